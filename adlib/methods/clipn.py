"""CLIPN (Wang et al., ICCV 2023): CLIP learns to say "no" for out-of-distribution detection.

``NoTextEncoder`` is the "no" text encoder with learnable no-prompts; ``itbo_loss`` and ``tso_loss`` are the
paper's image-text binary-opposite and text semantic-opposite losses, ``train_no_encoder`` trains them, and
``msp_score``, ``ctw_score`` (competing-to-win) and ``atd_score`` (agreeing-to-differ) score test images;
``ood_metrics`` gives AUROC and FPR95.

Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
"""
from __future__ import annotations

import copy
import io
import math
import os
from typing import Any, Callable, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from adlib.core.runtime import in_fresh_processes
from adlib.eval import metrics
from adlib.features.clip import CLASS_TEMPLATES, class_embeddings, tokenize, zero_shot_logits
from adlib.training.loop import FitSetup, RandomSteps, fit

# Hand-crafted negations in the spirit of the paper's baseline prompts (e.g. "a photo without {}"): what a frozen
# text encoder makes of "no" without being taught it.
NO_TEMPLATES: tuple[str, ...] = ("a photo without a {}.", "a photo with no {}.", "a photo of no {}.")

class NoTextEncoder(nn.Module):
    """CLIPN's "no" text encoder: a trainable copy of CLIP's text tower plus learnable no-prompts.

    Every parameter is trainable, whether or not the CLIP it copies was frozen before (a frozen source used
    to give frozen copies, so only the prompts trained).

    ``n_prompts`` prompt tensors of shape (L, width), initialised to zero, are added to the token and
    position embeddings (as the official code does). Training draws one of the ``n_prompts`` prompts or
    their mean per caption; inference uses the mean. ``forward``: (T, L) tokens -> (T, D) unit embeddings.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """

    def __init__(self, model: open_clip.CLIP, n_prompts: int = 16):
        super().__init__()
        if not hasattr(model, "token_embedding"):
            raise ValueError("NoTextEncoder needs an open_clip.CLIP with the built-in text tower "
                             "(CustomTextCLIP models keep it in model.text; use a CLIP-architecture model).")
        self.token_embedding = copy.deepcopy(model.token_embedding)
        self.positional_embedding = copy.deepcopy(model.positional_embedding)
        self.transformer = copy.deepcopy(model.transformer)
        self.ln_final = copy.deepcopy(model.ln_final)
        self.text_projection = copy.deepcopy(model.text_projection)
        self.register_buffer("attn_mask", model.attn_mask.clone(), persistent=False)
        self.pool_type = model.text_pool_type
        self.eos_token_id = getattr(model, "text_eos_id", None)
        length, width = model.positional_embedding.shape
        self.prompts = nn.Parameter(torch.zeros(n_prompts, length, width))
        self.requires_grad_(True)  # the copies train even when the source CLIP was frozen first

    def forward(self, tokens: torch.Tensor, prompt_index: torch.Tensor | None = None) -> torch.Tensor:
        """``prompt_index`` (T,) in [0, n_prompts]: which prompt each caption gets (n_prompts = the mean);
        None = the mean for all (inference)."""
        mean = self.prompts.mean(0, keepdim=True)
        prompt = mean if prompt_index is None else torch.cat([self.prompts, mean])[prompt_index]
        x = self.token_embedding(tokens) + self.positional_embedding + prompt
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        x = open_clip.transformer.text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_token_id)
        x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
        return F.normalize(x, dim=-1)

    @torch.no_grad()
    def encode(self, model: open_clip.CLIP, texts: Sequence[str], batch_size: int = 512) -> torch.Tensor:
        """(T,) strings -> (T, D) unit "no" embeddings with the mean prompt."""
        tokens = tokenize(list(texts), model)
        device = self.prompts.device
        return torch.cat([self(tokens[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(tokens), batch_size)])


def itbo_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, no_emb: torch.Tensor, logit_scale: float | torch.Tensor,
              positives: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-text binary-opposite loss: (loss_yes, loss_no).

    ``image_emb``, ``text_emb``, ``no_emb``: (N, D) unit embeddings of N image-caption pairs. For every
    pair (i, j) a two-way softmax over [s <I_i, T_j>, s <I_i, T^no_j>] gives p_yes and p_no. A matching
    pair should say "yes", every other pair "no": loss_yes = mean of -log p_yes over matches, loss_no =
    mean of -log p_no over non-matches. ``positives`` (N, N) bool marks matches (default: the diagonal,
    as in the paper, where captions of other images are assumed not to describe image i).

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    n = image_emb.shape[0]
    pos = torch.eye(n, dtype=torch.bool, device=image_emb.device) if positives is None else positives.bool()
    yes = logit_scale * image_emb @ text_emb.T
    no = logit_scale * image_emb @ no_emb.T
    log_p = torch.stack([yes, no], -1).log_softmax(-1)  # (N, N, 2)
    loss_yes = -log_p[..., 0][pos].mean()
    loss_no = -log_p[..., 1][~pos].mean() if (~pos).any() else log_p.new_zeros(())
    return loss_yes, loss_no


def tso_loss(text_emb: torch.Tensor, no_emb: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Text semantic-opposite loss: mean of 2 - ||t - t_no||_2 over (N, D) unit pairs, in [0, 2].

    Pushes each caption's "no" embedding away from its standard one (distance at most 2 on the unit
    sphere). ``eps`` under the square root avoids an infinite gradient at zero distance (official code).

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    dist = torch.sqrt(2 - 2 * (text_emb * no_emb).sum(-1) + eps)
    return (2 - dist).mean()


def clipn_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, no_emb: torch.Tensor, logit_scale: float | torch.Tensor,
               positives: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """CLIPN's training loss 0.5 * (ITBO yes + ITBO no + TSO) (the official weighting), with its parts.

    Used by: ``adlib.methods.clipn.train_no_encoder``.
    """
    loss_yes, loss_no = itbo_loss(image_emb, text_emb, no_emb, logit_scale, positives)
    loss_tso = tso_loss(text_emb, no_emb)
    return {"loss": 0.5 * (loss_yes + loss_no + loss_tso), "itbo_yes": loss_yes, "itbo_no": loss_no, "tso": loss_tso}


def train_no_encoder(
    model: open_clip.CLIP,
    no_encoder: NoTextEncoder,
    image_emb: torch.Tensor,
    captions: Sequence[str],
    *,
    steps: int = 300,
    log_every: int = 0,
    checkpoint: str | os.PathLike | None = None,
    budget_s: float | None = None,
    **options: Any,
) -> list[dict[str, float]]:
    """Train the "no" encoder (and its prompts) for ``steps`` with :func:`clipn_loss`; CLIP itself is not trained
    (its text embeddings are computed without gradients) and is left as it came: its ``requires_grad`` flags are not
    touched. ``options``: those of :func:`no_encoder_training` (batch size, learning rate, positives, seed).

    The loop is :func:`adlib.training.loop.fit` with one step per "epoch", so the history has one dict of losses per
    step (with its ``"epoch"`` = step number), ``log_every`` > 0 prints every that many steps, ``checkpoint`` saves
    after every step and resumes from the file, and ``budget_s`` (with a checkpoint) stops after that many seconds, to
    go on with the same call.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    setup = no_encoder_training(model, no_encoder, image_emb, captions, steps=steps, **options)
    no_encoder.train()
    try:
        return fit(setup.step, setup.loader, epochs=steps, checkpoint=checkpoint, state=setup.state,
                   seed=options.get("seed", 0), config=setup.config, progress=log_every > 0,
                   log_every=max(1, log_every), budget_s=budget_s)
    finally:
        no_encoder.eval()


def train_no_encoders(model: open_clip.CLIP, runs: Sequence[tuple[torch.Tensor, Sequence[str], np.ndarray | None, int]],
                      *, n_jobs: int = 1, **options: Any) -> list[tuple[NoTextEncoder, list[dict[str, float]]]]:
    """One "no" encoder per run, each trained by :func:`train_no_encoder` from a fresh copy of ``model``'s text tower:
    a run is ((N, D) unit image embeddings, N captions, the (N, N) boolean match matrix of image and caption or None
    for the diagonal, seed). ``options``: steps, batch size, learning rate. Returns (encoder, history) per run, in
    order. ``n_jobs`` > 1 trains that many at a time, each in its own process on one thread (``model`` is copied into
    each); the encoders are the same tensors as with ``n_jobs=1``.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    calls = [{"model": model, "image_emb": emb, "captions": list(captions), "match": match, "seed": seed} | options
             for emb, captions, match, seed in runs]
    done = [_trained_encoder(**call) for call in calls] if n_jobs == 1 else \
        in_fresh_processes(_trained_encoder, calls, n_jobs=n_jobs)
    out = []
    for state, history in done:
        encoder = NoTextEncoder(model)
        encoder.load_state_dict(torch.load(io.BytesIO(state)))
        out.append((encoder.eval(), history))
    return out


def _trained_encoder(model: open_clip.CLIP, image_emb: torch.Tensor, captions: list[str], match: np.ndarray | None,
                     seed: int, **options: Any) -> tuple[bytes, list[dict[str, float]]]:
    # the state as bytes: a tensor returned from a process that has ended cannot be received
    encoder = NoTextEncoder(model)
    positives = None if match is None else (lambda idx: torch.from_numpy(match[np.ix_(idx, idx)]))
    history = train_no_encoder(model, encoder, image_emb, captions, positives=positives, seed=seed, **options)
    state = io.BytesIO()
    torch.save(encoder.state_dict(), state)
    return state.getvalue(), history


def no_encoder_training(
    model: open_clip.CLIP,
    no_encoder: NoTextEncoder,
    image_emb: torch.Tensor,
    captions: Sequence[str],
    *,
    steps: int,
    steps_per_epoch: int = 1,
    batch_size: int = 128,
    lr: float = 3e-4,
    weight_decay: float = 0.2,
    positives: Callable[[np.ndarray], torch.Tensor] | None = None,
    seed: int = 0,
) -> FitSetup:
    """The "no" encoder's training of ``steps`` optimiser steps set up for :func:`adlib.training.loop.fit`, in
    epochs of ``steps_per_epoch`` steps.

    ``image_emb`` (N, D): the frozen CLIP's unit image embeddings of the N captioned images (computed
    once, since the image encoder is frozen); ``captions``: N strings. ``positives(batch_indices)``
    returns the (B, B) match matrix of a batch (default: the diagonal). Each step draws a random batch and a
    random prompt per caption (from :class:`adlib.training.loop.RandomSteps`' generator). The optimiser is the
    official one (AdamW, cosine schedule over ``steps``; see the code); a step logs its losses and the learning rate.

    Used by: ``adlib.methods.clipn.train_no_encoder``, ``adlib.recipes.clipn_caption.setup``.
    """
    if len(image_emb) != len(captions):
        raise ValueError(f"{len(image_emb)} image embeddings but {len(captions)} captions: give one caption per image.")
    tokens = tokenize(list(captions), model)
    with torch.no_grad():
        text_emb = torch.cat([model.encode_text(tokens[i:i + 512], normalize=True) for i in range(0, len(tokens), 512)])
    scale = model.logit_scale.exp().detach()
    # The official optimiser (src/training/main.py of xmed-lab/CLIPN): AdamW with betas (0.9, 0.98) and eps 1e-6,
    # weight decay on matrices only (not on gains, biases or layer norms), and a cosine schedule over all steps
    # without warm-up (run.sh leaves --warmup at 0). fused: one kernel per step for all parameters.
    groups: dict[bool, list[nn.Parameter]] = {True: [], False: []}  # decayed or not
    for n, p in no_encoder.named_parameters():
        if p.requires_grad:
            groups[not (p.ndim < 2 or "ln" in n or "bias" in n)].append(p)
    opt = torch.optim.AdamW([{"params": groups[False], "weight_decay": 0.0},
                             {"params": groups[True], "weight_decay": weight_decay}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    n_prompts = no_encoder.prompts.shape[0]

    def step(gen: torch.Generator) -> dict[str, float]:
        idx = torch.randperm(len(captions), generator=gen)[:batch_size].numpy()
        which = torch.randint(0, n_prompts + 1, (len(idx),), generator=gen)
        no_emb = no_encoder(tokens[idx], which)
        pos = positives(idx) if positives is not None else None
        parts = clipn_loss(image_emb[idx], text_emb[idx], no_emb, scale, pos)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        lr_used = opt.param_groups[0]["lr"]
        opt.step()
        schedule.step()
        return {k: v.item() for k, v in parts.items()} | {"lr": lr_used}

    if steps % steps_per_epoch:
        raise ValueError(f"steps ({steps}) must be a multiple of steps_per_epoch ({steps_per_epoch}).")
    return FitSetup(step, RandomSteps(steps_per_epoch, seed),
                    {"no_encoder": no_encoder, "optimizer": opt, "schedule": schedule},
                    {"positives": positives is not None, "steps": steps})


def yes_no_logits(model: open_clip.CLIP, no_encoder: NoTextEncoder, image_emb: torch.Tensor,
                  classnames: Sequence[str], templates: Sequence[str] = CLASS_TEMPLATES,
                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) unit image embeddings -> ((N, C) "yes" logits, (N, C) "no" logits) over the ID classes.

    Class embeddings average the templates for both encoders (as the official ``merge_yes_no_feature``);
    ``scale`` defaults to the model's temperature (the official ViT-B-16 evaluation uses 100).

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    scale = model.logit_scale.exp().item() if scale is None else scale
    yes = class_embeddings(model, classnames, templates)
    no = class_embeddings(model, classnames, templates, encode=lambda t: no_encoder.encode(model, t))
    return scale * image_emb @ yes.T, scale * image_emb @ no.T


def msp_score(logits_yes: torch.Tensor) -> np.ndarray:
    """MCM-style zero-shot OOD score: how little the most likely ID class claims an image. (N, C) -> (N,),
    higher = OOD.

    Returned as the log-odds log((1 - max softmax) / max softmax) = logsumexp of the other classes' logits minus
    the largest, in float64: a monotone transform of 1 - max softmax that does not round to ties (at CLIP's logit
    scale, ~100, a float32 softmax is often exactly 1).

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    logits = logits_yes.double()
    top = logits.argmax(-1, keepdim=True)
    others = logits.scatter(-1, top, float("-inf"))
    return (others.logsumexp(-1) - logits.gather(-1, top)[:, 0]).numpy()


def ctw_score(logits_yes: torch.Tensor, logits_no: torch.Tensor) -> np.ndarray:
    """Competing-to-win: how strongly the predicted (argmax "yes") class's "no" prompt beats its "yes" prompt.
    (N, C) x 2 -> (N,), higher = OOD.

    Returned as the logit difference no - yes of that class, float64: p_no = sigmoid(difference), so the ranking
    is that of p_no without its saturation; the paper's rule (OOD when p_no > 0.5) is difference > 0.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    pred = logits_yes.argmax(-1, keepdim=True)
    return (logits_no.double() - logits_yes.double()).gather(1, pred)[:, 0].numpy()


def atd_score(logits_yes: torch.Tensor, logits_no: torch.Tensor) -> np.ndarray:
    """Agreeing-to-differ: p_OOD = 1 - sum_c p_c * (1 - p_no_c), with p_c the ID softmax. (N,), higher = OOD.

    Since the p_c sum to 1, p_OOD = sum_c p_c * p_no_c; returned as log p_OOD = logsumexp_c(log p_c +
    log p_no_c) in float64, which keeps the ranking of images whose p_OOD is far below float precision. The
    paper's rule calls an image OOD when p_OOD exceeds every p_c * (1 - p_no_c).

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    yes, no = logits_yes.double(), logits_no.double()
    return (yes.log_softmax(-1) + F.logsigmoid(no - yes)).logsumexp(-1).numpy()


def handcrafted_no_logits(model: open_clip.CLIP, image_emb: torch.Tensor, classnames: Sequence[str],
                          templates: Sequence[str] = NO_TEMPLATES) -> torch.Tensor:
    """(N, C) "no" logits from negated prompts read by CLIP's own text encoder, no training: the paper's
    hand-crafted baseline ("a photo without {}.", ...), to compare with the learned "no" encoder.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    return zero_shot_logits(model, image_emb, class_embeddings(model, classnames, templates))


def ood_metrics(is_ood: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUROC and FPR95 in percent, as the CLIPN evaluation computes them.

    ``is_ood`` (N,) 1 for OOD; ``scores`` (N,) higher = more OOD. FPR95 is the fraction of OOD images
    accepted as ID at the threshold that keeps 95 % of ID images (ID is the positive class there).

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    y, s = metrics.check_labels_scores(is_ood, scores)
    return {"AUROC": 100 * metrics.image_auroc(y, s), "FPR95": 100 * metrics.fpr_at_tpr(1 - y, -s, 0.95)}

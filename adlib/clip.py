"""CLIP for anomaly and OOD detection: a tiny CLIP of the toy world, zero-shot scores, CLIPN.

Everything here works on an ``open_clip.CLIP`` model: the book's tiny CLIP (``load_tiny_clip``: trained
on :mod:`adlib.toyworld`, shipped as package data with a sha256) or a real one (``load_open_clip``:
ViT-B-16 and friends from a local file or a pretrained tag, for the paper profile).

* Encoding: ``tokenize``, ``to_tensor``, ``encode_images`` (global and patch embeddings), ``encode_texts``.
* Zero-shot classification: ``class_embeddings``, ``zero_shot_accuracy``.
* WinCLIP-style zero-shot anomaly detection: ``prompt_ensemble``, ``winclip_scores`` (image and patch level).
* CLIPN: ``NoTextEncoder`` (the "no" text encoder with learnable no-prompts), ``itbo_loss``, ``tso_loss``,
  ``train_no_encoder``, and the scores ``ctw_score``, ``atd_score``, ``msp_score``, ``ood_metrics``.
* Paper profile: ``load_open_clip`` (a file or a pretrained tag; offline it fails at once with a message),
  ``read_image_text_folder``, ``read_image_folder``, ``encode_image_files``.

For segmentation (chapter 10, AA-CLIP) ``encode_images`` returns the projected patch tokens of open_clip's
``VisionTransformer`` (its ``output_tokens`` switch) next to the global embedding.

Reproduce the shipped weights with ``python -m adlib.clip train-tiny --out adlib/weights/tiny_clip.pt``.

Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from adlib import toyworld

#: The tiny CLIP: a ViT with 8 x 8 patches on 64 px images and a small causal text transformer.
#: open_clip's BPE vocabulary (49408 tokens) is kept so the real tokenizer works unchanged.
#: ``conv_stem``: the ViT's patch embedding is a stack of stride-2 3x3 convolutions with these widths
#: (see :class:`ConvStem`) instead of one linear patch projection.
TINY_CONFIG: dict = {
    "embed_dim": 64,
    "conv_stem": [32, 64],
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TINY_WEIGHTS = WEIGHTS_DIR / "tiny_clip.pt"
TRAIN_COMMAND = "python -m adlib.clip train-tiny --out adlib/weights/tiny_clip.pt"
#: Toy-world settings of the tiny CLIP's training captions: defects rare (10 %) and mostly unnamed (10 % of those).
TINY_WORLD = {"defect_rate": 0.1, "name_defect_rate": 0.1, "image_size": 64}


# --------------------------------------------------------------------------- model, text, images


class ConvStem(nn.Sequential):
    """A convolutional patch embedding (Xiao et al. 2021, "Early convolutions help transformers see better").

    (N, 3, S, S) -> (N, width, S / patch, S / patch), like the ViT's linear patch projection it replaces,
    but through log2(patch) stride-2 3x3 convolutions: one per entry of ``channels`` (with batch norm and
    GELU), then a last one to ``width`` channels (plain, as the linear projection it replaces). Trained
    from scratch on a small data set, a ViT with a linear stem learnt the toy world's colours but not its
    shapes; with this stem it learns both.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """

    def __init__(self, patch: int, width: int, channels: Sequence[int]):
        n = int(math.log2(patch))
        if 2 ** n != patch or len(channels) != n - 1:
            raise ValueError(f"A conv stem needs a power-of-two patch and log2(patch) - 1 = {n - 1} widths, "
                             f"got patch {patch} and {list(channels)}.")
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.GELU()]
            c_in = c
        super().__init__(*layers, nn.Conv2d(c_in, width, 3, 2, 1))


def build_tiny_clip(config: dict | None = None) -> open_clip.CLIP:
    """A randomly initialised ``open_clip.CLIP`` of ``config`` (default :data:`TINY_CONFIG`).

    With a ``conv_stem`` entry the ViT's ``conv1`` (its patch projection) becomes a :class:`ConvStem`.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    cfg = copy.deepcopy(config or TINY_CONFIG)
    model = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    if cfg.get("conv_stem"):
        vision = cfg["vision_cfg"]
        model.visual.conv1 = ConvStem(vision["patch_size"], vision["width"], cfg["conv_stem"])
    return model


def context_length(model: open_clip.CLIP) -> int:
    """The number of text tokens ``model`` reads.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    return int(model.positional_embedding.shape[0])


def tokenize(texts: Sequence[str] | str, model: open_clip.CLIP) -> torch.Tensor:
    """open_clip's BPE tokenizer (offline) at the model's context length: (T,) strings -> (T, L) int64.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    return open_clip.tokenize(texts, context_length=context_length(model))


def image_size(model: open_clip.CLIP) -> int:
    """Side of the square images the model's ViT expects.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    return int(model.visual.image_size[0])


def to_tensor(images: np.ndarray, size: int | None = None) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, size, size) float, normalised with CLIP's mean and std.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"Expected (N, H, W, 3) uint8 images, got {images.shape} {images.dtype}.")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def encode_images(model: open_clip.CLIP, images: np.ndarray | torch.Tensor, batch_size: int = 256
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised global and patch embeddings in the joint space.

    ``images``: (N, H, W, 3) uint8 or an already normalised (N, 3, S, S) tensor. Returns
    ((N, D) global, (N, P, D) patches) where P = (S / patch)^2 in row-major order; patch tokens pass
    through the same final norm and projection as the class token (the way WinCLIP-style methods read
    them), so they can be compared with text embeddings.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    x = to_tensor(images, image_size(model)) if isinstance(images, np.ndarray) else images
    visual, device = model.visual, next(model.parameters()).device
    pooled_all, tokens_all = [], []
    before = visual.output_tokens
    visual.output_tokens = True  # open_clip's VisionTransformer then returns (pooled, tokens)
    try:
        for i in range(0, len(x), batch_size):
            pooled, tokens = visual(x[i:i + batch_size].to(device))
            if visual.proj is not None:
                tokens = tokens @ visual.proj
            pooled_all.append(F.normalize(pooled.float(), dim=-1).cpu())
            tokens_all.append(F.normalize(tokens.float(), dim=-1).cpu())
    finally:
        visual.output_tokens = before
    return torch.cat(pooled_all), torch.cat(tokens_all)


@torch.no_grad()
def encode_texts(model: open_clip.CLIP, texts: Sequence[str], batch_size: int = 512) -> torch.Tensor:
    """(T,) strings -> (T, D) L2-normalised text embeddings.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    device = next(model.parameters()).device
    tokens = tokenize(list(texts), model)
    out = [model.encode_text(tokens[i:i + batch_size].to(device), normalize=True).float().cpu()
           for i in range(0, len(tokens), batch_size)]
    return torch.cat(out)


# --------------------------------------------------------------------------- zero-shot classification

#: Prompt templates for zero-shot classification of toy objects (an ensemble, as CLIP does for ImageNet).
CLASS_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a {}.", "a picture of a {}.")


def class_embeddings(model: open_clip.CLIP, classnames: Sequence[str],
                     templates: Sequence[str] = CLASS_TEMPLATES,
                     encode: Callable[[Sequence[str]], torch.Tensor] | None = None) -> torch.Tensor:
    """(C,) class names -> (C, D) unit class embeddings: the mean of the normalised template embeddings.

    ``encode`` maps strings to (T, D) unit embeddings (default: the model's text encoder); CLIPN passes
    its "no" encoder here.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    encode = encode or (lambda texts: encode_texts(model, texts))
    prompts = [t.format(c) for c in classnames for t in templates]
    emb = encode(prompts).view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)


def zero_shot_logits(model: open_clip.CLIP, image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """(N, D) image and (C, D) class embeddings (unit) -> (N, C) logits scaled by the model's temperature.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    return model.logit_scale.exp().detach().float() * image_emb @ class_emb.T


def zero_shot_accuracy(model: open_clip.CLIP, images: np.ndarray, labels: np.ndarray, classnames: Sequence[str],
                       templates: Sequence[str] = CLASS_TEMPLATES) -> float:
    """Top-1 accuracy of zero-shot classification: (N, H, W, 3) uint8 images, (N,) labels indexing ``classnames``.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    image_emb, _ = encode_images(model, images)
    pred = (image_emb @ class_embeddings(model, classnames, templates).T).argmax(1).numpy()
    return float((pred == np.asarray(labels)).mean())


# --------------------------------------------------------------------------- WinCLIP-style zero-shot anomaly detection

#: WinCLIP's compositional prompt ensemble (Jeong et al. 2023, as in anomalib's ``winclip/prompting.py``):
#: every state is put into every template; the ensemble's mean embedding is the text anchor.
NORMAL_STATES: tuple[str, ...] = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw",
                                  "{} without defect", "{} without damage")
ANOMALOUS_STATES: tuple[str, ...] = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
WINCLIP_TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.", "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.",
    "a blurry photo of a {}.", "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.",
    "a photo of the small {}.", "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)


def prompt_ensemble(object_name: str) -> tuple[list[str], list[str]]:
    """WinCLIP's (normal prompts, anomalous prompts) for one object name: 7 x 21 and 4 x 21 strings.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    normal = [t.format(s.format(object_name)) for s in NORMAL_STATES for t in WINCLIP_TEMPLATES]
    anomalous = [t.format(s.format(object_name)) for s in ANOMALOUS_STATES for t in WINCLIP_TEMPLATES]
    return normal, anomalous


def text_anchors(model: open_clip.CLIP, object_name: str) -> torch.Tensor:
    """(2, D) unit text anchors [normal, anomalous]: the normalised mean of each ensemble's embeddings.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    normal, anomalous = prompt_ensemble(object_name)
    anchors = [F.normalize(encode_texts(model, p).mean(0), dim=-1) for p in (normal, anomalous)]
    return torch.stack(anchors)


def winclip_scores(model: open_clip.CLIP, images: np.ndarray, object_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot anomaly scores: ((N,) image scores, (N, H, W) pixel maps), both P(anomalous) in [0, 1].

    Image level: softmax over the [normal, anomalous] anchors of the global embedding, with the model's
    temperature. Patch level: the same for every projected patch token, upsampled bilinearly to the
    image size. WinCLIP proper scores sliding windows at several scales; reading patch tokens instead
    keeps the baseline cheap (one forward pass) and is what later token-based variants do.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    global_emb, patch_emb = encode_images(model, images)
    anchors = text_anchors(model, object_name)
    scale = model.logit_scale.exp().detach().float()
    image_scores = (scale * global_emb @ anchors.T).softmax(-1)[:, 1]
    patch = (scale * patch_emb @ anchors.T).softmax(-1)[..., 1]
    side = int(round(math.sqrt(patch.shape[1])))
    maps = F.interpolate(patch.view(-1, 1, side, side), size=images.shape[1:3], mode="bilinear", align_corners=False)
    return image_scores.numpy().astype(np.float64), maps[:, 0].numpy().astype(np.float64)


# --------------------------------------------------------------------------- CLIPN


class NoTextEncoder(nn.Module):
    """CLIPN's "no" text encoder: a trainable copy of CLIP's text tower plus learnable no-prompts.

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

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
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

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    dist = torch.sqrt(2 - 2 * (text_emb * no_emb).sum(-1) + eps)
    return (2 - dist).mean()


def clipn_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, no_emb: torch.Tensor, logit_scale: float | torch.Tensor,
               positives: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """CLIPN's training loss 0.5 * (ITBO yes + ITBO no + TSO) (the official weighting), with its parts.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
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
    batch_size: int = 128,
    lr: float = 3e-4,
    weight_decay: float = 0.1,
    positives: Callable[[np.ndarray], torch.Tensor] | None = None,
    seed: int = 0,
    log_every: int = 0,
) -> list[dict[str, float]]:
    """Train the "no" encoder (and its prompts) with :func:`clipn_loss`; CLIP itself stays frozen.

    ``image_emb`` (N, D): the frozen CLIP's unit image embeddings of the N captioned images (computed
    once, since the image encoder is frozen); ``captions``: N strings. ``positives(batch_indices)``
    returns the (B, B) match matrix of a batch (default: the diagonal). Returns one dict of losses per step.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    if len(image_emb) != len(captions):
        raise ValueError(f"{len(image_emb)} image embeddings but {len(captions)} captions: give one caption per image.")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    tokens = tokenize(list(captions), model)
    with torch.no_grad():
        text_emb = torch.cat([model.encode_text(tokens[i:i + 512], normalize=True) for i in range(0, len(tokens), 512)])
    scale = model.logit_scale.exp().detach()
    opt = torch.optim.AdamW([p for p in no_encoder.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    no_encoder.train()
    history = []
    n_prompts = no_encoder.prompts.shape[0]
    for step in range(steps):
        idx = torch.randperm(len(captions), generator=gen)[:batch_size]
        which = torch.randint(0, n_prompts + 1, (len(idx),), generator=gen)
        no_emb = no_encoder(tokens[idx], which)
        pos = positives(idx.numpy()) if positives is not None else None
        parts = clipn_loss(image_emb[idx], text_emb[idx], no_emb, scale, pos)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in parts.items()})
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  " + "  ".join(f"{k} {v:.3f}" for k, v in history[-1].items()))
    no_encoder.eval()
    return history


def yes_no_logits(model: open_clip.CLIP, no_encoder: NoTextEncoder, image_emb: torch.Tensor,
                  classnames: Sequence[str], templates: Sequence[str] = CLASS_TEMPLATES,
                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) unit image embeddings -> ((N, C) "yes" logits, (N, C) "no" logits) over the ID classes.

    Class embeddings average the templates for both encoders (as the official ``merge_yes_no_feature``);
    ``scale`` defaults to the model's temperature (the official ViT-B-16 evaluation uses 100).

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    scale = model.logit_scale.exp().item() if scale is None else scale
    yes = class_embeddings(model, classnames, templates)
    no = class_embeddings(model, classnames, templates, encode=lambda t: no_encoder.encode(model, t))
    return scale * image_emb @ yes.T, scale * image_emb @ no.T


def p_yes(logits_yes: torch.Tensor, logits_no: torch.Tensor) -> torch.Tensor:
    """(N, C) pairs of logits -> (N, C) probability that class c's "yes" prompt beats its "no" prompt.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    return torch.stack([logits_yes, logits_no], -1).softmax(-1)[..., 0]


def msp_score(logits_yes: torch.Tensor) -> np.ndarray:
    """MCM-style zero-shot OOD score: 1 - max softmax over the ID classes. (N, C) -> (N,), higher = OOD.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    return (1 - logits_yes.softmax(-1).amax(-1)).double().numpy()


def ctw_score(logits_yes: torch.Tensor, logits_no: torch.Tensor) -> np.ndarray:
    """Competing-to-win: 1 - p_yes of the predicted (argmax "yes") class. (N, C) x 2 -> (N,), higher = OOD.

    The paper's rule (OOD when the predicted class's "no" wins, p_no > 0.5) thresholds this score at 0.5.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    pred = logits_yes.argmax(-1, keepdim=True)
    return (1 - p_yes(logits_yes, logits_no).gather(1, pred)[:, 0]).double().numpy()


def atd_score(logits_yes: torch.Tensor, logits_no: torch.Tensor) -> np.ndarray:
    """Agreeing-to-differ: p_OOD = 1 - sum_c p_c * (1 - p_no_c), with p_c the ID softmax. (N,), higher = OOD.

    The paper's rule calls an image OOD when p_OOD exceeds every p_c * (1 - p_no_c).

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    probs = logits_yes.softmax(-1)
    return (1 - (probs * p_yes(logits_yes, logits_no)).sum(-1)).double().numpy()


def ood_metrics(is_ood: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUROC and FPR95 in percent, as the CLIPN evaluation computes them.

    ``is_ood`` (N,) 1 for OOD; ``scores`` (N,) higher = more OOD. FPR95 is the fraction of OOD images
    accepted as ID at the threshold that keeps 95 % of ID images (ID is the positive class there).

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    from adlib import metrics

    y, s = metrics.check_labels_scores(is_ood, scores)
    return {"AUROC": 100 * metrics.image_auroc(y, s), "FPR95": 100 * metrics.fpr_at_tpr(1 - y, -s, 0.95)}


# --------------------------------------------------------------------------- weights on disk


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_clip(model: open_clip.CLIP, path: str | os.PathLike, config: dict, meta: dict | None = None) -> str:
    """Save config + fp16 state dict to ``path`` and a sidecar ``path.json`` with its sha256; returns the sha256.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    buffer = io.BytesIO()  # torch.save names its archive after a file's name; a buffer keeps the bytes name-free
    torch.save({"config": config, "state_dict": state}, buffer)
    path.write_bytes(buffer.getvalue())
    sha = sha256_file(path)
    card = {"file": path.name, "sha256": sha, "bytes": path.stat().st_size, "config": config, **(meta or {})}
    path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return sha


def load_tiny_clip(path: str | os.PathLike | None = None, sha256: str | None = None) -> open_clip.CLIP:
    """Load a tiny CLIP saved by :func:`save_clip` (default: the shipped weights), in eval mode, fp32.

    The file's sha256 must equal ``sha256`` or, if not given, the one in the sidecar ``.json``.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    path = Path(path) if path is not None else TINY_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"No tiny CLIP weights at {path}. Train them with `{TRAIN_COMMAND}`.")
    if sha256 is None:
        card = path.with_suffix(".json")
        if not card.is_file():
            raise FileNotFoundError(f"{card} (the sha256 of {path.name}) is missing; pass sha256=... to load anyway.")
        sha256 = json.loads(card.read_text())["sha256"]
    actual = sha256_file(path)
    if actual != sha256:
        raise ValueError(f"{path} has sha256 {actual}, expected {sha256}: the file is corrupt or was replaced. "
                         f"Restore it from the repository or retrain with `{TRAIN_COMMAND}`.")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = build_tiny_clip(blob["config"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
    return model.eval()


def tiny_clip_card(path: str | os.PathLike | None = None) -> dict:
    """The sidecar metadata of saved tiny CLIP weights (sha256, config, training settings, accuracy).

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    path = Path(path) if path is not None else TINY_WEIGHTS
    return json.loads(path.with_suffix(".json").read_text())


def load_open_clip(name: str = "ViT-B-16", pretrained: str = "openai", device: str | torch.device = "cpu"
                   ) -> tuple[open_clip.CLIP, Callable]:
    """A real CLIP through ``open_clip.create_model_and_transforms``: (model in eval mode, test preprocess).

    ``pretrained`` is a local checkpoint file (an open_clip/OpenAI state dict) or a pretrained tag such
    as ``"openai"`` or ``"laion2b_s34b_b88k"``. With ``HF_HUB_OFFLINE=1`` (or no network) a tag that is
    not already in the Hugging Face cache stops at once with a message saying what to download.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    if name not in open_clip.list_models():
        raise ValueError(f"Unknown open_clip model {name!r}; see open_clip.list_models().")
    if not os.path.isfile(pretrained):
        tags = [t for m, t in open_clip.list_pretrained() if m == name]
        if pretrained not in tags:
            raise FileNotFoundError(f"{pretrained!r} is neither a file nor a pretrained tag of {name} ({tags}).")
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        if offline and not _in_hf_cache(cfg):
            raise FileNotFoundError(
                f"{name}/{pretrained} weights are not in the Hugging Face cache and HF_HUB_OFFLINE is set. "
                f"On a machine with internet run open_clip.create_model_and_transforms({name!r}, "
                f"pretrained={pretrained!r}) once (hub repo {cfg.get('hf_hub') or cfg.get('url')}), or pass "
                f"pretrained='/path/to/weights.bin' (a local state dict).")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    except RuntimeError as err:
        raise FileNotFoundError(f"Could not load {name} weights {pretrained!r}: {err}. Download them on a "
                                f"machine with internet, or pass a local file path.") from err
    return model.eval(), preprocess


def _in_hf_cache(cfg: dict) -> bool:
    """Whether a pretrained tag's weights are already in the local Hugging Face cache (no network)."""
    hub = cfg.get("hf_hub") or ""
    if not hub:
        return False
    from huggingface_hub import try_to_load_from_cache

    repo_id = "/".join(hub.strip("/").split("/")[:2])
    files = [hub.strip("/").split("/", 2)[2]] if hub.strip("/").count("/") >= 2 else [
        "open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in files)


# --------------------------------------------------------------------------- paper-profile data (files on disk)

_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".JPEG", ".webp")


def read_image_text_folder(root: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """An image-caption set on disk: every ``root/**/<name>.<jpg|png|...>`` with a ``<name>.txt`` caption.

    Returns (image paths, captions). This is how the paper profile points CLIPN at its training pairs
    (the paper uses CC3M; any subset exported as image + caption files works).

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    root = Path(root)
    pairs = sorted((p, p.with_suffix(".txt")) for p in root.rglob("*") if p.suffix in _IMAGE_EXT) if root.is_dir() else []
    pairs = [(img, txt) for img, txt in pairs if txt.is_file()]
    if not pairs:
        raise FileNotFoundError(
            f"No image-caption pairs under {root}. Put images there with a caption file of the same name "
            f"(e.g. 000.jpg + 000.txt), for instance a CC3M subset exported with img2dataset.")
    return [p for p, _ in pairs], [t.read_text().strip() for _, t in pairs]


def read_image_folder(root: str | os.PathLike, classnames_file: str | None = "classnames.txt"
                      ) -> tuple[list[Path], np.ndarray, list[str]]:
    """An ImageFolder tree ``root/<class>/*.jpg``: (image paths, (N,) labels, class names).

    Class names come from ``root/<classnames_file>`` (one readable name per line, in sorted folder
    order, as for ImageNet's wnid folders) when it exists, else from the folder names.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    paths, labels = [], []
    for k, folder in enumerate(folders):
        files = sorted(p for p in folder.iterdir() if p.suffix in _IMAGE_EXT)
        paths += files
        labels += [k] * len(files)
    if not paths:
        raise FileNotFoundError(f"No images in class folders under {root} (expected {root}/<class>/*.jpg). "
                                "Download the data set and unpack it there.")
    names = [f.name for f in folders]
    if classnames_file and (root / classnames_file).is_file():
        names = [line.strip() for line in (root / classnames_file).read_text().splitlines() if line.strip()]
        if len(names) != len(folders):
            raise ValueError(f"{root / classnames_file} has {len(names)} names for {len(folders)} class folders.")
    return paths, np.array(labels), names


@torch.no_grad()
def encode_image_files(model: open_clip.CLIP, preprocess: Callable, paths: Sequence[Path], batch_size: int = 128
                       ) -> torch.Tensor:
    """Image files -> (N, D) unit embeddings, with open_clip's preprocessing (paper profile).

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    from PIL import Image

    device = next(model.parameters()).device
    out = []
    for i in range(0, len(paths), batch_size):
        x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[i:i + batch_size]])
        out.append(model.encode_image(x.to(device), normalize=True).float().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------- training the tiny CLIP


def train_tiny_clip(
    out: str | os.PathLike,
    *,
    steps: int = 3000,
    batch_size: int = 128,
    n_pairs: int = 20_000,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: int = 50,
    seed: int = 0,
    n_eval: int = 1000,
    config: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train a tiny CLIP with the CLIP contrastive loss on toy-world image-caption pairs and save it.

    ``config``: the model (default :data:`TINY_CONFIG`; its ViT image size sets the toy images' size);
    ``log``: where progress lines go. Pairs come from ``toyworld.sample(n_pairs, seed, **TINY_WORLD)``
    (defects rare and mostly unnamed);
    the learning rate warms up linearly for ``warmup`` steps, then follows a cosine to zero; the logit
    scale is clamped at ln(100) as in CLIP. After training, zero-shot shape accuracy is measured on
    ``n_eval`` held-out scenes (seed + 1) and written with the sha256 into the sidecar json.
    Returns that metadata.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    config = copy.deepcopy(config or TINY_CONFIG)
    start = time.time()
    torch.manual_seed(seed)
    model = build_tiny_clip(config)
    size = config["vision_cfg"]["image_size"]
    world = dict(TINY_WORLD, image_size=size)
    data = toyworld.sample(n_pairs, seed, **world)
    images = to_tensor(data.images)
    tokens = tokenize(data.captions, model)
    log(f"generated {n_pairs} pairs in {time.time() - start:.0f} s")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    loss_fn = open_clip.ClipLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    running = 0.0
    for step in range(steps):
        idx = torch.randint(0, n_pairs, (batch_size,), generator=gen)
        img = model.encode_image(images[idx], normalize=True)
        txt = model.encode_text(tokens[idx], normalize=True)
        loss = loss_fn(img, txt, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
        if (step + 1) % max(1, steps // 20) == 0 or step + 1 == steps:
            log(f"step {step + 1}/{steps}  loss {running:.3f}  {time.time() - start:.0f} s")
    model.eval()
    held = toyworld.sample(n_eval, seed + 1, **world)
    acc = zero_shot_accuracy(model, held.images, held.labels, toyworld.SHAPES)
    meta = {
        "command": TRAIN_COMMAND,
        "train": {"steps": steps, "batch_size": batch_size, "n_pairs": n_pairs, "lr": lr, "weight_decay": weight_decay,
                  "warmup": warmup, "seed": seed, "world": world, "torch": torch.__version__,
                  "open_clip": open_clip.__version__, "seconds": round(time.time() - start, 1),
                  "threads": torch.get_num_threads()},
        "eval": {"n": n_eval, "seed": seed + 1, "zero_shot_shape_accuracy": round(acc, 4),
                 "templates": list(CLASS_TEMPLATES)},
    }
    meta["sha256"] = save_clip(model, out, config, meta)
    log(f"zero-shot shape accuracy on {n_eval} held-out scenes: {acc:.3f}; saved {out} (sha256 {meta['sha256'][:12]}...)")
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m adlib.clip train-tiny --out PATH [--steps N ...]``: (re)train the tiny CLIP.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``)
    """
    parser = argparse.ArgumentParser(prog="python -m adlib.clip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train-tiny", help="train the tiny CLIP on the toy world and save it with its sha256")
    p.add_argument("--out", required=True, help="output .pt file (a sidecar .json with the sha256 is written next to it)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--pairs", type=int, default=20_000)
    p.add_argument("--eval", type=int, default=1000, help="held-out scenes for the zero-shot accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 was fastest on the shared 2-core build machine (2 threads oversubscribe)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_tiny_clip(args.out, steps=args.steps, batch_size=args.batch_size, n_pairs=args.pairs, seed=args.seed,
                    n_eval=args.eval)
    return 0


if __name__ == "__main__":
    sys.exit(main())

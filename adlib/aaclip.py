"""AA-CLIP (Ma et al., CVPR 2025): making CLIP anomaly-aware with two-stage residual adapters.

CLIP's text embeddings of "a bottle" and "a damaged bottle" are nearly the same vector, so comparing
patch features with them localises defects poorly ("anomaly unawareness"). AA-CLIP keeps CLIP frozen
and adds small residual adapters,

    x <- lam * A(x) * |x| / |A(x)| + (1 - lam) * x,   lam = 0.1,

after the first few transformer blocks. Stage 1 trains adapters in the *text* encoder so the normal and
anomalous text anchors of an object separate (image-level classification, patch-level segmentation
against frozen CLIP features, and a disentangle loss on the anchors' inner product). Stage 2 freezes the
text side and trains adapters in the *image* encoder, with one projection per chosen layer, so that
multi-layer patch features line up with those anchors.

Everything runs on an ``open_clip.CLIP``: the book's tiny CLIP (:mod:`adlib.clip`) or the paper's
ViT-L-14-336 with OpenAI weights at 518 px (:func:`paper_clip`). Defaults are the official code's
(github.com/Mwxinnn/AA-CLIP: ``model/adapter.py``, ``train.py``, ``forward_utils.py``).

Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Callable, Iterable, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from adlib.clip import context_length, encode_images, image_size, load_open_clip, to_tensor
from adlib.train import IndexBatches, fit

#: The official prompt states and templates (``dataset/constants.py``): 3 x 2 normal, 5 x 2 anomalous prompts.
NORMAL_STATES: tuple[str, ...] = ("{}", "a {}", "the {}")
ANOMALOUS_STATES: tuple[str, ...] = ("a damaged {}", "a broken {}", "a {} with flaw", "a {} with defect",
                                     "a {} with damage")
TEMPLATES: tuple[str, ...] = ("{}.", "a photo of {}.")


def prompts(object_name: str) -> tuple[list[str], list[str]]:
    """AA-CLIP's (normal prompts, anomalous prompts) for one object name: 6 and 10 strings.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    normal = [t.format(s.format(object_name)) for s in NORMAL_STATES for t in TEMPLATES]
    anomalous = [t.format(s.format(object_name)) for s in ANOMALOUS_STATES for t in TEMPLATES]
    return normal, anomalous


@functools.lru_cache(maxsize=None)
def _prompt_tokens(object_name: str, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (normal, anomalous) prompts of one object, tokenised once: training asks for them at every step."""
    return tuple(open_clip.tokenize(texts, context_length=context_length) for texts in prompts(object_name))


# --------------------------------------------------------------------------- residual adapters


def residual_adapt(x: torch.Tensor, adapted: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    """AA-CLIP's residual update ``lam * a * |x| / |a| + (1 - lam) * x`` along the last dimension.

    ``x``, ``adapted`` (..., C) -> (..., C). Rescaling ``a`` to the norm of ``x`` bounds the change:
    ``|out| <= |x|`` (triangle inequality), with equality when ``a`` points along ``x``, whatever scale
    the adapter's weights have.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam is a mixing weight in [0, 1], got {lam}.")
    scaled = adapted * x.norm(dim=-1, keepdim=True) / adapted.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return lam * scaled + (1.0 - lam) * x


class Adapter(nn.Module):
    """The official ``SimpleAdapter``: a bias-free linear layer and a LeakyReLU, (..., C) -> (..., C).

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``)
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width, bias=False)
        nn.init.xavier_uniform_(self.fc.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.fc(x))


def _linear_from(proj: torch.Tensor | nn.Linear) -> nn.Linear:
    """A trainable bias-free copy of a CLIP projection (a (C, D) matrix used as ``x @ proj``, or a Linear)."""
    weight = proj.weight if isinstance(proj, nn.Linear) else proj.T
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight.detach())
    return layer


class AACLIP(nn.Module):
    """A frozen ``open_clip.CLIP`` with AA-CLIP's text adapters (stage 1) and image adapters (stage 2).

    Text: residual adapters after the first ``text_adapt_until`` blocks and a trainable projection.
    Image: residual adapters after the first ``image_adapt_until`` blocks; the patch tokens after the
    blocks in ``levels`` (1-based) go through ``ln_post`` and one trainable projection per level
    (segmentation); a separate projection of the last level, averaged over patches, is the image-level
    ("detection") feature. Defaults are the paper's for ViT-L-14 (24 image and 12 text blocks).

    One deliberate change from the official code: the trainable projections start as copies of CLIP's
    own projections (the official code draws them at random), so both stages start from CLIP's joint
    space; with the book's few hundred training steps that start matters.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """

    def __init__(
        self,
        clip: open_clip.CLIP,
        text_adapt_until: int = 3,
        image_adapt_until: int = 6,
        levels: Sequence[int] = (6, 12, 18, 24),
        text_adapt_weight: float = 0.1,
        image_adapt_weight: float = 0.1,
    ) -> None:
        super().__init__()
        if not isinstance(clip, open_clip.CLIP) or not hasattr(clip.visual, "_embeds"):
            raise ValueError("AACLIP needs an open_clip.CLIP with a ViT image tower (e.g. ViT-L-14-336, "
                             "or adlib.clip.build_tiny_clip()); CustomTextCLIP and ResNet towers are not supported.")
        n_text, n_image = len(clip.transformer.resblocks), len(clip.visual.transformer.resblocks)
        levels = tuple(sorted(set(int(i) for i in levels)))
        if not 0 <= text_adapt_until <= n_text or not 0 <= image_adapt_until <= n_image:
            raise ValueError(f"text_adapt_until must be in [0, {n_text}] and image_adapt_until in [0, {n_image}] "
                             f"for this CLIP, got {text_adapt_until} and {image_adapt_until}.")
        if not levels or levels[0] < 1 or levels[-1] > n_image:
            raise ValueError(f"levels are 1-based image block indices in [1, {n_image}], got {levels}.")
        if not clip.transformer.batch_first or not clip.visual.transformer.batch_first:
            raise ValueError("AACLIP expects open_clip's batch-first transformers (open_clip >= 2.23).")
        self.clip = clip.eval().requires_grad_(False)
        self.levels, self.text_lam, self.image_lam = levels, text_adapt_weight, image_adapt_weight
        width_t, width_v = clip.transformer.width, clip.visual.transformer.width
        self.text_adapters = nn.ModuleList(Adapter(width_t) for _ in range(text_adapt_until))
        self.text_proj = _linear_from(clip.text_projection)
        self.image_adapters = nn.ModuleList(Adapter(width_v) for _ in range(image_adapt_until))
        self.seg_proj = nn.ModuleList(_linear_from(clip.visual.proj) for _ in levels)
        self.det_proj = _linear_from(clip.visual.proj)

    def train(self, mode: bool = True) -> "AACLIP":
        super().train(mode)
        self.clip.eval()  # the backbone never leaves eval mode (no dropout, frozen statistics)
        return self

    def text_parameters(self) -> list[nn.Parameter]:
        """The stage-1 parameters: text adapters and text projection."""
        return [*self.text_adapters.parameters(), *self.text_proj.parameters()]

    def image_parameters(self) -> list[nn.Parameter]:
        """The stage-2 parameters: image adapters and the segmentation and detection projections."""
        return [*self.image_adapters.parameters(), *self.seg_proj.parameters(), *self.det_proj.parameters()]

    @property
    def logit_scale(self) -> float:
        """CLIP's temperature (100 for OpenAI CLIP, the constant of the official code)."""
        return float(self.clip.logit_scale.exp())

    def encode_text(self, tokens: torch.Tensor, adapt: bool = True) -> torch.Tensor:
        """(T, L) tokens -> (T, D) unit text embeddings; ``adapt=False`` is plain CLIP."""
        clip = self.clip
        if not adapt:
            return clip.encode_text(tokens, normalize=True)
        x = clip.token_embedding(tokens) + clip.positional_embedding
        for i, block in enumerate(clip.transformer.resblocks):
            x = block(x, attn_mask=clip.attn_mask)
            if i < len(self.text_adapters):
                x = residual_adapt(x, self.text_adapters[i](x), self.text_lam)
        x = text_global_pool(clip.ln_final(x), tokens, clip.text_pool_type,
                             eos_token_id=getattr(clip, "text_eos_id", None))
        return F.normalize(self.text_proj(x), dim=-1)

    def anchors(self, object_name: str, adapt: bool = True) -> torch.Tensor:
        """(2, D) unit text anchors [normal, anomalous] of one object: each the normalised mean of its prompts."""
        device = self.text_proj.weight.device
        out = []
        for tokens in _prompt_tokens(object_name, context_length(self.clip)):
            emb = self.encode_text(tokens.to(device), adapt)
            out.append(F.normalize(emb.mean(0), dim=-1))
        return torch.stack(out)

    def encode_image(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(N, 3, S, S) normalised images -> (per level (N, P, D) unit patch features, (N, D) image feature).

        The image feature is the official "detection" token: the patch mean of the unit-normalised
        projection of the last level (not renormalised).
        """
        visual = self.clip.visual
        x = visual._embeds(images)
        tokens = []
        for i, block in enumerate(visual.transformer.resblocks[: self.levels[-1]]):
            x = block(x)
            if i < len(self.image_adapters):
                x = residual_adapt(x, self.image_adapters[i](x), self.image_lam)
            if i + 1 in self.levels:
                tokens.append(visual.ln_post(x[:, 1:]))
        patches = [F.normalize(proj(t), dim=-1) for proj, t in zip(self.seg_proj, tokens)]
        image = F.normalize(self.det_proj(tokens[-1]), dim=-1).mean(1)
        return patches, image

    @torch.no_grad()
    def frozen_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1's image side from frozen CLIP: ((N, P, D) patch + class features, (N, D) class features).

        As the official code, every unit patch feature gets the unit class embedding added, so the
        patch-level loss also sees the image-level evidence.
        """
        image, patches = encode_images(self.clip, images)
        device = self.text_proj.weight.device
        return (patches + image[:, None]).to(device), image.to(device)


# --------------------------------------------------------------------------- losses


def disentangle_loss(anchors: torch.Tensor) -> torch.Tensor:
    """The official disentangle ("orthogonal") loss: the squared batch mean of <normal, anomalous>.

    ``anchors`` (B, 2, D) or (2, D) unit anchors [normal, anomalous] -> scalar ``(mean_b n_b . a_b)^2``.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    if anchors.dim() == 2:
        anchors = anchors[None]
    if anchors.dim() != 3 or anchors.shape[1] != 2:
        raise ValueError(f"anchors must be (B, 2, D) or (2, D) [normal, anomalous], got {tuple(anchors.shape)}.")
    return (anchors[:, 0] * anchors[:, 1]).sum(-1).mean() ** 2


def focal_loss(probs: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """The official focal loss on 2-class probability maps, averaged over pixels.

    ``probs`` (N, 2, H, W) [normal, anomalous] probabilities; ``mask`` (N, H, W) in {0, 1}. With the
    smoothed one-hot target (``1 - smooth`` / ``smooth``), ``p_t = (1 - smooth) p_true + smooth p_other
    + smooth`` and the loss is ``-(1 - p_t)^gamma log p_t``.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    target = F.one_hot(mask.long(), 2).permute(0, 3, 1, 2).to(probs.dtype).clamp(smooth, 1.0 - smooth)
    pt = (target * probs).sum(1) + smooth
    return (-((1.0 - pt) ** gamma) * pt.log()).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary dice loss with smoothing 1: ``1 - mean_n (2 sum(p t) + 1) / (sum p + sum t + 1)``; (N, H, W) each.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    p, t = pred.flatten(1), target.flatten(1).to(pred.dtype)
    return 1.0 - ((2.0 * (p * t).sum(1) + 1.0) / (p.sum(1) + t.sum(1) + 1.0)).mean()


def segmentation_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Official patch-level loss: focal + dice(normal map, 1 - mask) + dice(anomalous map, mask).

    ``probs`` (N, 2, H, W) probabilities, ``mask`` (N, H, W) in {0, 1} -> scalar.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    mask = mask.to(probs.dtype)
    return focal_loss(probs, mask) + dice_loss(probs[:, 0], 1.0 - mask) + dice_loss(probs[:, 1], mask)


def similarity_logits(patches: torch.Tensor, anchors: torch.Tensor, scale: float) -> torch.Tensor:
    """(N, P, D) patch features and (N, 2, D) or (2, D) anchors -> (N, 2, g, g) logits ``scale * cos``, g^2 = P.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``)
    """
    anchors = anchors.expand(len(patches), -1, -1) if anchors.dim() == 2 else anchors
    logits = scale * torch.einsum("npd,nkd->nkp", patches, anchors)
    side = int(round(math.sqrt(patches.shape[1])))
    if side * side != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patches do not form a square grid.")
    return logits.reshape(len(patches), 2, side, side)


def similarity_probs(patches: torch.Tensor, anchors: torch.Tensor, scale: float, size: int) -> torch.Tensor:
    """Training maps as the official code: logits upsampled (bilinear) to ``size``, then softmax -> (N, 2, size, size).

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``)
    """
    logits = F.interpolate(similarity_logits(patches, anchors, scale), size=(size, size), mode="bilinear",
                           align_corners=True)
    return logits.softmax(1)


# --------------------------------------------------------------------------- training


def _check_training_data(images: np.ndarray | torch.Tensor, masks: np.ndarray | torch.Tensor,
                         labels: np.ndarray | torch.Tensor, names: Sequence[str]) -> None:
    n = len(images)
    if not (len(masks) == len(labels) == len(names) == n) or n == 0:
        raise ValueError(f"images, masks, labels and names need one entry per sample, got "
                         f"{n}, {len(masks)}, {len(labels)}, {len(names)}.")
    if images.ndim != 4 or masks.ndim != 3:
        raise ValueError(f"Expected images (N, H, W, 3) uint8 or (N, 3, S, S) normalised and masks (N, H, W), "
                         f"got {tuple(images.shape)} and {tuple(masks.shape)}.")


def _batch_images(model: AACLIP, images, idx: np.ndarray) -> torch.Tensor:
    """(B, 3, S, S) normalised images of one batch on the model's device.

    Converting per batch keeps a large training set (VisA at 518 px) in uint8 until it is used."""
    x = images[idx]
    x = to_tensor(x, image_size(model.clip)) if isinstance(x, np.ndarray) else x
    return x.to(model.text_proj.weight.device)


def _batch_targets(model: AACLIP, masks, labels, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W) float masks and (B,) int64 labels of one batch on the model's device."""
    device = model.text_proj.weight.device
    return torch.as_tensor(masks[idx]).float().to(device), torch.as_tensor(labels[idx]).long().to(device)


def train_text_adapters(
    model: AACLIP,
    images: np.ndarray | torch.Tensor,
    masks: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    names: Sequence[str],
    *,
    epochs: int = 5,
    lr: float = 1e-5,
    batch_size: int = 16,
    disentangle_weight: float = 0.1,
    image_loss: bool = False,
    feature_cache_bytes: int = 2**30,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Stage 1: train the text adapters against frozen CLIP image features; returns the history of
    :func:`adlib.train.fit` (``{"epoch", "loss"}`` per epoch; ``checkpoint``: resume after an interruption).

    ``images`` (N, H, W, 3) uint8 or (N, 3, S, S) normalised, ``masks`` (N, H, W) in {0, 1} at the
    model's input size, ``labels`` (N,) 0 = normal, 1 = anomalous, ``names`` the object name of each
    image. Per batch, as the official ``train_text_adapter``: the segmentation loss of the (patch + class)
    features against the anchors (last layer) and ``disentangle_weight`` times the disentangle loss;
    ``image_loss=True`` adds the image-level cross-entropy of the class embedding against the two anchors that
    the paper's text describes. Adam with betas (0.5, 0.999); the defaults are the official code's values.
    The frozen image features are computed once when all of them fit in ``feature_cache_bytes`` (the toy world's),
    else per batch (VisA at 518 px): the image tower is frozen and stage 1 has no augmentation, so both give the
    same features.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    _check_training_data(images, masks, labels, names)
    scale, size = model.logit_scale, masks.shape[-1]
    frozen = _frozen_features_once(model, images, feature_cache_bytes)

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        mask, label = _batch_targets(model, masks, labels, idx)
        if frozen is None:
            patches, image_emb = model.frozen_features(_batch_images(model, images, idx))
        else:
            patches, image_emb = frozen[0][idx], frozen[1][idx]
        batch_names = [names[i] for i in idx]
        per_name = {n: model.anchors(n) for n in dict.fromkeys(batch_names)}
        anchors = torch.stack([per_name[n] for n in batch_names])  # (B, 2, D)
        probs = similarity_probs(patches, anchors, scale, size)
        loss = segmentation_loss(probs, mask)
        if image_loss:
            loss = F.cross_entropy(scale * torch.einsum("nd,nkd->nk", image_emb, anchors), label) + loss
        return loss + disentangle_weight * disentangle_loss(anchors)

    return _train_epochs(model, model.text_parameters(), batch_loss, len(images), epochs, lr, batch_size, seed,
                         f"text adapters (image loss {image_loss}, disentangle {disentangle_weight})", checkpoint,
                         progress)


def _frozen_features_once(model: AACLIP, images, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stage 1's frozen (patch + class, class) features of every training image, or None when they exceed
    ``max_bytes`` (measured on the first image)."""
    n = len(images)
    first, _ = model.frozen_features(_batch_images(model, images, np.arange(1)))
    if n * first.numel() * first.element_size() > max_bytes:
        return None
    parts = [model.frozen_features(_batch_images(model, images, np.arange(i, min(i + 256, n))))
             for i in range(0, n, 256)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def train_image_adapters(
    model: AACLIP,
    images: np.ndarray | torch.Tensor,
    masks: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    names: Sequence[str],
    *,
    epochs: int = 20,
    lr: float = 5e-4,
    batch_size: int = 2,
    seed: int = 0,
    adapted_anchors: bool = True,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Stage 2: train the image adapters and projections with the text anchors fixed; the history as stage 1.

    Inputs as :func:`train_text_adapters`. The anchors (stage-1 text encoder; with ``adapted_anchors=False``
    plain CLIP's, the ablation "stage 2 alone") are computed once, without gradients. Loss, as the official
    code: cross-entropy of the detection feature's inner products with the anchors (no temperature) plus the
    segmentation loss of every level's patch features.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    _check_training_data(images, masks, labels, names)
    with torch.no_grad():
        per_name = {n: model.anchors(n, adapted_anchors) for n in dict.fromkeys(names)}
    scale, size = model.logit_scale, masks.shape[-1]

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        anchors = torch.stack([per_name[names[i]] for i in idx])
        mask, label = _batch_targets(model, masks, labels, idx)
        patches, image_feat = model.encode_image(_batch_images(model, images, idx))
        loss = F.cross_entropy(torch.einsum("nd,nkd->nk", image_feat, anchors), label)
        for level in patches:
            loss = loss + segmentation_loss(similarity_probs(level, anchors, scale, size), mask)
        return loss

    return _train_epochs(model, model.image_parameters(), batch_loss, len(images), epochs, lr, batch_size, seed,
                         "image adapters", checkpoint, progress)


def _train_epochs(model: AACLIP, parameters: Iterable[torch.nn.Parameter],
                  batch_loss: Callable[[np.ndarray], torch.Tensor], n: int, epochs: int, lr: float, batch_size: int,
                  seed: int, stage: str, checkpoint: str | os.PathLike | None, progress: bool
                  ) -> list[dict[str, float]]:
    """The loop both stages share, through :func:`adlib.train.fit`: Adam with betas (0.5, 0.999) as the official
    code, seeded shuffled batches of indices into the n training images (:class:`adlib.train.IndexBatches`),
    ``batch_loss(idx)`` per batch. With ``checkpoint`` it saves the trained parameters and the optimiser after
    every epoch and resumes from the file. Returns fit's history: one ``{"epoch", "loss"}`` per epoch."""
    trained = torch.nn.ParameterList(parameters)  # the same tensors: only they go into a checkpoint
    optimizer = torch.optim.Adam(trained.parameters(), lr=lr, betas=(0.5, 0.999))

    def step(idx: np.ndarray) -> dict[str, float]:
        loss = batch_loss(idx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    model.train()
    try:
        return fit(step, IndexBatches(n, batch_size, seed), epochs=epochs, checkpoint=checkpoint,
                   state={stage: trained, "optimizer": optimizer}, seed=seed, config={"stage": stage},
                   progress=progress)
    finally:
        model.eval()


# --------------------------------------------------------------------------- scoring


def _anomaly_map(patches: torch.Tensor, anchors: torch.Tensor, scale: float, size: int, sigma: float) -> torch.Tensor:
    """(N, P, D) -> (N, size, size): the logit difference anomalous - normal per patch, as the official test code,
    smoothed on the patch grid and upsampled."""
    logits = similarity_logits(patches, anchors, scale)
    diff = logits[:, 1:] - logits[:, :1]
    if sigma > 0:
        # The official code blurs on the patch grid (kernel 7, sigma 1 for industrial images).
        diff = gaussian_blur(diff, kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=sigma)
    return F.interpolate(diff, size=(size, size), mode="bilinear", align_corners=True)[:, 0]


@torch.no_grad()
def anomaly_scores(
    model: AACLIP,
    images: np.ndarray | torch.Tensor,
    object_name: str,
    stage: int = 2,
    *,
    sigma: float = 1.0,
    batch_size: int = 64,
    adapted_anchors: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot scores of one object's images, as the official test code: ((N,) image scores in [0, 1],
    (N, H, W) pixel maps).

    ``images``: (N, H, W, 3) uint8 or normalised (N, 3, S, S). ``stage=1``: frozen CLIP (patch + class)
    features against the stage-1 anchors; ``stage=2``: the adapted image encoder, the sum of the per-level
    maps. ``adapted_anchors=False`` scores against plain CLIP's anchors (for a model whose stage 2 was trained
    with them). A level's pixel map is the logit difference anomalous - normal of each patch (CLIP's
    temperature times the difference of the two cosines), blurred with ``sigma`` on the patch grid and
    upsampled to the image size. The image score is (<image feature, anomalous anchor> + 1) / 2.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 (adapted text only) or 2 (text and image adapters), got {stage}.")
    size = images.shape[1] if isinstance(images, np.ndarray) else images.shape[-1]
    x = to_tensor(images, image_size(model.clip)) if isinstance(images, np.ndarray) else images
    device, scale = model.text_proj.weight.device, model.logit_scale
    model.eval()
    anchors = model.anchors(object_name, adapted_anchors)
    scores, maps = [], []
    for i in range(0, len(x), batch_size):
        batch = x[i:i + batch_size].to(device)
        if stage == 1:
            patches, image = model.frozen_features(batch)
            levels = [patches]
        else:
            levels, image = model.encode_image(batch)
        maps.append(torch.stack([_anomaly_map(p, anchors, scale, size, sigma) for p in levels]).sum(0))
        scores.append((image @ anchors[1] + 1) / 2)
    return torch.cat(scores).cpu().double().numpy(), torch.cat(maps).cpu().double().numpy()


def anchor_similarity(model: AACLIP, object_names: Sequence[str], adapt: bool = True) -> np.ndarray:
    """(2C, 2C) cosine similarities of the anchors [name_1 normal, name_1 anomalous, name_2 normal, ...].

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    with torch.no_grad():
        anchors = torch.cat([model.anchors(n, adapt) for n in object_names])
    return (anchors @ anchors.T).cpu().double().numpy()


# --------------------------------------------------------------------------- data and the paper's model


def few_shot_indices(labels: np.ndarray, groups: Sequence[str], k: int | None, seed: int = 0) -> np.ndarray:
    """Indices of a k-shot training set: ``k`` normal and ``k`` anomalous samples (1:1) per group.

    ``labels`` (N,) 0/1, ``groups`` (N,) category of each sample; ``k=None`` keeps everything ("full").
    Sorted, deterministic in ``seed``.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    if len(labels) != len(groups):
        raise ValueError(f"labels and groups need the same length, got {len(labels)} and {len(groups)}.")
    if k is None:
        return np.arange(len(labels))
    if k < 1:
        raise ValueError(f"k must be a positive number of shots or None for the full set, got {k}.")
    rng = np.random.default_rng(seed)
    chosen = []
    for group in sorted(set(groups.tolist())):
        for label in (0, 1):
            pool = np.flatnonzero((groups == group) & (labels == label))
            if len(pool) < k:
                raise ValueError(f"Group {group!r} has {len(pool)} samples with label {label}, fewer than k={k}; "
                                 f"lower k or add data.")
            chosen.append(rng.choice(pool, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


def resize_input(clip: open_clip.CLIP, image_size: int) -> open_clip.CLIP:
    """Let a ViT CLIP read ``image_size`` px images by interpolating its position embeddings (in place).

    The paper runs ViT-L-14-336 at 518 px (37 x 37 patches); open_clip's ``resize_pos_embed`` does the
    bicubic interpolation.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    visual = clip.visual
    patch = visual.patch_size[0]
    if image_size % patch:
        raise ValueError(f"image_size must be a multiple of the patch size {patch}, got {image_size}.")
    old = {"visual.positional_embedding": visual.positional_embedding.data}
    visual.image_size = (image_size, image_size)
    visual.grid_size = (image_size // patch, image_size // patch)
    open_clip.model.resize_pos_embed(old, clip)
    visual.positional_embedding = nn.Parameter(old["visual.positional_embedding"],
                                               requires_grad=visual.positional_embedding.requires_grad)
    return clip


def paper_clip(name: str = "ViT-L-14-336", pretrained: str = "openai", image_size: int = 518,
               device: str | torch.device = "cpu") -> open_clip.CLIP:
    """The paper's backbone: ``name`` with ``pretrained`` weights (a tag or a local file) at ``image_size`` px.

    Loading goes through :func:`adlib.clip.load_open_clip`, which stops with a clear message when the
    weights are not available offline.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    model, _ = load_open_clip(name, pretrained, device)
    return resize_input(model, image_size)

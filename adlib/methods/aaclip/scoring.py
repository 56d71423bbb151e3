"""AA-CLIP's scores: patch-to-anchor similarities, anomaly maps and image scores."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from adlib.data.imageset import ImageSet
from adlib.features.clip import class_embeddings, image_size, to_tensor, tokenize
from adlib.methods.aaclip.adapters import AACLIP


def similarity_logits(patches: torch.Tensor, anchors: torch.Tensor, scale: float) -> torch.Tensor:
    """(N, P, D) patch features and (N, 2, D) or (2, D) anchors -> (N, 2, g, g) logits ``scale * cos``, g^2 = P.

    Used by: ``adlib.methods.aaclip.scoring.similarity_probs``.
    """
    anchors = anchors.expand(len(patches), -1, -1) if anchors.dim() == 2 else anchors
    logits = scale * torch.einsum("npd,nkd->nkp", patches, anchors)
    side = int(round(math.sqrt(patches.shape[1])))
    if side * side != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patches do not form a square grid.")
    return logits.reshape(len(patches), 2, side, side)


def similarity_probs(patches: torch.Tensor, anchors: torch.Tensor, scale: float, size: int) -> torch.Tensor:
    """Training maps as the official code: logits upsampled (bilinear) to ``size``, then softmax -> (N, 2, size, size).

    Used by: ``adlib.methods.aaclip.training.stage2_loss``.
    """
    logits = F.interpolate(similarity_logits(patches, anchors, scale), size=(size, size), mode="bilinear",
                           align_corners=True)
    return logits.softmax(1)


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
    images: ImageSet | np.ndarray | torch.Tensor,
    object_name: str,
    stage: int = 2,
    *,
    sigma: float = 1.0,
    batch_size: int = 64,
    adapted_anchors: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot scores of one object's images, as the official test code: ((N,) image scores in [0, 1],
    (N, H, W) pixel maps).

    ``images``: an :class:`adlib.data.imageset.ImageSet` or float (N, 3, H, W) in [0, 1], through CLIP's
    preprocessing (:func:`adlib.features.clip.to_tensor`) one batch at a time. ``stage=1``: frozen CLIP
    (patch + class) features against the stage-1 anchors; ``stage=2``: the adapted image encoder, the sum of the
    per-level maps. ``adapted_anchors=False`` scores against plain CLIP's anchors (for a model whose stage 2 was
    trained with them). A level's pixel map is the logit difference anomalous - normal of each patch (CLIP's
    temperature times the difference of the two cosines), blurred with ``sigma`` on the patch grid and
    upsampled to the image size. The image score is (<image feature, anomalous anchor> + 1) / 2.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 (adapted text only) or 2 (text and image adapters), got {stage}.")
    x = images.images if isinstance(images, ImageSet) else images
    size = x.shape[-1]
    device, scale = model.text_proj.weight.device, model.logit_scale
    model.eval()
    anchors = model.anchors(object_name, adapted_anchors)
    scores, maps = [], []
    for i in range(0, len(x), batch_size):
        batch = to_tensor(x[i:i + batch_size], image_size(model.clip)).to(device)
        if stage == 1:
            patches, image = model.frozen_features(batch)
            levels = [patches]
        else:
            levels, image = model.encode_image(batch)
        maps.append(torch.stack([_anomaly_map(p, anchors, scale, size, sigma) for p in levels]).sum(0))
        scores.append((image @ anchors[1] + 1) / 2)
    return torch.cat(scores).cpu().double().numpy(), torch.cat(maps).cpu().double().numpy()


class ScoreRange(NamedTuple):
    """The (min, max) of detection scores and of map values that :func:`fused_image_scores` normalises with.

    Used by: ``adlib.methods.aaclip.scoring.fused_image_scores``.
    """

    image: tuple[float, float]
    pixel: tuple[float, float]

    @classmethod
    def of(cls, image_scores: np.ndarray, maps: np.ndarray) -> ScoreRange:
        """The range of (N,) detection scores and (N, H, W) maps."""
        return cls((float(image_scores.min()), float(image_scores.max())), (float(maps.min()), float(maps.max())))


def fused_image_scores(image_scores: np.ndarray, maps: np.ndarray, reference: ScoreRange | None = None
                       ) -> np.ndarray:
    """The official image score (``metrics_eval`` in ``forward_utils.py`` of the AA-CLIP code, industrial data):
    0.5 x the maximum of the min-max normalised map + 0.5 x the min-max normalised detection score, from
    :func:`anomaly_scores`' ((N,) image scores, (N, H, W) maps). ``reference``: the ranges to normalise with; None
    takes them from these images, as the official code does with each test class (test-set statistics).

    Used by: ``adlib.methods.aaclip.scoring.fused_scorer``.
    """
    (i_lo, i_hi), (p_lo, p_hi) = reference or ScoreRange.of(image_scores, maps)
    peaks = (maps.reshape(len(maps), -1).max(axis=1) - p_lo) / max(p_hi - p_lo, 1e-12)
    return 0.5 * peaks + 0.5 * (image_scores - i_lo) / max(i_hi - i_lo, 1e-12)


def fused_scorer(model: AACLIP, stage: int, reference: ImageSet | None, *, sigma: float = 1.0,
                 adapted_anchors: bool = True) -> Callable[[ImageSet, str], tuple[np.ndarray, np.ndarray]]:
    """A scorer for :func:`adlib.eval.tables.per_object`: ``(images, object name) -> (fused image scores, maps)``,
    :func:`anomaly_scores` with the image score of :func:`fused_image_scores`. ``reference``: a set whose *normal*
    images (each scored with its own object's name) give the normalising ranges, e.g. the training objects', so no
    test statistic enters; None normalises with each scored set's own range, as the official code.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    def score(images: ImageSet, name: str) -> tuple[np.ndarray, np.ndarray]:
        return anomaly_scores(model, images, name, stage, sigma=sigma, adapted_anchors=adapted_anchors)

    fixed = None
    if reference is not None:
        normal = reference[reference.labels == 0]
        names = np.array(normal.objects)
        parts = [score(normal[names == name], name) for name in dict.fromkeys(normal.objects)]
        fixed = ScoreRange.of(np.concatenate([s for s, _ in parts]), np.concatenate([m for _, m in parts]))

    def scored(images: ImageSet, name: str) -> tuple[np.ndarray, np.ndarray]:
        image_scores, maps = score(images, name)
        return fused_image_scores(image_scores, maps, fixed), maps

    return scored


def object_predictions(model: AACLIP, images: ImageSet, names: Sequence[str], adapt: bool = True,
                       batch_size: int = 64) -> np.ndarray:
    """Zero-shot object classification of ``images`` among ``names`` (CLIP's class templates): (N,) indices into
    ``names``. ``adapt=True`` reads both adapted encoders (the text adapters and projection, and the adapted image
    encoder's detection feature), ``adapt=False`` plain CLIP. AA-CLIP's residual design should keep what CLIP knows
    about objects, so the two should agree about as often as CLIP is right.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    model.eval()
    device = model.text_proj.weight.device

    def encode(texts: Sequence[str]) -> torch.Tensor:
        return model.encode_text(tokenize(list(texts), model.clip).to(device), adapt)

    with torch.no_grad():
        classes = class_embeddings(model.clip, names, encode=encode)
        feats = []
        for i in range(0, len(images), batch_size):
            batch = to_tensor(images.images[i:i + batch_size], image_size(model.clip)).to(device)
            feats.append(model.encode_image(batch)[1] if adapt else model.frozen_features(batch)[1])
    return (F.normalize(torch.cat(feats), dim=-1) @ classes.T).argmax(1).cpu().numpy()


def anchor_similarity(model: AACLIP, object_names: Sequence[str], adapt: bool = True) -> np.ndarray:
    """(2C, 2C) cosine similarities of the anchors [name_1 normal, name_1 anomalous, name_2 normal, ...].

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    with torch.no_grad():
        anchors = torch.cat([model.anchors(n, adapt) for n in object_names])
    return (anchors @ anchors.T).cpu().double().numpy()


def same_object_cosine(sim: np.ndarray) -> np.ndarray:
    """(C,) cos(normal, anomalous) of each object's anchors, from a (2C, 2C) :func:`anchor_similarity` matrix.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    return np.array([sim[2 * i, 2 * i + 1] for i in range(len(sim) // 2)])


def anchor_stats(sim: np.ndarray) -> dict[str, float]:
    """Two means of a (2C, 2C) :func:`anchor_similarity` matrix: cos(normal, anomalous) of the same object (how
    anomaly-aware the anchors are) and cos(normal, normal) of two different objects (how well they tell objects
    apart), by those names.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    c = len(sim) // 2
    same = np.mean(same_object_cosine(sim))
    other = np.mean([sim[2 * i, 2 * j] for i in range(c) for j in range(c) if i != j])
    return {"cos(normal, anomalous), same object": same, "cos(normal, normal), different objects": other}

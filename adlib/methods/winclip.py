"""WinCLIP-style zero-shot anomaly detection with any CLIP: compositional prompt ensembles as text anchors,
image scores from the global embedding and maps from the patch tokens.

Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import torch
import torch.nn.functional as F

from adlib.data.imageset import ImageSet
from adlib.eval.metrics import image_auroc
from adlib.features.clip import encode_images, encode_texts, load_open_clip, load_tiny_clip, patch_maps
from adlib.methods.base import PatchScores, ZeroShotDetector

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

    Used by: ``adlib.methods.winclip.text_anchors``.
    """
    normal = [t.format(s.format(object_name)) for s in NORMAL_STATES for t in WINCLIP_TEMPLATES]
    anomalous = [t.format(s.format(object_name)) for s in ANOMALOUS_STATES for t in WINCLIP_TEMPLATES]
    return normal, anomalous


def text_anchors(model: open_clip.CLIP, object_name: str) -> torch.Tensor:
    """(2, D) unit text anchors [normal, anomalous]: the normalised mean of each ensemble's embeddings.

    Used by: ``adlib.methods.winclip.winclip_scores``.
    """
    normal, anomalous = prompt_ensemble(object_name)
    anchors = [F.normalize(encode_texts(model, p).mean(0), dim=-1) for p in (normal, anomalous)]
    return torch.stack(anchors)


def winclip_scores(model: open_clip.CLIP, images: ImageSet | np.ndarray | torch.Tensor, object_name: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot anomaly scores of an :class:`adlib.data.imageset.ImageSet` (or float (N, 3, H, W) images in
    [0, 1]): ((N,) image scores, (N, H, W) pixel maps), both P(anomalous) in [0, 1], float64.

    Image level: softmax over the [normal, anomalous] anchors of the global embedding, with the model's
    temperature. Patch level: the same for every projected patch token, upsampled bilinearly to the
    image size. WinCLIP proper scores sliding windows at several scales; reading patch tokens instead
    keeps the baseline cheap (one forward pass) and is what later token-based variants do.

    Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
    """
    size = images.size if isinstance(images, ImageSet) else tuple(images.shape[-2:])
    global_emb, patch_emb = encode_images(model, images)
    anchors = text_anchors(model, object_name)
    scale = model.logit_scale.exp().detach().float()
    image_scores = (scale * global_emb @ anchors.T).softmax(-1)[:, 1]
    maps = patch_maps((scale * patch_emb @ anchors.T).softmax(-1)[..., 1], size)
    return image_scores.numpy().astype(np.float64), maps.numpy().astype(np.float64)


def anomaly_awareness(model: open_clip.CLIP, images: ImageSet, objects: Sequence[str] | None = None) -> pd.DataFrame:
    """How anomaly-aware a CLIP is, per object of ``images`` (an :class:`~adlib.data.imageset.ImageSet` with normal
    and defective images of every object; ``objects``: their order, default as they first occur): the cosine of the
    object's normal and anomalous WinCLIP anchors (1 = the text encoder cannot tell "a star" from "a damaged
    star") and the zero-shot image AUROC of :func:`winclip_scores`. One row per object.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    names = np.array(images.objects)
    rows = {}
    for name in dict.fromkeys(names) if objects is None else objects:
        normal, anomalous = text_anchors(model, name)
        of = np.flatnonzero(names == name)
        rows[name] = {"anchor cosine (normal, anomalous)": float(normal @ anomalous),
                      "WinCLIP image AUROC": image_auroc(images.labels[of], winclip_scores(model, images[of], name)[0])}
    return pd.DataFrame(rows).T


class WinCLIPDetector(ZeroShotDetector):
    """:func:`winclip_scores` behind the book's detector protocol, so the benchmark can run it beside the
    feature detectors: ``fit`` learns nothing (zero-shot; it only records the image size), ``predict`` compares
    the images with the prompt ensembles of ``object_name`` and applies the book's post-processing.

    ``clip``: ``"tiny"`` (the shipped tiny CLIP, which knows the toy world's objects only), the path of a tiny
    CLIP saved by :func:`adlib.features.clip.save_clip`, or ``"NAME:PRETRAINED"`` for an open_clip model (the paper
    profile, e.g. ``"ViT-B-16:openai"``; :func:`adlib.features.clip.load_open_clip`). The image score is the image-level
    P(anomalous).

    Used by: ``adlib.methods.catalog.METHODS``.
    """

    method = "winclip"

    def __init__(self, object_name: str = "object", clip: str = "tiny", sigma: float = 4.0, device: str = "cpu",
                 seed: int = 0, batch_size: int = 32):
        super().__init__(object_name, sigma=sigma, device=device, seed=seed, batch_size=batch_size)
        self.clip = clip
        if clip == "tiny" or Path(clip).is_file():
            self.clip_model = load_tiny_clip(None if clip == "tiny" else clip)
        else:
            name, _, pretrained = clip.partition(":")
            self.clip_model = load_open_clip(name, pretrained or "openai")[0]
        self.clip_model = self.clip_model.to(device).eval()  # not self.model: nothing to save

    def hparams(self) -> dict:
        return {"clip": self.clip} | super().hparams()

    def score_images(self, images: torch.Tensor) -> PatchScores:
        scores, maps = winclip_scores(self.clip_model, images, self.object_name)
        return PatchScores(maps, scores)  # maps at image size already: the shared post-processing only blurs them

"""AA-CLIP's two training stages: text adapters (stage 1), then image adapters (stage 2); few-shot sampling."""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torchvision import transforms

from adlib.data.imageset import ImageSet
from adlib.features.clip import image_size, to_tensor
from adlib.methods.aaclip.adapters import AACLIP
from adlib.methods.aaclip.losses import disentangle_loss, segmentation_loss
from adlib.methods.aaclip.scoring import similarity_probs
from adlib.training.loop import FitSetup, IndexBatches, fit

# --------------------------------------------------------------------------- training


def _check_training_data(train: ImageSet) -> None:
    if not isinstance(train, ImageSet):
        raise TypeError(f"AA-CLIP trains on an adlib.data.imageset.ImageSet with labels, masks and objects, got "
                        f"{type(train).__name__}: e.g. ImageSet(images, labels, masks, objects=names).")
    if len(train) == 0 or train.labels is None or train.masks is None or "" in train.objects:
        raise ValueError("AA-CLIP's training set needs images, and labels, masks and an object name for every one "
                         f"({len(train)} images, labels {'missing' if train.labels is None else 'given'}, masks "
                         f"{'missing' if train.masks is None else 'given'}, objects {sorted(set(train.objects))}).")


def augment(images: torch.Tensor, masks: torch.Tensor, colour: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The official training augmentation (``dataset/__init__.py`` of the AA-CLIP code), image by image:
    with ``colour`` (stage 2), brightness, contrast and saturation jitter of up to 50 %, each with probability 0.7;
    then, on the image and its mask together, a rotation by up to 30 degrees and a translation by up to 15 % (each
    with probability 0.5) and horizontal and vertical flips (0.5 each), nearest-neighbour. The official code moves
    the CLIP-normalised image, so uncovered pixels take CLIP's mean colour; so do they here.

    ``images`` (B, 3, H, W) in [0, 1] and ``masks`` (B, H, W) -> the same shapes. Draws from torch's global
    generator, which :func:`adlib.training.loop.fit` seeds and checkpoints.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    fill = [*open_clip.OPENAI_DATASET_MEAN, 0.0]
    geometric = transforms.Compose([
        transforms.RandomApply([transforms.RandomRotation(30, fill=fill)], p=0.5),
        transforms.RandomApply([transforms.RandomAffine(0, translate=(0.15, 0.15), fill=fill)], p=0.5),
        transforms.RandomHorizontalFlip(0.5), transforms.RandomVerticalFlip(0.5)])
    jitter = transforms.Compose([transforms.RandomApply([transforms.ColorJitter(**{k: 0.5})], p=0.7)
                                 for k in ("brightness", "contrast", "saturation")])
    out = [geometric(torch.cat([jitter(x) if colour else x, m[None]])) for x, m in zip(images, masks.float())]
    return torch.stack([o[:3] for o in out]), torch.stack([o[3] for o in out])


def _batch(model: AACLIP, train: ImageSet, idx: np.ndarray, colour: bool | None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch on the model's device: ((B, 3, S, S) images through CLIP's preprocessing, (B, H, W) float masks,
    (B,) int64 labels); ``colour`` None: as they are, else through :func:`augment` (``colour``: with colour jitter).

    Preprocessing per batch keeps a large training set (VisA at 518 px) from being converted all at once."""
    device = model.text_proj.weight.device
    images, masks = torch.as_tensor(train.images[idx]).float(), torch.as_tensor(train.masks[idx]).float()
    if colour is not None:
        images, masks = augment(images, masks, colour)
    return (to_tensor(images, image_size(model.clip)).to(device), masks.to(device),
            torch.as_tensor(train.labels[idx]).long().to(device))


def train_text_adapters(
    model: AACLIP,
    train: ImageSet,
    *,
    epochs: int = 5,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = False,
    **options: Any,
) -> list[dict[str, float]]:
    """Stage 1: train the text adapters against frozen CLIP image features for ``epochs``; returns the history of
    :func:`adlib.training.loop.fit` (``{"epoch", "loss"}`` per epoch; ``checkpoint``: resume after an interruption).
    ``options``: those of :func:`text_adapter_training`, whose defaults are the official code's values.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    return _fit(model, text_adapter_training(model, train, **options), epochs, checkpoint, progress)


def text_adapter_training(
    model: AACLIP,
    train: ImageSet,
    *,
    lr: float = 1e-5,
    batch_size: int = 16,
    disentangle_weight: float = 0.1,
    image_loss: bool = False,
    augmentation: bool = True,
    cached_views: int | None = None,
    feature_cache_bytes: int = 2**30,
    seed: int = 0,
) -> FitSetup:
    """Stage 1 set up for :func:`adlib.training.loop.fit`: the text adapters trained against frozen CLIP image
    features.

    ``train``: an :class:`adlib.data.imageset.ImageSet` of normal and anomalous images (float (N, 3, H, W) in
    [0, 1]) with ``labels`` (1 = anomalous), ``masks`` (N, H, W) and ``objects`` (the object name of each image,
    which its prompts use), in seeded shuffled batches (:class:`adlib.training.loop.IndexBatches`). Per batch, as
    the official ``train_text_adapter``: the segmentation loss of the
    (patch + class) features against the anchors (last layer) and ``disentangle_weight`` times the disentangle loss;
    ``image_loss=True`` adds the image-level cross-entropy of the class embedding against the two anchors that
    the paper's text describes. Adam with betas (0.5, 0.999); the defaults are the official code's values.
    ``augmentation``: the official geometric augmentation of :func:`augment` (no colour jitter in stage 1), so the
    frozen image features are computed per batch, each image augmented afresh; ``cached_views=K`` instead computes
    them once for K augmented views of every image and lets each step read one of them at random (K views stand in
    for a fresh augmentation every epoch: much cheaper when the image tower is costly). Without augmentation they are
    computed once when all of them fit in ``feature_cache_bytes`` (the toy world's), else per batch (VisA at 518 px).

    Used by: ``adlib.methods.aaclip.training.train_text_adapters``, ``adlib.recipes.aaclip_caption.setup``.
    """
    _check_training_data(train)
    scale, size, names = model.logit_scale, train.masks.shape[-1], train.objects
    frozen = None if augmentation else _frozen_features_once(model, train, feature_cache_bytes)
    views: list = []  # the cached views, computed at the first step (a set-up that only loads weights skips them)

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        if augmentation and cached_views:  # one cached augmented view per image, from fit's seeded generator
            if not views:
                views.extend(_frozen_views(model, train, cached_views, seed))
            v = torch.randint(len(views[0]), (len(idx),))
            patches, image_emb, mask = (part[v, idx] for part in views)
            label = torch.as_tensor(train.labels[idx]).long().to(patches.device)
        else:
            images, mask, label = _batch(model, train, idx, False if augmentation else None)
            patches, image_emb = model.frozen_features(images) if frozen is None else (frozen[0][idx], frozen[1][idx])
        batch_names = [names[i] for i in idx]
        per_name = {n: model.anchors(n) for n in dict.fromkeys(batch_names)}
        anchors = torch.stack([per_name[n] for n in batch_names])  # (B, 2, D)
        probs = similarity_probs(patches, anchors, scale, size)
        loss = segmentation_loss(probs, mask)
        if image_loss:
            loss = F.cross_entropy(scale * torch.einsum("nd,nkd->nk", image_emb, anchors), label) + loss
        return loss + disentangle_weight * disentangle_loss(anchors)

    return _adapter_training(model.text_parameters(), [], batch_loss, len(train), (lr, lr), batch_size, seed,
                             f"text adapters (image loss {image_loss}, disentangle {disentangle_weight}, "
                             f"augmentation {augmentation}, views {cached_views})")


def _frozen_views(model: AACLIP, train: ImageSet, n_views: int, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1's frozen features of ``n_views`` geometric augmentations (:func:`augment`) of every training image:
    ((V, N, P, D) patch + class, (V, N, D) class, (V, N, H, W) masks), drawn from ``seed`` without touching the
    global generator."""
    out = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(n_views):
            parts = [_batch(model, train, np.arange(i, min(i + 256, len(train))), False)
                     for i in range(0, len(train), 256)]
            feats = [model.frozen_features(images) for images, _, _ in parts]
            out.append((torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats]),
                        torch.cat([m for _, m, _ in parts])))
    return tuple(torch.stack([view[k] for view in out]) for k in range(3))


def _frozen_features_once(model: AACLIP, train: ImageSet, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stage 1's frozen (patch + class, class) features of every training image, or None when they exceed
    ``max_bytes`` (measured on the first image)."""
    n = len(train)
    first, _ = model.frozen_features(_batch(model, train, np.arange(1), None)[0])
    if n * first.numel() * first.element_size() > max_bytes:
        return None
    parts = [model.frozen_features(_batch(model, train, np.arange(i, min(i + 256, n)), None)[0])
             for i in range(0, n, 256)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def train_image_adapters(
    model: AACLIP,
    train: ImageSet,
    *,
    epochs: int = 20,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = False,
    **options: Any,
) -> list[dict[str, float]]:
    """Stage 2: train the image adapters and projections for ``epochs`` with the text anchors fixed; the history
    as :func:`train_text_adapters`. ``options``: those of :func:`image_adapter_training` (the official values).

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    return _fit(model, image_adapter_training(model, train, **options), epochs, checkpoint, progress)


def image_adapter_training(
    model: AACLIP,
    train: ImageSet,
    *,
    lr: float = 5e-4,
    batch_size: int = 2,
    seed: int = 0,
    adapted_anchors: bool = True,
    augmentation: bool = True,
) -> FitSetup:
    """Stage 2 set up for :func:`adlib.training.loop.fit`: the image adapters and projections, the text anchors
    fixed.

    ``train`` as :func:`text_adapter_training`. The anchors (stage-1 text encoder; with ``adapted_anchors=False``
    plain CLIP's, the ablation "stage 2 alone") are computed once, without gradients. Loss, as the official
    code: :func:`stage2_loss`. ``augmentation``: the official one, :func:`augment` with colour jitter.

    Used by: ``adlib.methods.aaclip.training.train_image_adapters``, ``adlib.recipes.aaclip_caption.setup``.
    """
    _check_training_data(train)
    names = train.objects
    with torch.no_grad():
        per_name = {n: model.anchors(n, adapted_anchors) for n in dict.fromkeys(names)}

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        images, mask, label = _batch(model, train, idx, True if augmentation else None)
        return stage2_loss(model, images, mask, label, torch.stack([per_name[names[i]] for i in idx]))

    return _adapter_training([], model.image_parameters(), batch_loss, len(train), (lr, lr), batch_size, seed,
                             f"image adapters (augmentation {augmentation}, adapted anchors {adapted_anchors})")


def stage2_loss(model: AACLIP, images: torch.Tensor, mask: torch.Tensor, label: torch.Tensor, anchors: torch.Tensor
               ) -> torch.Tensor:
    """Stage 2's loss, as the official code: cross-entropy of the detection feature's inner products with the
    ``anchors`` (B, 2, D) (no temperature) plus the segmentation loss of every level's patch features against the
    (B, H, W) ``mask``. ``images``: (B, 3, S, S) through CLIP's preprocessing; ``label``: (B,) 0/1.

    Used by: ``adlib.methods.aaclip.training.image_adapter_training``.
    """
    scale, size = model.logit_scale, mask.shape[-1]
    patches, image_feat = model.encode_image(images)
    loss = F.cross_entropy(torch.einsum("nd,nkd->nk", image_feat, anchors), label)
    for level in patches:
        loss = loss + segmentation_loss(similarity_probs(level, anchors, scale, size), mask)
    return loss


def train_jointly(
    model: AACLIP,
    train: ImageSet,
    *,
    epochs: int = 20,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = False,
    **options: Any,
) -> list[dict[str, float]]:
    """The one-stage alternative: text and image adapters trained together for ``epochs``; the history as
    :func:`train_text_adapters`. ``options``: those of :func:`joint_adapter_training`.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    return _fit(model, joint_adapter_training(model, train, **options), epochs, checkpoint, progress)


def joint_adapter_training(
    model: AACLIP,
    train: ImageSet,
    *,
    lr: float = 5e-4,
    text_lr: float = 1e-5,
    batch_size: int = 2,
    disentangle_weight: float = 0.1,
    seed: int = 0,
    augmentation: bool = True,
) -> FitSetup:
    """One stage instead of two, set up for :func:`adlib.training.loop.fit`: the text and the image side trained
    at once on stage 2's loss (:func:`stage2_loss`) against the anchors of the text encoder being trained (recomputed
    every batch, with gradients), plus stage 1's ``disentangle_weight`` times the disentangle loss. Each side keeps
    its stage's learning rate (``text_lr``, ``lr``) and the batches are stage 2's. This is the alternative the
    paper's two-stage design argues against: nothing holds the anchors still while the image side aligns to them.

    Used by: ``adlib.methods.aaclip.training.train_jointly``, ``adlib.recipes.aaclip_caption.setup``.
    """
    _check_training_data(train)
    names = train.objects

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        batch_names = [names[i] for i in idx]
        per_name = {n: model.anchors(n) for n in dict.fromkeys(batch_names)}
        anchors = torch.stack([per_name[n] for n in batch_names])
        images, mask, label = _batch(model, train, idx, True if augmentation else None)
        return stage2_loss(model, images, mask, label, anchors) + disentangle_weight * disentangle_loss(anchors)

    return _adapter_training(model.text_parameters(), model.image_parameters(), batch_loss, len(train),
                             (text_lr, lr), batch_size, seed, f"joint (augmentation {augmentation})")


def _adapter_training(text: list[torch.nn.Parameter], image: list[torch.nn.Parameter],
                      batch_loss: Callable[[np.ndarray], torch.Tensor], n: int, lrs: tuple[float, float],
                      batch_size: int, seed: int, stage: str) -> FitSetup:
    """What every stage shares: Adam with betas (0.5, 0.999) as the official code (the ``text`` parameters at
    ``lrs[0]``, the ``image`` ones at ``lrs[1]``), seeded shuffled batches of indices into the n training images
    (:class:`adlib.training.loop.IndexBatches`), ``batch_loss(idx)`` per batch."""
    trained = torch.nn.ParameterList([*text, *image])  # the same tensors: only they go into a checkpoint
    groups = [{"params": p, "lr": lr} for p, lr in zip((text, image), lrs) if p]
    optimizer = torch.optim.Adam(groups, betas=(0.5, 0.999))

    def step(idx: np.ndarray) -> dict[str, float]:
        loss = batch_loss(idx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    return FitSetup(step, IndexBatches(n, batch_size, seed), {stage: trained, "optimizer": optimizer},
                    {"stage": stage})


def _fit(model: AACLIP, training: FitSetup, epochs: int, checkpoint: str | os.PathLike | None,
         progress: bool) -> list[dict[str, float]]:
    """``training`` through :func:`adlib.training.loop.fit` for ``epochs`` (saved after every epoch to
    ``checkpoint`` and resumed from it), the model in training mode meanwhile; fit's history."""
    model.train()
    try:
        seed = int(training.loader.generator.initial_seed())
        return fit(training.step, training.loader, epochs=epochs, checkpoint=checkpoint, state=training.state,
                   seed=seed, config=training.config, progress=progress)
    finally:
        model.eval()


# --------------------------------------------------------------------------- data and the paper's model


def few_shot_indices(images: ImageSet, k: int | None, seed: int = 0) -> np.ndarray:
    """Indices of a k-shot training set: ``k`` normal and ``k`` anomalous images (1:1) of every object of
    ``images`` (its ``labels`` and ``objects``); ``k=None`` keeps everything ("full"). Sorted, deterministic in
    ``seed``: ``images[few_shot_indices(images, k)]`` is the k-shot set.

    Defined in: "AA-CLIP: anomaly-aware CLIP" (``notebooks/10_aa_clip.ipynb``).
    """
    if images.labels is None:
        raise ValueError("few_shot_indices needs labelled images (ImageSet.labels is None).")
    labels, groups = images.labels, np.asarray(images.objects)
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
                raise ValueError(f"Object {group!r} has {len(pool)} images with label {label}, fewer than k={k}; "
                                 f"lower k or add data.")
            chosen.append(rng.choice(pool, size=k, replace=False))
    return np.sort(np.concatenate(chosen))

"""Distil the Uninformed Students teachers shipped in ``adlib/weights`` (``python -m adlib distill-teacher``)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from adlib.core.checksum import sha256sum
from adlib.features.cnn import feature_extractor
from adlib.methods.students.teacher import (
    TEACHER_BACKBONE,
    TEACHER_LAYERS,
    TEACHER_RECIPE,
    explained_variance,
    pretrained_descriptors,
    random_patches,
    teacher_images,
    train_teacher,
)
from adlib.training.loop import loss_change


def distill_teacher(patch_size: int, out: str | Path, epochs: int | None = None,
                    n_patches: int | None = None) -> dict:
    """Distil a teacher of receptive field ``patch_size`` with :data:`TEACHER_RECIPE` (``epochs`` and ``n_patches``
    override it when given) and write it to ``out`` (safetensors, fp32; an existing file is refused before the
    training). Returns the run's summary: the recipe, seconds, held-out explained variance, the relative change of
    the loss, the file's sha256 and the training history.

    Used by: ``python -m adlib distill-teacher``.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another file or delete it first.")
    recipe = TEACHER_RECIPE | {k: v for k, v in (("epochs", epochs), ("n_patches", n_patches)) if v}
    extractor = feature_extractor(TEACHER_BACKBONE, TEACHER_LAYERS)
    images = teacher_images()
    t0 = time.perf_counter()
    teacher, decoder, history = train_teacher(images, extractor, patch_size, seed=0, progress=False, **recipe)
    seconds = time.perf_counter() - t0
    held_out = random_patches(images, patch_size, max(256, recipe["n_patches"] // 10), seed=1)
    explained = explained_variance(teacher, decoder, held_out,
                                   pretrained_descriptors(extractor, held_out, recipe["target_size"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {f"teacher.{k}": v for k, v in teacher.state_dict().items()}
    state |= {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    state["options"] = torch.tensor([patch_size, recipe["dim"], recipe["width"], recipe["stride"]])
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    change = round(loss_change(history, "L_k"), 4) if len(history) > 1 else None
    return {"patch_size": patch_size, "recipe": recipe, "seconds": round(seconds, 1),
            "held_out_explained": round(explained, 4), "loss_change": change, "sha256": sha256sum(out),
            "history": [{k: round(v, 4) for k, v in row.items()} for row in history]}

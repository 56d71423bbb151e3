"""Distil the Uninformed Students teachers shipped in ``adlib/weights`` (``python -m adlib distill-teacher``)."""
from __future__ import annotations

import torch

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


def main(argv: list[str] | None = None) -> None:
    """``python -m adlib.methods.students --patch-size P --out FILE``: distil a teacher with :data:`TEACHER_RECIPE` and
    write it (safetensors, fp32) with a JSON summary: history, held-out explained variance, sha256.

    Defined in: "Uninformed Students" (``notebooks/06_uninformed_students.ipynb``).
    """
    import argparse
    import json
    import time
    from pathlib import Path

    from safetensors.torch import save_file

    from adlib.core.checksum import sha256sum
    from adlib.features.cnn import feature_extractor
    from adlib.training.loop import loss_change

    parser = argparse.ArgumentParser(prog="python -m adlib.students", description="Distil a Uninformed "
                                     "Students teacher from the ImageNet EfficientNet-Lite0.")
    parser.add_argument("--patch-size", type=int, required=True, help="receptive field p (17, 33 or 65)")
    parser.add_argument("--out", required=True, help="file to write (.safetensors); refused if it exists")
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs (e.g. a smoke run)")
    parser.add_argument("--n-patches", type=int, help="override the recipe's number of training patches")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; choose another file or delete it first.")
    recipe = TEACHER_RECIPE | {k: v for k, v in (("epochs", args.epochs), ("n_patches", args.n_patches)) if v}
    extractor = feature_extractor(TEACHER_BACKBONE, TEACHER_LAYERS)
    images = teacher_images()
    t0 = time.perf_counter()
    teacher, decoder, history = train_teacher(images, extractor, args.patch_size, seed=0, progress=False, **recipe)
    seconds = time.perf_counter() - t0
    held_out = random_patches(images, args.patch_size, max(256, recipe["n_patches"] // 10), seed=1)
    explained = explained_variance(teacher, decoder, held_out,
                                   pretrained_descriptors(extractor, held_out, recipe["target_size"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {f"teacher.{k}": v for k, v in teacher.state_dict().items()}
    state |= {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    state["options"] = torch.tensor([args.patch_size, recipe["dim"], recipe["width"], recipe["stride"]])
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    change = round(loss_change(history, "L_k"), 4) if len(history) > 1 else None
    print(json.dumps({"patch_size": args.patch_size, "recipe": recipe, "seconds": round(seconds, 1),
                      "held_out_explained": round(explained, 4), "loss_change": change, "sha256": sha256sum(out),
                      "history": [{k: round(v, 4) for k, v in row.items()} for row in history]}, indent=1))

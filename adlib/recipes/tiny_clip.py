"""Training the book's tiny CLIP: ``python -m adlib train-clip --out FILE`` (the toy world, by default); the shipped
one adds ``--world caption --stem effnet-lite0`` and its control ``--world caption-no-defect-words --stem
effnet-lite0`` (``adlib/weights/TINY_CLIP.md``).

Defined in: "CLIPN: teaching CLIP to say no" (``notebooks/09_clipn.ipynb``).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from pathlib import Path

import open_clip
import torch

from adlib.data import captionworld, toyworld
from adlib.eval.probes import probe_aurocs
from adlib.features.clip import (
    CLASS_TEMPLATES,
    TINY_CONFIG,
    TINY_WORLD,
    TRAIN_COMMAND,
    build_tiny_clip,
    encode_images,
    image_size,
    restrict_vocabulary,
    save_clip,
    to_tensor,
    tokenize,
    zero_shot_accuracy,
)
from adlib.methods import winclip
from adlib.training.loop import RandomSteps, fit, steps_per_epoch


def train_tiny_clip(
    out: str | os.PathLike,
    *,
    steps: int = 6000,
    batch_size: int = 128,
    n_pairs: int = 20_000,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: int = 50,
    seed: int = 0,
    n_eval: int = 1000,
    config: dict | None = None,
    world: dict | None = None,
    caption_world: captionworld.World | None = None,
    stem: str | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    command: str = TRAIN_COMMAND,
) -> dict:
    """Train a tiny CLIP with the CLIP contrastive loss on toy-world image-caption pairs and save it.

    ``config``: the model (default :data:`TINY_CONFIG`; its ViT image size sets the toy images' size);
    ``world``: the toy-world settings of the captions (default :data:`TINY_WORLD`: defects rare and mostly unnamed);
    ``caption_world``: train on :mod:`adlib.data.captionworld` with these rates instead (``world`` then gives only the
    image size), measure the zero-shot accuracy over its twenty objects and the :func:`tower_report` (``eval.tower``);
    ``stem``: a frozen ImageNet CNN (a name of :data:`adlib.features.backbones.BACKBONES`) as the ViT's patch
    embedding instead of the config's conv stem (:class:`adlib.features.clip_parts.PretrainedStem`, a hybrid ViT);
    ``command``: how to rebuild the file, recorded in its metadata (the CLI passes the one of its settings);
    ``progress``: print progress lines (the loop is :func:`adlib.training.loop.fit`, an epoch of
    :func:`adlib.training.loop.steps_per_epoch` steps); ``checkpoint``: a file to save to after every epoch and resume
    from after an interruption. Pairs come from ``toyworld.sample(n_pairs, seed, **world)`` (or the caption world's
    ``sample``); the learning rate warms up linearly for ``warmup`` steps, then follows a cosine to zero; the logit
    scale is clamped at ln(100) as in CLIP. The trained token table is then cut down to the captions' tokens
    (:func:`adlib.features.clip.restrict_vocabulary`; the rest never moved from their random start). Then zero-shot
    shape accuracy is measured on ``n_eval`` held-out scenes (seed + 1) and written, with the training settings, into
    the file's metadata (:func:`adlib.features.clip.save_clip`). Returns that metadata with the file's sha256: the
    registry entry's fields.

    Used by: ``python -m adlib train-clip``.
    """
    if Path(out).exists():  # before the training, not after it
        raise FileExistsError(f"{out} exists; choose another file or delete it first.")
    config = copy.deepcopy(config or TINY_CONFIG)
    if stem is not None:
        config = {k: v for k, v in config.items() if k != "conv_stem"} | {"pretrained_stem": stem}
    start = time.time()
    torch.manual_seed(seed)
    model = build_tiny_clip(config)
    size = config["vision_cfg"]["image_size"]
    world = dict(TINY_WORLD if world is None else world, image_size=size)
    if caption_world is None:
        data = toyworld.sample(n_pairs, seed, **world)
    else:
        data = captionworld.sample(n_pairs, seed, image_size=size, world=caption_world)
    images = to_tensor(data.images)  # CLIP's preprocessing, once for all pairs
    tokens = tokenize(data.captions, model)
    del data  # the float images: training reads the preprocessed tensor only
    if progress:
        print(f"generated {n_pairs} pairs in {time.time() - start:.0f} s")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    def lr_factor(s: int) -> float:  # linear warm-up, then cosine decay to zero
        return (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    loss_fn = open_clip.ClipLoss()

    def step(gen: torch.Generator) -> dict[str, float]:
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
        return {"loss": loss.item()}

    per_epoch = steps_per_epoch(steps)
    model.train()
    history = fit(step, RandomSteps(per_epoch, seed), epochs=steps // per_epoch, checkpoint=checkpoint,
                  state={"model": model, "optimizer": opt, "schedule": schedule}, seed=seed,
                  config={"steps": steps, "lr": lr, "warmup": warmup, "n_pairs": n_pairs}, progress=progress,
                  log_every=max(1, steps // 20 // per_epoch))
    model.eval()
    config = restrict_vocabulary(model, tokens, config)  # the rows of the captions' tokens: about 1 % of the table
    if caption_world is None:
        held = toyworld.sample(n_eval, seed + 1, **world)
        acc = zero_shot_accuracy(model, held.images, held.classes, toyworld.SHAPES)
    else:  # ordinary photos of objects only
        plain = captionworld.World(style_rate=0.0, background_rate=0.0, digit_rate=0.0)
        pictures = captionworld.sample(n_eval, seed + 1, image_size=size, world=plain)
        classes = [captionworld.OBJECTS.index(name) for name in pictures.images.objects]
        acc = zero_shot_accuracy(model, pictures.images, classes, captionworld.OBJECTS)
        world = world | {"caption_world": dataclasses.asdict(caption_world)}
        tower = {k: round(v, 4) for k, v in tower_report(model).items()}
    meta = {
        "command": command,
        "train": {"steps": steps, "batch_size": batch_size, "n_pairs": n_pairs, "lr": lr, "weight_decay": weight_decay,
                  "warmup": warmup, "seed": seed, "world": world, "torch": torch.__version__,
                  "open_clip": open_clip.__version__, "seconds": round(time.time() - start, 1),
                  "final_loss": round(history[-1]["loss"], 4),
                  "threads": torch.get_num_threads()},
        "eval": {"n": n_eval, "seed": seed + 1, "zero_shot_shape_accuracy": round(acc, 4),
                 "templates": list(CLASS_TEMPLATES)} | ({} if caption_world is None else {"tower": tower}),
    }
    meta["sha256"] = save_clip(model, out, config, meta)
    if progress:
        print(f"zero-shot shape accuracy on {n_eval} held-out scenes: {acc:.3f}; saved {out} "
              f"(sha256 {meta['sha256'][:12]}...)")
    return meta


def tower_report(model: open_clip.CLIP, n: int = 600, seed: int = 20) -> dict[str, float]:
    """What a tiny CLIP knows about the caption world's held-out objects (AA-CLIP's test objects), on ``n`` fresh
    ordinary photos of them (``seed``), half defective with any of the eight defects: zero-shot object accuracy
    among all twenty objects; the linear defect probes of :func:`adlib.eval.probes.probe_aurocs` (what a tower is
    chosen by); and AA-CLIP's premise, measured: the cosine of WinCLIP's normal and anomalous anchors and WinCLIP's
    zero-shot image AUROC (:func:`adlib.methods.winclip.winclip_scores`), each averaged over the objects. No
    chapter's test image is used.

    Used by: ``adlib.recipes.tiny_clip.train_tiny_clip``.
    """
    held = captionworld.inspection_photos(n, seed, image_size=image_size(model))
    classes = [captionworld.OBJECTS.index(name) for name in held.objects]
    glob, tokens = encode_images(model, held)
    aware = winclip.anomaly_awareness(model, held, captionworld.HELD_OUT_OBJECTS)
    return ({"held-out object accuracy": zero_shot_accuracy(model, held, classes, captionworld.OBJECTS)}
            | probe_aurocs(glob.numpy(), tokens.numpy(), held.masks, seed)
            | {name: float(column.mean()) for name, column in aware.items()})

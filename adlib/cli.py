"""``python -m adlib``: the book's one command. Run any detector of the book on any MVTec-format folder, score new
images, benchmark every method, or remake the weights shipped in ``adlib/weights``.

    python -m adlib list
    python -m adlib run patchcore --data ROOT [--category C ...] [--backbone effnet-lite0] [--image-size 128]
                        [--device cpu|cuda] [--seed 0] [--out results.json] [--save-maps DIR] [--save-model FILE]
                        [--set KEY=VALUE ...]
                        [--calibrate]
    python -m adlib fit [METHOD] (--data ROOT [--category C ...] | --good DIR) [--target-fpr 0.05]
                        [--calibration-share 0.2] --save-model FILE
    python -m adlib calibrate --model FILE --good DIR [--target-fpr A]
    python -m adlib predict --model FILE IMAGES_OR_FOLDERS... [--out scores.csv] [--save-maps DIR | --report DIR]
                            [--target-fpr A]
    python -m adlib bench --data ROOT [--methods patchcore padim ...] [--categories ...] [--seeds 0 1 2]
                          [--jobs 2] [--out DIR]
    python -m adlib pretrain RECIPE --out FILE [--steps N ...] [--validate] [--checkpoint FILE]
    python -m adlib train-clip --out FILE [--steps N ...] [--threads 1] [--checkpoint FILE]
    python -m adlib distill-teacher --patch-size P --out FILE [--epochs N] [--n-patches N]
    python -m adlib train-checkpoint NAME [--budget-minutes 60] [--checkpoint FILE] [--threads 1]

This module imports only the standard library, so ``list`` and every ``--help`` answer at once: they read the
light tables of :mod:`adlib.methods.catalog`, :mod:`adlib.features.backbones`, :mod:`adlib.bench.lineup` and
:mod:`adlib.recipes.pretrain_recipes`; torch, numpy and the detectors are imported by the subcommand that needs them.

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import pandas as pd



def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _format(table: pd.DataFrame) -> str:
    three = ("image_auroc", "pixel_auroc", "aupro", "false_alarm_rate", "detection_rate")
    fmt = {c: (lambda v: f"{v:.3f}") if c in three else (lambda v: f"{v:.4g}") if c == "threshold" else
           (lambda v: f"{v:.1f}") for c in table.columns}
    return table.to_string(formatters=fmt, na_rep="-")


def _parser() -> argparse.ArgumentParser:
    from adlib.bench.lineup import (
        BENCH_IMAGE_SIZE,
        CALIBRATION_SHARE,
        DEFAULT_BACKBONE,
        DEFAULT_IMAGE_SIZE,
        SWEEP,
        TARGET_FPR,
        ZERO_SHOT,
    )
    from adlib.features.backbones import BACKBONES
    from adlib.methods.catalog import METHODS
    from adlib.recipes.pretrain_recipes import RECIPES

    parser = argparse.ArgumentParser(prog="python -m adlib", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the methods and backbones, one line each")

    r = sub.add_parser("run", help="fit and evaluate a method on MVTec-format categories")
    r.add_argument("method", choices=sorted(METHODS))
    r.add_argument("--data", required=True, type=Path, help="root folder: ROOT/<category>/train/good, test/, ...")
    r.add_argument("--category", nargs="+", help="categories to run (default: all under --data)")
    r.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=sorted(BACKBONES))
    r.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                   help=f"pixels per side (default {DEFAULT_IMAGE_SIZE}: chosen on the held-out validation set)")
    r.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", type=Path, help="write the results as JSON")
    r.add_argument("--save-maps", type=Path, help="write one heatmap overlay PNG per test image here")
    r.add_argument("--save-model", type=Path, help="save the fitted detector (FILE_<category> for several)")
    r.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", type=_option,
                   help="a keyword of the method, e.g. coreset_ratio=0.25 or kind=vae (python -m adlib list)")
    r.add_argument("--overwrite", action="store_true", help="replace --out, --save-model and --save-maps files")
    r.add_argument("--allow-large", action="store_true",
                   help="run an --image-size above twice the inputs' size or above the free memory's estimate")

    r.add_argument("--calibrate", action="store_true",
                   help="also fit on all but a calibration share of train/good, set the threshold for --target-fpr "
                        "and report the test split's false-alarm and detection rates at it")
    r.add_argument("--target-fpr", type=float, default=TARGET_FPR, help=f"with --calibrate (default {TARGET_FPR})")

    f = sub.add_parser("fit", help="fit a detector on good images only and calibrate its threshold",
                       description="Fit on the good images minus a held-out share, set the threshold for a target "
                       "false-alarm rate on that share (split conformal) and save both (adlib.bench.deploy).")
    f.add_argument("method", nargs="?", default="patchcore", choices=sorted(METHODS))
    f.add_argument("--data", type=Path, help="root folder: ROOT/<category>/train/good (test/ is not needed)")
    f.add_argument("--category", nargs="+", help="categories under --data (default: all)")
    f.add_argument("--good", type=Path, help="a plain folder of good images (searched recursively)")
    f.add_argument("--target-fpr", type=float, default=TARGET_FPR,
                   help=f"false-alarm rate the threshold guarantees on new good images (default {TARGET_FPR})")
    f.add_argument("--calibration-share", type=float, default=CALIBRATION_SHARE,
                   help=f"share of the good images held out to calibrate (default {CALIBRATION_SHARE})")
    f.add_argument("--save-model", required=True, type=Path, help="file to write (FILE_<category> for several)")
    f.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=sorted(BACKBONES))
    f.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    f.add_argument("--device", choices=("cpu", "cuda"))
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", type=_option)
    f.add_argument("--overwrite", action="store_true", help="replace --save-model")

    a = sub.add_parser("calibrate", help="set a saved detector's threshold again from new good images")
    a.add_argument("--model", required=True, type=Path)
    a.add_argument("--good", required=True, type=Path, help="good images the detector was not fitted on")
    a.add_argument("--target-fpr", type=float, help="default: the model's")
    a.add_argument("--device", choices=("cpu", "cuda"))

    p = sub.add_parser("predict", help="score new images with a saved detector: score, p-value, decision")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("images", nargs="+", help="image files or folders of images (searched recursively)")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--out", type=Path, help="write path,score,p_value,anomalous rows as CSV")
    p.add_argument("--save-maps", type=Path, help="write one figure per image here (original and heatmap)")
    p.add_argument("--report", type=Path, help="write the figures and an HTML page (flagged images first) here")
    p.add_argument("--target-fpr", type=float, help="decide at this false-alarm rate instead of the stored one")
    p.add_argument("--overwrite", action="store_true", help="replace --out, --save-maps and --report files")

    b = sub.add_parser("bench", help="every method on one MVTec-format folder: quality with intervals, cost")
    b.add_argument("--data", required=True, type=Path, help="root folder: ROOT/<category>/train/good, test/, ...")
    b.add_argument("--methods", nargs="+", default=[m for m in SWEEP if m not in ZERO_SHOT],
                   choices=list(SWEEP), help=f"default: all but the zero-shot {', '.join(ZERO_SHOT)}")
    b.add_argument("--categories", nargs="+", help="categories to run (default: all under --data)")
    b.add_argument("--seeds", nargs="+", type=int, default=[0])
    b.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=sorted(BACKBONES))
    b.add_argument("--image-size", type=int, default=BENCH_IMAGE_SIZE)
    b.add_argument("--device", choices=("cpu", "cuda"))
    b.add_argument("--jobs", type=int, default=1, help="runs side by side, one process each (CPU only)")
    b.add_argument("--out", type=Path, default=Path("bench"), help="new folder for bench.json, bench.md, bench.png")

    t = sub.add_parser("pretrain", help="pretrain a backbone of adlib/weights (book-resnet18, book-vit-tiny); "
                       "prints a JSON summary", description="The book's small pretrained backbones, reproducible "
                       "offline on a CPU (adlib.recipes.pretrain).")
    t.add_argument("recipe", choices=sorted(RECIPES))
    t.add_argument("--out", required=True, help="weights file to write (.safetensors)")
    t.add_argument("--steps", type=int, help="override the recipe's number of steps (e.g. a smoke run)")
    t.add_argument("--n-classes", type=int, help="override the number of fractal classes")
    t.add_argument("--per-class", type=int, help="override the images rendered per fractal class")
    t.add_argument("--batch-size", type=int, help="override the batch size")
    t.add_argument("--lr", type=float, help="override the peak learning rate")
    t.add_argument("--crop", type=int, help="override the training crop size in pixels")
    t.add_argument("--validate", action="store_true", help="print patch-kNN AUROC on the validation set")
    t.add_argument("--checkpoint", help="save here after every epoch; rerun with it to resume")

    c = sub.add_parser("train-clip", help="train the tiny CLIP of adlib/weights on the toy world; prints its "
                       "registry entry", description="Training the book's tiny CLIP on the toy world "
                       "(adlib.recipes.tiny_clip).")
    c.add_argument("--out", required=True, help="file to write (.safetensors); refused if it exists")
    c.add_argument("--steps", type=int, default=6000)
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--pairs", type=int, default=20_000)
    c.add_argument("--eval", type=int, default=1000, help="held-out scenes for the zero-shot accuracy")
    c.add_argument("--seed", type=int, default=0)
    # Defaults None: the tiny CLIP's toy world, adlib.features.clip.TINY_WORLD, read when the training starts.
    c.add_argument("--defect-rate", type=float, help="share of training scenes with a defect (default: TINY_WORLD's)")
    c.add_argument("--name-defect-rate", type=float, help="share of defective scenes whose caption names it (the same)")
    c.add_argument("--world", choices=("toy", "caption", "caption-no-defect-words"), default="toy",
                   help="the captions: adlib.data.toyworld's, or captionworld's with or without defect words")
    c.add_argument("--stem", choices=("conv", "effnet-lite0"), default="conv",
                   help="the ViT's patch embedding: a trained conv stem, or a frozen ImageNet CNN (a hybrid ViT)")
    c.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 was fastest on the shared 2-core build machine (2 threads oversubscribe)")
    c.add_argument("--checkpoint", help="save here after every epoch; rerun with it to resume")

    d = sub.add_parser("distill-teacher", help="distil an Uninformed Students teacher of adlib/weights; prints a "
                       "JSON summary", description="Distil a Uninformed Students teacher from the ImageNet "
                       "EfficientNet-Lite0 (adlib.recipes.teachers).")
    d.add_argument("--patch-size", type=int, required=True, help="receptive field p (17, 33 or 65)")
    d.add_argument("--out", required=True, help="file to write (.safetensors); refused if it exists")
    d.add_argument("--epochs", type=int, help="override the recipe's epochs (e.g. a smoke run)")
    d.add_argument("--n-patches", type=int, help="override the recipe's number of training patches")

    k = sub.add_parser("train-checkpoint", help="train a chapter's converged model of adlib/weights (in chunks) and "
                       "register it with its training record", description="A chapter's checkpoint recipe "
                       "(adlib.recipes.checkpoints): train to the official schedule, resumable; when finished, "
                       "write NAME.safetensors and its registry entry.")
    k.add_argument("name", help="a recipe of adlib.recipes.checkpoints.CHECKPOINT_RECIPES")
    k.add_argument("--budget-minutes", type=float, default=60.0,
                   help="stop after the first epoch past this; the same command resumes (default 60)")
    k.add_argument("--checkpoint", type=Path, help="training state, saved every epoch (default: NAME.training.pt)")
    k.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the tensors repeat exactly)")
    return parser


def _option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, value), the value read as a Python literal (0.25, (1, 2), None) or kept as text."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _list(args: argparse.Namespace) -> None:
    from adlib.features.backbones import BACKBONES
    from adlib.methods.catalog import METHODS

    print("methods:")
    for name in sorted(METHODS):
        print(f"  {name:10s} {METHODS[name][1]}")
    print("backbones (--backbone):")
    for name, (arch, _, layers, about) in BACKBONES.items():
        print(f"  {name:16s} {about} [{arch}, stages {layers}]")


def _write_json(document: dict[str, Any], path: Path) -> None:
    """Replace ``path`` in one step (a temporary file renamed over it): valid, complete JSON at every moment."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(document, indent=1))
    partial.replace(path)


def _run(args: argparse.Namespace) -> None:
    from adlib.bench import folders

    folders.check_output(args.out, "--out", args.overwrite)
    t0 = time.perf_counter()

    def save(document: dict[str, Any]) -> None:
        if args.out is not None:
            _write_json(document, args.out)

    result = folders.run(args.method, args.data, args.category, backbone=args.backbone, image_size=args.image_size,
                         device=args.device, seed=args.seed, save_maps=args.save_maps, save_model=args.save_model,
                         options=dict(args.set), overwrite=args.overwrite, allow_large=args.allow_large,
                         on_category=save, calibrate=args.calibrate, target_fpr=args.target_fpr)
    backbone = result["backbone"] or "no backbone"
    print(f"{args.method} with {backbone} at {args.image_size} px on {result['device']} "
          f"({time.perf_counter() - t0:.0f} s)")
    print(_format(folders.results_table(result)))
    if args.out is not None:
        _say(f"results written to {args.out}")


def _fit(args: argparse.Namespace) -> None:
    from adlib.bench import deploy
    from adlib.bench.folders import model_paths
    from adlib.eval.decisions import calibration_split

    folders = deploy.good_folders(args.data, args.category, args.good)
    paths = model_paths(args.save_model, list(folders))
    for name, good in folders.items():  # every output and every split before the first fit
        deploy.check_output(paths[name], "--save-model", args.overwrite)
        calibration_split(len(deploy.images_under(good)), args.calibration_share, args.target_fpr, args.seed)
    for name, good in folders.items():
        done = deploy.fit(args.method, good, paths[name], target_fpr=args.target_fpr,
                          calibration_share=args.calibration_share, image_size=args.image_size,
                          backbone=args.backbone, device=args.device, seed=args.seed, options=dict(args.set),
                          overwrite=args.overwrite, category=name)
        print(f"[{name}] {args.method} fitted on {done['fitted_on']} good images, calibrated on "
              f"{done['calibrated_on']}: threshold {done['threshold']:.6g} for a false-alarm rate of at most "
              f"{args.target_fpr:g}; saved to {paths[name]}")


def _calibrate(args: argparse.Namespace) -> None:
    from adlib.bench import deploy

    done = deploy.calibrate(args.model, args.good, args.target_fpr, args.device)
    old = "none" if done["old_threshold"] is None else f"{done['old_threshold']:.6g}"
    print(f"{args.model}: calibrated on {done['calibrated_on']} good images, threshold {old} -> "
          f"{done['threshold']:.6g} (false-alarm rate at most {done['target_fpr']:g}); the fitted detector is "
          "unchanged")


def _predict(args: argparse.Namespace) -> None:
    from adlib.bench import deploy

    deploy.check_output(args.out, "--out", args.overwrite)  # before scoring, not after
    rows = deploy.predict(args.model, args.images, args.device, args.save_maps, args.report, args.target_fpr,
                          overwrite=args.overwrite)
    columns = ("path", "score", "p_value", "anomalous")
    for row in rows:
        print("\t".join("" if row[c] is None else f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c])
                        for c in columns[1:] + columns[:1]))
    if args.out is not None:
        with open(args.out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows([["" if row[c] is None else row[c] for c in columns] for row in rows])
    flagged = sum(bool(r["anomalous"]) for r in rows)
    where = ", ".join(str(p) for p in (args.out, args.report, args.save_maps) if p is not None) or "stdout only"
    decided = "no decisions (the model stores no calibration)" if rows[0]["anomalous"] is None else \
        f"{flagged} flagged as anomalous"
    _say(f"{len(rows)} images scored, {decided}; written: {where}")


def _bench(args: argparse.Namespace) -> None:
    from adlib.bench import benchmark
    from adlib.core.runtime import choose_device

    benchmark.check_new_folder(args.out)  # before the sweep, not after it
    device = str(choose_device(args.device))
    t0 = time.perf_counter()
    records = benchmark.sweep(args.data, args.methods, args.categories, seeds=args.seeds, image_size=args.image_size,
                              backbone=args.backbone, device=device, n_jobs=args.jobs, progress=True)
    meta = {"data": str(args.data), "methods": args.methods, "categories": sorted({r["category"] for r in records}),
            "seeds": args.seeds, "backbone": args.backbone, "image_size": args.image_size, "device": device,
            "jobs": args.jobs, "wall_s": time.perf_counter() - t0}
    paths = benchmark.write(records, args.out, meta)
    print(paths["markdown"].read_text(), end="")
    _say(f"{len(records)} runs in {meta['wall_s']:.0f} s; written: {', '.join(map(str, paths.values()))}")


def _pretrain(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from adlib.recipes import pretrain, pretrain_recipes

    overrides = {"steps": args.steps, "n_classes": args.n_classes, "per_class": args.per_class,
                 "batch_size": args.batch_size, "lr": args.lr, "crop": args.crop}
    recipe = replace(pretrain_recipes.RECIPES[args.recipe], **{k: v for k, v in overrides.items() if v is not None})
    with contextlib.redirect_stdout(sys.stderr):  # progress on stderr: stdout is the JSON summary
        summary = pretrain.pretrain_weights(recipe, args.out, checkpoint=args.checkpoint, validate=args.validate)
    print(json.dumps(summary, indent=1))


def _train_clip(args: argparse.Namespace) -> None:
    import torch

    from adlib.data.captionworld import World
    from adlib.features.clip import TINY_WORLD, TRAIN_COMMAND
    from adlib.recipes import tiny_clip

    # The canonical command of these settings: TRAIN_COMMAND plus every setting that is not the default;
    # --out, --checkpoint and --threads do not change the weights, so they stay out of it.
    world = {k: TINY_WORLD[k] if getattr(args, k) is None else getattr(args, k)
             for k in ("defect_rate", "name_defect_rate")}
    defaults = vars(_parser().parse_args(["train-clip", "--out", ""])) | {k: TINY_WORLD[k] for k in world}
    changed = [f"--{name.replace('_', '-')} {value}" for name, value in (vars(args) | world).items()
               if name not in ("command", "out", "checkpoint", "threads") and value != defaults[name]]
    captions = None if args.world == "toy" else World(defect_words=args.world == "caption")
    torch.set_num_threads(args.threads)
    with contextlib.redirect_stdout(sys.stderr):  # progress on stderr: stdout is the registry entry
        meta = tiny_clip.train_tiny_clip(args.out, steps=args.steps, batch_size=args.batch_size, n_pairs=args.pairs,
                                         seed=args.seed, n_eval=args.eval, checkpoint=args.checkpoint, world=world,
                                         caption_world=captions, stem={"conv": None}.get(args.stem, args.stem),
                                         command=" ".join([TRAIN_COMMAND, *changed]))
    print(json.dumps(meta, indent=1))  # the fields of the file's entry in adlib/weights/registry.json


def _distill_teacher(args: argparse.Namespace) -> None:
    from adlib.recipes.teachers import distill_teacher

    summary = distill_teacher(args.patch_size, args.out, epochs=args.epochs, n_patches=args.n_patches)
    print(json.dumps(summary, indent=1))


def _train_checkpoint(args: argparse.Namespace) -> None:
    import torch

    from adlib.recipes import checkpoints

    torch.set_num_threads(args.threads)
    with contextlib.redirect_stdout(sys.stderr):  # progress on stderr: stdout is the registry entry
        entry = checkpoints.build(args.name, args.checkpoint, budget_s=60 * args.budget_minutes)
    if entry is None:
        _say(f"stopped by the budget; run the same command to go on from {args.checkpoint or args.name}.training.pt")
    else:
        print(json.dumps({k: v for k, v in entry.items() if k != "record"}, indent=1))


COMMANDS = {"list": _list, "run": _run, "fit": _fit, "calibrate": _calibrate, "predict": _predict, "bench": _bench,
            "pretrain": _pretrain, "train-clip": _train_clip, "distill-teacher": _distill_teacher,
            "train-checkpoint": _train_checkpoint}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m adlib`` (and the ``adlib`` console script); returns the exit status (2 on a bad input).

    Used by: ``python -m adlib``.
    """
    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted: finished categories are kept (their --out JSON, models and overlays).", file=sys.stderr)
        return 130
    except Exception as err:  # one line that says what to do, not a traceback; --debug shows it
        if args.debug:
            raise
        expected = (OSError, ValueError, TypeError, ModuleNotFoundError, RuntimeError, MemoryError)
        hint = "" if isinstance(err, expected) else f" ({type(err).__name__}; --debug shows the traceback)"
        print(f"error: {err}{hint}", file=sys.stderr)
        return 2
    return 0

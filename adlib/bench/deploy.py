"""``python -m adlib fit``, ``calibrate`` and ``predict`` as functions: a detector from good images only, a threshold
with a guaranteed false-alarm rate, and decisions on new images.

``fit`` holds out a seeded share of the good images, fits on the rest and scores the held-out ones: their scores
(the calibration set), the split-conformal threshold for the target false-alarm rate and a fixed heatmap scale are
stored with the model (:mod:`adlib.eval.decisions`). ``calibrate`` sets them again from new good images, without
refitting. ``predict`` scores folders in batches and gives each image its score, conformal p-value and decision.

Defined in: "From scores to decisions" (``notebooks/12_decisions.ipynb``).
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Sequence

from adlib.bench.folders import check_options, check_output, say, unique_names
from adlib.bench.lineup import CALIBRATION_SHARE, TARGET_FPR

#: Images scored at a time by ``predict`` (a folder of any size never sits in memory whole).
PREDICT_BATCH = 32


def images_under(folder: str | Path) -> list[Path]:
    """The image files in ``folder`` and its sub-folders, sorted; hidden files and folders are skipped.

    Used by: ``adlib.bench.deploy.predict``, ``adlib.bench.deploy.fit``.
    """
    from adlib.data.mvtec import IMAGE_EXTENSIONS

    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def good_folders(data: Path | None, categories: Sequence[str] | None, good: Path | None) -> dict[str, Path]:
    """{name: folder of good images}: ``data/<category>/train/good`` for each category (``test/`` is optional and
    unused), or the one folder ``good`` under its own name.

    Used by: ``python -m adlib fit``.
    """
    if (data is None) == (good is None):
        raise ValueError("pass either --data ROOT (ROOT/<category>/train/good) or --good DIR, not both.")
    if good is not None:
        if not good.is_dir():
            raise FileNotFoundError(f"--good {good} is not a folder of good images.")
        return {good.name: good}
    names = categories or sorted(p.name for p in data.iterdir() if (p / "train" / "good").is_dir())
    if not names:
        raise FileNotFoundError(f"No ROOT/<category>/train/good folders under {data}; pass the folder that holds "
                                "the categories, or --good DIR for a plain folder of good images.")
    missing = [n for n in names if not (data / n / "train" / "good").is_dir()]
    if missing:
        raise FileNotFoundError(f"No {data / missing[0] / 'train' / 'good'}: a category needs its good images there.")
    return {n: data / n / "train" / "good" for n in names}


def calibration_record(scores: Any, maps: Any, target_fpr: float) -> dict[str, Any]:
    """What a model stores to decide: the calibration ``scores`` (n,), the ``threshold`` for ``target_fpr`` and the
    heatmap ``map_scale`` of the calibration ``maps`` (n, H, W).

    Used by: ``adlib.bench.deploy.fit``, ``adlib.bench.deploy.calibrate``.
    """
    from adlib.eval import decisions

    return {"scores": [float(s) for s in scores], "target_fpr": float(target_fpr),
            "threshold": decisions.conformal_threshold(scores, target_fpr),
            "map_scale": list(decisions.map_scale(maps))}


def fit(method: str, good: Path, save_model: Path, *, target_fpr: float = TARGET_FPR,
        calibration_share: float = CALIBRATION_SHARE, image_size: int | None = None, backbone: str | None = None,
        device: str | None = None, seed: int = 0, options: dict[str, Any] | None = None,
        overwrite: bool = False, category: str | None = None) -> dict[str, Any]:
    """Fit ``method`` on the good images under ``good`` minus a held-out calibration share, calibrate on that share
    and save the model with its calibration (:func:`calibration_record`); returns a summary. ``category`` names
    the object for a method that needs it (default: the folder's name). Every image is read before the fit.

    Used by: ``python -m adlib fit``.
    """
    from adlib.bench.lineup import DEFAULT_BACKBONE, DEFAULT_IMAGE_SIZE
    from adlib.core.runtime import choose_device, seed_everything
    from adlib.data import mvtec
    from adlib.eval import decisions
    from adlib.methods import catalog

    image_size, backbone, options = image_size or DEFAULT_IMAGE_SIZE, backbone or DEFAULT_BACKBONE, options or {}
    check_options(method, options)
    check_output(save_model, "--save-model", overwrite)
    paths = images_under(good)
    if not paths:
        raise FileNotFoundError(f"No images ({', '.join(mvtec.IMAGE_EXTENSIONS)}) under {good}.")
    fit_idx, cal_idx = decisions.calibration_split(len(paths), calibration_share, target_fpr, seed)
    fit_paths, cal_paths = [paths[i] for i in fit_idx], [paths[i] for i in cal_idx]
    device = str(choose_device(device))
    seed_everything(seed)
    fit_set, cal_set = mvtec.read_images(fit_paths, image_size), mvtec.read_images(cal_paths, image_size)
    det = catalog.make_detector(method, **catalog.run_options(method, category or good.name, backbone,
                                                              {"device": device, "seed": seed} | options))
    det.fit(fit_set)
    scores = det.predict(cal_set)
    record = calibration_record(scores.image, scores.maps, target_fpr)
    det.save(save_model, overwrite, image_size=image_size, data=str(good),
             calibration=record | {"share": calibration_share})
    return {"model": str(save_model), "fitted_on": len(fit_paths), "calibrated_on": len(cal_paths),
            "threshold": record["threshold"], "target_fpr": target_fpr}


def calibrate(model: Path, good: Path, target_fpr: float | None = None, device: str | None = None) -> dict[str, Any]:
    """Score the good images under ``good`` (new ones, never fitted on: e.g. after a camera or lighting change) with
    the saved ``model`` and store them as its calibration, with the threshold for ``target_fpr`` (default the
    model's). The fitted detector is unchanged; the file is replaced in one step. Returns the old and new threshold.

    Used by: ``python -m adlib calibrate``.
    """
    from adlib.core.runtime import choose_device
    from adlib.data import mvtec
    from adlib.methods import catalog

    det, meta = catalog.load_detector(model, str(choose_device(device)))
    old = meta.get("calibration") or {}
    target = target_fpr or old.get("target_fpr", TARGET_FPR)
    paths = images_under(good)
    if not paths:
        raise FileNotFoundError(f"No images ({', '.join(mvtec.IMAGE_EXTENSIONS)}) under {good}.")
    scores = det.predict(mvtec.read_images(paths, tuple(det.image_shape)))
    record = calibration_record(scores.image, scores.maps, target)
    det.save(model, True, **(meta | {"calibration": record | {"share": None, "good": str(good)}}))
    return {"model": str(model), "calibrated_on": len(paths), "target_fpr": target,
            "old_threshold": old.get("threshold"), "threshold": record["threshold"]}


def predict(model: str | Path, inputs: Sequence[str | Path], device: str | None = None,
            save_maps: str | Path | None = None, report: str | Path | None = None, target_fpr: float | None = None,
            overwrite: bool = False) -> list[dict[str, Any]]:
    """Score new images (files, or folders searched recursively) with a saved detector, ``PREDICT_BATCH`` at a time:
    one row per image, ``path``, ``score``, and with a calibrated model its conformal ``p_value`` and ``anomalous``
    (score above the stored threshold, or above the threshold for ``target_fpr`` when given). ``save_maps``: one
    figure per image (the original, the heatmap on the model's fixed scale with a colour bar, score and decision
    in the title, at the image's own size); ``report``: those figures and an HTML page, flagged images first.

    Used by: ``python -m adlib predict``.
    """
    import numpy as np

    from adlib import viz
    from adlib.core.runtime import choose_device
    from adlib.data import image_files, mvtec
    from adlib.eval import decisions
    from adlib.methods import catalog

    maps_dir = Path(report) / "maps" if report is not None else None if save_maps is None else Path(save_maps)
    if report is not None and save_maps is not None:
        raise ValueError("--report writes its own figures (REPORT/maps); pass --report or --save-maps, not both.")
    check_output(Path(report) if report is not None else maps_dir, "--report" if report else "--save-maps",
                 overwrite, folder=True)
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += images_under(item)
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"No image or folder {item}.")
    if not paths:
        raise FileNotFoundError(f"No images ({', '.join(mvtec.IMAGE_EXTENSIONS)}) in {list(map(str, inputs))}.")
    for path in paths:  # every header before the first score
        image_files.image_size(path)
    det, meta = catalog.load_detector(model, str(choose_device(device)))
    cal = meta.get("calibration")
    if cal is None:
        if target_fpr is not None:
            raise ValueError(f"{model} stores no calibration, so --target-fpr has nothing to set a threshold from; "
                             f"run: python -m adlib calibrate --model {model} --good DIR")
        say(f"{model} stores no calibration: scores only, heatmaps scaled to each batch "
             f"(python -m adlib calibrate --model {model} --good DIR adds p-values and decisions)")
    threshold = None if cal is None else (cal["threshold"] if target_fpr is None
                                          else decisions.conformal_threshold(cal["scores"], target_fpr))
    names = unique_names(paths)
    rows: list[dict[str, Any]] = []
    for lo in range(0, len(paths), PREDICT_BATCH):
        batch = paths[lo:lo + PREDICT_BATCH]
        scores = det.predict(mvtec.read_images(batch, tuple(det.image_shape)))
        p = decisions.conformal_p_values(cal["scores"], scores.image) if cal else [None] * len(batch)
        scale = cal["map_scale"] if cal else (float(np.min(scores.maps)), float(np.max(scores.maps)))
        for k, path in enumerate(batch):
            score = float(scores.image[k])
            row = {"path": str(path), "score": score, "p_value": None if cal is None else float(p[k]),
                   "anomalous": None if cal is None else bool(score > threshold)}
            rows.append(row)
            if maps_dir is not None:
                row["figure"] = str(viz.save_decision_figure(maps_dir / f"{names[lo + k]}.png",
                                                             image_files.read_image(path), scores.maps[k],
                                                             scale, _title(row, threshold)))
    if report is not None:
        write_report(Path(report) / "index.html", rows, model, threshold)
    return rows


def _title(row: dict[str, Any], threshold: float | None) -> str:
    if row["anomalous"] is None:
        return f"score {row['score']:.4g} (no calibration)"
    verdict = "ANOMALOUS" if row["anomalous"] else "normal"
    return f"{verdict}: score {row['score']:.4g} (threshold {threshold:.4g}), p = {row['p_value']:.3g}"


def write_report(path: Path, rows: Sequence[dict[str, Any]], model: str | Path, threshold: float | None) -> Path:
    """An HTML page that opens offline: a grid of the images' figures (relative links), flagged images first, then by
    p-value and score, each with its score, p-value and decision.

    Used by: ``adlib.bench.deploy.predict``.
    """
    order = sorted(rows, key=lambda r: (not r["anomalous"], r["p_value"] if r["p_value"] is not None else 1.0,
                                        -r["score"]))
    n_flagged = sum(bool(r["anomalous"]) for r in rows)
    cells = []
    for r in order:
        link = html.escape(os.path.relpath(r["figure"], path.parent))
        verdict = "no calibration" if r["anomalous"] is None else "anomalous" if r["anomalous"] else "normal"
        p = "" if r["p_value"] is None else f", p = {r['p_value']:.3g}"
        cells.append(f'<figure class="{verdict.split()[0]}"><a href="{link}"><img src="{link}" alt="{verdict}"></a>'
                     f"<figcaption>{html.escape(verdict)}: score {r['score']:.4g}{p}<br>"
                     f"{html.escape(r['path'])}</figcaption></figure>")
    head = (f"{len(rows)} images scored by {html.escape(str(model))}: {n_flagged} flagged"
            + ("" if threshold is None else f" (score above {threshold:.4g})"))
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>adlib predict</title><style>"
            "body{font-family:sans-serif}main{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));"
            "gap:12px}img{width:100%}figure{margin:0}.anomalous figcaption{color:#b00;font-weight:bold}</style>"
            f"</head><body><h1>{head}</h1><main>\n" + "\n".join(cells) + "\n</main></body></html>\n")
    path.write_text(page, encoding="utf-8")
    return path

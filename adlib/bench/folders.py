"""``python -m adlib run`` as a function, safe on real folders (``fit``, ``calibrate`` and ``predict``:
:mod:`adlib.bench.deploy`).

Everything that can fail cheaply fails before the first fit: the categories (each once), every input file's header,
the image size against the inputs and the machine's memory, the ``--set`` options against the method's keywords, and
every output path (its folder exists and is writable, no symbolic link, nothing already there unless
``overwrite``). Then each category is fitted, reported and handed to ``on_category`` (the command rewrites its JSON
there) as soon as it is done, so a late failure or Ctrl-C keeps every finished category.
"""
from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from adlib.bench.lineup import CALIBRATION_SHARE, DEFAULT_BACKBONE, DEFAULT_IMAGE_SIZE, TARGET_FPR

if TYPE_CHECKING:
    import pandas as pd

#: The columns of a run's row: quality, then cost (seconds, and the memory the detector added, MB: its backbone, fit
#: and scoring, over what the category's own new process held with the images read).
COLUMNS = ("image_auroc", "pixel_auroc", "aupro", "fit_s", "predict_s", "added_mb")
#: ``run --calibrate`` adds: the threshold and the test split's false-alarm and detection rates at it.
CALIBRATED_COLUMNS = ("threshold", "false_alarm_rate", "detection_rate")
#: What a float32 patch feature costs per training pixel, for the memory estimate (a 1,000-d feature per 8 x 8 px).
_BANK_BYTES_PER_PIXEL = 1000 * 4 / 64


def say(text: str) -> None:
    """Print a progress or status line on stderr (stdout is the command's result).

    Used by: ``adlib.bench.folders.run``, ``adlib.bench.deploy.predict``.
    """
    print(text, file=sys.stderr, flush=True)


def check_options(method: str, options: dict[str, Any]) -> None:
    """Refuse an option ``method`` does not take, or a value of another type than its default's (an int is a float).

    Used by: ``adlib.bench.folders.run``, ``adlib.bench.deploy.fit``.
    """
    from adlib.methods import catalog

    params = inspect.signature(catalog.detector_class(method)).parameters
    for key, value in options.items():
        if key not in params:
            known = ", ".join(k for k in params if k not in ("self", "device", "seed"))
            raise ValueError(f"{method} has no option {key!r}; its options: {known} (python -m adlib list).")
        default = params[key].default
        if default is inspect.Parameter.empty or default is None or value is None:
            continue
        wanted = (int, float) if type(default) is float else type(default)
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, wanted):
            raise ValueError(f"--set {key}={value!r}: {method} expects a {type(default).__name__} for {key} "
                             f"(default {default!r}).")


def check_output(path: Path | None, what: str, overwrite: bool, folder: bool = False) -> None:
    """Refuse an output ``path`` (a file, or with ``folder`` a folder) that cannot be written: a symbolic link, a
    missing or read-only parent folder, the wrong kind, or a file (a non-empty folder) already there without
    ``overwrite``.

    Used by: ``adlib.bench.folders.run``, ``adlib.bench.deploy``.
    """
    if path is None:
        return
    if path.is_symlink():
        raise ValueError(f"{what} {path} is a symbolic link; adlib does not write through links: pass a real path.")
    if path.exists():
        if path.is_dir() != folder:
            wanted = "folder" if folder else "file name"
            raise ValueError(f"{what} {path} is a {'file' if folder else 'folder'}; pass a {wanted}.")
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{what} {path} is not writable.")
        links = [p for p in path.rglob("*") if p.is_symlink()] if folder else []
        if links:
            raise ValueError(f"{what} {path} holds a symbolic link ({links[0]}); adlib does not write through links.")
        if (any(path.iterdir()) if folder else True) and not overwrite:
            raise FileExistsError(f"{what} {path} exists{' and is not empty' if folder else ''}; pass --overwrite to "
                                  "replace what is there, or choose another.")
        return
    parent = path.parent
    while folder and not parent.exists() and parent != parent.parent:  # a folder may be made with its parents
        parent = parent.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"The folder of {what} {path} does not exist: create {parent} first.")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"Cannot write {what} {path}: the folder {parent} is not writable.")


def check_inputs(root: Path, categories: Sequence[str], image_size: int, allow_large: bool) -> None:
    """Read every image's header (an unreadable file fails here, not after hours of fitting), check the masks and
    refuse an ``image_size`` above twice the largest input, or whose estimated memory exceeds what is free, unless
    ``allow_large``.

    Used by: ``adlib.bench.folders.run``.
    """
    from adlib.data import image_files, mvtec

    largest, n_train, n_test = 0, 0, 0
    for category in categories:
        train = mvtec.MVTecDataset(root, category, "train", image_size)
        test = mvtec.MVTecDataset(root, category, "test", image_size)  # checks every mask against its image
        for path, *_ in train.samples + test.samples:
            largest = max(largest, *image_files.image_size(path))
        n_train, n_test = max(n_train, len(train)), max(n_test, len(test))
    if allow_large:
        return
    if image_size > 2 * largest:
        raise ValueError(f"--image-size {image_size} is more than twice the largest input image ({largest} px): "
                         "upsampling adds no detail and multiplies time and memory. Pass --allow-large to run anyway.")
    need = (n_train + n_test) * 3 * image_size ** 2 * 4 * 2 + n_train * image_size ** 2 * _BANK_BYTES_PER_PIXEL
    free = _free_memory()
    if free is not None and need > free:
        raise MemoryError(f"--image-size {image_size} needs about {need / 2**30:.1f} GiB for {n_train} training and "
                          f"{n_test} test images (float32 copies and a patch-feature bank), but {free / 2**30:.1f} "
                          "GiB are free. Lower --image-size, or pass --allow-large to run anyway.")


def _free_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: no estimate, no refusal
        return None


def model_paths(save_model: Path | None, cats: Sequence[str]) -> dict[str, Path | None]:
    """One file per category: FILE itself for one category, FILE's stem + _<category> for several.

    Used by: ``adlib.bench.folders.run``, ``python -m adlib fit``.
    """
    if save_model is None:
        return {c: None for c in cats}
    return {c: save_model if len(cats) == 1 else save_model.with_name(f"{save_model.stem}_{c}{save_model.suffix}")
            for c in cats}


def run(method: str, root: str | Path, categories: Sequence[str] | None = None, *, backbone: str = DEFAULT_BACKBONE,
        image_size: int = DEFAULT_IMAGE_SIZE, device: str | None = None, seed: int = 0,
        save_maps: str | Path | None = None, save_model: str | Path | None = None,
        options: dict[str, Any] | None = None, overwrite: bool = False, allow_large: bool = False,
        on_category: Callable[[dict[str, Any]], None] | None = None, calibrate: bool = False,
        target_fpr: float = TARGET_FPR) -> dict[str, Any]:
    """``python -m adlib run`` as a function: check everything, then every category in turn, then the mean; returns
    the JSON document. ``on_category`` gets the document after each category (``"complete": False`` until the
    last one, the mean ``None`` until then). ``calibrate`` adds each category's ``false_alarm_rate`` and
    ``detection_rate`` at a threshold for ``target_fpr`` (:func:`calibrated_rates`: a second fit on
    all but a calibration share; the row's metrics keep the fit on every training image).

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    import numpy as np
    import torch

    from adlib.core.runtime import choose_device, in_fresh_processes
    from adlib.data import mvtec
    from adlib.methods import catalog

    root, options = Path(root), options or {}
    maps_dir, model_file = (None if p is None else Path(p) for p in (save_maps, save_model))
    uses_backbone = "backbone" in inspect.signature(catalog.detector_class(method)).parameters  # method known
    check_options(method, options)
    cats = mvtec.select_categories(root, categories)
    model_files = model_paths(model_file, cats)
    for cat in cats:
        check_output(model_files[cat], "--save-model", overwrite)
        check_output(None if maps_dir is None else maps_dir / cat, "--save-maps", overwrite, folder=True)
    check_inputs(root, cats, image_size, allow_large)
    if calibrate:  # a calibration share too small for the target is refused now, not after a fit
        from adlib.eval.decisions import calibration_split

        for cat in cats:
            calibration_split(len(mvtec.MVTecDataset(root, cat, "train", image_size)), CALIBRATION_SHARE, target_fpr)
    device = str(choose_device(device))
    document = {"method": method, "backbone": backbone if uses_backbone else None, "image_size": image_size,
                "device": device, "seed": seed, "options": options, "categories": {}, "mean": None,
                "complete": False}
    for cat in cats:  # each in a new process, so that "added_mb" is the category's own memory
        call = {"method": method, "root": root, "category": cat, "image_size": image_size, "backbone": backbone,
                "device": device, "seed": seed, "options": options, "save_maps": maps_dir,
                "save_model": model_files[cat], "overwrite": overwrite,
                "target_fpr": target_fpr if calibrate else None}
        say(f"[{cat}] fitting {method} ...")
        ((row, lines),) = in_fresh_processes(_run_one_category, [call], threads=torch.get_num_threads(),
                                             preload=("adlib.bench.runs", "adlib.viz"))
        for line in lines:
            say(line)
        document["categories"][cat] = row
        rows = document["categories"].values()
        if len(rows) == len(cats):
            document["mean"] = {k: None if any(r[k] is None for r in rows) else float(np.mean([r[k] for r in rows]))
                                for k in rows_columns(rows)}
            document["complete"] = True
        if on_category is not None:
            on_category(document)
    return document


def _run_one_category(method: str, root: Path, category: str, *, image_size: int, backbone: str, device: str,
                      seed: int, options: dict[str, Any], save_maps: Path | None, save_model: Path | None,
                      overwrite: bool, target_fpr: float | None) -> tuple[dict[str, float | None], list[str]]:
    """:func:`adlib.bench.runs.run_category` with the command's overlays and saved model; the row and the lines to
    print (returned, not printed: this runs in a process of its own, whose output would bypass the caller's)."""
    from adlib import viz
    from adlib.bench import runs
    from adlib.data import mvtec

    run = runs.run_category(method, root, category, image_size=image_size, backbone=backbone, device=device,
                            seed=seed, options=options)
    note = "" if run.test.masks is not None else " (no ground-truth masks: image-level metrics only)"
    row = {k: run.row[k] for k in COLUMNS}
    quality = ", ".join(f"{k.replace('_', ' ')} {row[k]:.3f}" for k in COLUMNS[:3] if row[k] is not None)
    lines = [f"[{category}] {run.n_train} train / {len(run.test)} test images at {image_size} px{note}",
             f"[{category}] done: {quality}; fit {row['fit_s']:.1f} s, predict {row['predict_s']:.1f} s, "
             f"{row['added_mb']:.0f} MB added"]
    if target_fpr is not None:
        from adlib.methods import catalog

        train = mvtec.load_split(root, category, "train", image_size)
        row |= calibrated_rates(lambda: catalog.make_detector(method, **catalog.run_options(
            method, category, backbone, {"device": device, "seed": seed} | options)), train, run.test, target_fpr,
            seed=seed)
        lines.append(f"[{category}] a second fit without {CALIBRATION_SHARE:.0%} of train/good, its threshold for a "
                     f"false-alarm rate of {target_fpr:g} set on them: false alarms {row['false_alarm_rate']:.3f}, "
                     f"detections {row['detection_rate']:.3f} of the test images")
    if save_maps is not None:
        names = unique_names([Path(d) / Path(p).name for d, p in zip(run.test.defects, run.test.files)])
        viz.save_overlays(save_maps / category, run.test.images, run.scores.maps, names, overwrite=overwrite)
        lines.append(f"[{category}] {len(names)} overlays in {save_maps / category}")
    if save_model is not None:
        run.detector.save(save_model, overwrite, image_size=image_size, category=category, data=str(root))
        lines.append(f"[{category}] detector saved to {save_model}")
    return row, lines


def calibrated_rates(make_detector: Callable[[], Any], train: Any, test: Any, target_fpr: float,
                     calibration_share: float = CALIBRATION_SHARE, seed: int = 0) -> dict[str, float]:
    """``run --calibrate``: a second detector (``make_detector()``) fitted on ``train`` (an ImageSet of good images)
    minus a calibration share, its threshold for ``target_fpr`` from that share, and the false-alarm and detection
    rates it gives on the labelled ``test`` ImageSet.

    Used by: ``adlib.bench.folders._run_one_category``.
    """
    from adlib.eval import decisions

    fit_idx, cal_idx = decisions.calibration_split(len(train), calibration_share, target_fpr, seed)
    det = make_detector()
    det.fit(train[fit_idx])
    threshold = decisions.conformal_threshold(det.predict(train[cal_idx]).image, target_fpr)
    return {"threshold": threshold, **decisions.rates(test.labels, det.predict(test).image, threshold)}


def unique_names(paths: Sequence[Path]) -> list[str]:
    """One overlay name per input path: ``<parent>_<stem>``, numbered (``_2``, ``_3``) where two paths still share it
    (``a.png`` and ``a.jpg`` in one folder), so no overlay overwrites another.

    Used by: ``adlib.bench.deploy.predict``.
    """
    names: list[str] = []
    for path in paths:
        base = f"{path.parent.name}_{path.stem}" if path.parent.name else path.stem
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    return names


def results_table(result: dict[str, Any]) -> pd.DataFrame:
    """The per-category table of a :func:`run` result, with its mean row once complete (None shown as NaN).

    Defined in: "Datasets and metrics" (``notebooks/02_datasets_and_metrics.ipynb``).
    """
    import pandas as pd

    rows = {**result["categories"], **({"mean": result["mean"]} if result["mean"] is not None else {})}
    return pd.DataFrame(rows).T[rows_columns(result["categories"].values())].astype(float)


def rows_columns(rows: Any) -> list[str]:
    """:data:`COLUMNS`, then ``run --calibrate``'s columns where every row has them.

    Used by: ``adlib.bench.folders.run``, ``adlib.bench.folders.results_table``.
    """
    rows = list(rows)
    extra = [k for k in CALIBRATED_COLUMNS if rows and all(k in r for r in rows)]
    return list(COLUMNS) + extra

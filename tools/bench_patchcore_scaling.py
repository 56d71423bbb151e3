"""PatchCore's fit time, added memory and quality against the training-set size and the image size.

    .venv/bin/python tools/bench_patchcore_scaling.py [--n-train 80 160 320 640 1000] [--sizes 128 256]
        [--categories hubble_deep_field immunohistochemistry] [--coreset-rows N | --exact] [--out scaling.json]

Each run is a fresh process on one thread (so "added MB" is PatchCore's own peak over the process before the fit, not
memory left by earlier runs) on the held-out validation set (``adlib.data.heldout``, never SynthTex's test split):
normal crops for training, the SynthTex defect types on other crops for testing. PatchCore's default runs one greedy
coreset over all patches; ``--coreset-rows N`` the chunked one, to judge it against the default. A benchmark, not a
test.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(n_train: int, size: int, categories: list[str], coreset_rows: int | None) -> dict:
    """Fit and score PatchCore on each category in this process; the row of the table."""
    import numpy as np
    import torch

    from adlib.core.runtime import PeakMemory
    from adlib.data import heldout
    from adlib.eval import metrics
    from adlib.methods import patchcore

    torch.set_num_threads(1)
    data = heldout.validation_set(image_size=size, n_train=n_train)
    fit_s, added, image, aupro, bank = [], [], [], [], 0
    for name in categories:
        det = patchcore.PatchCore(coreset_rows=coreset_rows)
        before = PeakMemory.rss_mb()
        with PeakMemory() as peak:
            t0 = time.perf_counter()
            det.fit(data[name].train)
            fit_s.append(time.perf_counter() - t0)
        added.append(peak.peak_mb - before)
        scores = det.predict(data[name].test)
        image.append(metrics.image_auroc(data[name].test.labels, scores.image))
        aupro.append(metrics.aupro(data[name].test.masks, scores.maps))
        bank += len(det.bank)
    return {"n_train": n_train, "size": size, "coreset_rows": coreset_rows, "fit_s": float(np.mean(fit_s)),
            "added_mb": float(np.max(added)), "image_auroc": float(np.mean(image)), "aupro": float(np.mean(aupro)),
            "bank_rows": bank, "categories": categories}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", nargs="+", type=int, default=[80, 160, 320, 640, 1000])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--categories", nargs="+", default=["hubble_deep_field", "immunohistochemistry"])
    rows = parser.add_mutually_exclusive_group()
    rows.add_argument("--coreset-rows", type=int, help="PatchCore's coreset_rows: chunks of at most this many rows")
    rows.add_argument("--exact", action="store_true", help="one greedy over all patches (coreset_rows=None, the "
                      "default)")
    parser.add_argument("--out", type=Path, help="append the rows to this JSON list")
    parser.add_argument("--one", nargs=2, type=int, metavar=("N_TRAIN", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from adlib.methods.patchcore import PatchCore

    coreset_rows = None if args.exact else args.coreset_rows if args.coreset_rows else PatchCore().coreset_rows
    if args.one:
        print(json.dumps(one_run(*args.one, args.categories, coreset_rows)))
        return
    print(f"{'n_train':>7} {'size':>4} {'fit_s':>7} {'added_MB':>8} {'image_AUROC':>11} {'AUPRO':>6} {'bank':>7}")
    print("(fit_s: mean seconds per category; added_MB: the largest category's; quality: mean over the categories;"
          " bank: coreset rows of all categories)")
    results = []
    for size in args.sizes:
        for n in args.n_train:
            cmd = [sys.executable, __file__, "--one", str(n), str(size), "--categories", *args.categories,
                   *(["--coreset-rows", str(coreset_rows)] if coreset_rows else ["--exact"])]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={"OMP_NUM_THREADS": "1",
                                  "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
            if done.returncode:
                print(done.stderr[-2000:], file=sys.stderr)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(row)
            print(f"{n:7d} {size:4d} {row['fit_s']:7.1f} {row['added_mb']:8.0f} {row['image_auroc']:11.3f} "
                  f"{row['aupro']:6.3f} {row['bank_rows']:7d}", flush=True)
    if args.out is not None:
        old = json.loads(args.out.read_text()) if args.out.exists() else []
        args.out.write_text(json.dumps(old + results, indent=1) + "\n")


if __name__ == "__main__":
    main()

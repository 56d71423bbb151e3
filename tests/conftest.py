"""Test setup: every cache inside the work tree, no hub access, a non-interactive matplotlib."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"

# Set before anything imports matplotlib/torch/HF, and inherited by papermill's kernels.
for var, sub in {
    "ADLIB_DATA": "data",
    "MPLCONFIGDIR": "matplotlib",
    "IPYTHONDIR": "ipython",
    "JUPYTER_DATA_DIR": "jupyter",
    "HF_HOME": "huggingface",
    "TORCH_HOME": "torch",
    "SCIKIT_LEARN_DATA": "scikit_learn",
}.items():
    os.environ.setdefault(var, str(CACHE / sub))
    Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

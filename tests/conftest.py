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


import pytest  # noqa: E402  (after the environment above: imports below must see it)
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: two threads on a shared 2-core machine are ~50x slower for tiny
    convolutions, and one thread makes the training tests repeat bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

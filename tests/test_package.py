"""The package installs whole: a wheel built from the repository holds every module and every shipped file.

The editable install that `make` uses reads the work tree and would hide a module left out of the wheel; Colab's
`pip install git+...` builds a wheel.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from notebook_contract import ROOT


def test_the_wheel_holds_every_module_and_every_registry_file(tmp_path) -> None:
    # Built from a copy of the tracked files: setuptools packs whatever a stale build/lib holds.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    src = tmp_path / "src"
    for name in tracked:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                    "--quiet", "--wheel-dir", str(tmp_path)], check=True, timeout=300, cwd=tmp_path)
    wheel = next(tmp_path.glob("adlib-*.whl"))
    inside = set(zipfile.ZipFile(wheel).namelist())
    tracked = [f for f in tracked if f.startswith("adlib/")]
    missing = sorted(f for f in tracked if f not in inside)
    assert not missing, f"{wheel.name} lacks {missing}: check [tool.setuptools] in pyproject.toml"
    assert "adlib/weights/registry.json" in inside and "adlib/eval/claims.py" in inside

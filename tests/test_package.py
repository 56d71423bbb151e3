"""The package installs whole: a wheel built from the repository holds every module and every shipped file, and its
console script answers ``--help`` and ``list`` in a bare environment (no torch: the CLI imports it only to work).

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
    # Built from a copy of the files git tracks or would track (new ones too): setuptools packs whatever a stale
    # build/lib holds.
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.splitlines()
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

    # The wheel alone, in a bare environment (no torch, numpy, ...): the console script still lists and helps.
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=60)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(bare / "bin" / "python"), "install", "--no-deps",
                    "--quiet", "--disable-pip-version-check", str(wheel)], check=True, timeout=120, cwd=tmp_path)
    script = bare / "bin" / "adlib"
    assert subprocess.run([str(bare / "bin" / "python"), "-c", "import torch"], capture_output=True).returncode != 0
    helped = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert helped.returncode == 0 and "distill-teacher" in helped.stdout, helped.stderr
    listed = subprocess.run([str(script), "list"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert listed.returncode == 0 and "patchcore" in listed.stdout and "effnet-lite0" in listed.stdout, listed.stderr

"""The wheel holds the library alone: installed into a fresh venv, it brings `jest_jax`
and no top-level `configs` (experiment files are loaded by path, not imported)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def _run(*args: str, cwd: str) -> str:
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, f"{' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out.stdout


def test_wheel_installs_jest_jax_and_no_configs_package(tmp_path):
    # A copy of the checkout, so that building leaves nothing behind in it.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    # What `pip install .` does, in two offline halves: build the wheel with the build
    # tools `make install` provides, then install it into a fresh venv from the file.
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "--wheel-dir", str(dist), str(source), cwd=str(tmp_path))
    (wheel,) = glob.glob(str(dist / "jest_jax-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        tops = {name.split("/")[0] for name in z.namelist()}
        top_level = next(z.read(n).decode().split() for n in z.namelist()
                         if n.endswith("top_level.txt"))
    assert "jest_jax" in tops and "configs" not in tops
    assert top_level == ["jest_jax"]
    # The zero-shot benchmark sets travel as package data, with their source and licence.
    shipped = {n.rsplit("/", 1)[1] for n in z.namelist()
               if n.startswith("jest_jax/data/benchmarks/")}
    assert shipped == {"README.md", "LICENSE-CLIP.txt", "imagenet.txt", "cifar10.txt",
                       "cifar100.txt", "clip_imagenet_80.txt", "clip_cifar_18.txt"}

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", str(venv), cwd=str(tmp_path))
    python = str(venv / "bin" / "python")
    _run(python, "-m", "pip", "install", "--no-deps", "--no-index", wheel, cwd=str(tmp_path))
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                cwd=str(tmp_path)).strip()
    installed = set(os.listdir(site))
    assert "jest_jax" in installed and "configs" not in installed
    assert os.path.isfile(os.path.join(site, "jest_jax", "config.py"))  # the defaults
    # From a directory without the checkout, `configs` is not importable at all.
    probe = "import importlib.util as u; print(u.find_spec('configs'), u.find_spec('jest_jax'))"
    found = _run(python, "-c", probe, cwd=str(tmp_path)).split(" ", 1)
    assert found[0] == "None" and "jest_jax" in found[1]

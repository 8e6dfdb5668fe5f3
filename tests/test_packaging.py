"""vlm installs anywhere: the wheel holds every module and every config, and a non-editable install trains from an
empty folder through the console scripts."""

from __future__ import annotations

import configparser
import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from tiny import TINY

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("vlm-train", "vlm-eval", "vlm-infer", "vlm-serve", "vlm-export", "vlm-constitution")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the source tree (a build leaves build/ and egg-info behind)."""
    source = tmp_path_factory.mktemp("source") / "vlm"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "checkpoints", "__pycache__", "*.egg-info",
                                                                 "build", "dist", ".*_cache"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                    "-w", str(out)], check=True, capture_output=True, timeout=300)
    return next(out.glob("vlm-*.whl"))


@pytest.mark.slow
def test_the_wheel_holds_every_module_config_and_script(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"vlm/configs/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").rglob("*.yaml")}
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "vlm").rglob("*") if p.is_file() and p.suffix in
               (".py", ".html", ".css", ".js")}  # the code and the chat page
    assert configs and configs <= names, sorted(configs - names)
    assert modules <= names, sorted(modules - names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    parser = configparser.ConfigParser()
    parser.read_string(zipfile.ZipFile(wheel).read(entry_points).decode())
    declared = dict(parser["console_scripts"])
    # each vlm-<name> runs vlm.<name>'s main, and that function is there to run
    assert declared == {script: f"vlm.{script.removeprefix('vlm-')}:main" for script in SCRIPTS}
    for target in declared.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


@pytest.mark.slow
def test_a_wheel_install_trains_from_an_empty_folder(wheel, tmp_path):
    """Installed non-editable into a fresh environment, `vlm-train` finds its configs through the package."""
    venv = tmp_path / "venv"
    # the fresh environment borrows the heavy dependencies (torch, ...) from this one; vlm itself is its own
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    where = subprocess.run([str(python), "-c", "import vlm, vlm.cli; print(vlm.__file__); print(vlm.cli.CONFIG_DIR)"],
                           cwd=empty, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # the wheel's code and configs, not the checkout's
    result = subprocess.run(
        [str(venv / "bin" / "vlm-train"), "stage=contrastive", "stage.max_steps=2", "stage.batch_size=8",
         "eval.batch_size=8", "data.num_workers=0", "data.synthetic.num_train=16", "data.synthetic.num_val=8",
         "data.synthetic.samples_per_shard=8", f"data.synthetic.cache_dir={tmp_path / 'synthetic'}",
         "trainer.val_check_interval=1000", *TINY],
        cwd=empty, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    exports = list((empty / "checkpoints" / "contrastive").glob("*/export/model.safetensors"))
    assert len(exports) == 1
    scored = subprocess.run(
        [str(venv / "bin" / "vlm-eval"), f"checkpoint={exports[0].parent}", "eval.batch_size=8", "data.num_workers=0",
         "data.synthetic.num_train=16", "data.synthetic.num_val=8", "data.synthetic.samples_per_shard=8",
         f"data.synthetic.cache_dir={tmp_path / 'synthetic'}", *TINY],
        cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert json.loads(scored.stdout)["samples_scored"] == 8, scored.stderr[-3000:]  # stdout: the metrics alone

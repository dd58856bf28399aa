"""The distribution: configs and plugins ship in the wheel, and a wheel install composes a run."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_built_wheel_carries_configs_and_entry_points(tmp_path):
    # build from a copy: setuptools leaves a build/ folder behind in the tree it builds
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".ci", ".venv", "build", "runs", "outputs", "multirun", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)], check=True)
    (wheel,) = tmp_path.glob("selfloop-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("selfloop/conf/config.yaml", "selfloop/conf/loop/default.yaml", "selfloop/conf/loop/smoke.yaml", "selfloop_plugins/filter/uncertainty.py"):
        assert path in names, path
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[selfloop]" in entry_points and "uncertainty = selfloop_plugins.filter.uncertainty" in entry_points

    # the unpacked wheel, first on the path, composes the default config and lists its plugins
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import json, selfloop, selfloop.config as c\n"
        "from selfloop.plugins import load_plugins\n"
        "p = load_plugins(strict=True)\n"
        "cfg = c.compose([], p.registry)\n"
        "print(json.dumps({'file': selfloop.__file__, 'task': list(cfg.task), 'rounds': cfg.loop.rounds}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout)
    assert out["file"].startswith(str(site)) and out["task"] == ["reversal"] and out["rounds"] > 0

"""The third-party path as a user walks it, in a fresh virtual environment: pip-install
selfloop and the contrib packages from the working tree, list them, run a smoke loop with a
contrib strategy, run every contrib package's own tests there, and scaffold new plugins
whose generated tests pass once installed.

One environment serves the whole module (about a minute to build from the pip cache).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRIB = sorted(p.name for p in (ROOT / "contrib").iterdir() if (p / "pyproject.toml").exists())
pytestmark = pytest.mark.slow


class Env:
    def __init__(self, root: Path, src: Path):
        self.root, self.src = root, src
        self.bin = root / "venv" / "bin"
        self.env = {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        for leak in ("PYTHONPATH", "VIRTUAL_ENV", "PYTEST_ADDOPTS"):
            self.env.pop(leak, None)

    def run(self, *args: str | Path, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(a) for a in args], cwd=cwd or self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc

    def pip_install(self, *targets: str | Path) -> None:
        self.run(self.bin / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", *targets)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("third-party")
    # a copy of the working tree: building a wheel leaves build/ folders in the source
    src = root / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".ci", ".venv", "build", "runs", "outputs", "multirun", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"))
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    env = Env(root, src)
    env.pip_install(f"torch=={metadata.version('torch')}")  # the CPU build this suite runs on
    env.pip_install(src, *(f"{src / 'contrib' / name}[test]" for name in CONTRIB))
    return env


def test_contrib_packages_are_listed_with_their_distribution(env):
    listed = json.loads(env.run(env.bin / "selfloop", "plugins", "--json").stdout)
    assert listed["problems"] == []
    by_name = {p["name"]: p for p in listed["plugins"]}
    assert by_name["semantic_dedup"]["distribution"] == "selfloop-semantic-dedup"
    assert by_name["semantic_dedup"]["version"] == "0.1.0"
    assert by_name["semantic_dedup"]["provides"] == {"filter": ["semantic_dedup"]}
    assert by_name["uncertainty"]["distribution"] == "selfloop"


def test_a_smoke_loop_uses_a_pip_installed_contrib_filter(env):
    run_dir = env.root / "runs" / "dedup"
    env.run(env.bin / "selfloop", "run", "loop=smoke", "loop.rounds=1", "filter=[uncertainty,semantic_dedup]",
            "filter.semantic_dedup.threshold=0.99", f"hydra.run.dir={run_dir}")
    filtered = json.loads((run_dir / "round-001" / "filter" / "metrics.json").read_text())
    steps = {s["filter"]: s for s in filtered["filters"]}
    assert set(steps) == {"uncertainty", "semantic_dedup"}
    assert 0 < steps["semantic_dedup"]["kept"] <= steps["semantic_dedup"]["of"]
    plugins = json.loads((run_dir / "run.json").read_text())["plugins"]
    assert plugins["semantic_dedup"]["distribution"] == "selfloop-semantic-dedup"


@pytest.mark.parametrize("package", CONTRIB)
def test_contrib_package_tests_pass_where_it_is_installed(env, package):
    env.run(env.bin / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=env.src / "contrib" / package)


SCAFFOLD_STAGES = ("task", "model", "acquire", "filter", "optimize", "refine", "evaluate", "observer")


def test_scaffolded_plugins_pass_their_own_tests_once_installed(env):
    made = env.root / "scaffolds"
    made.mkdir()
    for stage in SCAFFOLD_STAGES:
        env.run(env.bin / "selfloop", "new-plugin", f"my_{stage}", "--stage", stage, cwd=made)
    env.pip_install(*(f"{made / f'selfloop-my-{stage}'}[test]" for stage in SCAFFOLD_STAGES))
    listed = {p["name"]: p for p in json.loads(env.run(env.bin / "selfloop", "plugins", "--json").stdout)["plugins"]}
    assert listed["my_filter"]["provides"] == {"filter": ["my_filter"]}
    assert listed["my_observer"]["hooks"] == ["selfloop_on_round_end", "selfloop_on_stage_end"]
    for stage in SCAFFOLD_STAGES:
        out = env.run(env.bin / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=made / f"selfloop-my-{stage}").stdout
        assert " passed" in out and "failed" not in out, out


def tutorial_files() -> list[tuple[str, str, str]]:
    """(mode, path, text) for each file block of docs/writing-plugins.md."""
    import re

    text = (ROOT / "docs" / "writing-plugins.md").read_text()
    return re.findall(r"<!-- (file|append): (\S+) -->\n```[a-z]*\n(.*?)```\n", text, flags=re.S)


def test_the_writing_plugins_tutorial_works_as_written(env):
    files = tutorial_files()
    assert {path for _, path, _ in files} >= {"src/selfloop_unique_prompts/__init__.py", "tests/test_unique_prompts.py", "pyproject.toml"}
    work = env.root / "tutorial"
    work.mkdir()
    env.run(env.bin / "selfloop", "new-plugin", "unique_prompts", "--stage", "filter", cwd=work)
    package = work / "selfloop-unique-prompts"
    for mode, path, text in files:
        target = package / path
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "a" if mode == "append" else "w") as fh:
            fh.write(("\n" if mode == "append" else "") + text)
    env.pip_install(f"{package}[test]")
    listed = json.loads(env.run(env.bin / "selfloop", "plugins", "--json").stdout)
    assert {"name": "unique_prompts", "package": "selfloop_unique_prompts.conf", "distribution": "selfloop-unique-prompts",
            "version": "0.1.0", "presets": ["loop/unique_smoke"]} in listed["presets"]
    out = env.run(env.bin / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=package).stdout
    assert " passed" in out and "failed" not in out, out
    # the preset composes the filter in, from the installed package
    run_dir = env.root / "runs" / "tutorial"
    env.run(env.bin / "selfloop", "run", "loop=unique_smoke", f"hydra.run.dir={run_dir}")
    steps = json.loads((run_dir / "round-001" / "filter" / "metrics.json").read_text())["filters"]
    assert [s["filter"] for s in steps] == ["uncertainty", "roundtrip", "unique_prompts"]
    # a typo in an option fails before anything runs, naming it
    bad = subprocess.run([env.bin / "selfloop", "run", "filter=[unique_prompts]", "filter.unique_prompts.kep=first"],
                         cwd=env.root, env=env.env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "selfloop: error: unknown option filter.unique_prompts.kep; valid options of filter.unique_prompts: keep "
        "(did you mean filter.unique_prompts.keep?)")

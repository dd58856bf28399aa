"""``selfloop new-plugin NAME --stage STAGE``: a plugin package that works as generated.

The package has a ``selfloop`` entry point, a typed config, a small working strategy to
replace with yours, a README, and tests built on selfloop's contract suite for the stage.
Templates are plain files next to this module (``string.Template`` syntax).
"""

from __future__ import annotations

import keyword
import re
from importlib import metadata, resources
from pathlib import Path
from string import Template

from selfloop.errors import SelfloopError
from selfloop.plugins import REGISTRATION_HOOKS

STAGES = (*REGISTRATION_HOOKS, "observer")
SUMMARIES = {
    "task": "a task (problems by difficulty level, with a checker).",
    "model": "a model provider (builds the run's initial model).",
    "acquire": "an acquirer (stage 1: produces candidate training rows).",
    "filter": "a filter (stage 2: scores rows and keeps the good ones).",
    "optimize": "an optimizer (stage 3: trains a candidate model).",
    "refine": "a refiner (stage 4: wraps generation at inference).",
    "evaluate": "an evaluator (scores models without labels).",
    "observer": "an observer (logs what every run does).",
}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def usage(stage: str, name: str) -> str:
    if stage == "observer":
        return "selfloop run loop=smoke     # observers run in every run once installed"
    if stage in ("task", "model", "optimize"):
        return f"selfloop run loop=smoke {stage}={name}"
    defaults = {"acquire": "task_sampler", "filter": "uncertainty", "refine": "self_consistency", "evaluate": "self_consistency"}
    return f"selfloop run loop=smoke {stage}=[{defaults[stage]},{name}]"


def _check(name: str, stage: str) -> None:
    if not _NAME.match(name) or keyword.iskeyword(name):
        raise SelfloopError(f"plugin name {name!r} must be lowercase letters, digits and '_', starting with a letter (e.g. my_filter)")
    if stage not in STAGES:
        raise SelfloopError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


def distribution_for(dest: Path) -> str:
    """The distribution a package directory is named for: ``selfloop-textkit`` for a directory
    ``selfloop-textkit`` or ``textkit`` (PyPI convention: community packages are ``selfloop-*``)."""
    base = re.sub(r"[^a-z0-9]+", "-", Path(dest).resolve().name.lower()).strip("-")
    dist = base if base.startswith("selfloop-") else f"selfloop-{base}"
    module = dist.replace("-", "_")
    if not module.isidentifier() or keyword.iskeyword(module) or dist == "selfloop-":
        raise SelfloopError(f"cannot name a package after the directory {Path(dest).name!r}; choose a --dir such as selfloop-my-plugins")
    return dist


def _values(name: str, stage: str, dist: str, module: str) -> dict[str, str]:
    return {
        "name": name,
        "dist": dist,
        "module": module,
        "cls": "".join(part.capitalize() for part in name.split("_")),
        "kind": stage,
        "summary": SUMMARIES[stage],
        "usage": usage(stage, name),
        "selfloop_version": metadata.version("selfloop").split("+")[0],
    }


def _write(dest: Path, files: dict[str, object], values: dict[str, str]) -> list[Path]:
    written = []
    for relative, template in files.items():
        path = dest / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(template.read_text()).substitute(values))
        written.append(path)
    return written


def render(name: str, stage: str, dest: Path) -> list[Path]:
    """Write a new package for strategy ``name`` of ``stage`` into ``dest``; return the files.
    The distribution and module are named after ``dest`` (``selfloop-NAME`` by default)."""
    _check(name, stage)
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise SelfloopError(f"{dest} already exists and is not empty; choose another --dir, or add a strategy to it with --into {dest}")
    dist = distribution_for(dest)
    module = dist.replace("-", "_")
    templates = resources.files(__package__) / "templates"
    files = {
        "pyproject.toml": templates / "pyproject.toml.tmpl",
        "README.md": templates / "README.md.tmpl",
        f"src/{module}/__init__.py": templates / "stages" / f"{stage}.py.tmpl",
        f"tests/test_{name}.py": templates / "stages" / f"{stage}_test.py.tmpl",
    }
    return _write(dest, files, _values(name, stage, dist, module))


def add(name: str, stage: str, package: Path) -> list[Path]:
    """Add strategy ``name`` of ``stage`` to an existing plugin package (one made by
    ``render``, or any with a ``src/`` layout): its own module ``src/<pkg>/<name>.py``, a test
    file, and an entry point in ``pyproject.toml``. Nothing existing is overwritten."""
    import tomllib

    _check(name, stage)
    package = Path(package)
    pyproject = package / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text())
    except FileNotFoundError:
        raise SelfloopError(f"{package} has no pyproject.toml; --into takes a plugin package (make one with `selfloop new-plugin NAME --stage STAGE`)") from None
    except tomllib.TOMLDecodeError as exc:
        raise SelfloopError(f"{pyproject} is not valid TOML: {exc}") from None
    dist = project.get("project", {}).get("name")
    points = project.get("project", {}).get("entry-points", {}).get("selfloop", {})
    if not dist or not points:
        raise SelfloopError(f"{pyproject} declares no [project.entry-points.selfloop]; --into takes a selfloop plugin package")
    if name in points:
        raise SelfloopError(f"{pyproject} already has an entry point {name!r}; choose another name")
    top = sorted({value.split(":")[0].split(".")[0] for value in points.values()})[0]
    if not (package / "src" / top).is_dir():
        raise SelfloopError(f"{package}/src/{top} not found: --into expects the src/ layout new-plugin writes")
    templates = resources.files(__package__) / "templates"
    files = {
        f"src/{top}/{name}.py": templates / "stages" / f"{stage}.py.tmpl",
        f"tests/test_{name}.py": templates / "stages" / f"{stage}_test.py.tmpl",
    }
    taken = [relative for relative in files if (package / relative).exists()]
    if taken:
        raise SelfloopError(f"{', '.join(taken)} already exist in {package}; choose another name")
    written = _write(package, files, _values(name, stage, dist, f"{top}.{name}"))
    text = pyproject.read_text()
    header = "[project.entry-points.selfloop]"
    if header not in text:  # an inline table or another spelling: safer to let the author add it
        raise SelfloopError(f"add `{name} = \"{top}.{name}\"` to the selfloop entry points of {pyproject} (written: {', '.join(map(str, written))})")
    at = text.index(header) + len(header)
    end_of_table = text.find("\n[", at)
    insert_at = len(text.rstrip("\n")) if end_of_table < 0 else end_of_table
    body = text[:insert_at].rstrip("\n") + f'\n{name} = "{top}.{name}"\n'
    pyproject.write_text(body + ("\n" + text[insert_at:].lstrip("\n") if end_of_table >= 0 else ""))
    return [*written, pyproject]

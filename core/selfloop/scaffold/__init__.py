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


def render(name: str, stage: str, dest: Path) -> list[Path]:
    """Write the package for strategy ``name`` of ``stage`` into ``dest``; return the files."""
    if not _NAME.match(name) or keyword.iskeyword(name):
        raise SelfloopError(f"plugin name {name!r} must be lowercase letters, digits and '_', starting with a letter (e.g. my_filter)")
    if stage not in STAGES:
        raise SelfloopError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise SelfloopError(f"{dest} already exists and is not empty; choose another --dir")
    module = f"selfloop_{name}"
    values = {
        "name": name,
        "dist": f"selfloop-{name.replace('_', '-')}",
        "module": module,
        "cls": "".join(part.capitalize() for part in name.split("_")),
        "kind": stage,
        "summary": SUMMARIES[stage],
        "usage": usage(stage, name),
        "selfloop_version": metadata.version("selfloop").split("+")[0],
    }
    templates = resources.files(__package__) / "templates"
    files = {
        "pyproject.toml": templates / "pyproject.toml.tmpl",
        "README.md": templates / "README.md.tmpl",
        f"src/{module}/__init__.py": templates / "stages" / f"{stage}.py.tmpl",
        f"tests/test_{name}.py": templates / "stages" / f"{stage}_test.py.tmpl",
    }
    written = []
    for relative, template in files.items():
        path = dest / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(template.read_text()).substitute(values))
        written.append(path)
    return written

"""`selfloop new-plugin`: the rendered package is well formed and its strategy registers.
(tests/test_third_party.py pip-installs every stage's package and runs its generated tests.)"""

import importlib
import sys
import tomllib

import pytest

from selfloop.cli import main
from selfloop.errors import SelfloopError
from selfloop.registry import KINDS
from selfloop.scaffold import STAGES, render
from selfloop.plugins import load_plugins


@pytest.mark.parametrize("stage", STAGES)
def test_rendered_package_registers_its_strategy(stage, tmp_path, monkeypatch):
    name = f"demo_{stage}"
    package = tmp_path / f"selfloop-demo-{stage}"  # the CLI's default directory
    files = render(name, stage, package)
    assert {p.relative_to(package).as_posix() for p in files} == {
        "pyproject.toml", "README.md", f"src/selfloop_{name}/__init__.py", f"tests/test_{name}.py"}
    project = tomllib.loads((package / "pyproject.toml").read_text())
    assert project["project"]["name"] == f"selfloop-demo-{stage}"
    assert project["project"]["entry-points"]["selfloop"] == {name: f"selfloop_{name}"}
    monkeypatch.syspath_prepend(str(package / "src"))
    module = importlib.import_module(f"selfloop_{name}")
    try:
        loaded = load_plugins(extra={name: module}, strict=True)
        if stage == "observer":
            assert loaded.info[name].hooks == ["selfloop_on_round_end", "selfloop_on_stage_end"]
        else:
            assert loaded.registry.get(stage, name).plugin == name
    finally:
        sys.modules.pop(f"selfloop_{name}", None)


def test_stage_list_covers_every_kind():
    assert set(STAGES) == {*KINDS, "observer"}


@pytest.mark.parametrize(("name", "stage", "message"), [
    ("MyFilter", "filter", "must be lowercase letters"),
    ("class", "filter", "must be lowercase letters"),
    ("ok", "sorter", "unknown stage 'sorter'; stages: task, model"),
])
def test_bad_names_are_refused_with_what_is_accepted(name, stage, message, tmp_path):
    with pytest.raises(SelfloopError, match=message):
        render(name, stage, tmp_path / "pkg")


def test_an_existing_package_is_never_overwritten(tmp_path, capsys):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mine.py").write_text("keep me")
    assert main(["new-plugin", "mine", "--stage", "filter", "--dir", str(tmp_path / "pkg")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "pkg" / "mine.py").read_text() == "keep me"


def test_cli_prints_the_next_steps(tmp_path, capsys):
    assert main(["new-plugin", "mine", "--stage", "refine", "--dir", str(tmp_path / "p")]) == 0
    assert "pip install -e '.[test]' && python -m pytest" in capsys.readouterr().out


def test_the_distribution_is_named_after_the_directory(tmp_path):
    render("mine", "filter", tmp_path / "selfloop-text-kit")
    project = tomllib.loads((tmp_path / "selfloop-text-kit" / "pyproject.toml").read_text())
    assert project["project"]["name"] == "selfloop-text-kit"
    assert project["project"]["entry-points"]["selfloop"] == {"mine": "selfloop_text_kit"}
    render("mine", "filter", tmp_path / "Tools")  # not a selfloop-* name: the prefix is added
    assert tomllib.loads((tmp_path / "Tools" / "pyproject.toml").read_text())["project"]["name"] == "selfloop-tools"


def test_a_second_strategy_is_added_into_an_existing_package(tmp_path, monkeypatch, capsys):
    package = tmp_path / "selfloop-kit"
    render("first", "filter", package)
    assert main(["new-plugin", "second", "--stage", "evaluate", "--into", str(package)]) == 0
    project = tomllib.loads((package / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["selfloop"] == {"first": "selfloop_kit", "second": "selfloop_kit.second"}
    assert project["tool"]["setuptools"]["packages"]["find"] == {"where": ["src"]}  # the rest is intact
    assert "from selfloop_kit.second import Second" in (package / "tests" / "test_second.py").read_text()
    monkeypatch.syspath_prepend(str(package / "src"))
    try:
        modules = {n: importlib.import_module(v) for n, v in project["project"]["entry-points"]["selfloop"].items()}
        loaded = load_plugins(extra=modules, strict=True)
        assert loaded.registry.get("filter", "first") and loaded.registry.get("evaluate", "second")
    finally:
        for m in ("selfloop_kit.second", "selfloop_kit"):
            sys.modules.pop(m, None)
    assert main(["new-plugin", "second", "--stage", "filter", "--into", str(package)]) == 2
    assert "already has an entry point 'second'" in capsys.readouterr().err

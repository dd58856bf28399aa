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
    files = render(name, stage, tmp_path / "pkg")
    assert {p.relative_to(tmp_path / "pkg").as_posix() for p in files} == {
        "pyproject.toml", "README.md", f"src/selfloop_{name}/__init__.py", f"tests/test_{name}.py"}
    project = tomllib.loads((tmp_path / "pkg" / "pyproject.toml").read_text())
    assert project["project"]["name"] == f"selfloop-demo-{stage}"
    assert project["project"]["entry-points"]["selfloop"] == {name: f"selfloop_{name}"}
    monkeypatch.syspath_prepend(str(tmp_path / "pkg" / "src"))
    module = importlib.import_module(f"selfloop_{name}")
    try:
        loaded = load_plugins(extra={name: module}, strict=True)
        if stage == "observer":
            assert loaded.info[name].hooks == ["selfloop_on_stage_end"]
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

import inspect
from pathlib import Path

from selfloop import hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "hooks.md"


def all_hooks():
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("selfloop_")]


def test_every_hook_has_a_docstring():
    for name in all_hooks():
        assert (getattr(hookspecs, name).__doc__ or "").strip(), f"{name} has no docstring"


def test_every_hook_is_documented_in_docs_hooks_md():
    text = DOCS.read_text()
    missing = [name for name in all_hooks() if f"`{name}" not in text]
    assert not missing, f"undocumented in docs/hooks.md: {missing}"
    assert len(all_hooks()) >= 13

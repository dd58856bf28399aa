"""Errors that the CLI reports as one clear line (no traceback)."""

import contextlib
from typing import Iterator


class SelfloopError(Exception):
    """Base class: a problem with the user's input, a plugin or a run directory."""


class PluginError(SelfloopError):
    """A plugin failed to import, raised in a hook, or registered something invalid."""


class UnknownStrategyError(SelfloopError):
    """A configuration names a strategy that no installed plugin registered."""


class ContractError(SelfloopError):
    """A strategy returned the wrong type or broke its stage's data contract."""


class RunDirError(SelfloopError):
    """A run directory is missing, incomplete or corrupt."""


def add_note(exc: BaseException, note: str) -> None:
    """Attach context to an exception's traceback (Python 3.11+; a no-op before)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)


@contextlib.contextmanager
def blame(culprit: str) -> Iterator[None]:
    """Name the strategy (plugin, distribution, version) in the traceback of what it raised."""
    try:
        yield
    except SelfloopError:
        raise  # already names its culprit
    except Exception as exc:
        add_note(exc, f"raised by {culprit}")
        raise

"""Errors that the CLI reports as one clear line (no traceback)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


class SelfloopError(Exception):
    """Base class: a problem with the user's input, a plugin or a run directory."""


class PluginError(SelfloopError):
    """A plugin failed to import, raised in a hook, or registered something invalid."""


class UnknownStrategyError(SelfloopError):
    """A configuration names a strategy that no installed plugin registered."""


class OptionError(SelfloopError, ValueError):
    """A bad option value: raise it from a Config's ``__post_init__`` or a strategy's
    ``setup(ctx)``. The core prefixes the option's full path (``filter.uncertainty.``) when
    the option is given by its field name, so the user sees one line such as
    ``bad option filter.uncertainty.min_agreement=1.5: accepted: a number in [0, 1]``.

    :param option: the field name (``min_agreement``) or the full path.
    :param value: the value that was given.
    :param accepted: what would be accepted, in words.
    """

    def __init__(self, option: str, value: Any, accepted: str):
        self.option, self.value, self.accepted = option, value, accepted
        super().__init__(self._text())

    def _text(self) -> str:
        return f"bad option {self.option}={self.value!r}: accepted: {self.accepted}"

    def located(self, prefix: str) -> OptionError:
        """The same error with the option's full path (``prefix`` + field name)."""
        if self.option.startswith(prefix):
            return self
        return OptionError(f"{prefix}{self.option}", self.value, self.accepted)


class ContractError(SelfloopError):
    """A strategy returned the wrong type or broke its stage's data contract."""


class RunDirError(SelfloopError):
    """A run directory is missing, incomplete, corrupt or in use."""


class StarvedRound(SelfloopError):
    """Raised by an optimizer that has nothing useful to train on this round (e.g. no
    preference pair survived). The loop records the round as starved: no candidate is
    trained or promoted, the curriculum waits, and the reason is in the round record."""


class RunInterrupted(BaseException):
    """Ctrl-C or SIGTERM: the run stops at once, resumable with ``selfloop resume``.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that strategies catching
    ``Exception`` cannot swallow it.
    """

    def __init__(self, signal_name: str = "SIGINT"):
        self.signal_name = signal_name
        super().__init__(f"interrupted by {signal_name}")


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

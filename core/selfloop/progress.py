"""Progress that reads well in a terminal and in a log file.

On a terminal: a tqdm bar. When stderr is not a terminal (output redirected to a file, CI,
SLURM): one plain line every ``SELFLOOP_PROGRESS_SECONDS`` (default 30) and one at the end,
instead of thousands of carriage-return updates. Strategies use :func:`progress` for long
loops; :class:`TrainerProgress` does the same for transformers/TRL trainers.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger("selfloop")


def interactive() -> bool:
    return sys.stderr.isatty() and os.environ.get("SELFLOOP_PROGRESS", "") != "lines"


def _interval() -> float:
    try:
        return float(os.environ.get("SELFLOOP_PROGRESS_SECONDS", "30"))
    except ValueError:
        return 30.0


class _Lines:
    """tqdm's interface (update, set_postfix_str, close, context manager), printing plain lines."""

    def __init__(self, total: int | None, desc: str, unit: str):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.started = self.last = time.monotonic()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= _interval():
            self.last = now
            self._line()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def _line(self, done: bool = False) -> None:
        elapsed = time.monotonic() - self.started
        of = f"/{self.total}" if self.total else ""
        pct = f" ({self.n / self.total:.0%})" if self.total else ""
        rate = f", {self.n / elapsed:.1f} {self.unit}/s" if elapsed > 0 and self.n else ""
        extra = f", {self.postfix}" if self.postfix else ""
        log.info("%s: %s%s %s%s%s in %.0fs%s", self.desc, self.n, of, self.unit, pct, rate, elapsed, " (done)" if done else extra)

    def close(self) -> None:
        if self.n and time.monotonic() - self.started >= _interval():
            self._line(done=True)

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: int | None = None, desc: str = "", unit: str = "it") -> Any:
    """A progress bar on a terminal, periodic plain log lines otherwise."""
    if interactive():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
    return _Lines(total, desc, unit)


def trainer_progress_callback(desc: str = "train"):
    """A transformers TrainerCallback that shows steps through :func:`progress` (and never
    prints the metrics dicts the default ProgressCallback prints)."""
    from transformers import TrainerCallback

    class TrainerProgress(TrainerCallback):
        def __init__(self):
            self.bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = progress(total=state.max_steps, desc=desc, unit="step")
            self.bar.update(state.global_step)  # resumed from a checkpoint

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(1)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return TrainerProgress()


def quiet_libraries() -> None:
    """No per-round "Loading weights"/"Writing shards" bars or info chatter from
    transformers and datasets; selfloop reports what matters itself."""
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()

"""Tasks from your own data: prompts (and answers) from a JSONL, CSV or Parquet file, a saved
``datasets`` directory, a packaged ``builtin:NAME`` file, or any ``datasets.load_dataset``
source by name. See docs/data.md for the whole story.

The survey's semi-supervised setting: a small *labelled* split bootstraps the model (round 0,
labels counted), a held-out *eval* split is what evaluators measure, and the large
*unlabelled pool* is what acquirers draw from in later rounds, without replacement across
rounds. References of pool rows, when the data has them, serve meta-evaluation only (the core
strips them before filters and optimizers).

Rows stay in memory-mapped Arrow: the splits are NumPy index arrays per difficulty level and a
draw reads only the rows it picks, so a draw costs the same per row from a 1,000-row file as
from a 1,000,000-row one (bench/dataset_pool.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from selfloop import hookimpl
from selfloop.errors import OptionError, SelfloopError
from selfloop.strategy import Problem, Task
from selfloop_plugins.tasks.answers import CHECKERS, EXTRACTORS, Answers, parse_number
from selfloop_plugins.tasks.difficulty import ESTIMATES, MODEL_ESTIMATES
from selfloop_plugins.tasks.tables import (
    OPTION,
    Rows,
    characters,
    column,
    difficulties,
    first_row,
    bands,
    group_by_level,
    hold_out,
    open_source,
    prompt_lengths,
    quantile_thresholds,
    reference_strings,
    text_column,
)

# rows each acquire stage drew from the pool, written with the stage's outputs
DRAWN = "drawn.json"
PLACEHOLDER = "{prompt}"


@dataclass
class DatasetConfig:
    # a .jsonl/.json/.csv/.tsv/.parquet/.arrow file, a saved `datasets` directory, a directory
    # of data files, builtin:NAME (a file shipped in selfloop_plugins/tasks/data) or a hub name
    path: str = ""
    name: Optional[str] = None  # the load_dataset configuration name (hub datasets)
    split: str = "train"
    prompt_column: str = "question"
    # the answers; needed for the bootstrap (labelled rows); null: none (the run is refused)
    reference_column: Optional[str] = "answer"
    # integer difficulty levels; null: every row is level 1
    difficulty_column: Optional[str] = None
    # what the model sees: literal text with one {prompt}; \n and \t mean newline and tab
    template: str = "Q: {prompt}\\nA:"
    # how the answer is read from a completion (and from a reference)
    extractor: str = "exact"
    pattern: Optional[str] = None  # extractor=regex: the last match (its first group, if any)
    # ground truth: exact | numeric (within tolerance) | normalized_text | none (no ground truth)
    checker: str = "exact"
    tolerance: float = 1e-6
    # the labelled split: another source (labelled_path), another split of a source
    # (labelled_split), or rows held out from `path`: a share (< 1) or a count (>= 1)
    labelled_path: Optional[str] = None
    labelled_split: Optional[str] = None
    labelled_size: float = 0.1
    # the eval split (what evaluators measure), chosen the same way
    eval_path: Optional[str] = None
    eval_split: Optional[str] = None
    eval_size: float = 0.1
    split_seed: int = 0  # the held-out rows depend on this, not on the run's seed
    # let a later round acquire a pool row again (default: each row at most once per run)
    with_replacement: bool = False
    # null: the longest reference of the level + 2
    max_new_tokens: Optional[int] = None
    # levels without a difficulty column (docs/data.md, "Difficulty without a difficulty
    # column"): none (every row level 1) | length (quantiles of prompt length) | loss |
    # agreement (the incumbent model scores pool rows each round; round 0 uses length)
    difficulty_estimate: str = "none"
    difficulty_levels: int = 5  # K quantile levels
    # loss/agreement: pool rows scored per row still wanted at the asked level
    estimate_candidates: float = 5.0
    estimate_samples: int = 4  # agreement: samples per scored row (temperature 0.7)

    def __post_init__(self):
        if self.extractor not in EXTRACTORS:
            raise OptionError("extractor", self.extractor, " | ".join(EXTRACTORS))
        if self.checker not in CHECKERS:
            raise OptionError("checker", self.checker, " | ".join(CHECKERS))
        if self.extractor == "regex":
            if not self.pattern:
                raise OptionError("pattern", self.pattern, "a regular expression (extractor=regex needs one), e.g. '#### (-?[0-9.,]+)'")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise OptionError("pattern", self.pattern, f"a valid Python regular expression ({exc})") from None
        elif self.pattern is not None:
            raise OptionError("pattern", self.pattern, "null unless extractor=regex (the pattern is used only there)")
        if self.template.count(PLACEHOLDER) != 1:
            raise OptionError("template", self.template, "text with exactly one {prompt} placeholder, e.g. 'Q: {prompt}\\nA:'")
        if not (self.tolerance >= 0 and math.isfinite(self.tolerance)):
            raise OptionError("tolerance", self.tolerance, "a finite number >= 0")
        for option in ("labelled_size", "eval_size"):
            size = getattr(self, option)
            if not (size >= 0 and math.isfinite(size) and (size < 1 or size == int(size))):
                raise OptionError(option, size, "a share of the rows in [0, 1) or a whole number of rows >= 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise OptionError("max_new_tokens", self.max_new_tokens, "null (from the references) or an integer >= 1")
        for option in ("path", "prompt_column", "split"):
            if not isinstance(getattr(self, option), str):
                raise OptionError(option, getattr(self, option), "text")
        self._check_estimate()

    def _check_estimate(self) -> None:
        estimate = self.difficulty_estimate
        if estimate not in ESTIMATES:
            raise OptionError("difficulty_estimate", estimate, " | ".join(ESTIMATES))
        if estimate != "none" and self.difficulty_column is not None:
            raise OptionError("difficulty_estimate", estimate,
                              f"none while task.dataset.difficulty_column={self.difficulty_column!r} gives the levels "
                              f"(set task.dataset.difficulty_column or task.dataset.difficulty_estimate, not both)")
        levels = self.difficulty_levels
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise OptionError("difficulty_levels", levels, "an integer >= 2 (the number of quantile levels)")
        if estimate == "none" and levels != 5:
            raise OptionError("difficulty_levels", levels, "the default (5) unless task.dataset.difficulty_estimate is set: without it no levels are estimated")
        if not (math.isfinite(self.estimate_candidates) and self.estimate_candidates >= 1):
            raise OptionError("estimate_candidates", self.estimate_candidates, "a number >= 1 (pool rows scored per row wanted)")
        if isinstance(self.estimate_samples, bool) or not isinstance(self.estimate_samples, int) or self.estimate_samples < 2:
            raise OptionError("estimate_samples", self.estimate_samples, "an integer >= 2 (one sample always agrees with itself)")


@dataclass
class Loaded:
    pool: Rows
    labelled: Rows
    eval: Rows
    levels: list[int]
    alphabet: str
    longest_prompt: int
    longest_reference: dict  # level -> characters
    eval_has_references: bool
    # difficulty_estimate != none: the prompt-length cut points of the levels (from the pool)
    length_thresholds: Optional[list] = None


# -- the task --------------------------------------------------------------------------------------
class DatasetTask(Task):
    """Prompts from a user's data; see the module docstring and docs/data.md."""

    name = "dataset"
    Config = DatasetConfig
    #: for acquirers: ``sample`` draws distinct rows of a finite pool, and the bootstrap's
    #: levels are not "already learnt" (the pool holds unlabelled rows at those levels too)
    unlabelled_pool = True

    def __init__(self, config: DatasetConfig | None = None):
        super().__init__(config)
        c = self.config
        self.answers = Answers(c.extractor, c.pattern, c.checker, c.tolerance)
        self.prefix, self.suffix = self.config.template.replace("\\n", "\n").replace("\\t", "\t").split(PLACEHOLDER)
        self._loaded: Loaded | None = None
        self._ctx = None
        self._excluded: tuple[Any, dict[int, set[int]]] | None = None
        self._estimates: tuple[Any, Any] = (None, None)  # (the stage's artifacts dict, Estimates)
        self._pool_rows = None
        self._reported: tuple[Any, set[str]] = (None, set())

    # -- loading -----------------------------------------------------------------------------
    @property
    def loaded(self) -> Loaded:
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded

    def _source(self, which: str = "", path: str | None = None, split: str | None = None):
        """The main source (``which`` empty), or the labelled/eval one: its own file
        (``<which>_path``) or another split of the main source (``<which>_split``)."""
        c = self.config
        prefix = f"{OPTION}{which}_" if which else OPTION
        path_option = f"{prefix}path" if path else f"{OPTION}path"
        split_option = f"{prefix}split" if split else f"{OPTION}split"
        spec, split = (path, split or "train") if path else (c.path, split or c.split)
        return open_source(spec, None if path else c.name, split, path_option, split_option), f"{spec}[{split}]"

    def _load(self) -> Loaded:
        c = self.config
        pool, labelled, evaluation = self._splits()
        thresholds = self._bin_by_length(pool, labelled, evaluation) if c.difficulty_estimate != "none" else None
        chars, longest_prompt, longest_ref = self._measure(pool, labelled, evaluation)
        if c.checker == "numeric":
            chars |= set("0123456789-.")
        levels = sorted({lv for split in (pool, labelled, evaluation) for lv, idx in split.by_level.items() if len(idx)})
        loaded = Loaded(
            pool=pool, labelled=labelled, eval=evaluation, levels=[int(v) for v in levels], alphabet="".join(sorted(chars)),
            longest_prompt=longest_prompt, longest_reference=longest_ref,
            eval_has_references=evaluation.references is not None and c.checker != "none",
            length_thresholds=thresholds,
        )
        self._check_references(loaded)
        return loaded

    def _splits(self) -> tuple[Rows, Rows, Rows]:
        """The pool, labelled and eval rows (see docs/data.md, "The semi-supervised split")."""
        import numpy as np
        import pyarrow.compute as pc

        c = self.config
        if c.reference_column is None:
            raise OptionError(
                f"{OPTION}reference_column", None,
                "the column of answers: round 0 (the bootstrap) trains on labelled rows, so some rows need one "
                "(with checker=none they only train the bootstrap and never score anything)",
            )
        main, name = self._source()
        diff = difficulties(main, c.difficulty_column, name)
        prompts = text_column(main, "prompt_column", c.prompt_column, name)
        separate_labels = bool(c.labelled_path or c.labelled_split)
        refs = None
        if c.reference_column in main.column_names or not separate_labels:
            refs = reference_strings(column(main, "reference_column", c.reference_column, name), c.reference_column, name)
        taken = np.zeros(len(diff), dtype=bool)

        def mark(groups: dict) -> dict:
            for rows in groups.values():
                taken[rows] = True
            return groups

        if separate_labels:
            labelled = self._separate("labelled", c.labelled_path, c.labelled_split, require_references=True)
        else:
            # rows that can be labelled: a non-empty reference
            has_ref = pc.greater(pc.fill_null(pc.utf8_length(refs), 0), 0).to_numpy(zero_copy_only=False)
            if not has_ref.any():
                raise SelfloopError(f"{name}: column {c.reference_column!r} has no answers, so no rows can be labelled for the bootstrap")
            labelled = Rows(main, prompts, refs, mark(hold_out(diff, has_ref, c.labelled_size, c.split_seed)))
        held = int(taken.sum())
        if c.eval_path or c.eval_split:
            evaluation = self._separate("eval", c.eval_path, c.eval_split, require_references=False)
        else:
            evaluation = Rows(main, prompts, refs, mark(hold_out(diff, None, c.eval_size, c.split_seed + 1, exclude=taken)))
        pool = Rows(main, prompts, refs, group_by_level(np.flatnonzero(~taken).astype(np.int32), diff))
        if not pool.size():
            raise SelfloopError(
                f"{name}: no rows are left for the unlabelled pool ({len(diff)} rows; {held} held out as labelled "
                f"(labelled_size={c.labelled_size:g}), {int(taken.sum()) - held} as eval (eval_size={c.eval_size:g})); lower them or add rows"
            )
        if not labelled.size():
            raise SelfloopError(f"{name}: no labelled rows for the bootstrap (labelled_size={c.labelled_size:g}); raise it or give task.dataset.labelled_path")
        return pool, labelled, evaluation

    def _bin_by_length(self, pool: Rows, *others: Rows) -> list:
        """Every split's rows regrouped into quantile levels of prompt length (characters),
        with cut points from the pool's prompts: labelled and eval rows of a length get the
        pool's level for it. The splits themselves are today's (all rows were level 1)."""
        import numpy as np

        lengths: dict[int, Any] = {}

        def of(split: Rows):
            if id(split.data) not in lengths:
                lengths[id(split.data)] = prompt_lengths(split.prompts)
            return lengths[id(split.data)]

        def rows(split: Rows):
            parts = [split.by_level[lv] for lv in sorted(split.by_level)]
            return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

        thresholds = quantile_thresholds(of(pool)[rows(pool)], self.config.difficulty_levels)
        for split in (pool, *others):
            split.by_level = group_by_level(rows(split), bands(of(split), thresholds))
        return thresholds

    def _measure(self, *splits: Rows) -> tuple[set[str], int, dict[int, int]]:
        """The characters of prompts (through the template) and references, the longest
        templated prompt, and the longest reference per level, from the Arrow columns."""
        import pyarrow.compute as pc

        chars: set[str] = set(self.prefix + self.suffix)
        longest_ref: dict[int, int] = {}
        longest_prompt = 0
        for source in {id(r.data): r for r in splits}.values():
            chars |= characters(source.prompts)
            longest_prompt = max(longest_prompt, int(pc.max(pc.utf8_length(source.prompts)).as_py() or 0))
            if source.references is None:
                continue
            chars |= characters(source.references)
            lengths = pc.fill_null(pc.utf8_length(source.references), 0).to_numpy()
            for split in splits:
                if split.data is source.data:
                    for level, idx in split.by_level.items():
                        if len(idx):
                            longest_ref[level] = max(longest_ref.get(level, 0), int(lengths[idx].max()))
        return chars, longest_prompt + len(self.prefix) + len(self.suffix), longest_ref

    def _separate(self, which: str, path: str | None, split: str | None, require_references: bool) -> Rows:
        import numpy as np

        c = self.config
        data, name = self._source(which, path, split)
        diff = difficulties(data, c.difficulty_column, name)
        prompts = text_column(data, "prompt_column", c.prompt_column, name)
        refs = None
        if require_references or c.reference_column in data.column_names:
            refs = reference_strings(column(data, "reference_column", c.reference_column, name), c.reference_column, name)
        if require_references and refs.null_count:
            row = first_row(refs.is_null().to_numpy(zero_copy_only=False))
            raise SelfloopError(f"{name}: {refs.null_count} labelled rows have no answer in column {c.reference_column!r}, e.g. row {row}")
        return Rows(data, prompts, refs, group_by_level(np.arange(len(diff), dtype=np.int32), diff))

    def _check_references(self, loaded: Loaded) -> None:
        """With checker=numeric the labelled references (through the extractor) must be
        numbers: they train the bootstrap. The first 2000 of each level are checked."""
        if self.config.checker != "numeric":
            return
        labelled = loaded.labelled
        for level, rows in labelled.by_level.items():
            for row in rows[:2000].tolist():
                ref = labelled.reference(row)
                if ref is not None and parse_number(self.answers.lenient(ref)) is None:
                    raise SelfloopError(
                        f"task.dataset.checker=numeric, but the labelled reference of row {row} ({ref!r}, column "
                        f"{self.config.reference_column!r}) is not a number; use checker=exact or normalized_text, or an extractor that finds the number"
                    )

    # -- the Task interface ----------------------------------------------------------------
    def setup(self, ctx) -> None:
        from omegaconf import OmegaConf

        self._ctx = ctx
        loaded = self.loaded
        c = self.config
        ctx.log.info("task.dataset: %s: %d labelled, %d eval and %d unlabelled pool rows at levels %s", c.path, loaded.labelled.size(), loaded.eval.size(),
                     loaded.pool.size(), loaded.levels)
        missing = [lv for lv in loaded.levels if not loaded.eval.count(lv)]
        if missing:
            ctx.warn(self.name, f"the eval split has no rows at level(s) {missing}: evaluation there draws from the unlabelled pool")
        if loaded.eval.references is None and c.checker != "none":
            ctx.warn(self.name, f"the eval split has no column {c.reference_column!r}: no meta-evaluation exists for this run")
        self._setup_estimate(ctx)
        positions = OmegaConf.select(ctx.cfg, "model.tiny.n_positions", default=None)
        if positions is not None:
            need = loaded.longest_prompt + 1 + max(self.max_new_tokens(lv) for lv in loaded.levels)
            if need > positions:
                raise SelfloopError(
                    f"model.tiny.n_positions={positions} is too short for task.dataset: its longest prompt is {loaded.longest_prompt} characters "
                    f"through the template and answers take up to {need - loaded.longest_prompt - 1} more; set model.tiny.n_positions={need} or more"
                )

    def _setup_estimate(self, ctx) -> None:
        c, loaded = self.config, self.loaded
        if c.difficulty_estimate == "none":
            return
        ctx.log.info("task.dataset: difficulty_estimate=%s: %d levels; prompt-length cut points %s", c.difficulty_estimate,
                     len(loaded.levels), loaded.length_thresholds)
        if len(loaded.levels) < c.difficulty_levels:
            ctx.warn(self.name, f"difficulty_levels={c.difficulty_levels}: the pool's prompt lengths have too few distinct values for "
                                f"{c.difficulty_levels} quantile levels; using {len(loaded.levels)}")
        if c.difficulty_estimate in MODEL_ESTIMATES and ctx.run.loop.rounds < 1:
            ctx.warn(self.name, f"difficulty_estimate={c.difficulty_estimate} scores rows with the incumbent model from round 1 on, "
                                f"and loop.rounds=0: the levels stay prompt-length bins")

    @property
    def has_references(self) -> bool:  # type: ignore[override]
        return self.loaded.eval_has_references

    @property
    def alphabet(self) -> str:  # type: ignore[override]
        return self.loaded.alphabet

    @property
    def levels(self) -> list[int]:
        return list(self.loaded.levels)

    @property
    def bootstrap_levels(self) -> list[int]:
        """The easier half of the levels that have labelled rows."""
        labelled = [lv for lv in self.levels if self.loaded.labelled.count(lv)]
        return labelled[: max(1, len(labelled) // 2)]

    def render(self, prompt: str) -> str:
        return f"{self.prefix}{prompt}{self.suffix}"

    def _problems(self, rows: Rows, picked: list[int], level: int, references: bool) -> list[Problem]:
        out = []
        for row in picked:
            ref = rows.reference(row) if references else None
            out.append(Problem(prompt=self.render(rows.prompt(row)), reference=ref, difficulty=level))
        return out

    def _draw(self, rng, rows: Rows, level: int, n: int, references: bool) -> list[Problem]:
        """Up to ``n`` distinct rows of ``level`` (all when fewer), O(n) whatever the split's size."""
        candidates = rows.by_level.get(level)
        if candidates is None:
            return []
        picked = [int(candidates[i]) for i in rng.sample(range(len(candidates)), min(n, len(candidates)))]
        return self._problems(rows, picked, level, references)

    def sample_labelled(self, rng, level: int, n: int) -> list[Problem]:
        """Up to ``n`` labelled rows of ``level`` (all of them when fewer): the bootstrap."""
        self._note_length_levels(self._ctx)
        return self._draw(rng, self.loaded.labelled, level, n, references=True)

    def sample(self, rng, level: int, n: int) -> list[Problem]:
        """Unlabelled problems of ``level``: from the pool during the acquire stage (never a
        row acquired in an earlier round) and outside a run; from the eval split for every
        other caller in a run (evaluators, filters that need held-out prompts). With
        ``difficulty_estimate=loss|agreement`` an acquire stage after round 0 picks the pool
        rows the incumbent model places at ``level``."""
        ctx = self._ctx
        stage = getattr(ctx, "stage", "") if ctx is not None else ""
        loaded = self.loaded
        with_refs = self.config.checker != "none"
        if stage and stage != "acquire" and loaded.eval.count(level):
            return self._draw(rng, loaded.eval, level, n, with_refs)
        if stage == "acquire" and self.model_estimated and ctx.round >= 1:
            return self._acquire_estimated(ctx, rng, level, n, with_refs)
        if stage == "acquire":
            self._note_length_levels(ctx)
        if stage != "acquire" or self.config.with_replacement:
            return self._draw(rng, loaded.pool, level, n, with_refs)
        return self._acquire(ctx, rng, level, n, with_refs)

    @property
    def model_estimated(self) -> bool:
        return self.config.difficulty_estimate in MODEL_ESTIMATES

    def _note_length_levels(self, ctx) -> None:
        """Record the prompt-length levels a stage drew by (round 0 of loss/agreement too)."""
        c = self.config
        if c.difficulty_estimate == "none" or ctx is None or getattr(ctx, "stage", "") != "acquire" or not hasattr(ctx, "record"):
            return
        note = {"estimate": c.difficulty_estimate, "levels_from": "prompt length (characters)", "thresholds": self.loaded.length_thresholds}
        if self.model_estimated:
            note["levels_from"] += ": no incumbent model before round 1"
        ctx.record(self.name, difficulty=note)

    # -- the pool, without replacement across rounds ----------------------------------------
    @staticmethod
    def _pick(rng, candidates, excluded: set, n: int) -> list[int]:
        """Up to ``n`` distinct rows of ``candidates`` not in ``excluded`` (a subset of them)."""
        import numpy as np

        left = len(candidates) - len(excluded)
        if n < left and len(excluded) * 2 <= len(candidates):  # mostly unused: a rejection draw, O(n)
            picked, seen = [], set()
            while len(picked) < n:
                row = int(candidates[rng.randrange(len(candidates))])
                if row not in excluded and row not in seen:
                    seen.add(row)
                    picked.append(row)
            return picked
        keep = np.setdiff1d(candidates, np.fromiter(excluded, dtype=np.int64, count=len(excluded)), assume_unique=True)
        return [int(keep[i]) for i in rng.sample(range(len(keep)), min(n, len(keep)))]

    def _acquire(self, ctx, rng, level: int, n: int, with_refs: bool) -> list[Problem]:
        import numpy as np

        pool = self.loaded.pool
        earlier, now = self._acquired_before(ctx), self._drawn_now(ctx)
        if not self._remaining(ctx, earlier, now):
            return self._stop(ctx)
        candidates = pool.by_level.get(level, np.zeros(0, dtype=np.int32))
        picked = self._pick(rng, candidates, earlier.get(level, set()) | now.get(level, set()), n)
        problems = self._problems(pool, picked, level, with_refs)
        self._record_drawn(ctx, level, picked, problems)
        self._warn_short(ctx, earlier, level, n, len(picked))
        return problems

    def _warn_short(self, ctx, earlier: dict, level: int, n: int, got: int, why: str = "") -> None:
        remaining = self._remaining(ctx, earlier, self._drawn_now(ctx))
        where = "" if self.model_estimated else f" at levels >= {ctx.level}"
        if not remaining and not self.config.with_replacement:
            ctx.warn(self.name, f"round {ctx.round} took the last unacquired pool rows{where}: the next round stops")
        elif got < n:
            ctx.warn(self.name, why or f"the unlabelled pool has no more rows at level {level} (asked for {n}, got {got}); {remaining} rows remain{where}")

    def _acquire_estimated(self, ctx, rng, level: int, n: int, with_refs: bool) -> list[Problem]:
        """Pool rows whose model-estimated difficulty falls in ``level``'s quantile band.

        Rows scored by earlier draws of this stage and still free come first; for the rest,
        ``estimate_candidates`` x the rows still wanted are drawn from the unacquired pool and
        scored. The band cut points are fixed by the stage's first scoring (quantiles of its
        scores), so every level asked for in a round is cut the same way. Rows not taken stay
        in the pool: only taken rows enter drawn.json.
        """
        import math

        c, pool = self.config, self.loaded.pool
        est = self._estimates_of(ctx)
        earlier = {} if c.with_replacement else self._acquired_before(ctx)
        excluded = set().union(*earlier.values(), *self._drawn_now(ctx).values())
        if not c.with_replacement and not self._remaining(ctx, earlier, self._drawn_now(ctx)):
            return self._stop(ctx)
        if level not in self.levels:
            return []
        taken = [row for row in est.scores if row not in excluded and est.band(row) == level][:n]
        fresh: list[int] = []
        if len(taken) < n:
            want = math.ceil(c.estimate_candidates * (n - len(taken)))
            if est.thresholds is None:  # the cut points need a few scores per band
                want = max(want, 4 * len(self.levels))
            fresh = self._pick(rng, self._all_pool_rows(), excluded | set(est.scores), want)
            self._score(ctx, est, fresh)
            taken += [row for row in fresh if est.band(row) == level][: n - len(taken)]
        problems = self._problems(pool, taken, level, with_refs)
        self._record_drawn(ctx, level, taken, problems)
        est.drawn_by_level[level] = est.drawn_by_level.get(level, 0) + len(taken)
        ctx.save_artifact(self.name, "difficulty.json", est.artifact())
        ctx.record(self.name, difficulty=est.summary())
        short = (f"difficulty_estimate={c.difficulty_estimate}: level {level}'s band held {len(taken)} of the rows scored this round "
                 f"({len(fresh)} new); drew {len(taken)} of the {n} asked for (raise task.dataset.estimate_candidates to score more)")
        self._warn_short(ctx, earlier, level, n, len(taken), short)
        return problems

    def _all_pool_rows(self):
        import numpy as np

        if self._pool_rows is None:
            parts = list(self.loaded.pool.by_level.values())
            self._pool_rows = np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int32)
        return self._pool_rows

    def _estimates_of(self, ctx):
        """This stage's estimates (a new stage, or a resumed one, starts empty; its resume
        cache is read from the stage's checkpoint folder)."""
        from selfloop_plugins.tasks.difficulty import Estimates, load_cache

        stage, est = self._estimates
        if stage is not ctx.artifacts:
            est = Estimates(self.config.difficulty_estimate, self.levels, load_cache(ctx.checkpoint_dir, self.config.difficulty_estimate))
            self._estimates = (ctx.artifacts, est)
        return est

    def _score(self, ctx, est, rows: list[int]) -> None:
        """Score ``rows`` with the incumbent (or read a resumed stage's cache) and fix the
        band cut points at the stage's first scoring."""
        from selfloop.context import stage_seed
        from selfloop_plugins.tasks.difficulty import save_cache, score_batch

        c = self.config
        batch, est.batches = est.batches, est.batches + 1
        if not rows:
            return
        if all(row in est.cache for row in rows):
            scores = [est.cache[row] for row in rows]
            est.cached_rows += len(rows)
        else:
            model = ctx.model
            if model is None or not callable(getattr(model, "generate", None)):
                raise SelfloopError(f"task.dataset.difficulty_estimate={c.difficulty_estimate} scores pool rows with the incumbent model, "
                                    f"but round {ctx.round}'s acquire stage has none (ctx.model={model!r})")
            pool = self.loaded.pool
            prompts = [self.render(pool.prompt(row)) for row in rows]
            tokens = max(self.max_new_tokens(lv) for lv in self.levels)
            scores, generated = score_batch(model, prompts, c.difficulty_estimate, c.estimate_samples, tokens, self.answers.extract,
                                            stage_seed(ctx.seed, ctx.round, f"difficulty-{batch}"), f"difficulty round {ctx.round}")
            est.scored_rows += len(rows)
            est.generations += generated
            est.cache.update(zip(rows, scores))
            save_cache(ctx.checkpoint_dir, c.difficulty_estimate, est.cache)
        est.scores.update(zip(rows, scores))
        if est.thresholds is None:
            est.thresholds = quantile_thresholds(scores, len(self.levels))
            if len(est.thresholds) < len(self.levels) - 1:
                ctx.warn(self.name, f"difficulty_estimate={c.difficulty_estimate}: round {ctx.round}'s first {len(rows)} scores have too few "
                                    f"distinct values for {len(self.levels)} levels; the top levels get no rows this round")

    def _remaining(self, ctx, earlier: dict, now: dict) -> int:
        """Unacquired pool rows at the levels the curriculum can still reach (>= its level;
        every level with model-estimated levels, which change each round); earlier rounds'
        rows and this stage's draws are disjoint (a draw excludes both)."""
        pool = self.loaded.pool
        if self.model_estimated:
            return pool.size() - len(set().union(*earlier.values(), *now.values()))
        return sum(pool.count(lv) - len(earlier.get(lv, ())) - len(now.get(lv, ())) for lv in self.levels if lv >= ctx.level)

    def _stop(self, ctx) -> list[Problem]:
        """Nothing left to acquire: stop the run after this (empty) acquire stage. Asked only
        now, not when the last rows were drawn, so the round that drew them still trains."""
        reachable = self.levels if self.model_estimated else [lv for lv in self.levels if lv >= ctx.level]
        total = sum(self.loaded.pool.count(lv) for lv in reachable)
        where = "" if self.model_estimated else f" at levels >= {ctx.level}"
        ctx.request_stop(
            f"task.dataset: the unlabelled pool is exhausted: all {total} rows{where} were acquired in earlier rounds; "
            f"add rows to {self.config.path} or set task.dataset.with_replacement=true"
        )
        return []

    def _artifact(self) -> str:
        return f"artifacts/{self.name}/{DRAWN}"

    def _drawn_now(self, ctx) -> dict[int, set[int]]:
        """Rows earlier draws of this same stage took (e.g. a second acquirer)."""
        raw = ctx.artifacts.get(self._artifact())
        out: dict[int, set[int]] = {}
        if raw:
            drawn = json.loads(raw)
            for row, level in zip(drawn["rows"], drawn["levels"]):
                out.setdefault(level, set()).add(row)
        return out

    def _record_drawn(self, ctx, level: int, picked: list[int], problems: list[Problem]) -> None:
        raw = ctx.artifacts.get(self._artifact())
        drawn = json.loads(raw) if raw else {"rows": [], "levels": [], "prompt_sha1": []}
        drawn["rows"] += picked
        drawn["levels"] += [level] * len(picked)
        drawn["prompt_sha1"] += [digest(p.prompt) for p in problems]
        ctx.save_artifact(self.name, DRAWN, json.dumps(drawn))

    def _acquired_before(self, ctx) -> dict[int, set[int]]:
        """Pool rows acquired in earlier rounds, by level, read from the run directory: the
        rows each acquire stage drew (its artifact) whose prompt is in that stage's data. Exact
        after a kill and resume; computed once per round."""
        key = (str(ctx.run_dir.root), ctx.round)
        if self._excluded is not None and self._excluded[0] == key:
            return self._excluded[1]
        from selfloop.data import load

        rd, pool = ctx.run_dir, self.loaded.pool
        out: dict[int, set[int]] = {}
        for round_ in range(1, ctx.round):
            if not rd.is_complete(round_, "acquire"):
                continue
            rd.verify(round_, "acquire")
            folder = rd.stage_dir(round_, "acquire")
            path = folder / self._artifact()
            if not path.is_file():
                continue
            drawn = json.loads(path.read_text())
            acquired = set(load(folder / "data")["prompt"])
            for row, level, sha in zip(drawn["rows"], drawn["levels"], drawn["prompt_sha1"]):
                prompt = self.render(pool.prompt(row)) if row < len(pool.data) else None
                if prompt is None or digest(prompt) != sha:
                    raise SelfloopError(
                        f"{self.config.path}: the data changed since round {round_} acquired from it (pool row {row} holds a different prompt); "
                        f"resume the run with the data it started with"
                    )
                if prompt in acquired:
                    out.setdefault(level, set()).add(row)
        self._excluded = (key, out)
        return out

    # -- answers ----------------------------------------------------------------------------
    def extract_answer(self, completion: str) -> str:
        """The configured extractor's answer; an empty answer when it finds none, counted as a
        row error of the stage (not in filter stages, which re-read completions the acquire
        stage already counted)."""
        found = self.answers.extract(completion)
        if found is not None:
            return found
        ctx = self._ctx
        if ctx is not None and ctx.stage and ctx.stage != "filter":
            ledger, seen = self._reported
            if ledger is not ctx.row_errors:  # the loop starts a new ledger per stage
                seen = set()
                self._reported = (ctx.row_errors, seen)
            if completion not in seen:
                seen.add(completion)
                what = f"pattern {self.config.pattern!r}" if self.config.extractor == "regex" else f"extractor {self.config.extractor}"
                ctx.row_error(self.name, f"completion {completion[:40]!r}", f"answer {what} found no answer in the completion")
        return ""

    def check(self, answer: str, reference: str) -> bool:
        return self.answers.check(answer, reference)

    def is_well_formed(self, problem_prompt: str, answer: str) -> bool:
        return self.answers.well_formed(answer)

    def max_new_tokens(self, level: int) -> int:
        """The configured bound; else the longest reference of the level + 2 (of every level
        with model-estimated levels: a row's band is not its prompt-length level)."""
        if self.config.max_new_tokens is not None:
            return self.config.max_new_tokens
        longest = self.loaded.longest_reference
        if self.model_estimated:
            return max(longest.values(), default=30) + 2
        return (longest.get(level) or max(longest.values(), default=30)) + 2


def digest(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()[:12]


@hookimpl
def selfloop_register_tasks(register):
    register(DatasetTask)

"""Self-Instruct (Wang et al. 2023): the model writes new prompts from a pool of seed prompts.

Each generation shows the model ``n_seeds`` prompts (most from the seed pool, a few written
earlier this round, as in the paper) and lets it continue the list. What it writes is cut
into candidate prompts, which are rejected when empty, invalid (characters outside the
task's alphabet, or a shape none of the seeds has: ``"123="`` has shape ``9=``), too long,
or a near-copy of the pool (ROUGE-L F1 >= ``max_similarity`` against any seed or accepted
prompt, the paper's 0.7 by default; or n-gram Jaccard). Accepted prompts join the pool, so
later ones must differ from them too, and are then labelled by the model through the
refiner chain like ``task_sampler`` does.

Self-written prompts have no ground truth: their ``reference`` is None, so label precision
(meta-evaluation) leaves them out. Their difficulty is estimated from their length, by a
line fitted to the seed pool's lengths per level (reversal: exact), or is the highest level
of the seeds that prompted them (``difficulty=seeds``, also the fallback when the pool has
one level). Which seeds prompted which row is in the stage's
``artifacts/self_instruct/provenance.jsonl``; counts of every rejection reason are in the
stage's ``notes.self_instruct``.

A model trained only to answer (the built-in tiny models) answers the list instead of
continuing it and writes no usable prompt: the strategy then says so (``ctx.warn``) with
the counts, rather than returning nothing silently.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from selfloop import hookimpl
from selfloop.errors import OptionError, SelfloopError
from selfloop.strategy import Acquirer, Problem

# The paper's template for free text; the model continues after the last "Task k:".
HEADER = "Come up with a series of tasks:\n"
TASK_MARK = re.compile(r"\n*Task \d+:[ \t]*")


@dataclass
class SelfInstructConfig:
    n_problems: int = 200  # prompts to acquire per round (fewer if the model writes fewer)
    n_seeds: int = 8  # prompts shown per generation (paper: 8)
    generated_in_context: int = 2  # of those, prompts written earlier this round (paper: 2)
    seeds: str = "task"  # task: sampled at ctx.level + level_offsets | history: trained-on prompts | file
    seed_file: str | None = None  # seeds=file: one prompt per line, or JSONL with "prompt" (+ "difficulty")
    pool_size: int = 200  # seeds=task: seed prompts per level
    level_offsets: list[int] = field(default_factory=lambda: [-1, 0])
    similarity: str = "rouge_l"  # rouge_l | ngram (Jaccard of n-gram sets)
    max_similarity: float = 0.7  # reject a candidate this similar to any pool prompt (paper: 0.7)
    unit: str = "auto"  # char | word | auto (char for symbol-string tasks such as reversal, else word)
    ngram: int = 3
    temperature: float = 1.0
    max_new_tokens: int | None = None  # None: twice the longest seed (in characters)
    max_attempts: int = 4  # generations allowed per wanted prompt
    patience: int = 256  # stop after this many generations in a row without an accepted prompt
    difficulty: str = "length"  # length | seeds
    batch_size: int = 64

    def __post_init__(self):
        for name in ("n_problems", "n_seeds", "pool_size", "ngram", "max_attempts", "patience", "batch_size"):
            if getattr(self, name) < 1:
                raise OptionError(name, getattr(self, name), "an integer >= 1")
        if not 0 <= self.generated_in_context < self.n_seeds:
            raise OptionError("generated_in_context", self.generated_in_context, f"an integer in [0, n_seeds={self.n_seeds})")
        choices = {"seeds": ("task", "history", "file"), "similarity": ("rouge_l", "ngram"), "unit": ("auto", "char", "word"),
                   "difficulty": ("length", "seeds")}
        for name, accepted in choices.items():
            if getattr(self, name) not in accepted:
                raise OptionError(name, getattr(self, name), " | ".join(accepted))
        if self.seeds == "file" and not self.seed_file:
            raise OptionError("seed_file", self.seed_file, "a path to a text or JSONL file of prompts (seeds=file needs one)")
        if not 0 < self.max_similarity <= 1:
            raise OptionError("max_similarity", self.max_similarity, "a number in (0, 1]")
        if self.temperature < 0:
            raise OptionError("temperature", self.temperature, "a number >= 0")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise OptionError("max_new_tokens", self.max_new_tokens, "an integer >= 1, or null")


# -- shared with augment and active_learning ------------------------------------------------
def sampling_fields(gen) -> dict:
    """The row's sampling metadata (contract columns) from a Generation's ``extra``."""
    sampling = (gen.extra or {}).get("sampling") or {}
    return {"temperature": sampling.get("temperature"), "completion_logprobs": list(sampling.get("logprobs") or [])}


def label_prompts(ctx, prompts: list[str], levels: list[int], batch_size: int, desc: str) -> list:
    """One Generation per prompt, labelled through the refiner chain, grouped by level so
    each batch stops at its level's ``max_new_tokens``."""
    from selfloop.progress import progress

    out: list = [None] * len(prompts)
    by_level: dict[int, list[int]] = {}
    for i, level in enumerate(levels):
        by_level.setdefault(level, []).append(i)
    with progress(total=len(prompts), desc=desc, unit="prompt") as bar:
        for level, idx in sorted(by_level.items()):
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                gens = ctx.generate([prompts[i] for i in chunk], max_new_tokens=ctx.task.max_new_tokens(level))
                for i, gen in zip(chunk, gens):
                    out[i] = gen
                bar.update(len(chunk))
    return out


def context_limit(model) -> int | None:
    """The model's context length in tokens, when it says (stand-ins may not)."""
    config = getattr(getattr(model, "model", None), "config", None)
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


# -- prompt shape, near-copies, difficulty ----------------------------------------------------
def shape(text: str) -> str:
    """Runs of digits become ``9``, of letters ``a``, of spaces `` ``; other characters stay:
    ``"21+93="`` -> ``"9+9="``. Two prompts of one task format share a shape."""
    out: list[str] = []
    for ch in text:
        cls = "9" if ch.isdigit() else "a" if ch.isalpha() else " " if ch.isspace() else ch
        if not (out and out[-1] == cls and cls in "9a "):
            out.append(cls)
    return "".join(out)


def symbolic(task, prompts: list[str]) -> bool:
    """A task of symbol strings (``"123="``): it has an alphabet and its prompts no spaces.
    Those get the back-to-back template, character ROUGE-L and the shape check; free text
    (with or without an alphabet) gets the paper's text template and word ROUGE-L."""
    return bool(getattr(task, "alphabet", None)) and not any(ch.isspace() for p in prompts for ch in p)


def reads_only_alphabet(ctx) -> bool:
    """Whether the run's model reads nothing but the task's alphabet: the built-in ``tiny``
    model builds its character tokenizer from it (other characters become ``<unk>``)."""
    return bool(getattr(ctx.task, "alphabet", None)) and any(getattr(m, "name", "") == "tiny" for m in ctx.strategies.get("model", []))


def common_ending(prompts: list[str]) -> str:
    """The ending every prompt shares and contains exactly once (so a run of prompts can be
    cut back into prompts at it), or ``""``."""
    import os

    ending = os.path.commonprefix([p[::-1] for p in prompts])[::-1]
    if ending and all(p.count(ending) == 1 for p in prompts):
        return ending
    return ""


class NearCopyIndex:
    """The pool's prompts as token ids; the highest similarity of a candidate to any of them,
    vectorised over the pool. ROUGE-L F1 = 2 LCS / (len a + len b) (the paper's measure), or
    Jaccard of n-gram sets."""

    def __init__(self, unit: str, method: str, n: int = 3):
        import numpy as np

        self.np, self.unit, self.method, self.n = np, unit, method, n
        self.vocab: dict[str, int] = {}
        self.texts: set[str] = set()
        self.count = 0
        self.ids = np.full((64, 8), -1, dtype=np.int32)  # rouge_l: padded rows
        self.lens = np.zeros(64, dtype=np.int32)
        self.grams: dict[tuple, list[int]] = {}  # ngram: inverted index
        self.sizes: list[int] = []

    def tokens(self, text: str) -> list[str]:
        return list(text) if self.unit == "char" else re.findall(r"\w+", text.lower())

    def _encode(self, text: str):
        return self.np.array([self.vocab.setdefault(t, len(self.vocab)) for t in self.tokens(text)], dtype=self.np.int32)

    def _ngrams(self, text: str) -> set:
        toks = self.tokens(text)
        n = min(self.n, len(toks)) or 1
        return {tuple(toks[i : i + n]) for i in range(max(1, len(toks) - n + 1))}

    def __contains__(self, text: str) -> bool:
        return text in self.texts

    def add(self, text: str) -> None:
        np = self.np
        self.texts.add(text)
        if self.method == "ngram":
            grams = self._ngrams(text)
            for g in grams:
                self.grams.setdefault(g, []).append(self.count)
            self.sizes.append(len(grams))
        else:
            row = self._encode(text)
            if self.count == len(self.ids) or len(row) > self.ids.shape[1]:
                rows = 2 * len(self.ids) if self.count == len(self.ids) else len(self.ids)
                width = max(self.ids.shape[1], len(row))
                grown = np.full((rows, width), -1, dtype=np.int32)
                grown[: self.count, : self.ids.shape[1]] = self.ids[: self.count]
                lens = np.zeros(rows, dtype=np.int32)
                lens[: self.count] = self.lens[: self.count]
                self.ids, self.lens = grown, lens
            self.ids[self.count, : len(row)] = row
            self.lens[self.count] = len(row)
        self.count += 1

    def max_similarity(self, text: str) -> float:
        np = self.np
        if not self.count:
            return 0.0
        if self.method == "ngram":
            grams = self._ngrams(text)
            hits = [i for g in grams for i in self.grams.get(g, ())]
            if not hits:
                return 0.0
            inter = np.bincount(np.array(hits), minlength=self.count)
            union = np.array(self.sizes) + len(grams) - inter
            return float((inter / union).max())
        cand = [self.vocab.get(t, -2) for t in self.tokens(text)]  # -2: a token no pool prompt has
        if not cand:
            return 0.0
        ids, lens = self.ids[: self.count], self.lens[: self.count]
        # LCS by rows of the DP table, every pool prompt at once: row[j] = LCS(cand[:i], pool[:j]);
        # the next row is the running max of (row above, diagonal + 1 where tokens match).
        row = np.zeros((self.count, ids.shape[1] + 1), dtype=np.int32)
        for t in cand:
            step = row.copy()
            step[:, 1:] = np.maximum(row[:, 1:], np.where(ids == t, row[:, :-1] + 1, 0))
            row = np.maximum.accumulate(step, axis=1)
        lcs = row[np.arange(self.count), lens]
        return float((2.0 * lcs / (len(cand) + lens)).max())


def level_estimator(pool: list[Problem], task_levels: list[int]):
    """A function from a prompt's length to the nearest task level, from a line fitted to the
    pool's (level, length) pairs; None when the pool cannot support one (a single level)."""
    import numpy as np

    levels = np.array([p.difficulty for p in pool], dtype=float)
    if len(set(levels.tolist())) < 2:
        return None
    slope, intercept = np.polyfit(levels, np.array([len(p.prompt) for p in pool], dtype=float), 1)
    if slope <= 0:
        return None
    return lambda n_chars: min(task_levels, key=lambda v: (abs(v - (n_chars - intercept) / slope), v))


# -- the strategy ------------------------------------------------------------------------------
@dataclass
class _Template:
    text: str
    seeds: list[Problem]


class SelfInstruct(Acquirer):
    name = "self_instruct"
    Config = SelfInstructConfig

    def setup(self, ctx):
        import random

        c, task = self.config, ctx.task
        if c.seeds == "file":
            self._check_template(ctx, self.file_seeds(ctx))
        elif reads_only_alphabet(ctx):  # only a character model's alphabet constrains the template
            self._check_template(ctx, task.sample(random.Random(0), task.levels[0], 4))

    def _check_template(self, ctx, seeds: list[Problem]) -> None:
        """A character model needs prompts that a run of prompts can be cut back into (a shared
        ending such as ``=``) or an alphabet holding the text template's characters."""
        prompts, task = [p.prompt for p in seeds], ctx.task
        if not reads_only_alphabet(ctx) or (symbolic(task, prompts) and common_ending(prompts)):
            return
        missing = sorted(set(HEADER + "Task 10:\n") - set(task.alphabet))
        if missing:
            raise SelfloopError(
                f"acquire 'self_instruct' cannot write a few-shot template for task {task.name!r}: its prompts share no "
                f"ending to separate them by, and its alphabet lacks the text template's characters {''.join(missing)!r}"
            )

    # -- seeds -----------------------------------------------------------------------------
    def file_seeds(self, ctx) -> list[Problem]:
        c = self.config
        path = Path(c.seed_file).expanduser()
        try:
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise OptionError("seed_file", c.seed_file, f"a readable UTF-8 text or JSONL file of prompts ({type(exc).__name__}: {exc})") from None
        levels = list(ctx.task.levels)
        default = ctx.level if ctx.level in levels else levels[0]
        seeds = []
        for number, line in enumerate(lines, 1):
            prompt, level = line, default
            if path.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                    prompt, level = record["prompt"], record.get("difficulty", default)
                except (ValueError, KeyError, TypeError) as exc:
                    raise OptionError("seed_file", c.seed_file, f'JSONL lines with a "prompt" string (line {number}: {type(exc).__name__}: {exc})') from None
                if not isinstance(prompt, str) or level not in levels:
                    raise OptionError("seed_file", c.seed_file, f'JSONL lines with a "prompt" string and an optional "difficulty" among the '
                                      f"task's levels (line {number} has prompt {prompt!r}, difficulty {level!r})")
            seeds.append(Problem(prompt, None, level))
        if not seeds:
            raise OptionError("seed_file", c.seed_file, "a file with at least one prompt (this one is empty)")
        return seeds

    def seed_pool(self, ctx) -> list[Problem]:
        """The seed prompts (the first use of ``ctx.rng`` in ``acquire``)."""
        c, task = self.config, ctx.task
        levels = [ctx.level + o for o in c.level_offsets if ctx.level + o in task.levels] or [ctx.level]
        if c.seeds == "file":
            return self.file_seeds(ctx)
        if c.seeds == "history":
            history = ctx.training_history()
            if len(history):
                wanted = set(levels)
                pool = [Problem(p, None, d) for p, d in zip(history["prompt"], history["difficulty"]) if d in wanted]
                return pool or [Problem(p, None, d) for p, d in zip(history["prompt"], history["difficulty"])]
            ctx.warn(self.name, "no trained-on prompts yet (seeds=history); seeding with prompts sampled from the task")
        return [Problem(p.prompt, None, p.difficulty) for level in levels for p in task.sample(ctx.rng, level, c.pool_size)]

    # -- generation ------------------------------------------------------------------------
    def template(self, ctx, seeds: list[Problem], written: list[Problem], ending: str, room: int | None) -> _Template | None:
        """A few-shot request of at most ``room`` characters (dropping shown prompts to fit),
        or None when not even one prompt fits."""
        c = self.config
        k_written = min(c.generated_in_context, len(written))
        shown = ctx.rng.sample(seeds, min(c.n_seeds - k_written, len(seeds))) + ctx.rng.sample(written, k_written)
        ctx.rng.shuffle(shown)
        while True:
            if ending:  # self-delimiting prompts: the list is the prompts back to back
                text = "".join(p.prompt for p in shown)
            else:
                text = HEADER + "".join(f"Task {i}: {p.prompt}\n" for i, p in enumerate(shown, 1)) + f"Task {len(shown) + 1}:"
            if room is None or len(text) <= room:
                return _Template(text, shown)
            if len(shown) == 1:
                return None
            shown = shown[1:]  # fit the model's context

    @staticmethod
    def candidates(continuation: str, ending: str) -> list[str]:
        if ending:  # complete pieces only; an unfinished tail is no prompt
            pieces, start = [], 0
            while (end := continuation.find(ending, start)) >= 0:
                pieces.append(continuation[start : end + len(ending)])
                start = end + len(ending)
            return pieces
        parts = TASK_MARK.split(continuation)
        if len(parts) > 1:
            parts = parts[:-1]  # the text after the last "Task k:" may be cut off
        return [p.split("\n\n")[0].strip() for p in parts]

    def acquire(self, ctx):
        from selfloop.data import make_rows

        c, task = self.config, ctx.task
        seeds = self.seed_pool(ctx)
        if not seeds:
            raise SelfloopError(f"acquire 'self_instruct' has no seed prompts (seeds={c.seeds}) at level {ctx.level}")
        self._check_template(ctx, seeds)
        written, shown, stats = self.write(ctx, seeds)
        ctx.record(self.name, seed_pool=len(seeds), accepted=len(written), **stats)
        rejected = Counter(stats["rejected"])
        if not written:
            top = rejected.most_common(1)[0][0] if rejected else ""
            why = ("the seed prompts and room for a new one do not fit the model's context" if top == "too_long" else
                   f"e.g. {stats['rejected_examples'].get(top, '')!r}: a model trained only to answer the task does not write "
                   f"prompts; self_instruct needs one that continues a list of prompts")
            ctx.warn(self.name, f"the model wrote no usable prompt in {stats['generations']} generations (rejected: {dict(rejected)}); {why}")
            return make_rows([])
        if len(written) < c.n_problems:
            ctx.warn(self.name, f"wrote {len(written)} of n_problems={c.n_problems} prompts (stopped after {stats['generations']} generations)")

        gens = label_prompts(ctx, [p.prompt for p in written], [p.difficulty for p in written], c.batch_size, f"label round {ctx.round}")
        rows, lines = [], []
        for i, (problem, gen, seen) in enumerate(zip(written, gens, shown)):
            row_id = f"r{ctx.round:03d}-{self.name}-{i}"
            rows.append(dict(id=row_id, prompt=problem.prompt, completions=gen.completions, answer=gen.answer, reference=None,
                             difficulty=problem.difficulty, round=ctx.round, source=f"acquire/{self.name}", **sampling_fields(gen)))
            lines.append(json.dumps({"id": row_id, "seeds": seen}))
        ctx.save_artifact(self.name, "provenance.jsonl", "\n".join(lines) + "\n")
        return make_rows(rows)

    def write(self, ctx, seeds: list[Problem]) -> tuple[list[Problem], list[list[str]], dict]:
        """Let the model write prompts until ``n_problems`` pass the checks or the attempts run
        out: the accepted prompts (with estimated levels), the prompts shown for each, counts."""
        from selfloop.progress import progress

        c, task = self.config, ctx.task
        prompts = [p.prompt for p in seeds]
        symbols = symbolic(task, prompts)
        ending = common_ending(prompts) if symbols else ""
        max_new = c.max_new_tokens or max(8, 2 * max(len(p) for p in prompts))
        limit = context_limit(ctx.model)
        if limit is not None:  # leave at least half the context to the template
            max_new = min(max_new, max(1, limit // 2))
        room = None if limit is None else limit - max_new - 2
        estimate = level_estimator(seeds, list(task.levels)) if c.difficulty == "length" else None
        index = NearCopyIndex(("char" if symbols else "word") if c.unit == "auto" else c.unit, c.similarity, c.ngram)
        for p in prompts:
            index.add(p)
        check = PromptCheck(task, prompts, index, c.max_similarity, limit, symbols)
        rejected, examples = Counter(), {}
        written, shown = [], []
        generations = since_accepted = 0
        budget = c.max_attempts * c.n_problems
        with progress(total=c.n_problems, desc=f"self_instruct round {ctx.round}", unit="prompt") as bar:
            while len(written) < c.n_problems and generations < budget and since_accepted < c.patience:
                templates = [self.template(ctx, seeds, written, ending, room) for _ in range(min(c.batch_size, budget - generations))]
                generations += len(templates)
                if None in templates:  # not even one seed fits the model's context
                    since_accepted += templates.count(None)
                    rejected["too_long"] += templates.count(None)
                    templates = [t for t in templates if t is not None]
                outputs = ctx.model.generate([t.text for t in templates], n=1, temperature=c.temperature, max_new_tokens=max_new)
                for tmpl, outs in zip(templates, outputs):
                    text = outs[0] if outs else ""
                    found, before = self.candidates(text, ending), len(written)
                    if not found:
                        rejected["no_prompt"] += 1
                        examples.setdefault("no_prompt", text[:80])
                    for cand in found:
                        if len(written) == c.n_problems:
                            break
                        level = self._level(cand, tmpl, estimate)
                        reason = check.reason(cand, level)
                        if reason:
                            rejected[reason] += 1
                            examples.setdefault(reason, cand[:80])
                            continue
                        index.add(cand)
                        written.append(Problem(cand, None, level))
                        shown.append([s.prompt for s in tmpl.seeds])
                        bar.update(1)
                    since_accepted = 0 if len(written) > before else since_accepted + 1
        return written, shown, {"generations": generations, "rejected": dict(rejected), "rejected_examples": examples}

    @staticmethod
    def _level(prompt: str, tmpl: _Template, estimate) -> int:
        return estimate(len(prompt)) if estimate is not None else max(s.difficulty for s in tmpl.seeds)


@dataclass
class PromptCheck:
    """Why a candidate prompt is refused (``reason``), or None: the rules of the module doc."""

    task: object
    seeds: list[str]
    index: NearCopyIndex
    max_similarity: float
    context: int | None  # the model's context length in tokens, if known
    symbols: bool  # a task of symbol strings: candidates must have a seed's shape

    def __post_init__(self):
        alphabet = getattr(self.task, "alphabet", None)
        self.alphabet = set(alphabet) if alphabet else None
        self.shapes = {shape(p) for p in self.seeds}
        self.longest = max(len(p) for p in self.seeds)

    def reason(self, cand: str, level: int) -> str | None:
        if not cand.strip():
            return "empty"
        if self.alphabet is not None and not set(cand) <= self.alphabet:
            return "alphabet"
        if self.symbols and shape(cand) not in self.shapes:
            return "format"
        if len(cand) > 2 * self.longest or (self.context is not None and len(cand) + self.task.max_new_tokens(level) + 2 > self.context):
            return "length"
        if cand in self.index:
            return "duplicate"
        if self.index.max_similarity(cand) >= self.max_similarity:
            return "near_copy"
        return None


@hookimpl
def selfloop_register_acquirers(register):
    register(SelfInstruct)

"""Adversarial evaluation: search for the model's weaknesses and hand them to the next round.

From a fixed set of unlabelled problems per level (the same every round), build probes —
longer/harder problems (one or two levels up), runs of one repeated character, edge values
(the alphabet's first or last character everywhere), a distractor character inserted, and
the task's own ``perturb(problem, rng)`` when it has one — and keep the probes where the
model fails a label-free check: a malformed answer, a failed round trip (the task's
``inverse``), or sampled answers that disagree with the greedy one (agreement below
``min_agreement``). The score is the share of probes survived (``by_level``: by the level a
probe was derived from). The failures go to the run directory,
``round-NNN/evaluate/artifacts/adversarial/failures.jsonl``, where the acquirer of the same
name draws from them next round. It follows adversarial/red-team evaluation (Perez et al.
2022, "Red Teaming Language Models with Language Models"; Ribeiro et al. 2020, CheckList's
perturbation tests) with label-free checks in place of labels.

Cost per model and level: ``n_per_level`` x (number of perturbations) probes, each 1 greedy
+ ``n_samples`` sampled + 1 round-trip generation.

``acquire/adversarial`` reads the failures the incumbent's evaluation found (falling back to
the latest evaluate stage that recorded some), relabels their prompts with the incumbent
through the refiner chain like ``task_sampler`` does, and hands them to the filters. Models
fail these prompts by construction, so expect the filters to drop many of their labels; the
ones kept are the weaknesses the model has since learned to answer consistently.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field

from selfloop import hookimpl
from selfloop.errors import OptionError
from selfloop.strategy import Acquirer, Evaluator, Problem
from selfloop_plugins.evaluate.multi import check_choice, fixed_problems, measure, roundtrip_passes, roundtrip_setting
from selfloop_plugins.filter.uncertainty import agreement

PERTURBATIONS = ("longer", "repeat", "edge", "distractor", "task")
FAILURES = "failures.jsonl"


def content_chars(task) -> str:
    """The characters of the task's alphabet that carry content (letters and digits), which
    character perturbations may change without breaking the prompt's format."""
    return "".join(sorted({c for c in (task.alphabet or "") if c.isalnum()}))


def perturb(kind: str, problem: Problem, rng: random.Random, task) -> Problem | None:
    """One probe derived from ``problem``, or None when the perturbation does not apply."""
    levels = list(task.levels)
    if kind == "longer":
        level = problem.difficulty + rng.choice((1, 2))
        return task.sample(rng, level, 1)[0] if level in levels else None
    if kind == "task":
        fn = getattr(task, "perturb", None)
        return fn(problem, rng) if callable(fn) else None
    content = content_chars(task)
    positions = [i for i, c in enumerate(problem.prompt) if c in content]
    if not positions:
        return None
    if kind in ("repeat", "edge"):
        fill = rng.choice(content) if kind == "repeat" else rng.choice((content[0], content[-1]))
        prompt = "".join(fill if c in content else c for c in problem.prompt)
        return Problem(prompt, None, problem.difficulty) if prompt != problem.prompt else None
    if kind == "distractor":
        i = rng.choice(positions)
        prompt = problem.prompt[:i] + rng.choice(content) + problem.prompt[i:]
        return Problem(prompt, None, min(problem.difficulty + 1, levels[-1]))
    raise ValueError(f"unknown perturbation {kind!r}")


@dataclass
class AdversarialConfig:
    n_per_level: int = 16
    perturbations: list[str] = field(default_factory=lambda: list(PERTURBATIONS))
    n_samples: int = 4
    temperature: float = 0.7
    # a probe fails when fewer sampled answers than this agree with the greedy one
    min_agreement: float = 0.75
    roundtrip: str = "auto"
    # probe only the levels the curriculum has reached (the weaknesses worth learning next)
    reached_levels_only: bool = True
    max_failures_saved: int = 2000

    def __post_init__(self):
        bad = [p for p in self.perturbations if p not in PERTURBATIONS]
        if bad or not self.perturbations:
            raise OptionError("perturbations", list(self.perturbations), f"a non-empty list of {', '.join(PERTURBATIONS)}")
        for option, ok, accepted in (
            ("n_per_level", self.n_per_level >= 1, "an integer >= 1"),
            ("n_samples", self.n_samples >= 0, "an integer >= 0"),
            ("temperature", self.temperature > 0, "a number > 0"),
            ("min_agreement", 0.0 <= self.min_agreement <= 1.0, "a number in [0, 1]"),
            ("max_failures_saved", self.max_failures_saved >= 0, "an integer >= 0"),
        ):
            if not ok:
                raise OptionError(option, getattr(self, option), accepted)
        check_choice("roundtrip", self.roundtrip, ("auto", "on", "off"))


class Adversarial(Evaluator):
    name = "adversarial"
    Config = AdversarialConfig
    uses_references = False

    def setup(self, ctx):
        roundtrip_setting("evaluate.adversarial.roundtrip", self.config.roundtrip, ctx.task)
        usable = self.usable(ctx.task)
        if not usable:
            raise OptionError("perturbations", list(self.config.perturbations),
                              f"perturbations that apply to task {ctx.task.name!r} (it has no alphabet and no perturb(problem, rng): only 'longer' applies)")
        skipped = [p for p in self.config.perturbations if p not in usable]
        if skipped:
            ctx.warn(self.name, f"perturbations {skipped} do not apply to task {ctx.task.name!r} (no alphabet / no perturb(problem, rng)); probing with {usable}")

    def usable(self, task) -> list[str]:
        ok = {"longer"}
        if content_chars(task):
            ok |= {"repeat", "edge", "distractor"}
        if callable(getattr(task, "perturb", None)):
            ok.add("task")
        return [p for p in self.config.perturbations if p in ok]

    def levels(self, ctx) -> list[int]:
        levels = list(ctx.eval_levels)
        reached = [v for v in levels if v <= ctx.level]
        return reached if self.config.reached_levels_only and reached else levels

    def probes(self, ctx, levels: list[int]) -> list[dict]:
        """The probes of these levels: the same every round (seeded by run seed and level)."""
        out = []
        for level in levels:
            rng = random.Random(f"{ctx.seed}:probe:{self.name}:{level}")
            for base in fixed_problems(ctx, self.name, level, self.config.n_per_level):
                for kind in self.usable(ctx.task):
                    p = perturb(kind, base, rng, ctx.task)
                    if p is not None:
                        out.append({"prompt": p.prompt, "reference": p.reference, "difficulty": p.difficulty, "base_level": level, "perturbation": kind})
        return out

    def run_probes(self, ctx, model, levels: list[int]) -> list[dict]:
        """Each probe with the model's answer and the label-free checks it failed."""
        c = self.config
        roundtrip = roundtrip_setting("evaluate.adversarial.roundtrip", c.roundtrip, ctx.task)
        probes = self.probes(ctx, levels)
        top = max(ctx.task.levels)
        by_difficulty: dict[int, list[dict]] = defaultdict(list)
        for p in probes:
            by_difficulty[p["difficulty"]].append(p)
        for difficulty, group in sorted(by_difficulty.items()):
            s = measure(ctx, model, [p["prompt"] for p in group], min(difficulty, top), n_samples=c.n_samples, temperature=c.temperature,
                        roundtrip=roundtrip, key=(self.name, "probe", difficulty))
            for i, p in enumerate(group):
                failed = [name for name, bad in (
                    ("format", not s.well_formed[i]),
                    ("roundtrip", s.roundtrip is not None and s.roundtrip[i] == 0.0),
                    ("agreement", c.n_samples > 0 and s.agreement[i] < c.min_agreement - 1e-9),
                ) if bad]
                p.update(answer=s.answers[i], failed=failed)
        return probes

    def score(self, ctx, data):
        """1.0 for a row whose answer passes the label-free checks (format, agreement of its
        completions, the round trip under the incumbent), else 0.0."""
        c, task = self.config, ctx.task
        prompts, answers = list(data["prompt"]), list(data["answer"])
        rt: list[float | None] = [None] * len(prompts)
        if roundtrip_setting("evaluate.adversarial.roundtrip", c.roundtrip, task) and ctx.model is not None and prompts:
            rt = roundtrip_passes(task, ctx.model, prompts, answers)
        out = []
        for p, a, comps, r in zip(prompts, answers, data["completions"], rt):
            ok = task.is_well_formed(p, a) and r != 0.0 and (not comps or agreement(task, comps, a) >= c.min_agreement - 1e-9)
            out.append(float(ok))
        return out

    def evaluate(self, ctx, model):
        probes = self.run_probes(ctx, model, self.levels(ctx))
        by_level: dict[str, list[bool]] = defaultdict(list)
        by_kind: dict[str, list[bool]] = defaultdict(list)
        for p in probes:
            by_level[str(p["base_level"])].append(not p["failed"])
            by_kind[p["perturbation"]].append(not p["failed"])
        failures = [p for p in probes if p["failed"]]
        if ctx.stage:
            lines = "".join(json.dumps(f) + "\n" for f in failures[: self.config.max_failures_saved])
            ctx.save_artifact(self.name, FAILURES, lines)
        survived = {k: sum(v) / len(v) for k, v in by_kind.items()}
        ctx.record(self.name, probes=len(probes), failures=len(failures), survived_by_perturbation=survived)
        levels = {k: sum(v) / len(v) for k, v in sorted(by_level.items(), key=lambda kv: int(kv[0]))}
        if not probes:
            ctx.warn(self.name, f"no perturbation applied to the problems of levels {self.levels(ctx)}: nothing was probed (score 1.0 means untested)")
        score = sum(not p["failed"] for p in probes) / len(probes) if probes else 1.0
        return {"score": score, "by_level": levels, "probes": len(probes), "failures": len(failures), "survived_by_perturbation": survived}


def latest_failures(ctx) -> tuple[int, list[dict]] | None:
    """The failures recorded by the incumbent's evaluate stage (when it was a candidate),
    else by the latest evaluate stage that recorded some."""
    rd = ctx.run_dir
    history = ctx.history()
    incumbent = history[-1]["incumbent_round"] if history else None
    rounds = sorted((r for r in range(ctx.round) if r != incumbent), reverse=True)
    for r in ([incumbent] if incumbent is not None else []) + rounds:
        path = rd.stage_dir(r, "evaluate") / "artifacts" / Adversarial.name / FAILURES
        if rd.is_complete(r, "evaluate") and path.is_file():
            rd.verify(r, "evaluate")
            return r, [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return None


@dataclass
class AdversarialAcquireConfig:
    # at most this many failure prompts are relabelled per round
    n_problems: int = 500
    batch_size: int = 500
    # when no evaluate stage has recorded failures yet, probe the incumbent now, at the
    # curriculum level, from this many base problems
    probe_if_missing: bool = True
    n_probe_problems: int = 16

    def __post_init__(self):
        for option in ("n_problems", "batch_size", "n_probe_problems"):
            if getattr(self, option) < 1:
                raise OptionError(option, getattr(self, option), "an integer >= 1")


class AdversarialAcquirer(Acquirer):
    name = "adversarial"
    Config = AdversarialAcquireConfig

    def setup(self, ctx):
        if not any(e.name == Adversarial.name for e in ctx.strategies.get("evaluate", [])):
            ctx.warn(self.name, "evaluate 'adversarial' is not configured, so no failures are recorded; this acquirer probes the incumbent itself each round"
                     if self.config.probe_if_missing else "evaluate 'adversarial' is not configured and probe_if_missing=false: this acquirer will find nothing")

    def failures(self, ctx) -> list[dict]:
        found = latest_failures(ctx)
        if found is not None:
            ctx.record(self.name, from_round=found[0], failures=len(found[1]))
            return found[1]
        if not self.config.probe_if_missing:
            ctx.warn(self.name, "no evaluate stage has recorded adversarial failures yet; acquired nothing")
            return []
        configured = next((e for e in ctx.strategies.get("evaluate", []) if e.name == Adversarial.name), None)
        prober = Adversarial(dataclasses.replace(configured.config if configured else AdversarialConfig(), n_per_level=self.config.n_probe_problems))
        probes = prober.run_probes(ctx, ctx.model, [ctx.level])
        ctx.record(self.name, probed_now=len(probes))
        return [p for p in probes if p["failed"]]

    def acquire(self, ctx):
        from selfloop.data import make_rows

        c, task = self.config, ctx.task
        seen, unique = set(), []
        for f in self.failures(ctx):
            if f["prompt"] not in seen:
                seen.add(f["prompt"])
                unique.append(f)
        ctx.rng.shuffle(unique)
        chosen = unique[: c.n_problems]
        levels = list(task.levels)
        rows = []
        by_difficulty: dict[int, list[tuple[int, dict]]] = defaultdict(list)
        for i, f in enumerate(chosen):
            by_difficulty[min(max(int(f["difficulty"]), levels[0]), levels[-1])].append((i, f))
        for difficulty, group in sorted(by_difficulty.items()):
            for start in range(0, len(group), c.batch_size):
                chunk = group[start : start + c.batch_size]
                gens = ctx.generate([f["prompt"] for _, f in chunk], max_new_tokens=task.max_new_tokens(difficulty))
                for (i, f), g in zip(chunk, gens):
                    sampling = g.extra.get("sampling") or {}
                    rows.append(dict(id=f"r{ctx.round:03d}-adv-{i}", prompt=f["prompt"], completions=g.completions, answer=g.answer,
                                     reference=f.get("reference"), difficulty=difficulty, round=ctx.round, source=f"acquire/{self.name}",
                                     temperature=sampling.get("temperature"), completion_logprobs=sampling.get("logprobs")))
        rows.sort(key=lambda r: int(r["id"].rsplit("-", 1)[1]))
        return make_rows(rows)


@hookimpl
def selfloop_register_evaluators(register):
    register(Adversarial)


@hookimpl
def selfloop_register_acquirers(register):
    register(AdversarialAcquirer)

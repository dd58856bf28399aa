"""Ensemble: answer with the plurality vote of several independently trained models.

Follows Lee et al. 2025 ("Self-Improving Transformers Overcome Easy-to-Hard and Length
Generalization Challenges"), who lift the accuracy of self-generated multiplication labels
from 31% to 93% by a majority vote across independently seeded models: the members' errors
are largely uncorrelated, so a wrong answer rarely wins the vote.

Members (``members``) are model sources as ``ctx.load_model`` reads them: ``incumbent`` (the
model the caller generates with, through the wrapped generation: no copy is loaded),
``bootstrap``, ``previous``, ``round:N``, or a local model directory, e.g. another seed's run
(``runs/seed2/round-003/optimize/model``), or ``peer:RUN_DIR``: the model another run (e.g. the
same preset from another seed) had as its incumbent after the round before ours. Peers
advance in step, as Lee et al.'s independently seeded models do: round N waits (up to
``peer_wait_seconds``) until each peer has finished round N-1, so every member of round N's
vote has trained on N-1 rounds of voted labels. Members are loaded once per round and freed
when the round changes. A member that does not exist yet (``previous`` before two promoted
rounds) or that is the same model as another member (``bootstrap`` while round 0's model is
the incumbent) is skipped, with one warning per round; with fewer than ``min_members`` left,
the refiner passes generation through and says so in the stage notes.

Each member answers ``samples_per_member`` times at ``temperature`` (default: once, greedy);
answers are normalised with ``task.extract_answer``. The answer is the plurality over every
member's answers (empty answers abstain), ties broken by the incumbent's answer, then by
member order. ``agreement`` is the winner's share of all the members' answers, and the
returned ``completions`` are those answers' completions, so agreement-based filters see the
ensemble's vote. Below ``min_agreement`` the row keeps the incumbent's answer and is marked.
``extra["ensemble"]`` keeps the members, their answers and the votes.

Cost per prompt: members x samples_per_member generated sequences; per round, one load per
member (besides the incumbent). Stage notes count ``prompts``, ``sequences_generated``,
``member_loads``, ``split`` (rows the members disagreed on), ``tied``,
``below_min_agreement`` and ``fallback_prompts``.
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from selfloop import hookimpl
from selfloop.errors import OptionError, RunDirError, SelfloopError
from selfloop.strategy import Generation, Refiner
from selfloop_plugins.refine.cot import tally
from selfloop_plugins.refine.self_consistency import majority

RUN_SOURCES = ("incumbent", "bootstrap", "previous")
# run.json statuses after which a peer run writes no more rounds (an interrupted run may resume)
PEER_ENDED = ("completed", "failed", "stopped", "starved", "budget_exhausted")
PEER_POLL_SECONDS = 5.0
log = logging.getLogger("selfloop")


@dataclass
class EnsembleConfig:
    # incumbent | bootstrap | previous | round:N | peer:RUN_DIR | a local model directory
    members: list[str] = field(default_factory=lambda: ["incumbent", "previous", "bootstrap"])
    # fewer distinct members available than this: pass generation through (and say so)
    min_members: int = 2
    samples_per_member: int = 1
    temperature: float = 0.0
    # the winner's share of the votes below which the incumbent's answer is kept (0: always vote)
    min_agreement: float = 0.0
    # how long round N waits for a peer run to finish round N-1 before voting without it
    peer_wait_seconds: float = 3600.0

    def __post_init__(self):
        members = list(self.members)
        if not members or any(not isinstance(m, str) or not m.strip() for m in members):
            raise OptionError("members", members, "a non-empty list of incumbent, bootstrap, previous, round:N, peer:RUN_DIR or model directories")
        for m in members:
            if m.startswith("round:") and not _round_number(m):
                raise OptionError("members", members, f"round:N with N an integer >= 0 (got {m!r})")
            if _peer_dir(m) is not None and not _peer_dir(m).strip():
                raise OptionError("members", members, f"peer:RUN_DIR with the directory of another run (got {m!r})")
        if len(set(members)) != len(members):
            raise OptionError("members", members, "each member once (a duplicate would count its votes twice)")
        if self.min_members < 1:
            raise OptionError("min_members", self.min_members, "an integer >= 1")
        if self.min_members > len(members):
            raise OptionError("min_members", self.min_members, f"at most the number of members ({len(members)}: {', '.join(members)}); "
                              "list more members, e.g. members=[incumbent,peer:RUN_DIR,peer:RUN_DIR]")
        if self.samples_per_member < 1:
            raise OptionError("samples_per_member", self.samples_per_member, "an integer >= 1")
        if self.temperature < 0:
            raise OptionError("temperature", self.temperature, "a number >= 0 (0: greedy)")
        if self.samples_per_member > 1 and self.temperature == 0:
            raise OptionError("temperature", self.temperature, "a number > 0 when samples_per_member > 1 (greedy samples are identical)")
        if not 0 <= self.min_agreement <= 1:
            raise OptionError("min_agreement", self.min_agreement, "a number in [0, 1]")
        if self.peer_wait_seconds < 0:
            raise OptionError("peer_wait_seconds", self.peer_wait_seconds, "a number of seconds >= 0")


def _round_number(source: str) -> bool:
    number = source.split(":", 1)[1]
    return number.isdigit()


def plurality(votes: list[str], prefer: str | None) -> tuple[str, float, bool]:
    """The most voted non-empty answer, its share of all votes, and whether it was a tie;
    ties go to ``prefer`` (the incumbent's answer) when it is among them, else to the
    first voted in member order."""
    counts = Counter(v for v in votes if v)
    if not counts:
        return "", 0.0, False
    top = max(counts.values())
    tied = [a for a in counts if counts[a] == top]  # insertion order: member order
    winner = prefer if prefer in tied else tied[0]
    return winner, top / len(votes), len(tied) > 1


class Ensemble(Refiner):
    name = "ensemble"
    Config = EnsembleConfig

    def __init__(self, config=None):
        super().__init__(config)
        self._key: tuple | None = None
        self._members: dict[str, Any] = {}  # source -> ModelHandle, for the round in _key
        self._skipped: dict[str, str] = {}  # source -> why, for the round in _key

    def setup(self, ctx):
        chain = [r.name for r in ctx.strategies.get("refine", [])]
        if self.name in chain and chain[-1] != self.name:
            below = chain[chain.index(self.name) + 1 :]
            raise SelfloopError(f"refine 'ensemble' must be the innermost refiner (refine=[...,ensemble]): the members other than "
                                f"the incumbent generate with the bare model, so {', '.join(below)} below it would apply to the incumbent only")
        for m in self.config.members:
            if _peer_dir(m) is not None:
                if not os.path.isdir(_peer_dir(m)):
                    log.info("ensemble: peer run %s does not exist yet: each round waits up to %gs for it", m, self.config.peer_wait_seconds)
            elif m not in RUN_SOURCES and not m.startswith("round:") and _path_like(m) and not os.path.isdir(m):
                ctx.warn(self.name, f"member {m!r} is not a directory (yet): it is skipped until it exists")

    # -- members -----------------------------------------------------------------------
    def members(self, ctx) -> tuple[list[str], dict[str, str]]:
        """The distinct members available this round (loaded once per round) and the
        skipped ones with the reason."""
        key = (str(getattr(ctx.run_dir, "root", id(ctx.run_dir))), ctx.round)
        if key == self._key:
            return list(self._members), self._skipped
        self.free()
        self._key = key
        history = ctx.history()
        incumbent_round = history[-1].get("incumbent_round") if history else None
        seen = {}  # identity of a model -> the member it was loaded as
        loads = 0
        for source in self.config.members:
            target = source
            if _peer_dir(source) is not None:
                target, why = self.peer_model(ctx, _peer_dir(source))
                if target is None:
                    self._skipped[source] = why
                    continue
            if source == "incumbent":
                ident = ("round", incumbent_round) if incumbent_round is not None else ("incumbent",)
            else:
                ident = self.identity(ctx, target, history)
            if ident in seen:
                self._skipped[source] = f"the same model as {seen[ident]}"
                continue
            if ident[0] == "path" and _path_like(target) and not os.path.isdir(target):
                self._skipped[source] = f"no model directory at {target}"
                continue
            if source != "incumbent":
                try:
                    self._members[source] = ctx.load_model(target)
                    loads += 1
                except (SelfloopError, OSError, ValueError) as e:
                    self._skipped[source] = str(e).splitlines()[0] if str(e) else type(e).__name__
                    continue
            else:
                self._members[source] = None  # the wrapped generation
            seen[ident] = source
        tally(ctx, self.name, member_loads=loads)
        if self._skipped:
            why = "; ".join(f"{s} ({r})" for s, r in self._skipped.items())
            ctx.warn(self.name, f"round {ctx.round}: members skipped: {why}")
        return list(self._members), self._skipped

    def peer_model(self, ctx, root: str) -> tuple[str | None, str]:
        """The model directory of the peer run's incumbent after the round before ours
        (waiting for the peer to finish that round), or None and why not."""
        from selfloop.rundir import RunDir  # on first use: plugin discovery stays fast

        wanted = ctx.round - 1
        if wanted < 0:
            return None, "round 0 has no peer round before it"
        peer = RunDir(root)
        deadline = time.monotonic() + self.config.peer_wait_seconds
        waited = False
        while True:
            try:
                status = peer.read_run_json().get("status")
            except RunDirError:  # not started yet (or run.json mid-write): wait for it
                status = None
            # read after the status: a peer whose last round this is may complete in between
            if os.path.isdir(root) and peer.is_complete(wanted, "promote"):
                incumbent = peer.stage_metrics(wanted, "promote").get("incumbent_round")
                if incumbent is None:
                    return None, f"peer {root} has no model after its round {wanted}"
                if waited:
                    log.info("ensemble: peer %s finished round %d", root, wanted)
                return str(peer.stage_dir(incumbent, "optimize") / "model"), ""
            if status in PEER_ENDED:
                return None, f"peer {root} ended ({status}) before finishing round {wanted}"
            left = deadline - time.monotonic()
            if left <= 0:
                return None, f"peer {root} did not finish round {wanted} within peer_wait_seconds={self.config.peer_wait_seconds:g}"
            if not waited:
                log.info("ensemble: round %d waits for peer %s to finish round %d (up to %.0f s)", ctx.round, root, wanted, left)
                waited = True
            time.sleep(min(PEER_POLL_SECONDS, left))

    @staticmethod
    def identity(ctx, source: str, history: list[dict]) -> tuple:
        """What model a source names: ("round", N) for this run's rounds (a directory inside
        this run included), else ("path", its real path)."""
        if source == "bootstrap":
            return ("round", 0)
        if source.startswith("round:"):
            return ("round", int(source.split(":", 1)[1]))
        if source == "previous":
            promoted = [r["round"] for r in history if r.get("promoted")]
            return ("round", promoted[-2]) if len(promoted) >= 2 else ("missing", source)
        real = os.path.realpath(source)
        root = getattr(ctx.run_dir, "root", None)
        if root is not None:
            for r in history:
                if os.path.realpath(ctx.run_dir.stage_dir(r["round"], "optimize") / "model") == real:
                    return ("round", r["round"])
        return ("path", real)

    def free(self) -> None:
        """Drop the loaded members (a new round, or a new run)."""
        if not self._members:
            self._key, self._skipped = None, {}
            return
        self._members, self._skipped, self._key = {}, {}, None
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- voting ------------------------------------------------------------------------
    def refine(self, ctx, prompts, generate):
        if not prompts:
            return []
        c = self.config
        names, skipped = self.members(ctx)
        ctx.record(self.name, members=names, skipped=dict(skipped))
        if len(names) < c.min_members:
            ctx.warn(self.name, f"round {ctx.round}: only {len(names)} of {len(c.members)} members available ({', '.join(names) or 'none'}), "
                                f"fewer than min_members={c.min_members}: answering with the wrapped generation, no vote")
            ctx.record(self.name, fallback=f"{len(names)} member(s) available < min_members={c.min_members}: no vote this round")
            tally(ctx, self.name, fallback_prompts=len(prompts))
            return generate(prompts)
        limit = self.max_new_tokens(ctx, generate)
        n, t = c.samples_per_member, c.temperature
        per_member: dict[str, list[tuple[list[str], list[float] | None]]] = {}
        wrapped = None
        for name in names:
            handle = self._members[name]
            if handle is None:
                wrapped = generate(prompts, n=n, temperature=t)
                per_member[name] = [(list(g.completions), _logprobs(g)) for g in wrapped]
            else:
                outs, lps = handle.generate(prompts, n=n, temperature=t, max_new_tokens=limit, return_logprobs=True)
                per_member[name] = [(list(o), list(lp)) for o, lp in zip(outs, lps)]
        out, split, tied, low = [], 0, 0, []
        for i, prompt in enumerate(prompts):
            answers = {m: [ctx.task.extract_answer(x) for x in per_member[m][i][0]] for m in names}
            votes = [a for m in names for a in answers[m]]
            incumbent = majority([a for a in answers.get("incumbent", []) if a])[0] or None
            answer, agreement, tie = plurality(votes, incumbent)
            split += len({v for v in votes if v}) > 1
            tied += tie
            below = agreement < c.min_agreement
            if below:
                low.append(i)
            completions = [x for m in names for x in per_member[m][i][0]]
            lps = [per_member[m][i][1] for m in names]
            sampling = {"temperature": t, "n": len(completions),
                        "logprobs": [x for lp in lps for x in lp] if all(lp and len(lp) == n for lp in lps) else []}
            base = wrapped[i].extra if wrapped is not None else {}
            info = {"members": names, "answers": answers, "votes": dict(Counter(votes)), "winner": answer, "agreement": agreement,
                    "incumbent_answer": incumbent, "below_min_agreement": below}
            out.append(Generation(prompt, completions, answer, agreement, {**base, "sampling": sampling, "ensemble": info}))
        asked = len(low) if low and wrapped is None else 0  # the incumbent asked for the rows the vote left
        if low:
            self.keep_incumbent(ctx, prompts, generate, out, low, wrapped)
        tally(ctx, self.name, prompts=len(prompts), sequences_generated=len(prompts) * n * len(names) + asked, split=split, tied=tied,
              below_min_agreement=len(low))
        return out

    def keep_incumbent(self, ctx, prompts, generate, out, rows, wrapped) -> None:
        """Rows below min_agreement answer with the incumbent (the wrapped generation's
        answer, asked for when the incumbent is not a member)."""
        if wrapped is None:
            asked = generate([prompts[i] for i in rows])
            answers = dict(zip(rows, (g.answer for g in asked)))
        else:
            answers = {i: out[i].extra["ensemble"]["incumbent_answer"] or "" for i in rows}
        for i in rows:
            votes = out[i].extra["ensemble"]["votes"]
            out[i].answer = answers[i]
            out[i].agreement = votes.get(answers[i], 0) / max(1, sum(votes.values()))

    @staticmethod
    def max_new_tokens(ctx, generate) -> int:
        """The caller's bound on new tokens: innermost, the wrapped generation is the model's
        own, whose ``max_new_tokens`` default is the caller's. Without it (a stand-in), the
        task's largest bound."""
        try:
            param = inspect.signature(generate).parameters.get("max_new_tokens")
        except (TypeError, ValueError):
            param = None
        if param is not None and isinstance(param.default, int):
            return param.default
        return max(ctx.task.max_new_tokens(level) for level in ctx.task.levels)


def _peer_dir(source: str) -> str | None:
    """The run directory of a ``peer:RUN_DIR`` member, None for any other source."""
    return source.split(":", 1)[1] if source.startswith("peer:") else None


def _path_like(source: str) -> bool:
    """A local path rather than a hub name (``org/name``)."""
    return os.path.isabs(source) or source.startswith(".") or source.count("/") > 1


def _logprobs(gen: Generation) -> list[float] | None:
    lp = (gen.extra.get("sampling") or {}).get("logprobs")
    return list(lp) if lp and len(lp) == len(gen.completions) else None


@hookimpl
def selfloop_register_refiners(register):
    register(Ensemble)

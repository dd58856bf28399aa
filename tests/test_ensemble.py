"""The `ensemble` refiner: its contract, options, member handling (skipped, deduplicated,
cached per round, fallback) and a vote across independently seeded real models."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from selfloop.errors import OptionError, SelfloopError
from selfloop.testing import RefinerContract, build_ctx, restored_hydra
from selfloop_plugins.refine.ensemble import Ensemble, EnsembleConfig, plurality

LEVEL = 2  # where the briefly trained members below are imperfect (about 40% exact match)


# -- members: three tiny models trained briefly from different seeds ------------------------
def train_member(ctx, seed: int, steps: int = 250, batch: int = 32, lr: float = 5e-3):
    """A tiny model initialised and trained on its own seed (reversal levels 1-3). A plain
    torch loop: the members only need to be independent and imperfect, not good."""
    import torch

    from selfloop.context import seed_everything
    from selfloop_plugins.optimize.sft import tokenize_rows

    seed_everything(seed)
    handle = ctx.strategies["model"][0].build(ctx)
    tok, model, rng = handle.tokenizer, handle.model, random.Random(seed)
    problems = [p for level in (1, 2, 3) for p in ctx.task.sample(rng, level, 2000)]
    ids, labels = tokenize_rows(tok, [p.prompt for p in problems], [p.reference for p in problems])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        rows = rng.sample(range(len(ids)), batch)
        width = max(len(ids[i]) for i in rows)
        x = torch.full((batch, width), pad)
        y = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for r, i in enumerate(rows):
            x[r, : len(ids[i])], y[r, : len(ids[i])], mask[r, : len(ids[i])] = torch.tensor(ids[i]), torch.tensor(labels[i]), 1
        for group in opt.param_groups:  # warm up, then decay linearly
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (1 - step / steps)
        loss = model(input_ids=x, attention_mask=mask, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return handle


@pytest.fixture(scope="module")
def member_dirs(tmp_path_factory):
    """Three saved members (n_embd 48, 2 layers), each from its own seed."""
    root = tmp_path_factory.mktemp("members")
    with restored_hydra():
        ctx = build_ctx(root / "ctx", ["model.tiny.n_embd=48", "model.tiny.n_layer=2", "model.tiny.n_head=2"])
    dirs = []
    for seed in (1, 2, 3):
        path = root / f"seed{seed}"
        train_member(ctx, seed).save(path)
        dirs.append(str(path))
    return dirs


# -- stand-ins ---------------------------------------------------------------------------
class Says:
    """A stand-in member: answers each prompt from a table (default: the reversal)."""

    def __init__(self, table=None):
        self.table, self.calls = table or {}, []

    def generate(self, prompts, n=1, temperature=0.0, max_new_tokens=64, return_logprobs=False):
        self.calls.append({"prompts": list(prompts), "n": n, "temperature": temperature, "max_new_tokens": max_new_tokens})
        outs = [[self.table.get(p, p.rstrip("=")[::-1])] * n for p in prompts]
        return (outs, [[-0.5] * n for _ in prompts]) if return_logprobs else outs


def with_members(ctx, strategy, incumbent: Says, others: dict[str, Says]):
    """Install the stand-ins: ``incumbent`` as ctx.model, ``others`` behind ctx.load_model."""
    ctx.model = incumbent
    ctx.strategies["refine"] = [strategy]

    def load_model(source):
        if source not in others:
            raise SelfloopError(f"no model {source!r}")
        return others[source]

    ctx.load_model = load_model
    return ctx


# -- contract suites ---------------------------------------------------------------------
class TestEnsembleContract(RefinerContract):
    """Defaults: in a fresh context no previous/bootstrap model exists: the fallback path."""

    @pytest.fixture
    def strategy(self):
        return Ensemble()


class TestEnsembleOfDirectoriesContract(RefinerContract):
    """Two saved members beside the incumbent: the voting path."""

    @pytest.fixture
    def strategy(self, member_dirs):
        return Ensemble(EnsembleConfig(members=["incumbent", *member_dirs[:2]]))


# -- options -----------------------------------------------------------------------------
@pytest.mark.parametrize(("option", "values"), [
    ("members", {"members": []}),
    ("members", {"members": ["incumbent", ""]}),
    ("members", {"members": ["incumbent", "incumbent"]}),
    ("members", {"members": ["incumbent", "round:x"]}),
    ("members", {"members": ["incumbent", "peer:"]}),
    ("peer_wait_seconds", {"peer_wait_seconds": -1}),
    ("min_members", {"min_members": 0}),
    ("min_members", {"members": ["incumbent", "bootstrap"], "min_members": 3}),
    ("min_agreement", {"min_agreement": 1.5}),
    ("min_agreement", {"min_agreement": -0.1}),
    ("samples_per_member", {"samples_per_member": 0}),
    ("temperature", {"temperature": -1.0}),
    ("temperature", {"samples_per_member": 3, "temperature": 0.0}),
])
def test_bad_options_are_refused(option, values):
    with pytest.raises(OptionError, match=rf"bad option {option}="):
        EnsembleConfig(**values)


def test_setup_refuses_refiners_below_it(make_ctx):
    with pytest.raises(SelfloopError, match=r"innermost.*cot"):
        make_ctx(["refine=[ensemble,cot]"])
    make_ctx(["refine=[self_consistency,ensemble]"])  # innermost is fine


def test_plurality_breaks_ties_by_the_incumbent_then_member_order():
    assert plurality(["a", "b", "b"], "a") == ("b", 2 / 3, False)
    assert plurality(["a", "b", "c"], "b") == ("b", 1 / 3, True)
    assert plurality(["a", "b", "c"], None) == ("a", 1 / 3, True)
    assert plurality(["", "", "c"], "") == ("c", 1 / 3, False)  # empty answers abstain
    assert plurality(["", ""], None) == ("", 0.0, False)


# -- voting with stand-in members ---------------------------------------------------------
def test_votes_across_members_with_the_callers_bound(make_ctx):
    prompts = ["123=", "456=", "789="]
    inc, m2, m3 = Says({"123=": "329", "456=": "111"}), Says({"123=": "329", "456=": "222"}), Says({"456=": "333", "789=": "000"})
    ens = Ensemble(EnsembleConfig(members=["incumbent", "a", "b"]))
    ctx = with_members(make_ctx(), ens, inc, {"a": m2, "b": m3})
    out = ctx.generate(prompts, max_new_tokens=7)
    # 123=: 329 twice beats the right answer once; 456=: a three-way tie goes to the incumbent;
    # 789=: the two right answers outvote 000
    assert [g.answer for g in out] == ["329", "111", "987"]
    assert [g.agreement for g in out] == pytest.approx([2 / 3, 1 / 3, 2 / 3])
    assert out[0].completions == ["329", "329", "321"]  # every member's vote, in member order
    assert out[0].extra["ensemble"]["answers"] == {"incumbent": ["329"], "a": ["329"], "b": ["321"]}
    assert out[0].extra["sampling"]["n"] == 3 and len(out[0].extra["sampling"]["logprobs"]) == 3
    assert m2.calls[0]["max_new_tokens"] == 7 and m3.calls[0]["max_new_tokens"] == 7
    notes = ctx.notes["ensemble"]
    assert notes["prompts"] == 3 and notes["sequences_generated"] == 9 and notes["split"] == 3 and notes["tied"] == 1
    assert notes["members"] == ["incumbent", "a", "b"] and notes["member_loads"] == 2


def test_samples_per_member_and_min_agreement(make_ctx):
    prompts = ["12=", "34="]
    inc, m2, m3 = Says({"34=": "11"}), Says({"34=": "22"}), Says({"34=": "33"})
    ens = Ensemble(EnsembleConfig(members=["incumbent", "a", "b"], samples_per_member=2, temperature=0.5, min_agreement=0.5))
    ctx = with_members(make_ctx(), ens, inc, {"a": m2, "b": m3})
    out = ctx.generate(prompts, max_new_tokens=4)
    assert m2.calls[0]["n"] == 2 and m2.calls[0]["temperature"] == 0.5
    assert out[0].answer == "21" and out[0].agreement == 1.0 and not out[0].extra["ensemble"]["below_min_agreement"]
    # no answer reaches half the votes: the incumbent's answer is kept, and marked
    assert out[1].answer == "11" and out[1].extra["ensemble"]["below_min_agreement"]
    assert out[1].agreement == pytest.approx(2 / 6)
    assert ctx.notes["ensemble"]["below_min_agreement"] == 1 and ctx.notes["ensemble"]["sequences_generated"] == 12


def test_without_the_incumbent_low_agreement_asks_the_wrapped_generation(make_ctx):
    inc, m2, m3 = Says({"34=": "11"}), Says({"34=": "22"}), Says({"34=": "33"})
    ens = Ensemble(EnsembleConfig(members=["a", "b"], min_agreement=0.6))
    ctx = with_members(make_ctx(), ens, inc, {"a": m2, "b": m3})
    out = ctx.generate(["34=", "56="], max_new_tokens=4)
    assert [g.answer for g in out] == ["11", "65"]
    assert inc.calls == [{"prompts": ["34="], "n": 1, "temperature": 0.0, "max_new_tokens": 4}]


def test_missing_members_are_skipped_with_one_warning_and_loaded_once_per_round(make_ctx):
    m2, m3 = Says(), Says()
    loads = []
    ens = Ensemble(EnsembleConfig(members=["incumbent", "previous", "bootstrap", "a", "b", "/no/such/run/model"]))
    ctx = with_members(make_ctx(), ens, Says(), {"a": m2, "b": m3})
    load = ctx.load_model
    ctx.load_model = lambda source: loads.append(source) or load(source)
    for chunk in (["12="], ["34="], ["56="]):
        ctx.generate(chunk, max_new_tokens=4)
    assert loads == ["previous", "bootstrap", "a", "b"]  # once per round, not per call
    notes = ctx.notes["ensemble"]
    assert len(notes["warnings"]) == 1 and "previous" in notes["warnings"][0] and "bootstrap" in notes["warnings"][0]
    assert set(notes["skipped"]) == {"previous", "bootstrap", "/no/such/run/model"} and notes["members"] == ["incumbent", "a", "b"]
    assert notes["skipped"]["/no/such/run/model"] == "no model directory at /no/such/run/model"
    assert notes["sequences_generated"] == 9 and notes["member_loads"] == 2
    ctx.round += 1  # a new round reloads (and frees the last round's members)
    ctx.generate(["78="], max_new_tokens=4)
    assert loads[4:] == ["previous", "bootstrap", "a", "b"] and len(ctx.notes["ensemble"]["warnings"]) == 2


def test_fewer_than_min_members_falls_back_and_says_so(make_ctx):
    inc = Says({"12=": "99"})
    ens = Ensemble(EnsembleConfig(members=["incumbent", "previous", "bootstrap"], min_members=2))
    ctx = with_members(make_ctx(), ens, inc, {})
    out = ctx.generate(["12=", "34="], max_new_tokens=4)
    assert [g.answer for g in out] == ["99", "43"] and "ensemble" not in out[0].extra  # the wrapped generation as is
    notes = ctx.notes["ensemble"]
    assert "min_members=2" in notes["fallback"] and notes["fallback_prompts"] == 2
    assert any("fewer than min_members=2" in w for w in notes["warnings"])
    assert "sequences_generated" not in notes


# -- peer runs advanced in step ------------------------------------------------------------
def peer_run(root, finished: dict[int, int | None], status="running"):
    """A run directory whose rounds ``finished`` (round -> incumbent_round) are complete."""
    from selfloop.rundir import RunDir

    rd = RunDir(root)
    root.mkdir(parents=True, exist_ok=True)
    rd.write_run_json(status=status)
    for round_, incumbent in finished.items():
        finish(rd, round_, incumbent)
    return rd


def finish(rd, round_: int, incumbent: int | None) -> None:
    if incumbent == round_:  # promoted: its model (a stand-in answers for it)
        (rd.stage_dir(round_, "optimize") / "model").mkdir(parents=True)
    rd.write_stage(round_, "promote", {"round": round_, "promoted": incumbent == round_, "incumbent_round": incumbent})


@pytest.fixture
def quick_poll(monkeypatch):
    import selfloop_plugins.refine.ensemble as ensemble

    monkeypatch.setattr(ensemble, "PEER_POLL_SECONDS", 0.02)


def test_a_peer_member_is_the_peers_incumbent_after_the_round_before(make_ctx, tmp_path):
    # the peer rejected its round 1: after round 1 its incumbent is still round 0's model
    peer = peer_run(tmp_path / "peer", {0: 0, 1: 0, 2: 2})
    wanted = str(peer.stage_dir(0, "optimize") / "model")
    ens = Ensemble(EnsembleConfig(members=["incumbent", f"peer:{peer.root}"], peer_wait_seconds=0))
    ctx = with_members(make_ctx(round_=2), ens, Says({"12=": "99"}), {wanted: Says({"12=": "99"})})
    out = ctx.generate(["12=", "34="], max_new_tokens=4)
    assert [g.answer for g in out] == ["99", "43"] and out[0].agreement == 1.0
    assert ctx.notes["ensemble"]["members"] == ["incumbent", f"peer:{peer.root}"] and ctx.notes["ensemble"]["member_loads"] == 1


def test_a_peer_behind_is_waited_for(make_ctx, tmp_path, quick_poll):
    import threading

    peer = peer_run(tmp_path / "peer", {0: 0})
    wanted = str(peer.stage_dir(1, "optimize") / "model")
    ens = Ensemble(EnsembleConfig(members=["incumbent", f"peer:{peer.root}"], peer_wait_seconds=30))
    ctx = with_members(make_ctx(round_=2), ens, Says(), {wanted: Says()})
    later = threading.Timer(0.3, finish, (peer, 1, 1))
    later.start()
    try:
        ctx.generate(["12="], max_new_tokens=4)
    finally:
        later.cancel()
    assert ctx.notes["ensemble"]["members"] == ["incumbent", f"peer:{peer.root}"] and not ctx.notes["ensemble"]["skipped"]


@pytest.mark.parametrize(("finished", "status", "why"), [
    ({0: 0}, "running", "did not finish round 1 within peer_wait_seconds=0.1"),
    ({0: 0}, "failed", "ended (failed) before finishing round 1"),
    ({0: None, 1: None}, "running", "has no model after its round 1"),
    (None, None, "did not finish round 1 within peer_wait_seconds=0.1"),  # never started
])
def test_a_peer_that_cannot_vote_is_skipped_with_the_reason(make_ctx, tmp_path, quick_poll, finished, status, why):
    root = tmp_path / "peer"
    if finished is not None:
        peer_run(root, finished, status)
    ens = Ensemble(EnsembleConfig(members=["incumbent", f"peer:{root}"], min_members=1, peer_wait_seconds=0.1))
    ctx = with_members(make_ctx(round_=2), ens, Says(), {})
    ctx.generate(["12="], max_new_tokens=4)
    assert why in ctx.notes["ensemble"]["skipped"][f"peer:{root}"]
    assert ctx.notes["ensemble"]["members"] == ["incumbent"]


def test_the_own_run_as_a_peer_counts_once(make_ctx):
    # listing this very run as a peer names the incumbent's model: one vote, not two
    ctx = make_ctx(round_=1)
    finish(ctx.run_dir, 0, 0)
    ens = Ensemble(EnsembleConfig(members=["incumbent", f"peer:{ctx.run_dir.root}"], min_members=1, peer_wait_seconds=0))
    with_members(ctx, ens, Says(), {})
    ctx.generate(["12="], max_new_tokens=4)
    assert ctx.notes["ensemble"]["skipped"] == {f"peer:{ctx.run_dir.root}": "the same model as incumbent"}


# -- real members --------------------------------------------------------------------------
def test_the_vote_of_independent_seeds_beats_the_average_member(make_ctx, member_dirs):
    """Three members trained from different seeds; the incumbent is the first. On level 2 they
    are imperfect and disagree on many prompts: the vote must be the hand-computed plurality
    there, and at least as accurate as the average member (above the worst)."""
    from selfloop.model import ModelHandle

    incumbent = ModelHandle.load(member_dirs[0], device="cpu")
    ctx = make_ctx(level=LEVEL, model=incumbent)
    ens = Ensemble(EnsembleConfig(members=["incumbent", *member_dirs[1:]]))
    ctx.strategies["refine"] = [ens]
    problems = ctx.task.sample(random.Random(7), LEVEL, 300)
    prompts, limit = [p.prompt for p in problems], ctx.task.max_new_tokens(LEVEL)
    out = ctx.generate(prompts, max_new_tokens=limit)

    handles = [incumbent] + [ModelHandle.load(d, device="cpu") for d in member_dirs[1:]]
    each = [[ctx.task.extract_answer(o[0]) for o in h.generate(prompts, max_new_tokens=limit)] for h in handles]
    member_acc = [sum(a == p.reference for a, p in zip(answers, problems)) / len(problems) for answers in each]
    ensemble_acc = sum(g.answer == p.reference for g, p in zip(out, problems)) / len(problems)
    assert max(member_acc) < 0.9, f"members too good to test a vote: {member_acc}"
    assert ensemble_acc >= sum(member_acc) / 3 and ensemble_acc > min(member_acc), (ensemble_acc, member_acc)

    split = 0
    for i, g in enumerate(out):
        votes = [answers[i] for answers in each]
        counts = Counter(v for v in votes if v)
        top = max(counts.values())
        expected = votes[0] if counts.get(votes[0]) == top else next(v for v in votes if counts.get(v) == top)
        assert g.answer == expected and g.agreement == pytest.approx(top / 3), (g.prompt, votes, g.answer)
        split += len(counts) > 1
    assert split >= 30, f"only {split} prompts where the members disagree"
    assert ctx.notes["ensemble"]["split"] == split


# -- through the loop ----------------------------------------------------------------------
def test_through_the_loop_falls_back_then_votes(selfloop_smoke_loop):
    # round 1: the incumbent is round 0's model (= bootstrap) and there is no previous one:
    # one distinct member, so the refiner passes through and says so. Round 2: incumbent
    # (round 1) and previous (round 0, also the bootstrap: counted once) vote.
    run = selfloop_smoke_loop(["refine=[ensemble]", "filter=[]", "loop.promotion.tolerance=1.0", "acquire.task_sampler.n_problems=40"], rounds=2)
    assert run.status == "completed" and [r["promoted"] for r in run.records] == [True, True, True]
    first = run.stage_metrics(1, "acquire")["notes"]["ensemble"]
    assert "min_members=2" in first["fallback"] and first["fallback_prompts"] > 0
    assert any("fewer than min_members=2" in w for w in first["warnings"])
    assert set(first["skipped"]) == {"previous", "bootstrap"}
    second = run.stage_metrics(2, "acquire")["notes"]["ensemble"]
    assert second["members"] == ["incumbent", "previous"] and "bootstrap" in second["skipped"]
    assert second["member_loads"] == 1 and second["sequences_generated"] == 2 * second["prompts"] > 0
    assert "fallback" not in second


def test_through_the_loop_a_peer_run_votes_in_step(selfloop_smoke_loop):
    # the peer (another seed, finished after one round) and this run: round 1 votes with the
    # peer's round-0 model, round 2 with the incumbent the peer had after its round 1; round 3
    # has no peer round 2 to wait for (the peer completed): it votes alone, and says why
    quick = ["filter=[]", "loop.promotion.tolerance=1.0", "acquire.task_sampler.n_problems=20"]
    peer = selfloop_smoke_loop(["seed=1", *quick], rounds=1)
    run = selfloop_smoke_loop(["refine=[ensemble]", *quick, f"refine.ensemble.members=[incumbent,peer:{peer.run_dir}]",
                               "refine.ensemble.min_members=1"], rounds=3)
    assert run.status == "completed"
    for round_ in (1, 2):
        notes = run.stage_metrics(round_, "acquire")["notes"]["ensemble"]
        assert notes["members"] == ["incumbent", f"peer:{peer.run_dir}"] and notes["member_loads"] == 1, notes
        assert notes["sequences_generated"] == 2 * notes["prompts"] > 0 and not notes["skipped"]
    notes = run.stage_metrics(3, "acquire")["notes"]["ensemble"]
    assert notes["members"] == ["incumbent"]
    assert "ended (completed) before finishing round 2" in notes["skipped"][f"peer:{peer.run_dir}"]

"""The dpo, grpo and distill optimizers: their contract suites, behaviour tests that fail if an
optimizer does nothing useful, their bad-input errors, and one smoke run per recipe
(``+recipe=NAME``) from a shared bootstrapped run."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass

import pytest

from selfloop.errors import SelfloopError, StarvedRound
from selfloop.testing import OptimizerContract
from selfloop.testing.contracts import sample_rows
from selfloop_plugins.optimize.distill import Distill, DistillConfig
from selfloop_plugins.optimize.dpo import DPO, DPOConfig
from selfloop_plugins.optimize.grpo import GRPO, GRPOConfig


# -- contract suites ---------------------------------------------------------------------
class TestDPOContract(OptimizerContract):
    @pytest.fixture
    def strategy(self):
        return DPO(DPOConfig(max_steps=3, batch_size=8))

    @pytest.fixture
    def rows(self, ctx):
        # half the rows have disagreeing samples: preference pairs
        return sample_rows(ctx, self.n_rows, list(range(1, ctx.level + 1)), with_references=False, correct_share=0.5)


class TestGRPOContract(OptimizerContract):
    @pytest.fixture
    def strategy(self):
        return GRPO(GRPOConfig(max_steps=2, prompts_per_step=4, num_generations=4))


class TestDistillContract(OptimizerContract):
    @pytest.fixture
    def strategy(self):
        # the contract's model is untrained: learn the rows' own answers (no relabelling)
        return Distill(DistillConfig(relabel=False, max_steps=3, batch_size=8))


# -- shared helpers ----------------------------------------------------------------------
def sampled_rows(ctx, model, levels, n, samples=5, temperature=0.7, with_references=False):
    """Rows as the default acquirer makes them: the model's samples, majority answer."""
    from selfloop.data import blind, make_rows
    from selfloop_plugins.refine.self_consistency import majority

    rng = random.Random(11)
    problems = [p for level in levels for p in ctx.task.sample(rng, level, n)]
    outs = model.generate([p.prompt for p in problems], n=samples, temperature=temperature, max_new_tokens=max(levels) + 2)
    rows = make_rows(
        dict(id=f"t-{i}", prompt=p.prompt, completions=o, answer=majority(o)[0], reference=p.reference, difficulty=p.difficulty, round=1, source="test")
        for i, (p, o) in enumerate(zip(problems, outs))
    )
    return rows if with_references else blind(rows)


@pytest.fixture
def trained_ctx(make_ctx, trained_model):
    """A smoke-run context at level 4 whose incumbent is the session's trained model."""
    return make_ctx(level=4, model=trained_model)


def exact(ctx, model, prompts, references):
    outs = model.generate(prompts, max_new_tokens=ctx.task.max_new_tokens(max(len(p) for p in prompts)))
    return sum(ctx.task.check(o[0], r) for o, r in zip(outs, references)) / len(prompts)


@dataclass
class StubEvaluator:
    """A label-free evaluator stand-in whose per-row scores a test decides."""

    name: str
    fn: object
    uses_references: bool = False

    def score(self, ctx, data):
        return self.fn(data)

    def evaluate(self, ctx, model):
        return {"score": 0.0}


# -- dpo ---------------------------------------------------------------------------------
def test_dpo_raises_chosen_over_rejected_on_its_pairs(trained_ctx):
    ctx = trained_ctx
    rows = sampled_rows(ctx, ctx.model, [3, 4], 96)
    dpo = DPO(DPOConfig(max_steps=30, batch_size=16, learning_rate=5e-4))
    pairs, counts = dpo.self_reward_pairs(ctx, rows)
    assert pairs and counts["equal_answers"] > 0, "the sampled rows should hold both pairs and unanimous rows"
    prompts, chosen, rejected = (list(x) for x in zip(*pairs))

    def margin(model):
        good, bad = model.logprobs(prompts, chosen), model.logprobs(prompts, rejected)
        return sum(g - b for g, b in zip(good, bad)) / len(pairs)

    before = margin(ctx.model)
    candidate = dpo.optimize(ctx, rows)
    assert margin(candidate) > before + 0.3
    assert ctx.notes["dpo"]["pairs"] == len(pairs) and ctx.notes["dpo"]["equal_answers"] == counts["equal_answers"]
    assert candidate.train_metrics["pairs"] == len(pairs) and "train_loss" in candidate.train_metrics


def test_dpo_pairs_majority_against_minority_and_drops_equal_answers(make_ctx):
    from selfloop.data import make_rows

    ctx = make_ctx(level=3)
    rows = make_rows([
        dict(id="a", prompt="123=", completions=["321", "321", "312", "321"], answer="321"),
        dict(id="b", prompt="45=", completions=["54", "54", "54"], answer="54"),  # all equal: no pair
        dict(id="c", prompt="67=", completions=["76", "7", "7", "76", "76"], answer="76"),
        dict(id="d", prompt="89=", completions=["8", "8", "98x"], answer="8"),  # majority malformed, minority malformed
    ])
    pairs, counts = DPO(DPOConfig()).self_reward_pairs(ctx, rows)
    assert pairs == [("123=", "321", "312"), ("67=", "76", "7")]
    assert counts == {"equal_answers": 1, "no_well_formed_answer": 1}


def test_dpo_ranks_with_a_configured_evaluator(make_ctx):
    from selfloop.data import make_rows

    ctx = make_ctx(level=3)
    # an evaluator (say, a judge) that prefers the true reversal, even when it is the minority
    ctx.strategies["evaluate"].append(StubEvaluator("judge_stub", lambda d: [float(a == p[:-1][::-1]) for p, a in zip(d["prompt"], d["answer"])]))
    rows = make_rows([dict(id="a", prompt="123=", completions=["312", "312", "321"], answer="312")])
    assert DPO(DPOConfig()).self_reward_pairs(ctx, rows)[0] == [("123=", "312", "321")]  # majority ranking
    assert DPO(DPOConfig(rank_by="judge_stub")).self_reward_pairs(ctx, rows)[0] == [("123=", "321", "312")]


def test_dpo_without_pairs_starves_the_round(make_ctx, trained_model):
    from selfloop.data import blind, make_rows

    ctx = make_ctx(level=3, model=trained_model)
    rows = blind(make_rows([dict(id=str(i), prompt="12=", completions=["21"] * 4, answer="21") for i in range(5)]))
    with pytest.raises(StarvedRound, match="no preference pairs in 5 rows \\(equal answers: 5\\)"):
        DPO(DPOConfig()).optimize(ctx, rows)
    assert ctx.notes["dpo"] == {"rows": 5, "pairs": 0, "equal_answers": 5}


def test_spin_pairs_the_reference_against_the_models_own_answer(make_ctx, trained_model):
    ctx = make_ctx(["optimize=dpo", "optimize.dpo.pairs=spin", "loop.allow_references_in_training=true"], level=4, model=trained_model)
    rows = sampled_rows(ctx, trained_model, [4], 48, samples=1, temperature=0.0, with_references=True)
    dpo = ctx.strategies["optimize"][0]
    pairs, counts = dpo.spin_pairs(ctx, rows)
    assert counts["references_used"] == 48 and len(pairs) + counts["equal_answers"] == 48
    assert all(chosen == ref for (_, chosen, _), ref in zip(pairs, [r for r, a in zip(rows["reference"], rows["answer"]) if r != a]))
    assert all(chosen != rejected for _, chosen, rejected in pairs)


@pytest.mark.parametrize("overrides, message", [
    (["optimize=dpo", "optimize.dpo.pairs=spin", "filter=[uncertainty]", "filter.uncertainty.min_agreement=0.5"],
     "optimize.dpo.pairs=spin trains on reference answers .* set loop.allow_references_in_training=true"),
    (["optimize=dpo"], "filter.uncertainty.min_agreement=1.0 keeps only rows whose samples all agree"),
    (["optimize=dpo", "optimize.dpo.rank_by=nope", "filter=[]"], "bad option optimize.dpo.rank_by='nope': accepted: majority or a configured evaluator"),
    (["optimize=dpo", "optimize.dpo.rank_by=exact_match", "filter=[]"], "reads references"),
    (["optimize=dpo", "filter=[]", "+loop.bootstrap.optimize.dpo.max_steps=5"], "loop.bootstrap.optimize.dpo=\\{'max_steps': 5\\} would be ignored: round 0"),
    (["optimize=grpo", "optimize.grpo.rewards=[majority,correct]"], "rewards includes 'correct' .* set loop.allow_references_in_training=true"),
    (["optimize=grpo", "optimize.grpo.rewards=[majority,nope]"], "configured evaluators \\(exact_match, self_consistency\\); got 'nope'"),
    (["optimize=grpo", "task=addition", "filter=[uncertainty]", "optimize.grpo.rewards=[roundtrip]"], "has no inverse"),
    (["optimize=grpo", "optimize.grpo.reward_weights=[1.0]"], "one weight per reward \\(2\\)"),
    (["optimize=distill", "optimize.distill.only_correct=true"], "only_correct=true keeps only answers that match the reference .* allow"),
    (["optimize=distill", "optimize.distill.student=fresh", "+optimize.distill.student_model.n_layers=1"],
     "options of model 'tiny': .* \\(unknown: n_layers\\)"),
    (["optimize=distill", "optimize.distill.student=fresh", "+optimize.distill.student_model.n_embd=30"],
     "student_model.n_embd=30: accepted: a multiple of n_head"),
    (["optimize=distill", "+optimize.distill.student_model.n_layer=1"], "student_model=.*accepted: \\{\\} unless student=fresh"),
    (["optimize=distill", "optimize.distill.teacher=/no/such/model"], "teacher='/no/such/model': accepted: .* existing local model directory"),
])
def test_bad_setups_fail_before_the_run_naming_the_option(make_ctx, overrides, message):
    with pytest.raises(SelfloopError, match=message):
        make_ctx(overrides)


@pytest.mark.parametrize("optimizer", ["dpo", "grpo", "distill"])
def test_round_zero_trains_the_labelled_bootstrap_with_sft(make_ctx, optimizer):
    from selfloop.context import seed_everything

    ctx = make_ctx([f"optimize={optimizer}", "filter=[]", "loop.bootstrap.optimize.sft.max_steps=2", "loop.bootstrap.optimize.sft.batch_size=4"], round_=0)
    seed_everything(0)
    ctx.model = ctx.strategies["model"][0].build(ctx)
    rows = sample_rows(ctx, 8, [1, 2], with_references=False, correct_share=1.0)
    steps = ctx.budget.train_steps
    ctx.strategies["optimize"][0].optimize(ctx, rows)
    assert ctx.budget.train_steps - steps == 2
    assert "sft" in ctx.notes[optimizer]["bootstrap"]


# -- grpo --------------------------------------------------------------------------------
def group_reward(ctx, model, prompts, n=16):
    """Mean label-free reward (majority agreement + well-formedness) of sampled groups."""
    from collections import Counter

    task, total = ctx.task, 0.0
    outs = model.generate(prompts, n=n, temperature=1.0, max_new_tokens=ctx.task.max_new_tokens(max(len(p) for p in prompts)))
    for p, o in zip(prompts, outs):
        answers = [task.extract_answer(c) for c in o]
        valid = [a for a in answers if task.is_well_formed(p, a)]
        top = Counter(valid).most_common(1)[0][0] if valid else None
        total += (valid.count(top) + len(valid)) / n
    return total / len(prompts)


def test_grpo_raises_the_mean_reward_on_its_prompts(trained_ctx):
    import torch

    ctx = trained_ctx
    rows = sampled_rows(ctx, ctx.model, [3, 4], 16, samples=1)
    grpo = GRPO(GRPOConfig(max_steps=40, prompts_per_step=8, num_generations=8, learning_rate=5e-4))
    candidate = grpo.optimize(ctx, rows)
    prompts = list(rows["prompt"])
    torch.manual_seed(0)
    before = group_reward(ctx, ctx.model, prompts)
    torch.manual_seed(0)
    after = group_reward(ctx, candidate, prompts)
    assert after > before + 0.2, (before, after, candidate.train_metrics)
    assert {"train_loss", "reward_first", "reward_last"} <= set(candidate.train_metrics)


@pytest.mark.parametrize("fn, message", [
    (lambda d: [float("nan")] * len(d), "grpo reward 'bad_judge' .* returned nan for completion"),
    (lambda d: [1.0] * (len(d) - 1), "grpo reward 'bad_judge' .* returned 31 values for 32 completions"),
])
def test_grpo_rewards_that_return_nan_or_the_wrong_length_fail_naming_them(make_ctx, fn, message):
    from selfloop.context import seed_everything

    ctx = make_ctx(level=2)
    seed_everything(0)
    ctx.model = ctx.strategies["model"][0].build(ctx)
    ctx.strategies["evaluate"].append(StubEvaluator("bad_judge", fn))
    rows = sample_rows(ctx, 8, [2], with_references=False)
    grpo = GRPO(GRPOConfig(rewards=["majority", "bad_judge"], max_steps=1, prompts_per_step=4, num_generations=8))
    with pytest.raises(SelfloopError, match=message):
        grpo.optimize(ctx, rows)


# -- distill -----------------------------------------------------------------------------
def test_distill_student_matches_the_teachers_refined_answers_better(trained_ctx):
    import torch

    ctx = trained_ctx  # the smoke config's refiner: self-consistency, 4 samples
    rows = sampled_rows(ctx, ctx.model, [4], 160, samples=1)
    # level 4 is beyond the model's training: its greedy answers and its majority vote often differ
    distill = Distill(DistillConfig(max_steps=60, batch_size=32, learning_rate=1e-3, replay_fraction=0.0, require_well_formed=False))
    torch.manual_seed(0)  # the teacher samples: the same draws here and in optimize
    targets, counts = distill.targets(ctx, rows)
    assert counts == {"prompts": 160, "low_agreement": 0, "malformed": 0} and len(targets) == 160
    prompts, answers = [t["prompt"] for t in targets], [t["answer"] for t in targets]
    before = exact(ctx, ctx.model, prompts, answers)
    torch.manual_seed(0)
    candidate = distill.optimize(ctx, rows)
    assert exact(ctx, candidate, prompts, answers) > before + 0.1, before
    assert ctx.notes["distill"]["student"] == "incumbent"


def test_distill_trains_a_smaller_fresh_student(trained_ctx, tmp_path):
    from selfloop.model import ModelHandle

    ctx = trained_ctx
    rows = sampled_rows(ctx, ctx.model, [3], 64, samples=1)
    distill = Distill(DistillConfig(relabel=False, student="fresh", student_model={"n_layer": 1, "n_embd": 32}, max_steps=40, batch_size=32,
                                    replay_fraction=0.0))
    candidate = distill.optimize(ctx, rows)
    assert candidate.num_parameters < ctx.model.num_parameters / 3
    assert ctx.notes["distill"]["student"].startswith("fresh")
    candidate.save(tmp_path / "student")
    assert ModelHandle.load(tmp_path / "student", device="cpu").num_parameters == candidate.num_parameters
    # it learnt the teacher's answers: far likelier than under an untrained student of its shape
    fresh, _ = distill.student(ctx)
    prompts, answers = list(rows["prompt"]), list(rows["answer"])

    def mean(model):
        return sum(model.logprobs(prompts, answers)) / len(prompts)

    assert mean(candidate) > mean(fresh) + 0.25


def test_distill_only_correct_keeps_answers_that_match_the_reference(make_ctx, trained_model):
    ctx = make_ctx(["optimize=distill", "optimize.distill.only_correct=true", "optimize.distill.relabel=false",
                    "optimize.distill.targets=completions", "loop.allow_references_in_training=true"], level=4, model=trained_model)
    rows = sampled_rows(ctx, trained_model, [4], 48, with_references=True)
    targets, counts = ctx.strategies["optimize"][0].targets(ctx, rows)
    refs = dict(zip(rows["prompt"], rows["reference"]))
    assert targets and all(t["answer"] == refs[t["prompt"]] for t in targets)
    assert counts["references_used"] + counts["malformed"] + counts["low_agreement"] == 48 and counts["incorrect"] > 0


# -- recipes -----------------------------------------------------------------------------
RECIPES = {
    "self_rewarding": ["optimize.dpo.max_steps=4", "optimize.dpo.batch_size=8"],
    "spin": ["optimize.dpo.max_steps=4", "optimize.dpo.batch_size=8", "loop.allow_references_in_training=true"],
    "ttrl": ["optimize.grpo.max_steps=2", "optimize.grpo.prompts_per_step=4"],
    "star": ["optimize.distill.max_steps=4", "optimize.distill.batch_size=8", "loop.allow_references_in_training=true"],
    "rest_em": ["optimize.distill.max_steps=4", "optimize.distill.batch_size=8", "loop.allow_references_in_training=true"],
    "easy_to_hard": ["optimize.sft.max_steps=4", "optimize.sft.batch_size=8"],
}
SMALL = ["acquire.task_sampler.n_problems=48", "evaluate.self_consistency.n_per_level=8", "evaluate.exact_match.n_per_level=16"]


@dataclass
class NoOptions:
    pass


@pytest.fixture(scope="module")
def bootstrapped_run(trained_model, tmp_path_factory):
    """Round 0 of a smoke run whose model is the session's trained model (levels 1-3; a
    stand-in model provider hands it over, the bootstrap barely trains it), copied into each
    recipe's run. Round 1 is at level 3, where that model is right about 70% of the time."""
    from selfloop.config import compose
    from selfloop.loop import Loop
    from selfloop.rundir import RunDir
    from selfloop.testing.helpers import plugins_with, restored_hydra

    class Trained:
        name, Config = "trained_stub", NoOptions

        def __init__(self, config=None):
            self.config = config

        def build(self, ctx):
            return trained_model.clone()

    root = tmp_path_factory.mktemp("bootstrap")
    with restored_hydra():
        plugins = plugins_with(Trained, kind="model")
        cfg = compose(["loop=smoke", "model=trained_stub", "loop.rounds=0", "loop.bootstrap.levels=[1,2]", "loop.bootstrap.n_problems=64",
                       "loop.curriculum.start_level=3", "loop.bootstrap.optimize.sft.max_steps=1",
                       "loop.bootstrap.optimize.sft.learning_rate=1e-6", *SMALL], plugins.registry)
        assert Loop(cfg, RunDir(root), plugins, echo=lambda s: None).execute() == "completed"
    return root


def run_recipe(plugins, bootstrapped_run, tmp_path, recipe, extra=()):
    from selfloop.config import compose
    from selfloop.loop import Loop
    from selfloop.rundir import RunDir

    root = tmp_path / recipe
    shutil.copytree(bootstrapped_run, root, ignore=shutil.ignore_patterns("run.lock"))
    cfg = compose([f"+recipe={recipe}", "loop=smoke", "loop.rounds=1", "loop.bootstrap.levels=[1,2]", *SMALL, *RECIPES[recipe], *extra], plugins.registry)
    rd = RunDir(root)
    status = Loop(cfg, rd, plugins, echo=lambda s: None).execute()
    return cfg, status, rd


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_smoke(plugins, bootstrapped_run, tmp_path, recipe):
    cfg, status, rd = run_recipe(plugins, bootstrapped_run, tmp_path, recipe)
    assert status == "completed"
    (record,) = [r for r in rd.records() if r["round"] == 1]
    optimize = rd.stage_metrics(1, "optimize")
    name = next(iter(cfg.optimize))
    assert not record["starved"], record["reason"]
    assert optimize["rows"] > 0 and optimize["train_loss"] == optimize["train_loss"]
    uses_references = recipe in ("spin", "star", "rest_em")
    assert (record["labels_used"] > 0) == uses_references, "references reach training only in recipes that need them, and are counted"
    if name != "sft":
        assert optimize["notes"][name], "the optimizer reports what it did"


@pytest.mark.parametrize("recipe", ["spin", "star", "rest_em"])
def test_recipes_that_need_ground_truth_refuse_to_run_without_it(plugins, recipe):
    from selfloop.config import compose
    from selfloop.loop import prepare
    from selfloop.rundir import RunDir

    cfg = compose([f"+recipe={recipe}", "loop=smoke"], plugins.registry)
    with pytest.raises(SelfloopError, match="loop.allow_references_in_training=true"):
        prepare(cfg, plugins.registry, RunDir("/nonexistent-never-written"))

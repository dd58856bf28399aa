"""The acquirers self_instruct, augment and active_learning: their contract suites, and
behaviour tests that fail if a strategy does nothing useful; the tasks' perturb."""

from __future__ import annotations

import json
import random
import re
import types

import pytest

from selfloop.context import seed_everything
from selfloop.errors import OptionError, SelfloopError
from selfloop.strategy import Problem, Task
from selfloop.testing import AcquirerContract
from selfloop_plugins.acquire.active_learning import ActiveLearning, ActiveLearningConfig, greedy_k_center
from selfloop_plugins.acquire.augment import Augment, AugmentConfig
from selfloop_plugins.acquire.self_instruct import NearCopyIndex, SelfInstruct, SelfInstructConfig
from selfloop_plugins.tasks.addition import Addition, AdditionConfig
from selfloop_plugins.tasks.reversal import Reversal


# -- contract suites ---------------------------------------------------------------------------
class TestSelfInstruct(AcquirerContract):
    # the untrained model writes random characters, some of which are well-formed prompts
    @pytest.fixture
    def strategy(self):
        return SelfInstruct(SelfInstructConfig(n_problems=4, max_attempts=16, batch_size=32))


class TestAugment(AcquirerContract):
    @pytest.fixture
    def strategy(self):
        return Augment(AugmentConfig(n_problems=8, origin="task"))


class TestActiveLearning(AcquirerContract):
    @pytest.fixture
    def strategy(self):
        return ActiveLearning(ActiveLearningConfig(n_problems=4, pool_factor=3, selection="mix"))


# -- helpers -----------------------------------------------------------------------------------
def reseed(ctx, seed: int = 0) -> None:
    seed_everything(seed)
    ctx.rng = random.Random(seed)
    ctx.notes, ctx.artifacts, ctx.row_errors = {}, {}, []


def rouge_l(a: str, b: str) -> float:
    """Character ROUGE-L F1 by the textbook dynamic programme (the reference for the vectorised one)."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return 2 * table[-1][-1] / (len(a) + len(b))


class Scripted:
    """A stand-in model: continues few-shot templates (several prompts) with ``write(seeds)``
    and answers a single reversal prompt with its reversal."""

    def __init__(self, write):
        self.write = write

    def generate(self, prompts, n=1, temperature=0.0, max_new_tokens=64):
        out = []
        for p in prompts:
            seeds = re.findall(r"[0-9]+=", p)
            out.append([self.write(seeds) if len(seeds) > 1 else p.rstrip("=")[::-1]] * n)
        return out


def provenance(ctx, name):
    text = ctx.artifacts[f"artifacts/{name}/provenance.jsonl"].decode()
    return [json.loads(line) for line in text.splitlines()]


# -- self_instruct -----------------------------------------------------------------------------
def test_near_copy_index_matches_the_textbook_rouge_l():
    rng = random.Random(3)
    pool = ["".join(rng.choice("0123=") for _ in range(rng.randint(1, 12))) for _ in range(60)]
    index = NearCopyIndex("char", "rouge_l")
    for p in pool:
        index.add(p)
    for _ in range(40):
        cand = "".join(rng.choice("01234=") for _ in range(rng.randint(1, 12)))
        assert index.max_similarity(cand) == pytest.approx(max(rouge_l(cand, p) for p in pool))


def test_self_instruct_rejects_copies_near_copies_and_invalid_prompts(make_ctx):
    # new prompts: too short to be near-copies of the 7-8 digit pool (ROUGE-L < 0.7 whatever its digits), and far from each other
    fresh = [f"{d}" * 3 + "=" for d in "0123456789"]
    calls = iter(range(1000))

    def write(seeds):
        i = next(calls)
        near = ("1" if seeds[0][0] != "1" else "2") + seeds[0][1:]  # one character changed
        # an exact copy, a near-copy, an invalid character, a bare "=", then (sometimes) a new prompt
        return seeds[1] + near + "12a4=" + "=" + (fresh[i // 2] if i % 2 == 0 and i // 2 < len(fresh) else "")

    ctx = make_ctx(level=8, model=Scripted(write))
    strategy = SelfInstruct(SelfInstructConfig(n_problems=10, pool_size=100, batch_size=4))
    reseed(ctx)
    data = strategy.acquire(ctx)
    notes, rows = ctx.notes["self_instruct"], provenance(ctx, "self_instruct")
    reseed(ctx)
    pool = [p.prompt for p in strategy.seed_pool(ctx)]

    assert sorted(data["prompt"]) == sorted(fresh), "every new prompt is kept, and nothing else"
    assert not set(data["prompt"]) & set(pool)
    assert max(rouge_l(p, s) for p in data["prompt"] for s in pool) < 0.7
    assert notes["rejected"]["duplicate"] >= 10 and notes["rejected"]["near_copy"] >= 10
    assert notes["rejected"]["alphabet"] >= 10 and notes["rejected"]["format"] >= 10
    assert data["answer"] == [p[:-1][::-1] for p in data["prompt"]], "labelled by the model through ctx.generate"
    assert set(data["reference"]) == {None}, "self-written prompts have no ground truth"
    assert set(data["difficulty"]) == {3}, "difficulty from the length (3 characters before '=')"
    assert set(data["source"]) == {"acquire/self_instruct"}
    assert [r["id"] for r in rows] == data["id"]
    # shown: seeds from the pool plus (paper: 2) prompts written earlier this round
    assert all(set(r["seeds"]) & set(pool) and set(r["seeds"]) <= set(pool) | set(data["prompt"]) for r in rows)


def test_self_instruct_says_so_when_the_model_writes_no_prompts(make_ctx, trained_model):
    # a model trained only to answer reversal answers the list instead of continuing it
    ctx = make_ctx(level=4, model=trained_model)
    reseed(ctx)
    data = SelfInstruct(SelfInstructConfig(n_problems=8, batch_size=16)).acquire(ctx)
    notes = ctx.notes["self_instruct"]
    assert len(data) == 0
    assert notes["generations"] == 32 and notes["accepted"] == 0 and sum(notes["rejected"].values()) >= 32
    assert any("wrote no usable prompt" in w for w in notes["warnings"])


def test_self_instruct_reads_a_seed_file_and_refuses_a_bad_one(make_ctx, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"prompt": "123456=", "difficulty": 6}\n{"prompt": "654321=", "difficulty": 6}\n')
    ctx = make_ctx(level=6, model=Scripted(lambda s: "99999=88888="))
    reseed(ctx)
    data = SelfInstruct(SelfInstructConfig(n_problems=2, seeds="file", seed_file=str(seeds))).acquire(ctx)
    assert sorted(data["prompt"]) == ["88888=", "99999="] and set(data["difficulty"]) == {6}
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(OptionError, match="seed_file.*empty"):
        SelfInstruct(SelfInstructConfig(seeds="file", seed_file=str(tmp_path / "empty.txt"))).setup(ctx)
    (tmp_path / "bad.jsonl").write_text('{"prompt": 5}\n')
    with pytest.raises(OptionError, match="line 1"):
        SelfInstruct(SelfInstructConfig(seeds="file", seed_file=str(tmp_path / "bad.jsonl"))).setup(ctx)
    with pytest.raises(OptionError, match="seed_file"):
        SelfInstructConfig(seeds="file")


def test_self_instruct_writes_free_text_with_the_papers_template(make_ctx):
    class Writer:
        def generate(self, prompts, n=1, temperature=0.0, max_new_tokens=64):
            return [[" What is 5 times 7?\nTask 10: Name a colour.\nTask 11: Wha" if p.startswith("Come up") else "42"] * n for p in prompts]

    ctx = make_ctx(level=2, model=Writer())
    ctx.task = FreeText()
    reseed(ctx)
    data = SelfInstruct(SelfInstructConfig(n_problems=3, pool_size=20, max_attempts=2)).acquire(ctx)
    notes = ctx.notes["self_instruct"]
    # the cut-off last task is dropped; repeats of the two new ones are duplicates
    assert sorted(data["prompt"]) == ["Name a colour.", "What is 5 times 7?"] and set(data["answer"]) == {"42"}
    assert notes["rejected"] == {"duplicate": 10} and any("wrote 2 of n_problems=3" in w for w in notes["warnings"])


# -- perturb and augment -----------------------------------------------------------------------
def solve(task, prompt: str) -> str:
    """Ground truth computed here, independently of the task."""
    if task.name == "reversal":
        return prompt[:-1][::-1]
    if task.config.index_hints:  # "k2l1+k9l3=": digits at odd places, places counted from the first letter
        left, right = prompt[:-1].split("+")
        a, b = (int(x[1::2][::-1]) for x in (left, right))
        letters = "abcdefghijklmnopqrstuvwxyz"
        start = letters.index(left[0])
        return "".join(letters[(start + i) % 26] + d for i, d in enumerate(str(a + b)[::-1]))
    a, b = (int(x[::-1]) for x in prompt[:-1].split("+"))
    return str(a + b)[::-1]


@pytest.mark.parametrize("task", [Reversal(), Addition(), Addition(AdditionConfig(max_level=4)), Addition(AdditionConfig(index_hints=True))],
                         ids=["reversal", "addition", "addition-max4", "addition-hints"])
def test_perturb_returns_valid_nearby_problems(task):
    rng = random.Random(0)
    for level in task.levels:
        for p in task.sample(rng, level, 30):
            q = task.perturb(p, rng)
            assert isinstance(q, Problem) and q.prompt != p.prompt and q.reference != p.reference
            assert q.reference == solve(task, q.prompt), "the perturbed problem carries its own correct reference"
            assert task.check(q.reference, q.reference) and task.is_well_formed(q.prompt, q.reference)
            assert q.difficulty in task.levels and abs(q.difficulty - p.difficulty) <= 1
    p = task.sample(random.Random(1), 3, 1)[0]
    assert task.perturb(p, random.Random(5)) == task.perturb(p, random.Random(5)), "seeded"
    with pytest.raises(ValueError):
        task.perturb(Problem("12x4=", None, 4), rng)


def test_augment_perturbs_into_checkable_rows_with_provenance(make_ctx):
    from selfloop.data import make_rows

    ctx = make_ctx(["task=addition", "filter=[uncertainty]"], level=3, model=Scripted(lambda s: ""))
    history = make_rows(dict(id=f"r000-L{lv}-{i}", prompt=p.prompt, answer=p.reference, difficulty=lv, source="bootstrap")
                        for lv in (1, 2) for i, p in enumerate(ctx.task.sample(random.Random(1), lv, 20)))
    ctx.training_history = lambda: history.remove_columns("reference")
    reseed(ctx)
    data = Augment(AugmentConfig(n_problems=30, level_offsets=[-1, 0])).acquire(ctx)
    originals = dict(zip(history["id"], history["prompt"]))

    assert len(data) == 30 and set(data["source"]) == {"acquire/augment/perturb"}
    assert not set(data["prompt"]) & set(originals.values()), "new prompts differ from the originals"
    assert len(set(data["prompt"])) == 30
    for prompt, reference in zip(data["prompt"], data["reference"]):
        assert reference == solve(ctx.task, prompt) and ctx.task.check(reference, reference)
    rows = provenance(ctx, "augment")
    assert [r["id"] for r in rows] == data["id"]
    for r in rows:  # level_offsets [-1, 0] at level 3: level 2 originals (3 is not in the history)
        assert originals[r["from_id"]] == r["from_prompt"] and r["from_id"].startswith("r000-L2-")


class FreeText(Task):
    """A free-text stand-in task without perturb."""

    name = "free_text"
    alphabet = None
    levels = [1, 2]

    def sample(self, rng, level, n):
        return [Problem(f"What is {rng.randint(0, 99)} plus {rng.randint(0, 99)}?", None, level) for _ in range(n)]


def test_augment_paraphrases_free_text_with_the_model(make_ctx):
    class Paraphraser:
        def generate(self, prompts, n=1, temperature=0.0, max_new_tokens=64):
            return [[p.split("Task: ")[1].split("\n")[0].replace("What is", "Compute") if "Rewritten" in p else "42"] * n for p in prompts]

    ctx = make_ctx(level=2, model=Paraphraser())
    ctx.task = FreeText()
    reseed(ctx)
    data = Augment(AugmentConfig(n_problems=5, origin="task")).acquire(ctx)
    assert len(data) == 5 and all(p.startswith("Compute ") for p in data["prompt"])
    assert set(data["source"]) == {"acquire/augment/paraphrase"} and set(data["reference"]) == {None}
    assert all(r["from_prompt"].replace("What is", "Compute") == p for r, p in zip(provenance(ctx, "augment"), data["prompt"]))


def test_augment_refuses_modes_the_task_cannot_serve():
    tiny = types.SimpleNamespace(name="tiny")
    ctx = types.SimpleNamespace(task=FreeText(), strategies={"model": [tiny]})
    with pytest.raises(SelfloopError, match="perturb"):
        Augment(AugmentConfig(mode="perturb")).setup(ctx)
    Augment(AugmentConfig(mode="auto")).setup(ctx)  # paraphrase: the task is free text
    ctx.task.alphabet = "0123456789="  # ... unless a character model reads only this alphabet
    with pytest.raises(SelfloopError, match="alphabet"):
        Augment(AugmentConfig(mode="auto")).setup(ctx)
    Augment(AugmentConfig(mode="perturb")).setup(types.SimpleNamespace(task=Reversal(), strategies={"model": [tiny]}))


# -- active_learning ---------------------------------------------------------------------------
def disagreement(model, prompts, seed=123) -> list[float]:
    """Fresh samples, independent of the acquirer's: 1 - the majority's share of 16 answers."""
    import torch
    from collections import Counter

    torch.manual_seed(seed)
    outs = model.generate(prompts, n=16, temperature=1.0, max_new_tokens=8)
    return [1 - Counter(o).most_common(1)[0][1] / len(o) for o in outs]


@pytest.mark.parametrize(("selection", "measure"), [("uncertainty", "disagreement"), ("uncertainty", "entropy"), ("uncertainty", "logprob"),
                                                    ("mix", "disagreement")])
def test_active_learning_picks_what_the_model_is_unsure_of(make_ctx, trained_model, selection, measure):
    ctx = make_ctx(level=4, model=trained_model)
    strategy = ActiveLearning(ActiveLearningConfig(n_problems=24, pool_factor=8, level_offsets=[0], selection=selection, uncertainty=measure))
    reseed(ctx)
    picked = strategy.acquire(ctx)["prompt"]
    reseed(ctx)
    pool = [p.prompt for p in strategy.draw_pool(ctx, 4)]
    assert len(picked) == 24 and set(picked) <= set(pool)
    unsure = dict(zip(pool, disagreement(trained_model, pool)))
    chance = [unsure[p] for p in random.Random(7).sample(pool, 24)]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean([unsure[p] for p in picked]) > max(mean(chance), mean(list(unsure.values()))) + 0.05


def test_k_center_covers_every_planted_cluster():
    import numpy as np

    from selfloop_plugins.acquire.active_learning import embed

    rng = random.Random(0)
    bases = ["11111111=", "22223333=", "45454545=", "67896789="]
    prompts, cluster = [], []
    for c, base in enumerate(bases):
        for _ in range(25 if c == 0 else 5):  # an unbalanced pool: random picks favour cluster 0
            i = rng.randrange(8)
            prompts.append(base[:i] + rng.choice("0123456789") + base[i + 1 :])
            cluster.append(c)
    vectors = embed(prompts, "tfidf", (1, 3))
    picks = greedy_k_center(vectors, 4, None, 1.0, np.random.default_rng(0))
    assert {cluster[i] for i in picks} == {0, 1, 2, 3}
    chance = np.mean([len({cluster[i] for i in random.Random(s).sample(range(len(prompts)), 4)}) for s in range(50)])
    assert chance < 3.5


def test_diversity_selection_labels_only_its_picks(make_ctx):
    asked = []
    model = Scripted(lambda seeds: "")
    generate = model.generate
    model.generate = lambda prompts, **kw: asked.extend(prompts) or generate(prompts, **kw)
    ctx = make_ctx(level=6, model=model)
    reseed(ctx)
    data = ActiveLearning(ActiveLearningConfig(n_problems=5, pool_factor=4, level_offsets=[0], selection="diversity")).acquire(ctx)
    assert len(data) == 5 and sorted(asked) == sorted(data["prompt"])
    assert data["answer"] == [p[:-1][::-1] for p in data["prompt"]]


def test_active_learning_needs_several_samples_to_measure_disagreement():
    ctx = types.SimpleNamespace(strategies={"refine": []})
    with pytest.raises(OptionError, match="refine"):
        ActiveLearning(ActiveLearningConfig(uncertainty="disagreement")).setup(ctx)
    ActiveLearning(ActiveLearningConfig(uncertainty="logprob")).setup(ctx)
    ActiveLearning(ActiveLearningConfig(selection="diversity")).setup(ctx)
    with pytest.raises(OptionError, match="pool_size"):
        ActiveLearningConfig(n_problems=10, pool_size=5)

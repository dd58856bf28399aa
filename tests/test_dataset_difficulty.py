"""task=dataset without a difficulty column: levels estimated from prompt length or, label-free,
by the incumbent model (issue 9: `task.dataset.difficulty_estimate`).

Options and errors; length levels are quantile bins shared by every split; the model-based
estimators (loss, agreement) place rows by what a trained model finds hard, reproduce their
draw on a resumed stage from the score cache, and drive the curriculum in a loop.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from selfloop.errors import OptionError, SelfloopError
from selfloop.loop import prepare
from selfloop.rundir import RunDir
from selfloop.testing import TaskContract, build_ctx, compose, plugins_with, restored_hydra
from selfloop_plugins.tasks.dataset import DatasetConfig, DatasetTask
from selfloop_plugins.tasks.tables import bands, prompt_lengths, quantile_thresholds


pytestmark = pytest.mark.usefixtures("datasets_cache")


def reversal_rows(n: int, longest: int, seed: int = 0) -> list[dict]:
    """Distinct reversal-like prompts ("123=" -> "321") of 2..longest digits, no difficulty column."""
    rng = random.Random(seed)
    seen: set[str] = set()
    while len(seen) < n:
        seen.add("".join(rng.choice("0123456789") for _ in range(rng.randint(2, longest))))
    order = sorted(seen)
    rng.shuffle(order)
    return [{"question": f"{digits}=", "answer": digits[::-1]} for digits in order]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def reversal_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "reversal.jsonl", reversal_rows(480, 8))


def task(path, **options) -> DatasetTask:
    return DatasetTask(DatasetConfig(path=str(path), template="{prompt}", **options))


def rows_of(split) -> set[int]:
    return {int(r) for rows in split.by_level.values() for r in rows}


# -- options ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, expected",
    [
        ({"difficulty_estimate": "size"}, r"difficulty_estimate='size': accepted: none \| length \| loss \| agreement"),
        ({"difficulty_estimate": "length", "difficulty_column": "level"},
         r"difficulty_estimate='length': accepted: none while task.dataset.difficulty_column='level' gives the levels"),
        ({"difficulty_estimate": "length", "difficulty_levels": 1}, r"difficulty_levels=1: accepted: an integer >= 2"),
        ({"difficulty_levels": 3}, r"difficulty_levels=3: accepted: the default \(5\) unless task.dataset.difficulty_estimate is set"),
        ({"difficulty_estimate": "loss", "estimate_candidates": 0.5}, r"estimate_candidates=0.5: accepted: a number >= 1"),
        ({"difficulty_estimate": "agreement", "estimate_samples": 1}, r"estimate_samples=1: accepted: an integer >= 2"),
    ],
    ids=["unknown", "both-column-and-estimate", "one-level", "levels-without-estimate", "candidates", "samples"],
)
def test_bad_options_are_refused(options, expected):
    with pytest.raises(OptionError, match=expected):
        DatasetConfig(path="x.jsonl", **options)


def test_a_column_and_an_estimate_together_fail_at_composition_naming_both(tmp_path, reversal_file, selfloop_offline):
    run_dir = tmp_path / "never"
    with restored_hydra():
        plugins = plugins_with()
        cfg = compose(["loop=dataset_smoke", "task=dataset", f"task.dataset.path={reversal_file}", "task.dataset.difficulty_column=level",
                       "task.dataset.difficulty_estimate=loss"], plugins)
        with pytest.raises(SelfloopError) as info:
            prepare(cfg, plugins.registry, RunDir(run_dir))
    message = str(info.value)
    assert message.startswith("bad option task.dataset.difficulty_estimate='loss'") and "task.dataset.difficulty_column='level'" in message
    assert "\n" not in message and not run_dir.exists()


# -- length: quantile bins of prompt length --------------------------------------------------
def test_length_levels_are_quantile_bins_shared_by_every_split(reversal_file):
    t = task(reversal_file, difficulty_estimate="length", difficulty_levels=4)
    plain = task(reversal_file)
    loaded = t.loaded
    assert t.levels == [1, 2, 3, 4] and plain.levels == [1]
    assert t.bootstrap_levels == [1, 2]  # the easier half, as for data with levels
    # the same rows land in each split as without an estimate: only their levels change
    for name in ("pool", "labelled", "eval"):
        assert rows_of(getattr(loaded, name)) == rows_of(getattr(plain.loaded, name))
    lengths = prompt_lengths(loaded.pool.prompts)
    pool_rows = sorted(rows_of(loaded.pool))
    assert loaded.length_thresholds == quantile_thresholds(lengths[pool_rows], 4)  # cut points from the pool alone
    counts = [loaded.pool.count(lv) for lv in t.levels]
    assert min(counts) >= len(pool_rows) / 4 / 2, counts  # spread over the levels, none nearly empty
    span: dict[int, list[int]] = {}
    for split in (loaded.pool, loaded.labelled, loaded.eval):
        for level, rows in split.by_level.items():
            ls = lengths[rows]
            assert (bands(ls, loaded.length_thresholds) == level).all()  # labelled and eval: the pool's cut points
            span.setdefault(level, []).extend(ls.tolist())
    for lower, upper in zip(t.levels, t.levels[1:]):  # monotone: every row of a level is shorter than the next level's
        assert max(span[lower]) < min(span[upper])
    assert t.max_new_tokens(1) < t.max_new_tokens(4)  # answer bounds per level, as with a difficulty column


def test_few_distinct_lengths_give_fewer_levels_with_a_warning(tmp_path, selfloop_offline):
    rows = [{"question": q, "answer": 1} for q in ("ab", "abcd") * 60]
    path = write_jsonl(tmp_path / "two.jsonl", [{**r, "question": f"{r['question']}{i % 10}"} for i, r in enumerate(rows)])
    ctx = build_ctx(tmp_path / "ctx", ["task=dataset", f"task.dataset.path={path}", "task.dataset.difficulty_estimate=length"],
                    preset="loop=dataset_smoke")
    assert ctx.task.levels == [1, 2]
    assert any("too few distinct values for 5 quantile levels; using 2" in w for w in ctx.setup_warnings)


class TestLengthLevelsTask(TaskContract):
    @pytest.fixture
    def strategy(self, reversal_file):
        return task(reversal_file, difficulty_estimate="length", difficulty_levels=4)


# -- loss and agreement: the incumbent model estimates difficulty ------------------------------
def acquire_ctx(tmp_path, path, estimate: str, plugins):
    ctx = build_ctx(tmp_path, ["task=dataset", f"task.dataset.path={path}", "task.dataset.template='{prompt}'",
                               f"task.dataset.difficulty_estimate={estimate}", "task.dataset.difficulty_levels=4"],
                    plugins, level=3, round=1, preset="loop=dataset_smoke")
    ctx.stage = "acquire"
    return ctx


def draw_every_level(ctx, n: int) -> dict[int, list]:
    ctx.rng, ctx.notes, ctx.artifacts = random.Random(1), {}, {}  # what the loop gives each (re)run of a stage
    return {level: ctx.task.sample(ctx.rng, level, n) for level in ctx.task.levels}


@pytest.mark.parametrize("estimate", ["loss", "agreement"])
def test_the_model_places_rows_it_gets_wrong_at_the_top(estimate, tmp_path, reversal_file, trained_model, plugins, selfloop_hydra, selfloop_offline):
    """The trained model knows reversal of 1-3 digits: the rows it estimates hardest are the
    long ones, and its ground-truth accuracy falls from level 1 to level 4."""
    ctx = acquire_ctx(tmp_path / "run", reversal_file, estimate, plugins)
    ctx.model = trained_model
    drawn = draw_every_level(ctx, 20)
    assert all(len(p) == 20 and {x.difficulty for x in p} == {lv} for lv, p in drawn.items())
    prompts = [x.prompt for p in drawn.values() for x in p]
    assert len(set(prompts)) == len(prompts)  # no row at two levels

    def mean_length(level):
        return sum(len(x.prompt) for x in drawn[level]) / len(drawn[level])

    def exact_match(level):
        answers = trained_model.generate([x.prompt for x in drawn[level]], max_new_tokens=12)
        return sum(a[0].strip() == x.reference for a, x in zip(answers, drawn[level])) / len(drawn[level])

    top = max(ctx.task.levels)
    assert mean_length(top) > mean_length(1) + 2, {lv: mean_length(lv) for lv in drawn}
    assert exact_match(1) > exact_match(top) + 0.3, {lv: exact_match(lv) for lv in drawn}
    note = ctx.notes["dataset"]["difficulty"]
    assert note["estimate"] == estimate and len(note["thresholds"]) == 3
    per_row = 1 if estimate == "loss" else 4
    assert note["scored_rows"] >= 80 and note["generations"] == per_row * note["scored_rows"] and note["cached_rows"] == 0
    assert note["drawn_by_level"] == {"1": 20, "2": 20, "3": 20, "4": 20}
    saved = json.loads(ctx.artifacts["artifacts/dataset/difficulty.json"])
    assert len(saved["rows"]) == note["scored_rows"] and saved["thresholds"] == note["thresholds"]
    drawn_rows = json.loads(ctx.artifacts["artifacts/dataset/drawn.json"])["rows"]
    assert len(drawn_rows) == 80 < note["scored_rows"]  # scored rows not taken stay in the pool
    if estimate == "agreement":
        # killed before the stage was written: the rerun reads the scores from the checkpoint
        # cache and draws exactly the same rows, generating nothing
        again = draw_every_level(ctx, 20)
        assert again == drawn
        note = ctx.notes["dataset"]["difficulty"]
        assert note["generations"] == 0 and note["scored_rows"] == 0 and note["cached_rows"] > 0


def test_model_estimates_need_the_incumbent(tmp_path, reversal_file, plugins, selfloop_hydra, selfloop_offline):
    ctx = acquire_ctx(tmp_path / "run", reversal_file, "loss", plugins)
    ctx.model = None
    with pytest.raises(SelfloopError, match=r"difficulty_estimate=loss scores pool rows with the incumbent model, but round 1's acquire stage has none"):
        draw_every_level(ctx, 5)


# -- in the loop -----------------------------------------------------------------------------
def test_a_loop_climbs_model_estimated_levels(tmp_path, selfloop_smoke_loop, monkeypatch):
    monkeypatch.setenv("SELFLOOP_DISABLE_PLUGINS", "drift")  # a tiny quick loop's outputs read as collapse
    path = write_jsonl(tmp_path / "reversal.jsonl", reversal_rows(400, 6, seed=3))
    run = selfloop_smoke_loop([
        "task=dataset", f"task.dataset.path={path}", "task.dataset.difficulty_estimate=loss", "task.dataset.difficulty_levels=4",
        "task.dataset.labelled_size=0.3", "task.dataset.estimate_candidates=2",
        "loop.bootstrap.levels=null", "loop.curriculum.start_level=null", "loop.eval_levels=auto", "loop.bootstrap.n_problems=100",
        "filter=[uncertainty]", "filter.uncertainty.min_agreement=0", "filter.uncertainty.require_well_formed=false",
        "model.tiny.n_embd=32", "model.tiny.n_layer=1", "model.tiny.n_head=2", "acquire.task_sampler.n_problems=10",
        "refine.self_consistency.n_samples=2", "evaluate.self_consistency.n_per_level=4", "evaluate.exact_match.n_per_level=4",
    ], rounds=2)
    assert run.status == "completed"
    assert [r["level"] for r in run.records] == [None, 3, 4]  # bootstrap on levels 1-2, then the curriculum climbs
    assert run.records[0]["labelled_levels"] == [1, 2]
    boot = run.stage_metrics(0, "acquire")["notes"]["dataset"]["difficulty"]
    assert boot["estimate"] == "loss" and "no incumbent model before round 1" in boot["levels_from"]
    for record in run.records[1:]:
        acquire = run.stage_metrics(record["round"], "acquire")
        note = acquire["notes"]["dataset"]["difficulty"]
        assert note["estimate"] == "loss" and len(note["thresholds"]) == 3
        assert note["scored_rows"] > 0 and note["generations"] == note["scored_rows"]
        assert set(note["drawn_by_level"]) == {str(record["level"] - 1), str(record["level"])}
        assert set(acquire["by_level"]) <= {str(record["level"] - 1), str(record["level"])}
    drawn = [row for r in (1, 2) for row in json.loads((run.run_dir / f"round-{r:03d}/acquire/artifacts/dataset/drawn.json").read_text())["rows"]]
    assert len(drawn) == len(set(drawn))  # without replacement across rounds

"""task=dataset: tasks from a user's files (issue 8, part 1).

The Task contract on a small JSONL; loaders, column mapping, extractors and checkers; the
semi-supervised split; acquisition without replacement across rounds (also across a kill and
resume); pool exhaustion; a checker-none run of three rounds; the issue's JSONL command with
meta-evaluation; and every bad input as one clear error before a run directory exists.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from selfloop.errors import OptionError, SelfloopError
from selfloop.loop import Loop, prepare
from selfloop.rundir import RunDir
from selfloop.testing import TaskContract, build_ctx, compose, plugins_with, restored_hydra
from selfloop.testing.helpers import QUICK
from selfloop_plugins.tasks.answers import Answers, parse_number
from selfloop_plugins.tasks.dataset import DatasetConfig, DatasetTask


pytestmark = pytest.mark.usefixtures("datasets_cache")


# -- data written by the tests ---------------------------------------------------------------
def level_rows(n: int = 240) -> list[dict]:
    """Unique prompts, numeric answers, three difficulty levels."""
    out = []
    for i in range(n):
        a, b = i % 10, (i * 7) % 10
        out.append({"question": f"Item {i}: what is {a} plus {b}?", "answer": a + b, "level": 1 + i % 3})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def levels_file(data_dir) -> Path:
    return write_jsonl(data_dir / "levels.jsonl", level_rows())


@pytest.fixture(scope="module")
def numbers_file(data_dir) -> Path:
    """The issue's file: {"question": ..., "answer": ...} lines with numeric answers."""
    rng = random.Random(1)
    rows = []
    for i in range(400):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"question": f"#{i} What is {a} plus {b}?", "answer": a + b})
    return write_jsonl(data_dir / "numbers.jsonl", rows)


def task(path, **options) -> DatasetTask:
    options.setdefault("checker", "numeric")
    return DatasetTask(DatasetConfig(path=str(path), **options))


def split_sizes(t: DatasetTask) -> dict[str, int]:
    loaded = t.loaded
    return {name: sum(map(len, s.by_level.values())) for name, s in (("labelled", loaded.labelled), ("eval", loaded.eval), ("pool", loaded.pool))}


def rows_of(split) -> set[int]:
    return {int(r) for rows in split.by_level.values() for r in rows}


# -- the contract ----------------------------------------------------------------------------
class TestDatasetTask(TaskContract):
    @pytest.fixture
    def strategy(self, levels_file):
        return task(levels_file, difficulty_column="level")


# -- loaders ---------------------------------------------------------------------------------
def write_format(fmt: str, folder: Path, rows: list[dict]) -> str:
    from datasets import Dataset, DatasetDict

    data = Dataset.from_list(rows)
    if fmt == "jsonl":
        return str(write_jsonl(folder / "d.jsonl", rows))
    if fmt == "csv":
        data.to_csv(str(folder / "d.csv"), index=False)
        return str(folder / "d.csv")
    if fmt == "tsv":
        lines = ["question\tanswer\tlevel"] + [f"{r['question']}\t{r['answer']}\t{r['level']}" for r in rows]
        (folder / "d.tsv").write_text("\n".join(lines) + "\n")
        return str(folder / "d.tsv")
    if fmt == "parquet":
        data.to_parquet(str(folder / "d.parquet"))
        return str(folder / "d.parquet")
    if fmt == "saved":
        data.save_to_disk(str(folder / "saved"))
        return str(folder / "saved")
    if fmt == "saved_dict":
        DatasetDict({"train": data, "test": data.select(range(30))}).save_to_disk(str(folder / "saved_dict"))
        return str(folder / "saved_dict")
    (folder / "files").mkdir()  # a directory of data files: datasets.load_dataset(dir)
    write_jsonl(folder / "files" / "train.jsonl", rows)
    return str(folder / "files")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet", "saved", "saved_dict", "directory"])
def test_every_format_gives_the_same_task(fmt, tmp_path):
    rows = level_rows(90)
    t = task(write_format(fmt, tmp_path, rows), difficulty_column="level")
    assert t.levels == [1, 2, 3]
    assert sum(split_sizes(t).values()) == 90
    prompts = {f"Q: {r['question']}\nA:": str(r["answer"]) for r in rows}
    for level in t.levels:
        for p in t.sample(random.Random(0), level, 10) + t.sample_labelled(random.Random(0), level, 10):
            assert prompts[p.prompt] == p.reference  # the row's own answer, numbers as text


def test_builtin_word_problems_and_its_generator(tmp_path):
    from selfloop_plugins.tasks import word_problems

    t = task("builtin:word_problems", difficulty_column="difficulty")
    assert t.levels == [1, 2, 3, 4, 5] and sum(split_sizes(t).values()) == 5000
    # the packaged file is exactly what the generator writes with its defaults
    word_problems.main(["--out", str(tmp_path / "wp.jsonl")])
    shipped = Path(word_problems.__file__).parent / "data" / "word_problems.jsonl"
    assert (tmp_path / "wp.jsonl").read_text() == shipped.read_text()
    for p in t.sample(random.Random(0), 4, 20):
        assert t.check(p.reference, p.reference) and int(p.reference) >= 0


def test_the_word_problems_preset_composes(tmp_path, selfloop_offline):
    """`selfloop run loop=word_problems` validates (the run itself takes CPU-minutes: docs/data.md)."""
    with restored_hydra():
        plugins = plugins_with()
        ctx = prepare(compose(["loop=word_problems"], plugins), plugins.registry, RunDir(tmp_path / "never"))
    t = ctx.task
    assert t.name == "dataset" and t.levels == [1, 2, 3, 4, 5] and ctx.run.loop.bootstrap.levels == [1, 2, 3, 4, 5]
    assert (t.loaded.labelled.size(), t.loaded.eval.size(), t.loaded.pool.size()) == (2000, 500, 2500)
    assert [f.name for f in ctx.strategies["filter"]] == ["uncertainty"] and not ctx.setup_warnings


# -- column mapping and templates ------------------------------------------------------------
def test_column_mapping_template_and_levels(tmp_path):
    rows = [{"q": f"Sag {i} café", "a": f"ü{i}", "lvl": 2 + 3 * (i % 2)} for i in range(40)]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    t = task(path, prompt_column="q", reference_column="a", difficulty_column="lvl", checker="exact", template="<{prompt}>\\t=")
    assert t.levels == [2, 5]
    p = t.sample(random.Random(0), 5, 1)[0]
    assert p.prompt.startswith("<Sag ") and p.prompt.endswith("café>\t=") and p.reference.startswith("ü")
    assert {"é", "ü", "\t", "<", ">"} <= set(t.alphabet)  # non-ASCII data and the template
    assert t.max_new_tokens(5) >= max(len(r["a"]) for r in rows)
    # without a difficulty column every row is level 1
    assert task(path, prompt_column="q", reference_column="a", checker="exact").levels == [1]


# -- extractors and checkers ----------------------------------------------------------------
def answers(**options) -> Answers:
    return Answers(**options)


def test_extractors():
    assert answers().extract("  42 \n") == "42"
    last = answers(extractor="last_number")
    assert last.extract("3 boxes of 1,250 pens: 3,750 pens") == "3750" and last.extract("-2.5 or +7") == "7"
    assert last.extract("no digits") is None
    boxed = answers(extractor="boxed")
    assert boxed.extract(r"so \boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}" and boxed.extract("42") is None
    regex = answers(extractor="regex", pattern=r"#### (-?\d+)")
    assert regex.extract("6*7\n#### 42") == "42" and regex.extract("42") is None
    assert answers(extractor="regex", pattern=r"\d+").extract("a 1 b 22") == "22"  # no group: the last match
    # already-extracted answers (the loop's pseudo-labels) pass through
    assert regex.lenient("42") == "42" and regex.check("42", "steps...\n#### 42")


def test_checkers():
    numeric = answers(checker="numeric", tolerance=0.01)
    assert numeric.check("1,000", "1000") and numeric.check("3/4", "0.75") and numeric.check("2.004", "2")
    assert not numeric.check("2.1", "2") and not numeric.check("two", "2")
    assert numeric.well_formed("-3.5") and not numeric.well_formed("abc")
    assert parse_number("$12") == 12 and parse_number("50%") == 50 and parse_number("1/0") is None
    text = answers(checker="normalized_text")
    assert text.check("The Eiffel  Tower!", "eiffel tower") and not text.check("Eiffel", "eiffel tower")
    assert answers(checker="exact").check(" Paris", "Paris") and not answers(checker="exact").check("paris", "Paris")
    with pytest.raises(SelfloopError, match="no ground-truth check"):
        answers(checker="none").check("a", "a")


# -- the semi-supervised split -----------------------------------------------------------
def test_labelled_eval_and_pool_are_disjoint_deterministic_and_sized(levels_file):
    t = task(levels_file, difficulty_column="level", labelled_size=30, eval_size=0.25)
    sizes = split_sizes(t)
    assert sizes == {"labelled": 30, "eval": 60, "pool": 150}
    lab, ev, pool = rows_of(t.loaded.labelled), rows_of(t.loaded.eval), rows_of(t.loaded.pool)
    assert not (lab & ev or lab & pool or ev & pool) and len(lab | ev | pool) == 240
    assert all(t.loaded.labelled.count(lv) == 10 for lv in t.levels)  # spread over the levels
    assert rows_of(task(levels_file, difficulty_column="level", labelled_size=30, eval_size=0.25).loaded.labelled) == lab
    assert rows_of(task(levels_file, difficulty_column="level", labelled_size=30, eval_size=0.25, split_seed=1).loaded.labelled) != lab
    # the bootstrap gets labelled rows with references, and never more than there are
    boot = t.sample_labelled(random.Random(0), 1, 100)
    assert len(boot) == 10 and all(p.reference is not None for p in boot)
    # pool rows keep their references, for meta-evaluation only
    assert all(p.reference is not None for p in t.sample(random.Random(0), 1, 20))


def test_a_separate_labelled_split_or_file(tmp_path, levels_file):
    saved = write_format("saved_dict", tmp_path, level_rows(240))
    t = task(saved, difficulty_column="level", labelled_split="test", eval_size=0.1)
    assert split_sizes(t)["labelled"] == 30 and split_sizes(t)["pool"] + split_sizes(t)["eval"] == 240
    labels = write_jsonl(tmp_path / "labels.jsonl", level_rows(12))
    t = task(levels_file, difficulty_column="level", labelled_path=str(labels))
    assert split_sizes(t)["labelled"] == 12 and split_sizes(t)["pool"] + split_sizes(t)["eval"] == 240


def test_stages_draw_from_their_own_split(levels_file):
    """Acquirers get pool rows, evaluators the eval split, the bootstrap the labelled split."""
    t = task(levels_file, difficulty_column="level", labelled_size=30, eval_size=30)
    t._ctx = SimpleNamespace(stage="evaluate")
    eval_prompts = {p.prompt for lv in t.levels for p in t.sample(random.Random(0), lv, 100)}
    t._ctx = None
    pool_prompts = {p.prompt for lv in t.levels for p in t.sample(random.Random(0), lv, 100)}
    labelled_prompts = {p.prompt for lv in t.levels for p in t.sample_labelled(random.Random(0), lv, 100)}
    assert len(eval_prompts) == 30 and len(labelled_prompts) == 30 and len(pool_prompts) == 180
    assert not (eval_prompts & pool_prompts or eval_prompts & labelled_prompts or labelled_prompts & pool_prompts)


def test_task_sampler_acquires_at_bootstrap_levels_of_a_pool_task(tmp_path, levels_file, selfloop_hydra, selfloop_offline):
    """A one-level dataset has nothing but bootstrap levels: acquisition must still happen."""
    from selfloop_plugins.acquire.task_sampler import TaskSampler, TaskSamplerConfig

    ctx = build_ctx(tmp_path / "ctx", [*DATASET(levels_file), "loop.bootstrap.levels=[1]"], level=1, with_model=True, preset="loop=dataset_smoke")
    ctx.stage = "acquire"
    data = TaskSampler(TaskSamplerConfig(n_problems=5, level_offsets=[0])).acquire(ctx)
    assert len(data) == 5 and set(data["difficulty"]) == {1}


# -- loops -----------------------------------------------------------------------------------
def DATASET(path, *extra) -> list[str]:  # noqa: N802 - reads like a constant list of overrides
    return ["task=dataset", f"task.dataset.path={path}", "task.dataset.checker=numeric", "task.dataset.difficulty_column=level", *extra]


SMALL = [
    "model.tiny.n_embd=32", "model.tiny.n_layer=1", "model.tiny.n_head=2",
    "refine.self_consistency.n_samples=2", "evaluate.self_consistency.n_per_level=4", "evaluate.exact_match.n_per_level=8",
]
# keep every row, so that rounds are not starved by an untrained model's disagreement
KEEP_ALL = ["filter.uncertainty.min_agreement=0", "filter.uncertainty.require_well_formed=false"]


@dataclass
class CloneConfig:
    pass


class Clone:
    """An optimizer that trains nothing (a copy of the incumbent): loops about acquisition in seconds."""

    name = "clone"
    Config = CloneConfig

    def __init__(self, config=None):
        self.config = config

    def optimize(self, ctx, data):
        return ctx.model.clone()


class Killed(KeyboardInterrupt):
    """What a kill -9 would do, raised where the test wants it."""


def killer(round_: int, stage: str):
    import types

    from selfloop.hookspecs import hookimpl

    module = types.ModuleType("killer")

    @hookimpl(tryfirst=True)
    def selfloop_on_stage_end(ctx, stage: str, metrics):  # noqa: F811 - the hook's own name
        if metrics["round"] == round_ and stage == wanted:
            raise Killed(f"killed after round {round_}'s {stage}")

    wanted = stage
    module.selfloop_on_stage_end = selfloop_on_stage_end
    return module


def run_loop(run_dir: Path, overrides: list[str], extra: dict | None = None) -> tuple[str, RunDir]:
    plugins = plugins_with(Clone, kind="optimize", extra=extra)
    cfg = compose(["loop=dataset_smoke", "optimize=clone", *SMALL, *KEEP_ALL, *overrides], plugins)
    rd = RunDir(run_dir)
    return Loop(cfg, rd, plugins, echo=lambda s: None).execute(), rd


def acquired(rd: RunDir, round_: int) -> dict:
    from selfloop.data import load

    folder = rd.stage_dir(round_, "acquire")
    drawn = json.loads((folder / "artifacts" / "dataset" / "drawn.json").read_text())
    data = load(folder / "data")
    return {"rows": drawn["rows"], "ids": data["id"], "prompts": data["prompt"]}


@pytest.fixture
def without_drift(monkeypatch):
    """The drift observer reads an empty or unchanging acquisition (a Clone optimizer, a drained
    pool) as output collapse and stops the run; these tests are about acquisition, not drift."""
    monkeypatch.setenv("SELFLOOP_DISABLE_PLUGINS", "drift")


def test_acquisition_is_without_replacement_across_rounds_and_exact_after_a_kill(tmp_path, levels_file, selfloop_offline, without_drift):
    overrides = [*DATASET(levels_file), "loop.rounds=3", "loop.bootstrap.levels=[1,2,3]", "loop.curriculum.start_level=2",
                 "acquire.task_sampler.n_problems=12"]
    with restored_hydra():
        status, whole = run_loop(tmp_path / "whole", overrides)
    assert status == "completed"
    rounds = [acquired(whole, r) for r in (1, 2, 3)]
    rows = [row for r in rounds for row in r["rows"]]
    assert len(rows) == len(set(rows)) == 3 * 2 * 12  # two levels a round, no row twice
    ids = [i for r in rounds for i in r["ids"]]
    assert len(ids) == len(set(ids))  # row ids unique across rounds
    # killed right after round 2's acquire stage is on disk, then resumed by a new process
    with restored_hydra(), pytest.raises(Killed):
        run_loop(tmp_path / "killed", overrides, {"killer": killer(2, "acquire")})
    with restored_hydra():
        status, resumed = run_loop(tmp_path / "killed", overrides)
    assert status == "completed"
    assert [acquired(resumed, r) for r in (1, 2, 3)] == rounds


def test_an_exhausted_pool_stops_the_run_cleanly(tmp_path, numbers_file, selfloop_offline, without_drift):
    small = write_jsonl(tmp_path / "small.jsonl", [json.loads(line) for line in numbers_file.read_text().splitlines()[:60]])
    overrides = ["task=dataset", f"task.dataset.path={small}", "task.dataset.checker=numeric", "task.dataset.labelled_size=10",
                 "task.dataset.eval_size=10", "loop.rounds=5", "acquire.task_sampler.n_problems=15"]
    with restored_hydra():
        status, rd = run_loop(tmp_path / "run", overrides)
    assert status == "stopped"
    info = json.loads(rd.run_json.read_text())
    assert "unlabelled pool is exhausted" in info["stop_reason"] and "all 40 rows" in info["stop_reason"]
    # round 3 takes what is left and still trains; round 4 finds nothing and the run stops there
    assert [r["acquired"] for r in rd.records()] == [10, 15, 15, 10]
    assert rd.stage_metrics(4, "acquire")["rows"] == 0 and not rd.is_complete(4, "filter")
    assert any("took the last unacquired pool rows" in w for w in rd.records()[3]["warnings"])
    rows = [row for r in (1, 2, 3) for row in acquired(rd, r)["rows"]]
    assert len(set(rows)) == 40


def test_checker_none_runs_three_rounds_on_autonomous_signals(tmp_path, selfloop_offline):
    rows = [{"question": f"greet {name}", "answer": f"hi {name}"} for name in ("ann", "bob", "cy", "dee", "eve", "fay") * 12]
    path = write_jsonl(tmp_path / "greet.jsonl", rows)
    overrides = ["task=dataset", f"task.dataset.path={path}", "task.dataset.checker=none", "loop.rounds=3", "optimize=sft", *QUICK,
                 "loop.bootstrap.optimize.sft.batch_size=16", "acquire.task_sampler.n_problems=10", *KEEP_ALL]
    with restored_hydra():
        plugins = plugins_with()
        cfg = compose(["loop=dataset_smoke", *SMALL, *overrides], plugins)
        rd = RunDir(tmp_path / "run")
        status = Loop(cfg, rd, plugins, echo=lambda s: None).execute()
    assert status == "completed"
    records = rd.records()
    assert [r["round"] for r in records] == [0, 1, 2, 3] and not any(r["starved"] for r in records[1:])
    assert all(not r["meta"] and r["label_precision_kept"] is None for r in records[1:])  # nothing to check against
    assert all(r["autonomous"]["self_consistency"] >= 0 for r in records)
    assert any("no ground truth" in w for w in json.loads(rd.run_json.read_text())["warnings"])
    assert "No meta-evaluation exists" in (rd.root / "report.md").read_text()
    from selfloop.data import load

    assert set(load(rd.stage_dir(1, "acquire") / "data")["reference"]) == {None}


def test_the_issue_command_runs_and_reports_meta_evaluation(tmp_path, numbers_file):
    """`selfloop run loop=dataset_smoke task=dataset task.dataset.path=FILE ...` through the
    CLI (quick training sizes appended)."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "selfloop.cli", "run", "loop=dataset_smoke", "task=dataset", f"task.dataset.path={numbers_file}",
               "task.dataset.prompt_column=question", "task.dataset.reference_column=answer", "task.dataset.checker=numeric",
               *QUICK, "loop.rounds=1", "acquire.task_sampler.n_problems=40", *SMALL, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1] and records[0]["labels_used"] == 40  # 10% of 400 rows
    assert set(records[1]["meta"]["exact_match"]) == {"1"}  # ground-truth accuracy, level 1
    assert isinstance(records[1]["label_precision_acquired"], float)
    assert "Accuracy by level is ground truth" in (run_dir / "report.md").read_text()


def acquire_stage(rd: RunDir, t: DatasetTask, round_: int, n: int, keep: int | None = None):
    """An acquire stage as the loop writes it: the task's draw recorded with the stage's data
    (``keep``: only the first rows drawn end up in the data, as an acquirer that picks some)."""
    import random as random_module

    from selfloop.data import make_rows, save

    artifacts: dict[str, bytes] = {}
    ctx = SimpleNamespace(stage="acquire", round=round_, level=1, run_dir=rd, artifacts=artifacts, rng=random_module.Random(round_),
                          request_stop=lambda reason: stops.append(reason), warn=lambda name, message: None)
    ctx.save_artifact = lambda name, filename, content: artifacts.__setitem__(f"artifacts/{name}/{filename}", content.encode())
    stops: list[str] = []
    t._ctx = ctx
    problems = t.sample(ctx.rng, 1, n)[:keep]
    rows = make_rows(dict(id=f"r{round_}-{i}", prompt=p.prompt, answer="", reference=p.reference, difficulty=1) for i, p in enumerate(problems))

    def write(tmp):
        save(rows, tmp / "data")
        for rel, content in artifacts.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(content)

    rd.write_stage(round_, "acquire", {"rows": len(rows)}, write)
    return {p.prompt for p in problems}, stops


def test_the_exclusion_is_read_from_the_run_directory(tmp_path, numbers_file):
    rd = RunDir(tmp_path / "run")
    first, _ = acquire_stage(rd, task(numbers_file), 1, 100, keep=60)  # drew 100, acquired 60
    second, _ = acquire_stage(rd, task(numbers_file), 2, 100)  # a new task object: nothing in memory
    assert len(second) == 100 and not first & second
    drawn_1 = json.loads((rd.stage_dir(1, "acquire") / "artifacts/dataset/drawn.json").read_text())["rows"]
    drawn_2 = json.loads((rd.stage_dir(2, "acquire") / "artifacts/dataset/drawn.json").read_text())["rows"]
    assert len(set(drawn_1[60:]) & set(drawn_2)) > 0  # rows drawn but not acquired stay available
    # the rest of the pool (320 rows: 400 less 40 labelled and 40 eval) goes to round 3, then the run must stop
    third, stops = acquire_stage(rd, task(numbers_file), 3, 1000)
    assert len(first | second | third) == 320 and not stops
    fourth, stops = acquire_stage(rd, task(numbers_file), 4, 10)  # nothing left: the run must stop
    assert not fourth and len(stops) == 1 and "exhausted" in stops[0]
    again, _ = acquire_stage(RunDir(tmp_path / "other"), task(numbers_file, with_replacement=True), 1, 320)
    assert again == first | second | third
    # a data file that changed under the run is refused, naming the row
    changed = write_jsonl(tmp_path / "changed.jsonl", [{"question": f"changed {i}", "answer": i} for i in range(400)])
    with pytest.raises(SelfloopError, match="the data changed since round 1"):
        acquire_stage(rd, task(changed), 5, 10)


# -- answers counted per row, not crashed ---------------------------------------------------
def test_a_regex_without_a_match_is_a_row_error_not_a_crash(tmp_path, numbers_file, selfloop_hydra, selfloop_offline):
    ctx = build_ctx(tmp_path / "ctx", ["task=dataset", f"task.dataset.path={numbers_file}", "task.dataset.extractor=regex",
                                       "task.dataset.pattern='= ([0-9]+)'"], level=1, preset="loop=dataset_smoke")
    t = ctx.task
    ctx.stage = "acquire"
    assert t.extract_answer("so 2+3 = 5") == "5"
    assert t.extract_answer("five") == "" and t.extract_answer("five") == ""
    assert len(ctx.row_errors) == 1 and "found no answer" in ctx.row_errors[0]["reason"]  # once per completion and stage
    ctx.stage = "filter"  # filters re-read completions the acquire stage already counted
    assert t.extract_answer("six") == "" and len(ctx.row_errors) == 1


# -- bad input: one clear error, before anything is written ----------------------------------
def refused(tmp_path, overrides: list[str]) -> str:
    run_dir = tmp_path / "never"
    with restored_hydra():
        plugins = plugins_with()
        with pytest.raises(SelfloopError) as info:
            prepare(compose(["loop=dataset_smoke", "task=dataset", *overrides], plugins), plugins.registry, RunDir(run_dir))
    assert not run_dir.exists()
    message = str(info.value)
    assert "\n" not in message
    return message


def bad_file(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize(
    "name, content, options, expected",
    [
        ("d.jsonl", b'{"question": "a", "answer": 1}\n', ["task.dataset.prompt_column=questoin"],
         r"task.dataset.prompt_column='questoin'.*columns? of .*: question, answer \(did you mean 'question'\?\)"),
        ("d.jsonl", b'{"question": "a", "answer": 1}\n', ["task.dataset.reference_column=solution"], r"reference_column='solution'.*question, answer"),
        ("d.jsonl", b'{"question": "a", "answer": 1}\n', ["task.dataset.difficulty_column=level"], r"difficulty_column='level'"),
        ("d.jsonl", b"", [], r"the file is empty"),
        ("d.jsonl", b'{"question": 1, "answer": 1}\n{"question": 2, "answer": 1}\n', [], r"a column of text; .* holds int64 values \(e\.g\. 1\)"),
        ("d.jsonl", b'{"question": "a", "answer": 1}\n{"question": null, "answer": 1}\n', [], r"1 rows have no prompt in column 'question' \(null\), e.g. row 1"),
        ("d.jsonl", b'{"question": "a", "answer": 1}\n{"question": "", "answer": 1}\n', [], r"1 rows have an empty 'question'"),
        ("d.jsonl", b'{"question": "a", "answer": 1}\n{"question": oops\n', [], r"could not read it: ArrowInvalid: JSON parse error"),
        ("d.jsonl", b'{"question": "a", "answer": 1}\n{"question": "caf\xe9", "answer": 2}\n', [], r"not UTF-8 text \(byte 0xe9 at offset \d+, line 2\).*iconv"),
        ("d.parquet", b"not parquet at all", [], r"could not read it: .*[Pp]arquet"),
        ("d.xlsx", b"PK", [], r"unknown file type '\.xlsx'"),
        ("d.jsonl", b'{"question": "a", "answer": "x"}\n' * 20, ["task.dataset.checker=numeric"], r"checker=numeric, but the labelled reference .* is not a number"),
        ("d.jsonl", b'{"question": "a", "answer": 1, "level": "easy"}\n' * 5, ["task.dataset.difficulty_column=level"], r"integer levels.*'easy'"),
        ("d.jsonl", b'{"question": "a", "answer": 1}\n' * 5, ["task.dataset.labelled_size=3", "task.dataset.eval_size=2"], r"no rows are left for the unlabelled pool"),
        ("d.jsonl", b'{"question": "a", "answer": null}\n' * 5, [], r"has no answers, so no rows can be labelled"),
        ("d.jsonl", b'{"question": "a", "answer": 1}\n' * 5, ["task.dataset.reference_column=null"], r"reference_column=None.*bootstrap"),
        ("d.jsonl", (b'{"question": "' + b"x" * 200 + b'", "answer": 1}\n') * 20, [], r"model.tiny.n_positions=128 is too short.*set model.tiny.n_positions=2\d\d"),
    ],
    ids=["misspelt-prompt", "missing-reference", "missing-difficulty", "empty", "non-text", "null-prompt", "empty-prompt", "bad-json",
         "latin1", "bad-parquet", "unknown-type", "non-numeric", "text-levels", "empty-pool", "no-answers", "no-reference-column", "too-long"],
)
def test_bad_files_are_one_clear_error(tmp_path, name, content, options, expected, selfloop_offline):
    path = bad_file(tmp_path, name, content)
    message = refused(tmp_path, [f"task.dataset.path={path}", *options])
    import re

    assert re.search(expected, message), message


@pytest.mark.parametrize(
    "options, expected",
    [
        (["task.dataset.path=/nowhere/d.jsonl"], r"task.dataset.path='/nowhere/d.jsonl'.*no such file"),
        (["task.dataset.path=builtin:nope"], r"builtin:NAME with NAME one of .*word_problems"),
        ([], r"task.dataset.path=''"),
        (["task.dataset.path=x", "task.dataset.checker=numerc"], r"task.dataset.checker='numerc': accepted: exact \| numeric"),
        (["task.dataset.path=x", "task.dataset.extractor=regex"], r"task.dataset.pattern=None: accepted: a regular expression"),
        (["task.dataset.path=x", "task.dataset.extractor=regex", "task.dataset.pattern='('"], r"valid Python regular expression"),
        (["task.dataset.path=x", "task.dataset.template=no-placeholder"], r"exactly one \{prompt\}"),
        (["task.dataset.path=x", "task.dataset.labelled_size=2.5"], r"labelled_size=2.5.*whole number"),
        (["task.dataset.path=no_such_hub_dataset_xyz"], r"loading it with datasets.load_dataset failed"),
    ],
    ids=["missing-file", "unknown-builtin", "no-path", "checker", "regex-without-pattern", "bad-regex", "template", "size", "hub-offline"],
)
def test_bad_options_are_one_clear_error(tmp_path, options, expected, selfloop_offline):
    import re

    message = refused(tmp_path, options)
    assert re.search(expected, message), message


def test_the_cli_refuses_bad_data_in_one_line_without_a_run_directory(tmp_path, numbers_file):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "selfloop.cli", "run", "loop=dataset_smoke", "task=dataset", f"task.dataset.path={numbers_file}",
               "task.dataset.prompt_column=query", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("selfloop: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"selfloop: error: bad option task.dataset.prompt_column='query': accepted: a column of {numbers_file}[train]: question, answer")
    assert "Traceback" not in done.stderr and not run_dir.exists()


def test_an_option_error_names_the_full_option(levels_file):
    with pytest.raises(OptionError, match=r"^bad option task\.dataset\.prompt_column='nope'"):
        task(levels_file, prompt_column="nope").levels

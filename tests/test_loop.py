"""The loop's guarantees, with tiny stand-in strategies so each test takes seconds."""

import json
import types
from dataclasses import dataclass

import pytest

from selfloop import hookimpl
from selfloop.errors import ContractError
from selfloop.testing import in_process_plugin

from loops import KEEP_ALL, run_with

def spy_plugin(seen: list):
    """An optimizer that records what it was given and returns a clone of the incumbent."""

    class Spy:
        name = "spy"

        def __init__(self, config):
            self.config = config

        def optimize(self, ctx, data):
            seen.append((ctx.round, list(data.column_names), len(data)))
            return ctx.model.clone()

    module = types.ModuleType("spy")
    module.selfloop_register_optimizers = hookimpl(lambda register: register(Spy))
    return module


def test_references_never_reach_training_after_bootstrap(tmp_path):
    seen = []
    loop, rd = run_with(tmp_path, {"spy": spy_plugin(seen)}, ["optimize=spy", *KEEP_ALL])
    assert loop.execute() == "completed"
    assert [r for r, *_ in seen] == [0, 1]
    for _, columns, _ in seen:
        assert "reference" not in columns
    records = rd.records()
    assert records[0]["labels_used"] == 300 and records[1]["labels_used"] == 0
    assert records[0]["labelled_levels"] == [1, 2, 3]


def test_references_reach_training_only_when_allowed_and_are_counted(tmp_path):
    seen = []
    loop, rd = run_with(
        tmp_path, {"spy": spy_plugin(seen)}, ["optimize=spy", "filter=[uncertainty]", "filter.uncertainty.min_agreement=0", "filter.uncertainty.require_well_formed=false", "loop.allow_references_in_training=true"]
    )
    loop.execute()
    assert "reference" in seen[1][1]
    assert rd.records()[1]["labels_used"] == seen[1][2] > 0


def bad_filter_plugin(mode: str):
    class Bad:
        name = "bad"

        def __init__(self, config):
            self.config = config

        def filter(self, ctx, data):
            if mode == "type":
                return list(data)
            if mode == "columns":
                return data.remove_columns(["answer"]).add_column("score_bad", [0.0] * len(data))
            return data  # no score column

    module = types.ModuleType("bad")
    module.selfloop_register_filters = hookimpl(lambda register: register(Bad))
    return module


@pytest.mark.parametrize(
    "mode, message",
    [("type", r"filter 'bad' from plugin 'bad' returned list; expected a datasets.Dataset"), ("columns", r"without the column\(s\) \['answer'\]"), ("score", "score column 'score_bad'")],
)
def test_a_strategy_breaking_the_contract_is_named_and_finished_stages_survive(tmp_path, mode, message):
    loop, rd = run_with(tmp_path, {"bad": bad_filter_plugin(mode)}, ["filter=[uncertainty,bad]"])
    with pytest.raises(ContractError, match=message):
        loop.execute()
    assert rd.is_complete(0, "promote") and rd.is_complete(1, "acquire")
    assert not rd.stage_dir(1, "filter").exists()
    info = json.loads((rd.root / "run.json").read_text())
    assert info["status"] == "failed" and "bad" in info["error"]
    # fix the config, resume: the finished stages are reused, not redone
    acquired_at = (rd.stage_dir(1, "acquire") / "COMPLETE").stat().st_mtime_ns
    loop2, _ = run_with(tmp_path, {}, [])
    assert loop2.execute() == "completed"
    assert (rd.stage_dir(1, "acquire") / "COMPLETE").stat().st_mtime_ns == acquired_at


def test_promotion_gate_rejects_a_worse_candidate(tmp_path):
    """A candidate whose autonomous score drops beyond the tolerance keeps the incumbent."""
    from selfloop_plugins.optimize.sft import SFT, SFTConfig

    class Sabotage:
        name = "sabotage"

        def __init__(self, config):
            self.config = config

        def optimize(self, ctx, data):
            if ctx.round == 0:  # a real bootstrap, so the incumbent agrees with itself
                return SFT(SFTConfig(max_steps=150, replay_fraction=0.0)).optimize(ctx, data)
            cand = ctx.model.clone()
            cand.model.get_output_embeddings().weight.data.zero_()  # uniform samples: no agreement
            return cand

    module = types.ModuleType("sabotage")
    module.selfloop_register_optimizers = hookimpl(lambda register: register(Sabotage))
    loop, rd = run_with(tmp_path, {"sabotage": module}, ["optimize=sabotage", *KEEP_ALL, "loop.promotion.tolerance=0.0", "evaluate.self_consistency.n_per_level=16"])
    assert loop.execute() == "completed"
    record = rd.records()[1]
    candidate, incumbent = record["gate"]["self_consistency"]["candidate"], record["gate"]["self_consistency"]["incumbent"]
    assert candidate < incumbent
    assert not record["promoted"] and "self_consistency" in record["reason"]
    assert record["incumbent_round"] == 0
    assert record["next_level"] == record["level"]  # the curriculum waits


def test_observers_see_every_stage_once_and_resume_skips_finished_ones(tmp_path):
    events = []

    class Recorder:
        @hookimpl
        def selfloop_on_run_start(self, ctx):
            events.append("run_start")

        @hookimpl
        def selfloop_on_round_start(self, ctx):
            events.append(f"round_start {ctx.round}")

        @hookimpl
        def selfloop_on_stage_start(self, ctx, stage):
            events.append(f"start {ctx.round} {stage}")

        @hookimpl
        def selfloop_on_stage_end(self, stage, metrics):  # a subset of the arguments is fine
            events.append(f"end {metrics['round']} {stage}")

        @hookimpl
        def selfloop_on_round_end(self, record):
            events.append(f"round_end {record['round']}")

        @hookimpl
        def selfloop_on_run_end(self, status):
            events.append(f"run_end {status}")

    loop, rd = run_with(tmp_path, {"recorder": Recorder()}, [])
    assert loop.execute() == "completed"
    round1 = [e for e in events if e.endswith(" 1") or " 1 " in e]
    assert round1 == [
        "round_start 1",
        *[f"{kind} 1 {stage}" for stage in ("acquire", "filter", "optimize", "evaluate", "promote") for kind in ("start", "end")],
        "round_end 1",
    ]
    assert events[0] == "run_start" and events[-1] == "run_end completed"

    events.clear()
    loop2, _ = run_with(tmp_path, {"recorder": Recorder()}, [])
    assert loop2.execute() == "completed"
    assert events == ["run_start", "run_end completed"]  # nothing is redone


def test_budget_guard_stops_before_a_new_round(tmp_path):
    loop, rd = run_with(tmp_path, {}, ["loop.max_minutes=0"])
    assert loop.execute() == "budget_exhausted"
    assert json.loads((rd.root / "run.json").read_text())["status"] == "budget_exhausted"
    assert rd.records() == []


def test_the_readme_plugin_example_works_in_a_loop(tmp_path):
    """The README's plugin example, registered as if installed, runs in a real loop."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(# selfloop_shortest/__init__.py.*?)```", readme, re.S).group(1)
    module = types.ModuleType("selfloop_shortest")
    exec(compile(code, "README.md", "exec"), module.__dict__)
    loop, rd = run_with(tmp_path, {"shortest": module}, ["filter=[uncertainty,shortest]", "filter.uncertainty.min_agreement=0", "filter.shortest.keep=0.5"])
    assert loop.execute() == "completed"
    steps = rd.stage_metrics(1, "filter")["filters"]
    assert [s["filter"] for s in steps] == ["uncertainty", "shortest"]
    assert steps[1]["kept"] == steps[1]["of"] // 2


def test_an_exception_in_a_strategy_names_its_plugin(tmp_path):
    class Exploding:
        name = "exploding"

        def __init__(self, config):
            pass

        def filter(self, ctx, data):
            raise ZeroDivisionError("oops")

    loop, rd = run_with(tmp_path, {"exploding_pkg": in_process_plugin(Exploding, name="exploding_pkg")}, ["filter=[exploding]"])
    with pytest.raises(ZeroDivisionError) as info:
        loop.execute()
    assert "raised by filter 'exploding' from plugin 'exploding_pkg'" in info.value.__notes__
    assert rd.is_complete(1, "acquire")


def test_a_refiner_returning_the_wrong_type_is_named(tmp_path):
    class Lossy:
        name = "lossy"

        def __init__(self, config):
            pass

        def refine(self, ctx, prompts, generate):
            return generate(prompts)[:-1]  # drops the last prompt

    loop, rd = run_with(tmp_path, {"lossy_pkg": in_process_plugin(Lossy, name="lossy_pkg")}, ["refine=[lossy]"])
    with pytest.raises(ContractError, match=r"refine 'lossy' from plugin 'lossy_pkg' returned a list of \d+; expected a list of \d+ Generation"):
        loop.execute()


def test_a_model_provider_returning_the_wrong_type_is_named(tmp_path):
    class Raw:
        name = "raw"

        def __init__(self, config):
            pass

        def build(self, ctx):
            return object()

    loop, _ = run_with(tmp_path, {"raw_pkg": in_process_plugin(Raw, name="raw_pkg")}, ["model=raw"])
    with pytest.raises(ContractError, match=r"model 'raw' from plugin 'raw_pkg' build\(\) returned object; expected a selfloop.model.ModelHandle"):
        loop.execute()


def test_an_observer_that_raises_stops_the_run_naming_its_plugin(tmp_path):
    guard = types.ModuleType("guard")

    @hookimpl
    def selfloop_on_round_end(ctx, record):
        if record["round"] == 1:
            raise RuntimeError("label precision dropped")

    guard.selfloop_on_round_end = selfloop_on_round_end
    loop, rd = run_with(tmp_path, {"guard": guard}, [])
    with pytest.raises(RuntimeError, match="label precision dropped") as info:
        loop.execute()
    assert "raised in selfloop_on_round_end by plugin 'guard' (not installed)" in info.value.__notes__
    assert rd.is_complete(1, "promote")  # the round it judged is safely on disk


def test_what_a_strategy_records_lands_in_its_stage_metrics(tmp_path):
    class Counting:
        name = "counting"

        def __init__(self, config):
            pass

        def filter(self, ctx, data):
            ctx.record(self.name, seen=len(data), backend="exact")
            return data.add_column("score_counting", [1.0] * len(data))

    loop, rd = run_with(tmp_path, {"counting": in_process_plugin(Counting, name="counting")}, ["filter=[uncertainty,counting]", "filter.uncertainty.min_agreement=0"])
    assert loop.execute() == "completed"
    metrics = rd.stage_metrics(1, "filter")
    kept_by_uncertainty = metrics["filters"][0]["kept"]
    assert metrics["notes"]["counting"] == {"seen": kept_by_uncertainty, "backend": "exact"}
    assert "counting" not in rd.stage_metrics(1, "optimize").get("notes", {})  # notes belong to the stage that made them


@pytest.mark.parametrize(
    "schedule, rounds, expected",
    [
        # (level, promoted, kept share at level) per round 1..4 -> next level after each
        (["loop.curriculum.advance=paced", "loop.curriculum.min_kept_fraction=0.8"],
         [(4, True, 0.5), (4, False, 0.9), (4, True, 0.9), (5, True, 0.95)], [4, 4, 5, 6]),
        (["loop.curriculum.advance=always", "loop.curriculum.step=2"],
         [(4, True, 0.0), (6, False, 0.0), (6, True, 0.0), (8, True, 0.0)], [6, 6, 8, 8]),  # capped at the top level, 8
        (["loop.curriculum.advance=fixed", "loop.curriculum.every_rounds=2"],
         [(4, False, 0.0), (4, False, 0.0), (5, True, 0.0), (5, True, 1.0)], [4, 5, 5, 6]),  # promoted or not
    ],
)
def test_pacing_schedules_advance_as_documented(tmp_path, monkeypatch, schedule, rounds, expected):
    loop, rd = run_with(tmp_path, {}, [*schedule, "task.reversal.max_level=8", "loop.bootstrap.levels=[1,2,3]", "loop.curriculum.start_level=4"])
    records, got = [{"round": 0, "level": None}], []
    monkeypatch.setattr(rd, "records", lambda: list(records))
    assert loop.next_level(None, 0, True, None) == 4
    for round_, (level, promoted, kept) in enumerate(rounds, start=1):
        got.append(loop.next_level(level, round_, promoted, {"kept_fraction_at_level": kept}))
        records.append({"round": round_, "level": level})
    assert got == expected


def test_pacing_options_are_checked_at_composition(tmp_path):
    from selfloop.errors import OptionError

    for bad in ("loop.curriculum.every_rounds=0", "loop.curriculum.step=0"):
        with pytest.raises(OptionError, match=bad.split("=")[0]):
            run_with(tmp_path, {}, [bad])

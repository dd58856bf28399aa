"""A real smoke loop with the installed plugin: TensorBoard shows what metrics.jsonl says."""

from __future__ import annotations

import shutil

import pytest
from tb_support import curves

import selfloop_tensorboard as tb

# The smoke loop with fewer training steps (about 4x faster): this checks logging, not learning.
FAST = ["loop.bootstrap.optimize.sft.max_steps=60", "optimize.sft.max_steps=10", "filter=[]"]  # so a weak model still trains every round


def expected(record: dict) -> dict[str, float]:
    """The round scalars a reader should find, derived from the record independently of the plugin."""
    out = {f"round/autonomous/{n}": s for n, s in record["autonomous"].items()}
    for group in ("meta", "candidate_meta"):
        out.update({f"round/{group}/{n}/level_{k}": v for n, by_level in record[group].items() for k, v in by_level.items()})
    out.update({f"round/compute/{k}": v for k, v in record["compute"].items()})
    for key in ("labels_used", "kept_fraction", "label_precision_acquired", "label_precision_kept", "promoted", "level", "next_level"):
        if record[key] is not None:
            out[f"round/{key}"] = float(record[key])
    return out


def check_against_run(run_dir, records) -> dict:
    seen = curves(run_dir / "tensorboard")
    for tag, points in seen.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), f"{tag}: doubled or unordered steps {steps}"
    for record in records:
        for tag, value in expected(record).items():
            assert (record["round"], pytest.approx(value, rel=1e-6, abs=1e-9)) in seen[tag], tag
    return seen


def test_smoke_loop_logs_every_round_and_resumes_cleanly(selfloop_smoke_loop, selfloop_compose):
    from selfloop.loop import Loop
    from selfloop.plugins import load_plugins
    from selfloop.rundir import RunDir, read_metrics_jsonl

    plugins = load_plugins(strict=True)
    assert plugins.info["tensorboard"].distribution == "selfloop-tensorboard"  # found through its entry point
    run = selfloop_smoke_loop(FAST, plugins, rounds=1)
    assert run.status == "completed"
    records = read_metrics_jsonl(run.run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1]
    seen = check_against_run(run.run_dir, records)
    assert len(seen["round/autonomous/self_consistency"]) == 2
    assert seen["stage/optimize/train_loss"][1] == (1, pytest.approx(run.stage_metrics(1, "optimize")["train_loss"]))
    assert tb._writers == {}

    # kill -9 after round 1's optimize stage: evaluate and promote are redone by `resume`
    for stage in ("evaluate", "promote"):
        shutil.rmtree(RunDir(run.run_dir).stage_dir(1, stage))
    cfg = selfloop_compose(["loop=smoke", "loop.rounds=1", *FAST], plugins)
    assert Loop(cfg, RunDir(run.run_dir), plugins, echo=lambda s: None).execute() == "completed"
    assert len(list((run.run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    seen = check_against_run(run.run_dir, read_metrics_jsonl(run.run_dir / "metrics.jsonl"))
    assert [s for s, _ in seen["stage/optimize/train_loss"]] == [0, 1]  # replayed, though not rerun

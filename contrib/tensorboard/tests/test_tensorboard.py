"""The observer hooks write what they promise, resume without doubling steps, and keep runs apart."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from tb_support import curves, read_events, record, run_round, run_stage, stage_metrics, texts

import selfloop_tensorboard as tb


def test_scalars_flatten_nested_metrics_generically():
    got = dict(tb.scalars(record(1, stage_metrics(1)), "round"))
    assert got["round/autonomous/self_consistency"] == pytest.approx(0.6)
    assert got["round/meta/exact_match/level_8"] == pytest.approx(0.05)
    assert got["round/promoted"] == 1.0 and got["round/compute/train_steps"] == 60
    assert got["round/gate/self_consistency/0"] == pytest.approx(1.6)  # lists by position...
    assert dict(tb.scalars({"filters": [{"filter": "uncertainty", "kept": 3}]}, "s")) == {"s/filters/uncertainty/kept": 3.0}  # ...or name
    # strings, None and bookkeeping are not curves
    assert not [t for t in got if t.split("/")[1] in ("reason", "round", "stage", "labelled_levels")]
    assert "round/label_precision_acquired" not in dict(tb.scalars(record(0, stage_metrics(0)), "round"))


def test_hooks_log_rounds_stages_config_and_status(make_ctx):
    ctx = make_ctx()
    tb.selfloop_on_run_start(ctx=ctx)
    for r in (0, 1, 2):
        run_round(ctx, r)
    tb.selfloop_on_run_end(ctx=ctx, status="completed")

    logs = ctx.run_dir.root / "tensorboard"
    c = curves(logs)
    assert c["round/autonomous/self_consistency"] == [(0, pytest.approx(0.5)), (1, pytest.approx(0.6)), (2, pytest.approx(0.7))]
    assert c["round/meta/exact_match/level_8"] == [(0, 0.0), (1, pytest.approx(0.05)), (2, pytest.approx(0.1))]
    assert c["round/candidate_meta/exact_match/level_4"] == [(r, pytest.approx(0.8)) for r in (0, 1, 2)]
    assert c["round/promoted"] == [(0, 1.0), (1, 1.0), (2, 0.0)]
    assert c["round/level"] == [(1, 4.0), (2, 5.0)]  # the bootstrap has no curriculum level
    assert c["round/label_precision_acquired"] == [(1, pytest.approx(0.9)), (2, pytest.approx(0.9))]
    assert c["round/kept_fraction"] == [(r, pytest.approx((150 + r) / 200)) for r in (0, 1, 2)]
    assert c["round/labels_used"] == [(0, 600.0), (1, 0.0), (2, 0.0)]
    assert c["round/compute/seconds"] == [(r, 10.0 + r) for r in (0, 1, 2)]
    assert c["round/gate/self_consistency/candidate"] == [(1, pytest.approx(1.6)), (2, pytest.approx(2.6))]
    assert c["stage/optimize/train_loss"] == [(r, pytest.approx(1 / (r + 1))) for r in (0, 1, 2)]
    assert c["stage/acquire/seconds"] == [(r, 1.5 + r) for r in (0, 1, 2)]
    assert c["stage/evaluate/evaluators/exact_match/score"][2] == (2, pytest.approx(0.5))
    assert c["stage/filter/filters/uncertainty/kept"] == [(1, 151.0), (2, 152.0)]
    assert c["stage/promote/seconds"] == [(r, pytest.approx(0.01)) for r in (0, 1, 2)]
    assert "stage/promote/kept" not in c and "round/seconds" not in c  # the record is logged once, as round/*
    ((step, config),) = texts(logs, "run/config")
    assert step == 0 and "min_agreement: 0.75" in config
    assert texts(logs, "run/status") == [(2, "completed")]
    assert tb._writers == {}  # closed at run end


def test_stage_and_round_ends_flush_for_a_live_tensorboard(make_ctx, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    calls = []
    monkeypatch.setattr(SummaryWriter, "add_scalar", lambda self, tag, *a, **k: calls.append(tag))
    monkeypatch.setattr(SummaryWriter, "flush", lambda self: calls.append("FLUSH"))
    ctx = make_ctx()
    tb.selfloop_on_run_start(ctx=ctx)
    calls.clear()
    for stage in ("acquire", "optimize", "evaluate"):
        run_stage(ctx, stage, stage_metrics(0)[stage])
        assert calls[-1] == "FLUSH"  # on disk when the hook returns
    calls.clear()
    tb.selfloop_on_round_end(ctx=ctx, record=record(0, stage_metrics(0)), replayed=False)
    assert "round/promoted" in calls and calls[-1] == "FLUSH"


def test_resume_replays_finished_work_and_never_doubles_a_step(make_ctx):
    ctx = make_ctx()
    tb.selfloop_on_run_start(ctx=ctx)
    run_round(ctx, 0)
    run_round(ctx, 1, upto="filter")
    # killed after round 1's optimize stage reached disk but before its hook ran: no run end,
    # and the event stream misses stage/optimize at step 1
    ctx.round = 1
    ctx.run_dir.write_stage(1, "optimize", {"round": 1, "stage": "optimize", "level": 4, **stage_metrics(1)["optimize"]})
    tb._writers.pop(tb.log_dir(ctx.run_dir)).flush()  # what a kill leaves: flushed events, a dead writer
    time.sleep(1.05)  # event files are ordered by their name's whole-second timestamp; a real resume is a new process

    resumed = make_ctx()
    tb.selfloop_on_run_start(ctx=resumed)  # the loop hooks only the stages it runs from here on
    resumed.round = 1
    stages = stage_metrics(1)
    run_stage(resumed, "evaluate", stages["evaluate"])
    rec = run_stage(resumed, "promote", record(1, stages))
    tb.selfloop_on_round_end(ctx=resumed, record=rec, replayed=False)
    run_round(resumed, 2)
    tb.selfloop_on_run_end(ctx=resumed, status="completed")

    logs = ctx.run_dir.root / "tensorboard"
    assert len(list(logs.glob("events.out.tfevents.*"))) == 2  # appended, not rewritten
    c = curves(logs)
    for tag, points in c.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), f"{tag} has doubled or unordered steps: {steps}"
    assert c["round/autonomous/self_consistency"] == [(0, pytest.approx(0.5)), (1, pytest.approx(0.6)), (2, pytest.approx(0.7))]
    assert c["stage/acquire/seconds"] == [(0, 1.5), (1, 2.5), (2, 3.5)]
    assert c["stage/optimize/train_loss"] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]  # recovered from disk
    # replayed points keep the wall time at which their stage finished
    marker = (ctx.run_dir.stage_dir(0, "promote") / "COMPLETE").read_text()
    acc = read_events(logs)
    assert acc.Scalars("round/promoted")[0].wall_time == pytest.approx(json.loads(marker)["time"], abs=1e-3)
    marker = (ctx.run_dir.stage_dir(0, "acquire") / "COMPLETE").read_text()
    assert acc.Scalars("stage/acquire/seconds")[0].wall_time == pytest.approx(json.loads(marker)["time"], abs=1e-3)
    assert texts(logs, "run/status") == [(2, "completed")]


def test_a_run_started_after_the_fact_gets_its_history(make_ctx):
    """Plugin installed (or re-enabled) half-way: the first start it sees logs the earlier rounds."""
    ctx = make_ctx()
    tb.selfloop_on_run_start(ctx=ctx)
    run_round(ctx, 0)
    run_round(ctx, 1)
    tb.close(tb.log_dir(ctx.run_dir))
    for f in (ctx.run_dir.root / "tensorboard").iterdir():
        f.unlink()  # as if nothing had been logged
    tb.selfloop_on_run_start(ctx=make_ctx())
    tb._close_all()
    assert curves(ctx.run_dir.root / "tensorboard")["round/compute/seconds"] == [(0, 10.0), (1, 11.0)]


def test_one_writer_per_run_directory(make_ctx):
    a, b = make_ctx("sweep/0"), make_ctx("sweep/1")
    tb.selfloop_on_run_start(ctx=a)
    tb.selfloop_on_run_start(ctx=b)
    assert len(tb._writers) == 2
    run_round(a, 0)
    run_round(b, 0)
    run_round(b, 1)
    tb.selfloop_on_run_end(ctx=a, status="completed")
    assert list(tb._writers) == [tb.log_dir(b.run_dir)]  # a's writer is closed, b's untouched
    tb.selfloop_on_run_start(ctx=b)  # started again without an end: replaced, not leaked
    assert len(tb._writers) == 1
    tb.selfloop_on_run_end(ctx=b, status="failed")
    assert tb._writers == {}
    assert [s for s, _ in curves(a.run_dir.root / "tensorboard")["round/promoted"]] == [0]
    assert [s for s, _ in curves(b.run_dir.root / "tensorboard")["round/promoted"]] == [0, 1]
    assert texts(b.run_dir.root / "tensorboard", "run/status")[-1] == (1, "failed")


def test_log_root_can_be_redirected(make_ctx, tmp_path, monkeypatch):
    monkeypatch.setenv(tb.ENV_DIR, str(tmp_path / "tb"))
    ctx = make_ctx("runs/2026-01-01_00-00-00")
    tb.selfloop_on_run_start(ctx=ctx)
    run_round(ctx, 0)
    tb.selfloop_on_run_end(ctx=ctx, status="completed")
    assert not (ctx.run_dir.root / "tensorboard").exists()
    assert curves(tmp_path / "tb" / "runs" / "2026-01-01_00-00-00")["round/promoted"] == [(0, 1.0)]


@pytest.mark.parametrize("disabled", ["", "tensorboard"])
def test_installed_plugin_observes_unless_disabled(make_ctx, monkeypatch, disabled):
    from selfloop.plugins import load_plugins

    monkeypatch.setenv("SELFLOOP_DISABLE_PLUGINS", disabled)
    plugins = load_plugins(strict=True)
    ctx = make_ctx()
    plugins.hook.selfloop_on_run_start(ctx=ctx)
    plugins.hook.selfloop_on_run_end(ctx=ctx, status="completed")
    assert ("tensorboard" in plugins.info) == (not disabled)
    assert (ctx.run_dir.root / "tensorboard").exists() == (not disabled)
    if not disabled:
        assert plugins.info["tensorboard"].distribution == "selfloop-tensorboard"
        assert {"selfloop_on_run_start", "selfloop_on_stage_end", "selfloop_on_round_end", "selfloop_on_run_end"} <= set(plugins.info["tensorboard"].hooks)


def test_import_loads_neither_torch_nor_tensorboard():
    code = "import sys, selfloop_tensorboard; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorboard')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

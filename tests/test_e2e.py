"""End-to-end: the CLI as a user runs it, in subprocesses (about a minute per run)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from selfloop.rundir import RunDir

pytestmark = pytest.mark.slow

SMOKE = ["loop=smoke", "seed=0"]


def selfloop(*args, check=True, env=None, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "selfloop.cli", *args], capture_output=True, text=True, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"selfloop {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def records(run_dir: Path) -> list[dict]:
    """Round records without wall-clock fields."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("seconds", None)
        rec["compute"].pop("seconds")
        out.append(rec)
    return out


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "smoke"
    proc = selfloop("run", *SMOKE, f"hydra.run.dir={run_dir}")
    return run_dir, proc


def test_smoke_run_completes_with_report(smoke_run):
    run_dir, proc = smoke_run
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed"
    assert info["versions"]["trl"] != "not installed" and "uncertainty" in info["plugins"]
    recs = records(run_dir)
    assert [r["round"] for r in recs] == [0, 1, 2]
    assert recs[0]["labels_used"] == 2000 and all(r["labels_used"] == 0 for r in recs[1:])
    assert recs[0]["compute"]["train_steps"] == 800 and recs[1]["compute"]["train_steps"] == 60
    # 200 problems x 4 samples, the round trip, and evaluation (5 levels x (16 x 5 sampled + 32 greedy))
    assert recs[1]["compute"]["generated_sequences"] >= 200 * 4 + 5 * (16 * 5 + 32)
    for stage in ("acquire", "filter", "optimize", "evaluate", "promote"):
        assert (run_dir / "round-001" / stage / "COMPLETE").exists()
    assert (run_dir / "round-001" / "optimize" / "model" / "model.safetensors").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert (run_dir / "curves.png").stat().st_size > 10_000
    report = (run_dir / "report.md").read_text()
    assert "| 2 |" in report and "Labels used: **2000**" in report
    assert "accuracy by level" in proc.stdout and "run completed" in proc.stdout


def test_report_is_rebuilt_from_metrics(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    (run_dir / "report.md").unlink()
    proc = selfloop("report", str(run_dir))
    assert (run_dir / "report.md").exists() and "promoted" in proc.stdout


def test_resuming_a_finished_run_changes_nothing(smoke_run):
    run_dir, _ = smoke_run
    before = records(run_dir)
    marker = (run_dir / "round-002" / "promote" / "COMPLETE").stat().st_mtime_ns
    selfloop("resume", str(run_dir))
    assert records(run_dir) == before
    assert (run_dir / "round-002" / "promote" / "COMPLETE").stat().st_mtime_ns == marker


@pytest.mark.parametrize("kill_after", ["round-000/optimize/COMPLETE", "round-001/filter/COMPLETE"])
def test_kill_9_then_resume_reaches_the_same_metrics(smoke_run, tmp_path, kill_after):
    reference, _ = smoke_run
    run_dir = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "selfloop.cli", "run", *SMOKE, f"hydra.run.dir={run_dir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )
    deadline = time.time() + 300
    while not (run_dir / kill_after).exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # land inside the next stage
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "round-002" / "promote" / "COMPLETE").exists()
    selfloop("resume", str(run_dir))
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert records(run_dir) == records(reference)


def start(run_dir, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "selfloop.cli", *extra, *(["run", *SMOKE, f"hydra.run.dir={run_dir}"] if not extra else [str(run_dir)])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
        # as from a terminal: a shell's background job (`pytest ... &`) starts with SIGINT ignored,
        # and the child would inherit that and never see the Ctrl-C this file sends
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(proc, path, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared: {proc.communicate()}"
        assert time.time() < deadline
        time.sleep(0.05)


def test_ctrl_c_and_sigterm_stop_with_one_line_and_the_run_resumes_to_the_same_metrics(smoke_run, tmp_path):
    reference, _ = smoke_run
    run_dir = tmp_path / "interrupted"
    proc = start(run_dir)
    wait_for(proc, run_dir / "round-000" / "acquire" / "COMPLETE")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's process group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == f"selfloop: interrupted (Ctrl-C); nothing finished is lost: continue with `selfloop resume {run_dir}`"
    assert "Traceback" not in err
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"

    proc = start(run_dir, "resume")  # SIGTERM is what SLURM, CI and `kill` send
    wait_for(proc, run_dir / "round-001" / "acquire" / "COMPLETE")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("selfloop: interrupted (SIGTERM); nothing finished is lost")
    assert "resuming" in out and "at round" in out
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"

    selfloop("resume", str(run_dir))
    assert records(run_dir) == records(reference)


def test_a_kill_inside_training_resumes_from_its_checkpoint_to_the_same_model(smoke_run, tmp_path):
    reference, _ = smoke_run
    run_dir = tmp_path / "mid-stage"
    proc = subprocess.Popen(
        [sys.executable, "-m", "selfloop.cli", "run", *SMOKE, "loop.checkpoint_minutes=0.02", f"hydra.run.dir={run_dir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True,
    )
    checkpoints = run_dir / "round-000" / ".optimize.checkpoints"
    deadline = time.time() + 300
    while not list(checkpoints.glob("checkpoint-*/SELFLOOP_CHECKPOINT_DONE")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "round-000" / "optimize").exists()
    step = int(next(checkpoints.glob("checkpoint-*/SELFLOOP_CHECKPOINT_DONE")).parent.name.split("-")[1])
    assert 0 < step < 800
    out = selfloop("resume", str(run_dir)).stdout
    assert "resuming optimize from round-000/.optimize.checkpoints/checkpoint-" in out
    assert records(run_dir) == records(reference)
    weights = [RunDir(d).stage_dir(0, "optimize") / "model" / "model.safetensors" for d in (run_dir, reference)]
    assert weights[0].read_bytes() == weights[1].read_bytes()
    assert not checkpoints.exists()  # removed once the stage completed


def test_run_refuses_a_directory_that_holds_a_run(smoke_run):
    run_dir, _ = smoke_run
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    proc = selfloop("run", *SMOKE, "seed=1", f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config


def test_bad_input_gives_one_clear_error(tmp_path):
    proc = selfloop("run", "filter=[nope]", f"hydra.run.dir={tmp_path / 'x'}", check=False)
    assert proc.returncode == 2 and "unknown filter 'nope'; installed: " in proc.stderr
    assert {"roundtrip", "uncertainty"} <= set(proc.stderr.split("installed: ")[1].split(" (in")[0].split(", "))
    proc = selfloop("run", "filter.uncertainty.min_agreement=abc", f"hydra.run.dir={tmp_path / 'y'}", check=False)
    assert proc.returncode != 0 and "min_agreement" in proc.stderr and "abc" in proc.stderr
    assert not (tmp_path / "y" / "run.json").exists()
    # options checked when the strategies are built: the run directory is not even left behind
    proc = selfloop("run", "loop.bootstrap.optimize.sft.max_steps=many", f"hydra.run.dir={tmp_path / 'z'}", check=False)
    assert proc.returncode == 2 and "optimize.sft.max_steps" in proc.stderr and "many" in proc.stderr
    assert not (tmp_path / "z").exists()
    proc = selfloop("resume", str(tmp_path / "missing"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = selfloop("frobnicate", check=False)
    assert proc.returncode == 2 and "commands: run, resume, infer, plugins, report, compare, new-plugin" in proc.stderr


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_multirun_gives_each_job_its_own_run_directory(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    selfloop("run", "-m", f"hydra/launcher={launcher}", "filter.uncertainty.min_agreement=0.6,0.8", "loop=smoke", "loop.rounds=0",
             "loop.bootstrap.optimize.sft.max_steps=20", f"hydra.sweep.dir={sweep}", env={"OMP_NUM_THREADS": "1"})
    for job, value in (("0", 0.6), ("1", 0.8)):
        assert json.loads((sweep / job / "run.json").read_text())["status"] == "completed"
        assert f"min_agreement: {value}\n" in (sweep / job / ".hydra" / "config.yaml").read_text()


def test_cfg_job_shows_the_composed_config_without_running(tmp_path):
    proc = selfloop("run", "--cfg", "job", "filter.uncertainty.min_agreement=0.8", f"hydra.run.dir={tmp_path / 'never'}")
    assert "min_agreement: 0.8" in proc.stdout and "roundtrip:" in proc.stdout
    assert not (tmp_path / "never").exists()
    # what the run would save: options the default loop preset sets for unselected strategies are dropped
    proc = selfloop("run", "--cfg", "job", "loop=smoke", "evaluate=[exact_match]")
    assert list(yaml.safe_load(proc.stdout)["evaluate"]) == ["exact_match"]
    # a sweep has one config per job: one line saying so, not Hydra's traceback
    proc = selfloop("run", "-m", "--cfg", "job", "filter=[],[uncertainty]", f"hydra.sweep.dir={tmp_path / 'never'}", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "cannot be combined with -m" in proc.stderr
    assert not (tmp_path / "never").exists()

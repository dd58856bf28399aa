"""What users, plugin authors and long runs found (issue 7), each pinned by a test that
failed before the fix: starved rounds, the row-error ledger, run-directory integrity, observer
delivery across a kill, readable records."""

import json
import os
import stat
import subprocess
import sys
import types

import pytest

from selfloop import hookimpl
from selfloop.errors import RunDirError, SelfloopError
from selfloop.rundir import MARKER, RunDir
from selfloop.testing import ObserverContract, in_process_plugin

from loops import KEEP_ALL, run_with


class DropAll:
    """A filter that keeps nothing: every round after the bootstrap is starved."""

    name = "drop_all"

    def __init__(self, config=None):
        pass

    def filter(self, ctx, data):
        return data.add_column("score_drop_all", [0.0] * len(data)).select([])


def test_a_starved_round_is_neither_trained_nor_promoted_and_the_run_stops_after_n(tmp_path):
    loop, rd = run_with(tmp_path, {"drop": in_process_plugin(DropAll, name="drop")},
                        ["filter=[drop_all]", "loop.rounds=5", "loop.max_starved_rounds=2"])
    assert loop.execute() == "starved"
    records = rd.records()
    assert [r["round"] for r in records] == [0, 1, 2]  # stopped after two starved rounds, not five
    for r in records[1:]:
        assert r["starved"] and not r["promoted"] and r["incumbent_round"] == 0
        assert r["reason"].startswith("starved: the filters kept 0 of") and r["reason"].endswith("(drop_all 0/20)")
        assert r["next_level"] == r["level"]  # the curriculum waits
        assert r["compute"].get("train_steps", 0) == 0
    assert not (rd.stage_dir(1, "optimize") / "model").exists()
    info = json.loads(rd.run_json.read_text())
    assert info["status"] == "starved" and "2 starved rounds in a row" in info["stop_reason"]
    report = (rd.root / "report.md").read_text()
    assert "Status: **starved**" in report and "| starved |" in report


def test_rows_a_strategy_could_not_process_are_recorded_and_fail_the_stage_past_the_limit(tmp_path):
    class Picky:
        name = "picky"

        def __init__(self, config=None):
            pass

        def filter(self, ctx, data):
            for row_id in data["id"][:3]:
                ctx.row_error(self.name, row_id, "no match for pattern")
            return data.add_column("score_picky", [1.0] * len(data))

    loop, rd = run_with(tmp_path, {"picky": in_process_plugin(Picky, name="picky")}, [*KEEP_ALL, "filter=[uncertainty,picky]"])
    assert loop.execute() == "completed"
    assert rd.stage_metrics(1, "filter")["row_errors"] == {"picky": 3}
    assert [e["reason"] for e in rd.row_errors(1, "filter")] == ["no match for pattern"] * 3
    assert rd.records()[1]["row_errors"] == 3

    loop, rd = run_with(tmp_path / "strict", {"picky": in_process_plugin(Picky, name="picky")},
                        [*KEEP_ALL, "filter=[uncertainty,picky]", "loop.max_row_error_share=0.01"])
    with pytest.raises(SelfloopError, match=r"picky could not process 3 of \d+ rows in round 1's filter \(more than loop.max_row_error_share=0.01\); most common: no match for pattern \(3x\)"):
        loop.execute()
    assert not rd.stage_dir(1, "filter").exists()


def test_a_strategy_that_cannot_do_part_of_its_job_says_so_in_the_record_and_report(tmp_path):
    class Partial:
        name = "partial"

        def __init__(self, config=None):
            pass

        def filter(self, ctx, data):
            ctx.warn(self.name, "no inverse for these rows: scored nan, kept")
            return data.add_column("score_partial", [float("nan")] * len(data))

    loop, rd = run_with(tmp_path, {"partial": in_process_plugin(Partial, name="partial")}, ["filter=[partial]"])
    assert loop.execute() == "completed"
    record = rd.records()[1]
    assert record["warnings"] == ["filter/partial: no inverse for these rows: scored nan, kept"]
    assert "round 1: filter/partial: no inverse for these rows" in (rd.root / "report.md").read_text()


def test_a_guard_stops_the_run_after_the_current_stage_and_resume_continues(tmp_path):
    asked = []

    class Guard:
        @hookimpl
        def selfloop_on_stage_end(self, ctx, stage, metrics):
            if stage == "filter" and not asked:
                asked.append(True)
                ctx.request_stop("label precision dropped below 0.5")

    loop, rd = run_with(tmp_path, {"guard": Guard()}, KEEP_ALL)
    assert loop.execute() == "stopped"
    assert rd.is_complete(1, "filter") and not rd.stage_dir(1, "optimize").exists()  # nothing trained after the request
    info = json.loads(rd.run_json.read_text())
    assert info["status"] == "stopped" and info["stop_reason"] == "label precision dropped below 0.5"
    loop, _ = run_with(tmp_path, {"guard": Guard()}, KEEP_ALL)
    assert loop.execute() == "completed"


# -- run-directory integrity ---------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished quick loop (bootstrap + 1 round) to damage in the tests below."""
    from selfloop.testing import restored_hydra

    with restored_hydra():
        loop, rd = run_with(tmp_path_factory.mktemp("finished"), {}, KEEP_ALL)
        assert loop.execute() == "completed"
    return rd


def copy_run(rd, tmp_path):
    import shutil

    shutil.copytree(rd.root, tmp_path / "run")
    return RunDir(tmp_path / "run")


def records_without_time(rd):
    out = []
    for r in rd.records():
        r = {k: v for k, v in r.items() if k != "seconds"}  # wall-clock fields differ between runs
        r["compute"] = {k: v for k, v in r["compute"].items() if k != "seconds"}
        out.append(r)
    return out


def test_a_damaged_file_is_named_with_its_stage_and_the_redo_command(finished, tmp_path):
    rd = copy_run(finished, tmp_path)
    arrow = next((rd.stage_dir(1, "acquire") / "data").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-100])  # truncated, as a full disk or a bad copy leaves it
    with pytest.raises(RunDirError, match=rf"{arrow.name} has \d+ bytes, \d+ when the stage completed: stage round-001/acquire is damaged.*--redo round-001/acquire"):
        rd.verify(1, "acquire")
    model = rd.stage_dir(1, "optimize") / "model" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    model.write_bytes(bytes(data))
    with pytest.raises(RunDirError, match=r"model.safetensors changed since the stage completed .*round-001/optimize"):
        RunDir(rd.root).verify(1, "optimize")


def test_redo_recomputes_a_stage_and_everything_after_it_identically(finished, tmp_path):
    rd = copy_run(finished, tmp_path)
    before = records_without_time(rd)
    arrow = next((rd.stage_dir(1, "acquire") / "data").glob("*.arrow"))
    arrow.write_bytes(b"garbage")
    removed = rd.redo(1, "acquire")
    assert removed == [f"round-001/{s}" for s in ("acquire", "filter", "optimize", "evaluate", "promote")]
    loop, _ = run_with(tmp_path, {}, KEEP_ALL)
    assert loop.execute() == "completed"
    assert records_without_time(rd) == before


def test_a_stage_without_marker_that_later_stages_depend_on_is_never_deleted(finished, tmp_path):
    rd = copy_run(finished, tmp_path)
    (rd.stage_dir(1, "optimize") / MARKER).unlink()  # lost marker: the incumbent's model lives there
    with pytest.raises(RunDirError, match=r"round-001/optimize has no COMPLETE marker, but later stages .*round-001/evaluate.*--redo round-001/optimize"):
        rd.clean_partial()
    assert (rd.stage_dir(1, "optimize") / "model").is_dir()


def test_resume_rebuilds_a_deleted_metrics_jsonl_and_report(finished, tmp_path):
    rd = copy_run(finished, tmp_path)
    before = rd.metrics_jsonl.read_text()
    rd.metrics_jsonl.unlink()
    (rd.root / "report.md").unlink()
    loop, _ = run_with(tmp_path, {}, KEEP_ALL)
    assert loop.execute() == "completed"
    assert rd.metrics_jsonl.read_text() == before
    assert (rd.root / "report.md").exists()


def test_finished_stages_are_never_written_to_and_files_have_the_usual_permissions(finished):
    rd = finished
    for round_, stage in rd.stages():
        marker = json.loads((rd.stage_dir(round_, stage) / MARKER).read_text())
        on_disk = {str(p.relative_to(rd.stage_dir(round_, stage))) for p in rd.stage_dir(round_, stage).rglob("*") if p.is_file()}
        assert on_disk - {MARKER} == set(marker["files"]), f"files appeared in round {round_} {stage} after it completed"
        rd.verify(round_, stage)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("run.json", "metrics.jsonl", "report.md", "curves.png", "observers.json"):
        assert stat.S_IMODE((rd.root / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE(rd.stage_dir(1, "filter").stat().st_mode) == 0o777 & ~umask
    assert not list(rd.root.rglob("*.selfloop-tmp")) and not list(rd.root.rglob("cache-*.arrow"))


def test_records_label_the_gate_order_levels_numerically_and_keep_zero_counters_out(finished, tmp_path):
    loop, rd = run_with(tmp_path, {}, [*KEEP_ALL, "loop.eval_levels=[1,2,10]"])
    assert loop.execute() == "completed"
    record = json.loads(rd.metrics_jsonl.read_text().splitlines()[1])
    assert set(record["gate"]["self_consistency"]) == {"candidate", "incumbent"}
    assert list(record["meta"]["exact_match"]) == ["1", "2", "10"]
    promote = rd.stage_metrics(1, "promote")
    assert "generated_sequences" not in promote and "train_steps" not in promote  # the promote stage computes nothing
    lower = record["gate"]["self_consistency"]["candidate"] < record["gate"]["self_consistency"]["incumbent"]
    if lower:  # smoke's tolerance is 1.0
        assert "within loop.promotion.tolerance=1.0" in record["reason"]


def test_temporary_files_of_interrupted_writes_are_removed_on_resume(finished, tmp_path):
    rd = copy_run(finished, tmp_path)
    leftovers = [rd.root / ".run.json.abc.selfloop-tmp", rd.root / ".hydra" / ".overrides.yaml.x.selfloop-tmp"]
    for path in leftovers:
        path.parent.mkdir(exist_ok=True)
        path.write_text("half")
    loop, _ = run_with(tmp_path, {}, KEEP_ALL)
    loop.execute()
    assert not any(p.exists() for p in leftovers)


def test_status_says_completed_only_once_the_report_exists(tmp_path, monkeypatch):
    loop, rd = run_with(tmp_path, {}, KEEP_ALL)
    original = RunDir.write_run_json

    def checked(self, **updates):
        if updates.get("status") == "completed":
            assert (self.root / "report.md").exists() and (self.root / "curves.png").stat().st_size > 1000
        return original(self, **updates)

    monkeypatch.setattr(RunDir, "write_run_json", checked)
    assert loop.execute() == "completed"


def test_a_start_killed_before_its_config_was_saved_is_recognised(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.root.mkdir()
    rd.write_run_json(status="starting", config_sha256="x")
    assert not rd.holds_a_run()  # `selfloop run` may start again here
    with pytest.raises(RunDirError, match=r"stopped while starting, before its config was saved; start it again with `selfloop run \.\.\. hydra.run.dir="):
        rd.validate_for_resume()


def test_resume_refuses_a_config_that_differs_from_the_one_the_run_started_with(tmp_path):
    rd = RunDir(tmp_path)
    (tmp_path / ".hydra").mkdir()
    rd.config_path.write_text("seed: 0\n")
    import hashlib

    rd.write_run_json(status="running", config_sha256=hashlib.sha256(b"seed: 0\n").hexdigest())
    rd.validate_for_resume()
    rd.config_path.write_text("seed: 1\n")  # e.g. overwritten by a second `selfloop run` into the same directory
    with pytest.raises(RunDirError, match="changed since the run started"):
        rd.validate_for_resume()


def test_one_process_per_run_directory(tmp_path):
    rd = RunDir(tmp_path)
    with rd.lock():
        with pytest.raises(RunDirError, match="in use by another selfloop process"):
            with RunDir(tmp_path).lock():
                pass


# -- observers -----------------------------------------------------------------------------
def rounds_logged(run_dir):
    path = run_dir / "rounds.log"
    return [json.loads(line)["round"] for line in path.read_text().splitlines()] if path.exists() else []


def append_only_observer(skip_replayed: bool = False):
    """The simplest observer an author would write: one appended line per finished round."""
    module = types.ModuleType("append_only")

    @hookimpl
    def selfloop_on_round_end(ctx, record, replayed):
        if skip_replayed and replayed:
            return
        with open(ctx.run_dir.root / "rounds.log", "a") as fh:
            fh.write(json.dumps({"round": record["round"], "replayed": replayed}) + "\n")

    module.selfloop_on_round_end = selfloop_on_round_end
    return module


class TestAppendOnlyObserverSurvivesAKill(ObserverContract):
    @pytest.fixture
    def observer(self):
        return append_only_observer()

    def rounds_seen(self, run_dir):
        return rounds_logged(run_dir)


def test_the_observer_suite_fails_an_observer_that_loses_the_replayed_round(pytester):
    pytester.makepyfile(
        test_lossy="""
import json, types, pytest
from selfloop import hookimpl
from selfloop.testing import ObserverContract

class TestLossy(ObserverContract):
    @pytest.fixture
    def observer(self):
        module = types.ModuleType("lossy")
        @hookimpl
        def selfloop_on_round_end(ctx, record, replayed):
            if not replayed:  # what every observer did before events were replayed
                with open(ctx.run_dir.root / "rounds.log", "a") as fh:
                    fh.write(json.dumps({"round": record["round"]}) + "\\n")
        module.selfloop_on_round_end = selfloop_on_round_end
        return module

    def rounds_seen(self, run_dir):
        path = run_dir / "rounds.log"
        return [json.loads(l)["round"] for l in path.read_text().splitlines()] if path.exists() else []
"""
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*a round lost to the kill?*"])


def test_replayed_events_carry_the_flag(tmp_path):
    seen, killed = [], []

    class Recorder:
        @hookimpl(tryfirst=True)
        def selfloop_on_stage_end(self, stage, metrics, replayed):
            if stage == "promote" and metrics["round"] == 1 and not killed:
                killed.append(True)
                raise KeyboardInterrupt
            seen.append((metrics["round"], stage, replayed))

    loop, rd = run_with(tmp_path, {"recorder": Recorder()}, KEEP_ALL)
    with pytest.raises(KeyboardInterrupt):
        loop.execute()
    assert json.loads(rd.run_json.read_text())["status"] == "interrupted"
    seen.clear()
    seen.append("resumed")
    loop, _ = run_with(tmp_path, {"recorder": Recorder()}, KEEP_ALL)
    assert loop.execute() == "completed"
    assert seen == ["resumed", (1, "promote", True)]


# -- validation happens before any directory exists, without torch -------------------------
def test_bad_options_fail_before_anything_is_written_and_without_importing_torch(tmp_path):
    code = (
        "import sys; from selfloop.cli import main; "
        f"rc = main(['run', 'loop.rounds=-1', 'hydra.run.dir={tmp_path / 'run'}']); "
        "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "selfloop: error: bad option loop.rounds=-1: accepted: an integer >= 0 (0: the bootstrap only)"
    assert proc.stdout.strip() == "no torch"
    assert not (tmp_path / "run").exists()


def test_the_report_shows_evaluator_trust_dimensions_guards_and_no_ground_truth(tmp_path):
    from selfloop.report import render

    rd = RunDir(tmp_path)
    base = {"labels_used": 0, "labelled_levels": [], "acquired": 10, "kept": 5, "kept_fraction": 0.5, "autonomous": {"multi": 0.8},
            "promoted": True, "reason": "no autonomous evaluator got worse", "funnel": [], "compute": {"seconds": 1.0}}
    records = [dict(base, round=0, level=None, labels_used=4, labelled_levels=[1], meta={}), dict(base, round=1, level=2, meta={})]
    rd.metrics_jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    meta = {"score": 0.5, "uses_references": True, "evaluators": {
        "self_consistency": {"trusted": False, "spearman": 0.12, "candidates": 9, "kappa_with_truth": 0.05},
        "multi": {"trusted": True, "spearman": 0.93, "candidates": 9, "kappa_with_truth": 0.6, "precision_kept": 0.97}},
        "agreement": {"krippendorff_alpha": 0.4, "pairwise_kappa": {"self_consistency|multi": 0.3}}}
    multi = {"score": 0.8, "uses_references": False, "by_dimension": {"format": {"1": 1.0, "2": 0.5}}, "weights": {"format": 1.0}}
    rd.write_stage(1, "evaluate", {"evaluators": {"meta": meta, "multi": multi}})
    (tmp_path / "drift.jsonl").write_text(json.dumps({"round": 1, "flags": ["collapse: distinct share 0.02"]}) + "\n")
    render(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| self_consistency | no | 0.12 (9) | 0.05 |" in report and "| multi | yes | 0.93 (9) | 0.60 | 0.97 |" in report
    assert "Krippendorff's alpha 0.40" in report
    assert "- multi: format 0.75 (weight 1.00)" in report
    assert "- round 1: drift monitor: collapse: distinct share 0.02" in report
    assert "No meta-evaluation exists for this run" in report  # no accuracy by level anywhere

import json

import pytest

from selfloop.errors import RunDirError
from selfloop.rundir import MARKER, RunDir


def test_stage_is_written_atomically_with_marker_last(tmp_path):
    rd = RunDir(tmp_path)

    def write(tmp):
        (tmp / "payload.txt").write_text("x")

    final = rd.write_stage(1, "filter", {"kept": 3}, write)
    assert rd.is_complete(1, "filter")
    assert (final / "payload.txt").read_text() == "x"
    assert json.loads((final / MARKER).read_text())["stage"] == "filter"
    assert rd.stage_metrics(1, "filter")["kept"] == 3


def test_a_crash_while_writing_leaves_no_stage(tmp_path):
    rd = RunDir(tmp_path)

    def write(tmp):
        (tmp / "half").write_text("x")
        raise KeyboardInterrupt  # as if killed mid-write

    with pytest.raises(KeyboardInterrupt):
        rd.write_stage(1, "optimize", {}, write)
    assert not rd.is_complete(1, "optimize")
    assert not rd.stage_dir(1, "optimize").exists()
    assert list(rd.round_dir(1).iterdir()) == []


def test_clean_partial_removes_leftovers_but_keeps_complete_stages(tmp_path):
    rd = RunDir(tmp_path)
    rd.write_stage(1, "acquire", {"rows": 1})
    (rd.round_dir(1) / ".filter.partialxyz").mkdir()  # a kill -9 mid-write
    (rd.round_dir(1) / "optimize").mkdir()  # no marker: incomplete
    removed = rd.clean_partial()
    assert len(removed) == 2
    assert rd.is_complete(1, "acquire")
    assert sorted(p.name for p in rd.round_dir(1).iterdir()) == ["acquire"]


def test_records_come_from_complete_promote_stages(tmp_path):
    rd = RunDir(tmp_path)
    rd.write_stage(0, "promote", {"round": 0, "promoted": True})
    rd.write_stage(1, "acquire", {"rows": 1})
    assert [r["round"] for r in rd.write_metrics_jsonl()] == [0]
    assert rd.metrics_jsonl.read_text().count("\n") == 1


def test_resume_validation_names_what_is_wrong(tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        RunDir(tmp_path / "missing").validate_for_resume()
    with pytest.raises(RunDirError, match="no .hydra/config.yaml"):
        RunDir(tmp_path).validate_for_resume()
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(RunDirError, match="no run.json"):
        RunDir(tmp_path).validate_for_resume()
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(RunDirError, match="corrupt"):
        RunDir(tmp_path).validate_for_resume()

"""`selfloop compare` on small synthetic run directories (round records written here; no training)."""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selfloop.compare import MARKER, assign_labels, cmd_compare, compare, load_run, print_tables, tracking
from selfloop.errors import SelfloopError

TASK_OPTIONS = {"reversal": {"max_level": 48, "alphabet": "0123456789"}, "addition": {"max_level": 10}}


def record(round_: int, acc: dict[int, float], precision: float | None = 1.0, kept: int = 100, seconds: float = 60.0,
           tokens: int = 1000, old: bool = False) -> dict:
    """A round record as the loop writes it; ``old``: as an older run wrote it (no frontier,
    funnel or compute)."""
    meta = {"exact_match": {str(k): v for k, v in acc.items()}}
    mastered = [k for k, v in acc.items() if v >= 0.9]
    rec = {
        "round": round_, "level": None if round_ == 0 else 3 + round_, "labels_used": 300 if round_ == 0 else 0,
        "labelled_levels": [1, 2, 3] if round_ == 0 else [], "acquired": kept * 2 if round_ else 300,
        "kept": kept if round_ else 300, "kept_fraction": 0.5, "label_precision_acquired": precision,
        "label_precision_kept": 1.0 if round_ == 0 else precision, "funnel": [], "autonomous": {"self_consistency": 0.9},
        "gate": {}, "promoted": True, "starved": False, "reason": "bootstrap" if round_ == 0 else "no autonomous evaluator got worse",
        "incumbent_round": round_, "next_level": 4 + round_, "meta": meta, "frontier": max(mastered) if mastered else None,
        "candidate_meta": meta, "compute": {"seconds": seconds, "generated_sequences": tokens // 10, "generated_tokens": tokens, "train_steps": 50},
        "warnings": [],
    }
    if old:
        for key in ("frontier", "funnel", "compute", "candidate_meta", "gate"):
            del rec[key]
    return rec


def climbing(top: int, rounds: int = 3, precision: float = 0.9) -> list[dict]:
    """Records whose frontier climbs from 3 by one level a round up to ``top``."""
    out = []
    for r in range(rounds + 1):
        frontier = min(3 + r, top)
        acc = {lvl: (1.0 if lvl <= frontier else 0.3) for lvl in range(1, 9)}
        out.append(record(r, acc, precision=precision))
    return out


def write_run(root: Path, task: str = "reversal", overrides: list[str] | None = None, status: str = "completed",
              records: list[dict] | None = None, config: dict | None = None, **info) -> Path:
    root.mkdir(parents=True)
    seed = next((int(o.split("=")[1]) for o in overrides or [] if o.startswith("seed=")), 0)
    filters = next(([f.strip() for f in o.split("=")[1].strip("[]").split(",")] for o in overrides or [] if o.startswith("filter=")), ["uncertainty", "roundtrip"])
    cfg = config or {"seed": seed, "task": {task: TASK_OPTIONS.get(task, {})}, "filter": {f: {} for f in filters}, "loop": {"rounds": 3}}
    (root / ".hydra").mkdir()
    (root / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))  # order matters: the filter chain
    (root / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides or []))
    (root / "run.json").write_text(json.dumps({"status": status, "seed": seed, **info}))
    if records is not None:
        (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def md_rows(md: str) -> dict[str, list[str]]:
    """Table rows of comparison.md by their first cell (the run label)."""
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| run ") and not line.startswith("| setting "):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells
    return rows


def assert_real_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000, f"{path.name} is suspiciously small"
    pixels = matplotlib.image.imread(path)
    assert pixels[..., :3].std() > 0.05, f"{path.name} is blank"  # lines, text and axes drawn


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A `selfloop run -m filter=[uncertainty],[uncertainty,roundtrip] seed=0,1` sweep:
    the roundtrip runs climb higher; the uncertainty runs' labels are worse."""
    root = tmp_path_factory.mktemp("multirun") / "2026-01-01_00-00-00"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra: {}\n")
    tops = {("[uncertainty]", 0): 4, ("[uncertainty]", 1): 5, ("[uncertainty,roundtrip]", 0): 6, ("[uncertainty,roundtrip]", 1): 6}
    for job, ((filters, seed), top) in enumerate(tops.items()):
        precision = 0.6 if filters == "[uncertainty]" else 0.95
        write_run(root / str(job), overrides=["loop=smoke", f"filter={filters}", f"seed={seed}"], records=climbing(top, precision=precision))
    before = snapshot(root)
    comparison = compare([root])
    return root, comparison, before


def test_sweep_table_csv_json_and_plots(sweep):
    root, comparison, before = sweep
    out = root / "comparison"
    assert comparison.out_dir == out and (out / MARKER).exists()
    md = (out / "comparison.md").read_text()
    rows = md_rows(md)
    # labelled by what differs (filter, seed), not by what all share (loop=smoke)
    row = rows["filter=[uncertainty] seed=1"]
    assert row[1:6] == ["completed", "3", "5", "5", "0.60"]
    assert row[6:11] == ["300", "4.0 min", "400", "4.0k", "200"]  # labels; 4 rounds x 60 s, 100 seqs, 1000 tokens, 50 steps
    assert rows["filter=[uncertainty,roundtrip] seed=0"][3] == "6"
    assert "loop=smoke" not in md
    # seeds of one setting are summarised together
    assert rows["filter=[uncertainty]"][1:5] == ["2 of 2", "4.5 ± 0.7", "4–5", "0.60"]
    assert rows["filter=[uncertainty,roundtrip]"][2] == "6.0 ± 0.0"
    # best accuracy shows the highest labelled level (3) and above
    assert row[11].startswith("3:1.00 4:1.00 5:1.00 6:0.30")

    with open(out / "comparison.csv") as fh:
        table = {r["label"]: r for r in csv.DictReader(fh)}
    assert set(table) == {"filter=[uncertainty] seed=0", "filter=[uncertainty] seed=1", "filter=[uncertainty,roundtrip] seed=0", "filter=[uncertainty,roundtrip] seed=1"}
    assert table["filter=[uncertainty] seed=0"]["final_frontier"] == "4"
    assert float(table["filter=[uncertainty] seed=0"]["seconds"]) == 240.0
    assert table["filter=[uncertainty] seed=0"]["best_accuracy_5"] == "0.3"

    data = json.loads((out / "comparison.json").read_text())
    series = {r["label"]: r["series"] for r in data["runs"]}
    assert series["filter=[uncertainty,roundtrip] seed=1"]["frontier"] == [3.0, 4.0, 5.0, 6.0]
    assert series["filter=[uncertainty,roundtrip] seed=1"]["minutes"] == [1.0, 2.0, 3.0, 4.0]
    assert series["filter=[uncertainty,roundtrip] seed=1"]["tokens"] == [1000, 2000, 3000, 4000]
    assert series["filter=[uncertainty] seed=0"]["precision"][1:] == [0.6, 0.6, 0.6]

    for name in ("frontier.png", "frontier_compute.png", "precision.png"):
        assert_real_png(out / name)
        assert f"({name})" in md
    # nothing of the runs was touched; the output is new files only
    after = snapshot(root)
    assert {k: v for k, v in after.items() if not k.startswith("comparison/")} == before


def test_terminal_table(sweep, capsys, monkeypatch):
    # output to a file or pipe (as here) is never folded to COLUMNS, often 80 off a terminal
    monkeypatch.setenv("COLUMNS", "40")
    print_tables(sweep[1])
    printed = capsys.readouterr().out
    assert "filter=[uncertainty,roundtrip] seed=1" in printed  # brackets are text, not rich markup
    assert "4.5 ± 0.7" in printed and "best accuracy by level" in printed


def test_run_directories_given_one_by_one_write_again_into_a_comparison(tmp_path, sweep):
    root, _, _ = sweep
    # a copy of the sweep's comparison: compare may write there again (its marker)
    out = tmp_path / "cmp"
    out.mkdir()
    for f in (root / "comparison").iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    comparison = compare([root / "0", root / "3"], out)
    assert [r.label for r in comparison.runs] == ["filter=[uncertainty] seed=0", "filter=[uncertainty,roundtrip] seed=1"]
    assert set(md_rows((out / "comparison.md").read_text())) == {"filter=[uncertainty] seed=0", "filter=[uncertainty,roundtrip] seed=1"}


def test_statuses_failed_running_killed_and_no_rounds(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    root = tmp_path / "runs"
    write_run(root / "a", overrides=["seed=0"], records=climbing(6))
    write_run(root / "b", overrides=["seed=1"], status="failed", records=climbing(5, rounds=1), error="RuntimeError: CUDA out of memory")
    live = write_run(root / "c", overrides=["seed=2"], status="running", records=climbing(6, rounds=2))
    dead = write_run(root / "d", overrides=["seed=3"], status="running", records=climbing(6, rounds=1))
    (dead / "run.lock").touch()  # left by a process that was killed: nobody holds it
    write_run(root / "e", overrides=["seed=4"], status="interrupted")  # no round finished
    with open(live / "run.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the loop holds it while running
        assert cmd_compare([str(root / x) for x in "abcde"]) == 0
    printed = capsys.readouterr().out
    md = (root / "comparison" / "comparison.md").read_text()
    rows = md_rows(md)
    assert rows["seed=0"][1:4] == ["completed", "3", "6"]
    assert rows["seed=1"][1:4] == ["failed", "1", "4"]
    assert rows["seed=2"][1:4] == ["running", "2", "5"]
    if Path("/proc/locks").exists():
        assert rows["seed=3"][1] == "killed?"
        assert "no process holds its run.lock" in md
    assert rows["seed=4"][1:4] == ["interrupted", "none finished", "–"]
    assert "error: RuntimeError: CUDA out of memory" in md
    assert "seed=4" in printed and "none finished" in printed and "wrote" in printed
    assert_real_png(root / "comparison" / "frontier.png")


def test_old_records_and_records_from_promote_stages(tmp_path):
    """Records without frontier/funnel/compute: the frontier comes from meta, compute is
    unknown. A run whose metrics.jsonl is missing is read from its promote stages."""
    old = write_run(tmp_path / "old", overrides=["seed=0"], records=[record(r, {1: 1.0, 2: 1.0, 3: 0.95, 4: 0.5 + 0.25 * r}, old=True) for r in range(3)])
    promote_only = write_run(tmp_path / "promote_only", overrides=["seed=1"])
    for rec in climbing(5, rounds=1):
        stage = promote_only / f"round-{rec['round']:03d}" / "promote"
        stage.mkdir(parents=True)
        (stage / "metrics.json").write_text(json.dumps(rec))
        (stage / "COMPLETE").write_text("{}")
    comparison = compare([old, promote_only], tmp_path / "out")
    rows = md_rows((tmp_path / "out" / "comparison.md").read_text())
    assert rows["seed=0"][3] == "4"  # round 2: level 4 at 0.9
    assert rows["seed=0"][7] == "–" and rows["seed=0"][9] == "–"  # wall time, generated tokens unknown
    assert rows["seed=1"][2:4] == ["1", "4"]
    assert not comparison.skipped
    assert_real_png(tmp_path / "out" / "frontier_compute.png")


def test_different_tasks_are_compared_within_their_task(tmp_path):
    write_run(tmp_path / "r0", "reversal", ["task=reversal", "seed=0"], records=climbing(6))
    write_run(tmp_path / "r1", "reversal", ["task=reversal", "seed=1"], records=climbing(5))
    write_run(tmp_path / "d0", "dataset", ["task=dataset", "task.dataset.path=a.jsonl"], records=climbing(4),
              config={"task": {"dataset": {"path": "a.jsonl"}}})
    write_run(tmp_path / "d1", "dataset", ["task=dataset", "task.dataset.path=b.jsonl"], records=climbing(4),
              config={"task": {"dataset": {"path": "b.jsonl"}}})
    comparison = compare([tmp_path / n for n in ("r0", "d0", "r1", "d1")], tmp_path / "out")
    assert [(g.title, len(g.runs)) for g in comparison.groups] == [("reversal", 2), ("dataset (path=a.jsonl)", 1), ("dataset (path=b.jsonl)", 1)]
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "These runs are of different tasks" in md
    assert "## reversal" in md and "## dataset (path=b.jsonl)" in md and "mean different things on different tasks" in md
    assert md_rows(md)["task=reversal seed=1"][3] == "5"
    assert md_rows(md)["task=dataset task.dataset.path=b.jsonl"][1] == "completed"
    assert_real_png(tmp_path / "out" / "frontier.png")


def test_corrupt_line_skips_that_run_and_names_file_and_line(tmp_path, capsys):
    good = write_run(tmp_path / "good", overrides=["seed=0"], records=climbing(5))
    bad = write_run(tmp_path / "bad", overrides=["seed=1"], records=climbing(5))
    lines = (bad / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:40]  # a truncated line
    (bad / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert cmd_compare([str(good), str(bad)], str(tmp_path / "out")) == 0
    assert f"{bad / 'metrics.jsonl'}:2 is corrupt" in capsys.readouterr().out
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert f"skipped {bad}: {bad / 'metrics.jsonl'}:2 is corrupt" in md
    assert "seed=0" in md_rows(md) and "seed=1" not in md_rows(md)
    with open(tmp_path / "out" / "comparison.csv") as fh:
        assert {r["label"]: r["problem"] for r in csv.DictReader(fh)}["seed=1"].startswith(f"{bad / 'metrics.jsonl'}:2 is corrupt")
    # a line that is JSON but no round record
    (good / "metrics.jsonl").write_text('{"round": 0}\n[1, 2]\n')
    with pytest.raises(SelfloopError, match=r"metrics.jsonl:2 is not a round record.*metrics.jsonl:2 is corrupt"):
        compare([good, bad], tmp_path / "out2")
    assert not (tmp_path / "out2").exists()  # every run skipped: an error, nothing written


def test_no_runs_and_missing_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SelfloopError, match="no selfloop runs in .*empty: expected run directories"):
        compare([tmp_path / "empty"])
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "0").mkdir()  # a job directory Hydra made, with nothing in it
    with pytest.raises(SelfloopError, match="it has multirun.yaml"):
        compare([sweep])
    with pytest.raises(SelfloopError, match="does not exist"):
        compare([tmp_path / "nope"])
    with pytest.raises(SelfloopError, match="no runs given"):
        compare([])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "sweep"]  # nothing written


def test_never_writes_over_other_files(tmp_path):
    run = write_run(tmp_path / "runs" / "a", overrides=["seed=0"], records=climbing(5))
    before = snapshot(run)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "comparison.md").write_text("my notes")
    with pytest.raises(SelfloopError, match="is not a comparison written by selfloop compare"):
        compare([run], foreign)
    assert (foreign / "comparison.md").read_text() == "my notes" and len(list(foreign.iterdir())) == 1
    with pytest.raises(SelfloopError, match="inside the run directory"):
        compare([run], run / "comparison")
    with pytest.raises(SelfloopError, match="inside the run directory"):
        compare([run], run)
    assert snapshot(run) == before
    comparison = compare([run])  # default: next to the run, never in it
    assert comparison.out_dir == tmp_path / "runs" / "comparison"
    assert snapshot(run) == before


def labels(*paths: Path) -> list[str]:
    runs = [load_run(p) for p in paths]
    assign_labels(runs)
    return [r.label for r in runs]


def test_labels_fall_back_to_config_differences_then_directory_names(tmp_path):
    a = write_run(tmp_path / "a", overrides=[], records=climbing(5), config={"seed": 0, "task": {"reversal": {}}, "loop": {"rounds": 3}})
    b = write_run(tmp_path / "b", overrides=[], records=climbing(5), config={"seed": 0, "task": {"reversal": {}}, "loop": {"rounds": 5}})
    assert labels(a, b) == ["loop.rounds=3", "loop.rounds=5"]
    c = write_run(tmp_path / "c", overrides=["seed=0"], records=climbing(5))
    d = write_run(tmp_path / "d", overrides=["seed=0"], records=climbing(5))
    assert labels(c, d) == ["c", "d"]
    # an explicit override and the same value by default are the same setting
    e = write_run(tmp_path / "e", overrides=["seed=0", "loop.rounds=3"], records=climbing(5))
    f = write_run(tmp_path / "f", overrides=["seed=1"], records=climbing(5))
    assert labels(e, f) == ["seed=0", "seed=1"]
    # a setting one run leaves at its default is not named; filter chains keep their order
    g = write_run(tmp_path / "g", overrides=["filter=[uncertainty, roundtrip]", "+loop=smoke"], records=climbing(5))
    h = write_run(tmp_path / "h", overrides=["filter=[roundtrip,uncertainty]"], records=climbing(5))
    assert labels(g, h) == ["filter=[uncertainty,roundtrip] loop=smoke", "filter=[roundtrip,uncertainty]"]
    # the same settings twice: told apart by directory
    assert labels(c, d, f) == ["seed=0 [c]", "seed=0 [d]", "seed=1"]
    # an empty chain is saved as `filter: null`; it reads as written
    i = write_run(tmp_path / "i", overrides=["filter=[]"], records=climbing(5), config={"seed": 0, "task": {"reversal": {}}, "filter": None})
    assert labels(i, h) == ["filter=[]", "filter=[roundtrip,uncertainty]"]


def test_compare_imports_no_torch(sweep, tmp_path):
    root, _, _ = sweep
    code = (
        "import sys; from selfloop.compare import cmd_compare; "
        f"assert cmd_compare([{str(root)!r}], {str(tmp_path / 'out')!r}) == 0; "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'datasets', 'trl', 'accelerate', 'sklearn'}); "
        "print('HEAVY', heavy)"
    )
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    assert (tmp_path / "out" / "frontier.png").exists()


def test_tracking_ranks_each_gate_evaluator_against_the_candidates_ground_truth(tmp_path):
    """`agree` rises with the truth, `flatter` falls as it rises: pooled Spearman +1 and -1,
    over every candidate (the rejected one too), on the levels the gate weighed only."""
    runs = []
    for seed, truths in ((0, [0.2, 0.5, 0.7, 0.4]), (1, [0.1, 0.6, 0.3, 0.8])):
        recs = climbing(8, rounds=len(truths))
        for rec, truth in zip(recs[1:], truths):
            # the gate weighs levels <= rec["level"]; a level above it must not count
            rec["candidate_meta"] = {"exact_match": {str(lvl): truth for lvl in range(1, rec["level"] + 1)} | {str(lvl): 1 - truth for lvl in range(rec["level"] + 1, rec["level"] + 11)}}
            rec["gate"] = {"agree": {"candidate": truth + 0.01, "incumbent": 0.5}, "flatter": {"candidate": 1 - truth, "incumbent": 0.5}}
        recs[2]["promoted"] = False  # a rejected candidate is ranked like any other
        recs[3]["starved"], recs[3]["gate"] = True, {}  # a starved round has no candidate: skipped
        runs.append(write_run(tmp_path / "sweep" / str(seed), overrides=[f"seed={seed}"], records=recs))
    comparison = compare([tmp_path / "sweep"])
    (group,) = comparison.groups
    by_name = {t["evaluator"]: t for t in tracking(group)}
    assert by_name["agree"]["candidates"] == 6 and by_name["agree"]["runs"] == 2
    assert by_name["agree"]["spearman"] == pytest.approx(1.0)
    assert by_name["flatter"]["spearman"] == pytest.approx(-1.0)
    assert by_name["agree"]["by_run"] == {"seed=0": None, "seed=1": None}  # 3 candidates each: too few for a rho
    md = (comparison.out_dir / "comparison.md").read_text()
    assert "Does the label-free gate track the truth?" in md
    rows = md_rows(md)
    assert rows["agree"][1:4] == ["6", "2", "1.00"] and rows["flatter"][3] == "-1.00"
    saved = json.loads((comparison.out_dir / "comparison.json").read_text())
    assert saved["groups"][0]["tracking"][0]["spearman"] == pytest.approx(1.0)

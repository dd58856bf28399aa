"""Guards: the drift/collapse observer (the budget guard and the row-error ledger are core's,
tested in test_loop/test_hardening)."""

import json

import pytest
import torch

from selfloop.errors import SelfloopError
from selfloop.testing import ObserverContract, in_process_plugin
from selfloop_plugins.observe.drift import FILENAME, DriftMonitor, DriftSettings, diversity, ngram_entropy


def constant_model(handle, char):
    """A real tiny model that emits ``char`` forever, whatever the prompt."""
    m = handle.clone()
    tok = m.tokenizer.convert_tokens_to_ids(char)
    with torch.no_grad():
        wte = m.model.transformer.wte.weight
        wte[tok] *= 100
        m.model.transformer.ln_f.weight.zero_()
        m.model.transformer.ln_f.bias.copy_(wte[tok])
    return m


def entries(run_dir):
    path = run_dir / FILENAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class TestDriftObserver(ObserverContract):
    """Every round reaches drift.jsonl exactly once across a kill and a resume."""

    @pytest.fixture
    def observer(self, monkeypatch):
        monkeypatch.setenv("SELFLOOP_DISABLE_PLUGINS", "drift")  # the installed instance; this one is under test
        return DriftMonitor()

    def rounds_seen(self, run_dir):
        return [e["round"] for e in entries(run_dir) if e.get("round_end")]


def test_diversity_measures():
    assert ngram_entropy(["7777", "7777"], 2) == 0.0
    assert ngram_entropy(["0123", "4567"], 2) == pytest.approx(2.585, abs=1e-3)  # six distinct bigrams
    assert diversity(["12", "12", "34", "56"], 2) == {"rows": 4, "distinct_share": 0.75, "ngram_entropy": pytest.approx(1.5)}


def test_settings_come_from_the_environment_and_are_checked():
    assert DriftSettings.from_env({"SELFLOOP_DRIFT_STOP": "any", "SELFLOOP_DRIFT_NGRAM": "3"}) == DriftSettings(stop="any", ngram=3)
    with pytest.raises(SelfloopError, match=r"bad environment variable SELFLOOP_DRIFT_STOP='sometimes': accepted: never, collapse, any"):
        DriftSettings.from_env({"SELFLOOP_DRIFT_STOP": "sometimes"})
    with pytest.raises(SelfloopError, match=r"SELFLOOP_DRIFT_MIN_DISTINCT_RATIO='lots': accepted: a number"):
        DriftSettings.from_env({"SELFLOOP_DRIFT_MIN_DISTINCT_RATIO": "lots"})


def test_drift_flags_a_run_whose_outputs_collapse_and_stops_it(tmp_path, trained_model, monkeypatch):
    from selfloop.config import compose
    from selfloop.loop import Loop
    from selfloop.plugins import load_plugins
    from selfloop.rundir import RunDir

    monkeypatch.delenv("SELFLOOP_DRIFT_STOP", raising=False)

    class Collapsing:
        name = "collapsing"

        def __init__(self, config=None):
            pass

        def optimize(self, ctx, data):  # round 0: a model that reverses; round 1: one that answers "7777..." to everything
            return trained_model.clone() if ctx.round == 0 else constant_model(ctx.model, "7") if ctx.round == 1 else ctx.model.clone()

    plugins = load_plugins(extra={"collapsing": in_process_plugin(Collapsing, kind="optimize", name="collapsing")}, strict=True)
    cfg = compose(["loop=smoke", "loop.rounds=3", "optimize=collapsing", "filter=[uncertainty]", "filter.uncertainty.min_agreement=0",
                   "filter.uncertainty.require_well_formed=false", "acquire.task_sampler.n_problems=24", "evaluate=[self_consistency]",
                   "evaluate.self_consistency.n_per_level=4"], plugins.registry)
    rd = RunDir(tmp_path / "run")
    assert Loop(cfg, rd, plugins, echo=lambda s: None).execute() == "stopped"
    info = json.loads((rd.root / "run.json").read_text())
    assert info["stop_reason"].startswith("drift guard: collapse:")
    found = {e["round"]: e for e in entries(rd.root)}
    # stopped right after round 2's acquire stage flagged the collapse: nothing trained on it
    assert sorted(found) == [0, 1, 2] and rd.is_complete(2, "acquire") and not rd.stage_dir(2, "optimize").exists()
    assert not any(f.startswith("collapse") for f in found[1]["flags"])
    assert found[1]["acquired"]["distinct_share"] > 0.8  # the bootstrap model's answers: the baseline
    assert found[2]["acquired"]["distinct_share"] < 0.2 and found[2]["acquired"]["ngram_entropy"] == 0.0
    assert any(f.startswith("collapse") for f in found[2]["flags"])
    # the collapsed candidate also forgot the bootstrap data
    assert any(f.startswith("drift: round 1's candidate") for f in found[1]["flags"])
    assert found[1]["bootstrap_loss"] > found[0]["bootstrap_loss"] + 1.0
    assert found[1]["acquired"]["difficulties"] == {"4": 24} and found[2]["acquired"]["difficulties"] == {"4": 24, "5": 24}

    # replayed events (a resume after a kill) rewrite the same entries, never add lines
    before = (rd.root / FILENAME).read_text()
    monitor, ctx = DriftMonitor(), Loop(cfg, rd, plugins, echo=lambda s: None).ctx
    for r in (1, 2):
        ctx.round = r
        for stage in ("acquire", "optimize", "promote"):
            if not rd.is_complete(r, stage):
                continue
            if stage == "promote":
                monitor.selfloop_on_round_end(ctx, rd.stage_metrics(r, "promote"))
            else:
                monitor.selfloop_on_stage_end(ctx, stage, rd.stage_metrics(r, stage))
    assert (rd.root / FILENAME).read_text() == before

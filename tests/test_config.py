from pathlib import Path

import pytest
from omegaconf import OmegaConf

from selfloop.config import compose, instantiate, selected, strategy_config, validate_run_config
from selfloop.errors import OptionError, SelfloopError, UnknownStrategyError
from selfloop.loop import Loop
from selfloop.rundir import RunDir


def test_default_config_composes_every_stage(plugins):
    cfg = compose([], plugins.registry)
    assert selected(cfg, "task") == ["reversal"]
    assert selected(cfg, "filter") == ["uncertainty", "roundtrip"]
    assert selected(cfg, "evaluate") == ["self_consistency", "exact_match"]
    assert cfg.loop.curriculum.advance == "paced"


def test_strategy_options_are_typed_hydra_options(plugins):
    cfg = compose(["filter=[uncertainty]", "filter.uncertainty.min_agreement=0.8"], plugins.registry)
    (flt,) = instantiate(plugins.registry, cfg, "filter")
    assert flt.config.min_agreement == 0.8


def one_line_error(plugins, overrides: list[str]) -> str:
    """The message `selfloop run OVERRIDES` would print: composition and validation errors."""
    from selfloop.loop import prepare

    with pytest.raises(SelfloopError) as err:
        prepare(compose(overrides, plugins.registry), plugins.registry, RunDir("never-written"))
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("filter.uncertainty.min_agreement=abc", "bad option filter.uncertainty.min_agreement='abc': Value 'abc' of type 'str' could not be converted to Float"),
        ("loop.rounds=many", "bad option loop.rounds='many'"),
        ("loop.curriculum.advance=sometimes", "bad option loop.curriculum.advance='sometimes': Invalid value 'sometimes', expected one of [paced, always, fixed]"),
        ("loop=nope", "unknown loop 'nope'; available: addition, addition_ensemble, dataset_smoke, default, smoke, word_problems"),
    ],
)
def test_wrong_types_and_unknown_presets_fail_in_one_line(plugins, override, expected):
    assert expected in one_line_error(plugins, [override])


@pytest.mark.parametrize("plus", ["", "+"])
def test_a_misspelt_option_fails_whatever_the_plus_prefix(plugins, plus):
    # `+filter.uncertainty.min_agreemnt=0.3` used to be accepted: the run used the default
    message = one_line_error(plugins, [f"{plus}filter.uncertainty.min_agreemnt=0.3"])
    assert message.startswith("unknown option filter.uncertainty.min_agreemnt; valid options of filter.uncertainty: ")
    assert message.endswith("(did you mean filter.uncertainty.min_agreement?)") and "require_well_formed" in message
    assert "did you mean loop.rounds?" in one_line_error(plugins, [f"{plus}loop.roundz=3"])


def test_an_option_of_an_unselected_strategy_fails_naming_the_selection(plugins):
    message = one_line_error(plugins, ["filter=[uncertainty]", "+filter.roundtrip.batch_size=10"])
    assert message.startswith("'roundtrip' is not in filter=[uncertainty], so '+filter.roundtrip.batch_size=10' would be ignored; selected: uncertainty")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("filter.uncertainty.min_agreement=1.5", "bad option filter.uncertainty.min_agreement=1.5: accepted: a number in [0, 1]"),
        ("loop.rounds=-1", "bad option loop.rounds=-1: accepted: an integer >= 0"),
        ("optimize.sft.learning_rate=0", "bad option optimize.sft.learning_rate=0.0: accepted: a number > 0"),
        ("loop.bootstrap.optimize.sft.batch_size=0", "bad option optimize.sft.batch_size=0: accepted: an integer >= 1"),
        ("refine.self_consistency.temperature=0", "bad option refine.self_consistency.temperature=0.0: accepted: a number > 0"),
        ("device=tpu", "bad option device='tpu': accepted: auto, cpu, cuda, cuda:N or mps"),
        ("task=addition", "filter 'roundtrip' cannot check task 'addition'"),
    ],
)
def test_out_of_range_values_fail_at_composition_naming_option_value_and_what_is_accepted(plugins, override, expected):
    assert expected in one_line_error(plugins, [override])


def test_a_strategy_can_refuse_a_run_it_cannot_serve_in_setup(plugins):
    from selfloop.testing import plugins_with

    class NeedsLevels:
        name = "needs_levels"

        def __init__(self, config=None):
            pass

        def setup(self, ctx):
            if len(ctx.task.levels) < 100:
                raise OptionError("min_levels", len(ctx.task.levels), "a task with 100 levels")

        def filter(self, ctx, data):
            return data

    extended = plugins_with(NeedsLevels)
    message = one_line_error(extended, ["filter=[needs_levels]"])
    assert message == "bad option filter.needs_levels.min_levels=48: accepted: a task with 100 levels"


def test_task_levels_drive_the_loop_levels_and_foreign_levels_are_clipped_with_a_warning(plugins):
    from selfloop.loop import prepare

    ctx = prepare(compose(["task=addition", "filter=[uncertainty]"], plugins.registry), plugins.registry, RunDir("x"))
    assert ctx.run.loop.bootstrap.levels == [1, 2] and ctx.run.loop.curriculum.start_level == 3
    ctx.level = 3
    assert ctx.eval_levels == [1, 2, 3, 4, 5, 6, 7]  # auto: up to the curriculum level + 4
    ctx = prepare(compose(["task=addition", "filter=[uncertainty]", "loop.eval_levels=[1,9,11,12]"], plugins.registry), plugins.registry, RunDir("x"))
    assert ctx.eval_levels == [1, 9]  # addition has 10 levels: evaluation never asks for 11 or 12
    assert ctx.setup_warnings == ["loop.eval_levels: task 'addition' has no level(s) [11, 12] (its levels: 1..10); using [1, 9]"]
    assert "levels of task 'addition' (1..10)" in one_line_error(plugins, ["task=addition", "filter=[uncertainty]", "loop.eval_levels=[11]"])


def test_reloaded_config_is_validated_again(plugins, tmp_path):
    cfg = OmegaConf.create(OmegaConf.to_yaml(compose([], plugins.registry)))  # as resume reads it
    cfg.loop.rounds = "three"
    with pytest.raises(SelfloopError, match="rounds"):
        validate_run_config(cfg)
    cfg = OmegaConf.create(OmegaConf.to_yaml(compose([], plugins.registry)))
    cfg.filter.uncertainty.min_agreement = "high"
    with pytest.raises(SelfloopError, match=r"filter.uncertainty.min_agreement='high'"):
        instantiate(plugins.registry, cfg, "filter")


def test_config_naming_an_uninstalled_strategy_fails_with_the_list(plugins, tmp_path):
    cfg = OmegaConf.create(OmegaConf.to_yaml(compose([], plugins.registry)))
    cfg.filter = {"semantic_dedup": {}}
    installed = ", ".join(plugins.registry.names("filter"))
    assert "roundtrip, uncertainty" in installed
    with pytest.raises(UnknownStrategyError, match=rf"unknown filter 'semantic_dedup'; installed: {installed}$"):
        Loop(cfg, RunDir(tmp_path), plugins)


def test_single_choice_kinds_need_exactly_one(plugins):
    cfg = OmegaConf.create({"optimize": {"sft": {}, "other": {}}})
    with pytest.raises(SelfloopError, match="exactly one optimize"):
        selected(cfg, "optimize")


def test_preset_options_for_unselected_strategies_are_dropped(plugins):
    cfg = compose(["loop=smoke", "model=pretrained", "model.pretrained.name_or_path=x", "evaluate=[exact_match]"], plugins.registry)
    assert selected(cfg, "model") == ["pretrained"]  # smoke's model.tiny sizes do not select tiny
    assert selected(cfg, "evaluate") == ["exact_match"]  # nor re-add an evaluator
    assert cfg.evaluate.exact_match.n_per_level == 32  # the selected one keeps the preset's size


def test_bootstrap_overrides_are_validated_too(plugins):
    with pytest.raises(SelfloopError, match=r"optimize.sft.max_stepz"):
        strategy_config(plugins.registry, "optimize", "sft", {}, {"max_stepz": 3})


def test_a_plugin_preset_composes_from_its_installed_package(plugins, fake_presets):
    cfg = compose(["loop=tight"], plugins.registry)
    assert list(cfg.filter) == ["uncertainty"] and cfg.filter.uncertainty.min_agreement == 0.5
    assert cfg.loop.rounds == 1 and cfg.loop.bootstrap.n_problems == 2000  # on top of the built-in smoke preset
    assert list(compose([], plugins.registry).filter) == ["uncertainty", "roundtrip"]  # the default is untouched


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "loop").glob("*.yaml")))
def test_every_shipped_preset_composes_and_passes_set_up(plugins, preset):
    from selfloop.loop import prepare

    extra = []
    if preset == "addition_ensemble":  # the peers are given at launch: without them, a clear error
        with pytest.raises(SelfloopError, match=r"refine.ensemble.min_members=3: .*list more members, e.g. members=\[incumbent,peer:RUN_DIR"):
            prepare(compose([f"loop={preset}"], plugins.registry), plugins.registry, RunDir("x"))
        extra = ["refine.ensemble.members=[incumbent,peer:runs/a,peer:runs/b]"]
    ctx = prepare(compose([f"loop={preset}", *extra], plugins.registry), plugins.registry, RunDir("x"))
    assert ctx.run.loop.rounds >= 1 and ctx.strategies["model"]
    if preset == "addition_ensemble":  # the addition preset, labelled by the seeds' vote
        assert [r.name for r in ctx.strategies["refine"]] == ["ensemble"] and ctx.run.loop.bootstrap.levels == [1, 2, 3, 4, 5]
    if preset == "addition":  # the digits are aligned by Abacus embeddings (docs/study.md, section 1)
        assert ctx.strategies["model"][0].config.positional == "abacus" and ctx.run.loop.bootstrap.levels == [1, 2, 3, 4, 5]
        assert ctx.run.loop.curriculum.min_kept_fraction == 0.9  # the pace measured in docs/study.md

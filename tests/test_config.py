import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from selfloop.config import compose, instantiate, selected, strategy_config, validate_run_config
from selfloop.errors import SelfloopError, UnknownStrategyError
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


def test_wrong_type_in_override_names_the_key(plugins):
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose(["filter.uncertainty.min_agreement=abc"], plugins.registry)
    assert "min_agreement" in str(err.value) or "min_agreement" in str(err.value.__cause__)


@pytest.mark.parametrize("override", ["filter=[uncertainty,nope]", "filter=nope", "task=nope"])
def test_unknown_strategy_lists_installed_ones(plugins, override):
    kind = override.split("=")[0]
    with pytest.raises(UnknownStrategyError, match=rf"unknown {kind} 'nope'.*installed: .*(uncertainty|reversal)"):
        compose([override], plugins.registry)


def test_hydra_itself_lists_options_for_unregistered_groups(plugins):
    with pytest.raises(ConfigCompositionException, match="Available options in 'loop'"):
        compose(["loop=nope"], plugins.registry)


def test_loop_options_are_typed(plugins):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose(["loop.rounds=many"], plugins.registry)
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose(["loop.curriculum.advance=sometimes"], plugins.registry)


def test_reloaded_config_is_validated_again(plugins, tmp_path):
    cfg = OmegaConf.create(OmegaConf.to_yaml(compose([], plugins.registry)))  # as resume reads it
    cfg.loop.rounds = "three"
    with pytest.raises(SelfloopError, match="rounds"):
        validate_run_config(cfg)
    cfg = OmegaConf.create(OmegaConf.to_yaml(compose([], plugins.registry)))
    cfg.filter.uncertainty.min_agreement = "high"
    with pytest.raises(SelfloopError, match=r"filter 'uncertainty'.*min_agreement"):
        instantiate(plugins.registry, cfg, "filter")


def test_config_naming_an_uninstalled_strategy_fails_with_the_list(plugins, tmp_path):
    cfg = OmegaConf.create(OmegaConf.to_yaml(compose([], plugins.registry)))
    cfg.filter = {"semantic_dedup": {}}
    with pytest.raises(UnknownStrategyError, match=r"unknown filter 'semantic_dedup'; installed: roundtrip, uncertainty"):
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

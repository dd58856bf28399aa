"""Quick loops with stand-in strategies, shared by the loop and hardening tests."""

from selfloop.config import compose
from selfloop.loop import Loop
from selfloop.plugins import load_plugins
from selfloop.rundir import RunDir

FAST = [
    "loop.rounds=1",
    "loop.bootstrap.n_problems=300",
    "loop.bootstrap.optimize.sft.max_steps=10",
    "acquire.task_sampler.n_problems=20",
    "evaluate.exact_match.n_per_level=8",
    "evaluate.self_consistency.n_per_level=4",
]
# filters that keep every row, so that round 1 is not starved
KEEP_ALL = ["filter=[uncertainty]", "filter.uncertainty.min_agreement=0", "filter.uncertainty.require_well_formed=false"]
# sft's own option, given only when sft is the optimizer (options of unselected strategies fail)
FAST_SFT = ["optimize.sft.max_steps=5"]


def run_with(tmp_path, extra_plugins, overrides):
    plugins = load_plugins(extra=extra_plugins, strict=True)
    sft = not any(o.startswith("optimize=") for o in overrides)
    cfg = compose(["loop=smoke", *FAST, *(FAST_SFT if sft else []), *overrides], plugins.registry)
    rd = RunDir(tmp_path / "run")
    return Loop(cfg, rd, plugins, echo=lambda s: None), rd

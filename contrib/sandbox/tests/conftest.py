"""Shared fixtures. selfloop's own pytest plugin (selfloop.testing, loaded through pytest11)
gives the Hydra-restoring and context fixtures; this adds one smoke loop shared by the tests
that need a trained model or a finished round."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread: these models are tiny, and on a busy 2-core machine two spinning OpenMP
# threads made the bootstrap 15x slower (143 s against 9 s, measured), while the sandbox's
# workers want the cores too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Bootstrap on numbers below 1000, then one round at level 4 (below 10,000): about a tenth of
# its targets are below 1000, so the bootstrapped model answers some right and most wrong,
# which is what a filter needs to show it can tell them apart.
SMOKE = [
    "task=make_number",
    "filter=[uncertainty,code_exec]",
    "evaluate=[code_exec,exact_match]",
    "loop.bootstrap.levels=[1,2,3]",
    "loop.bootstrap.n_problems=1500",
    "loop.bootstrap.optimize.sft.max_steps=300",
    "loop.curriculum.start_level=4",
    "loop.eval_levels=[1,2,3,4]",
    "acquire.task_sampler.n_problems=120",
    "optimize.sft.max_steps=20",
    "evaluate.code_exec.n_per_level=24",
    "evaluate.exact_match.n_per_level=24",
]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """A finished smoke loop (bootstrap + 1 round) with the package's strategies."""
    from selfloop.testing.helpers import restored_hydra, smoke_loop

    with restored_hydra():
        return smoke_loop(tmp_path_factory.mktemp("smoke") / "run", SMOKE, rounds=1)

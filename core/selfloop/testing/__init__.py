"""Tools for plugin authors: pytest fixtures and per-stage contract suites.

The fixtures (``selfloop_register``, ``selfloop_compose``, ``selfloop_ctx``,
``selfloop_smoke_loop``, ``selfloop_hydra``) load automatically in any environment where
selfloop is installed (the ``pytest11`` entry point). The contract suites are classes to
subclass in a test module::

    from selfloop.testing import FilterContract

    class TestMyFilter(FilterContract):
        @pytest.fixture
        def strategy(self):
            return MyFilter(MyFilter.Config(threshold=0.5))

Every test of the suite then runs against ``MyFilter``; a strategy that breaks its stage's
contract fails with a message that says which part. The functions behind the fixtures are
exported too, e.g. to share one smoke loop across a module::

    @pytest.fixture(scope="module")
    def run(tmp_path_factory):
        with restored_hydra():
            return smoke_loop(tmp_path_factory.mktemp("run"), ["filter=[uncertainty,my_filter]"])
"""

import pytest

pytest.register_assert_rewrite("selfloop.testing.contracts")

from selfloop.testing.contracts import (  # noqa: E402
    AcquirerContract,
    EvaluatorContract,
    FilterContract,
    ModelProviderContract,
    ObserverContract,
    OptimizerContract,
    RefinerContract,
    StrategyContract,
    TaskContract,
)
from selfloop.testing.helpers import (  # noqa: E402
    SmokeRun,
    build_ctx,
    compose,
    in_process_plugin,
    infer_kind,
    plugins_with,
    restored_hydra,
    smoke_loop,
)

__all__ = [
    "AcquirerContract",
    "EvaluatorContract",
    "FilterContract",
    "ModelProviderContract",
    "ObserverContract",
    "OptimizerContract",
    "RefinerContract",
    "SmokeRun",
    "StrategyContract",
    "TaskContract",
    "build_ctx",
    "compose",
    "in_process_plugin",
    "infer_kind",
    "plugins_with",
    "restored_hydra",
    "smoke_loop",
]

"""selfloop-sandbox: execution feedback for selfloop.

Registers the task ``make_number`` (answers are arithmetic programs), the filter
``code_exec`` and the evaluator ``code_exec`` (run each answer's program in the sandbox of
:mod:`selfloop_sandbox.sandbox`). Import-light: standard library and selfloop's strategy
bases only, so ``selfloop plugins`` stays fast.
"""

from selfloop_sandbox.code_exec import selfloop_register_evaluators, selfloop_register_filters
from selfloop_sandbox.sandbox import Result, Sandbox, SandboxConfig, SandboxError
from selfloop_sandbox.task import selfloop_register_tasks

__version__ = "0.1.0"
__all__ = [
    "Result",
    "Sandbox",
    "SandboxConfig",
    "SandboxError",
    "selfloop_register_evaluators",
    "selfloop_register_filters",
    "selfloop_register_tasks",
]

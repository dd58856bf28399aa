"""Errors that the CLI reports as one clear line (no traceback)."""


class SelfloopError(Exception):
    """Base class: a problem with the user's input, a plugin or a run directory."""


class PluginError(SelfloopError):
    """A plugin failed to import, raised in a hook, or registered something invalid."""


class UnknownStrategyError(SelfloopError):
    """A configuration names a strategy that no installed plugin registered."""


class ContractError(SelfloopError):
    """A strategy returned the wrong type or broke its stage's data contract."""


class RunDirError(SelfloopError):
    """A run directory is missing, incomplete or corrupt."""

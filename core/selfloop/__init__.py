"""selfloop: closed-loop self-improvement for language models.

The package root stays import-light (no torch, no datasets) so that the CLI and plugin
discovery start fast; heavy modules are imported where a run needs them.
"""

from selfloop.hookspecs import hookimpl

__version__ = "0.2.0"
__all__ = ["hookimpl", "__version__"]

"""The built-in selfloop plugins, one module per strategy, grouped by stage.

They register through the `selfloop` entry points in pyproject.toml, exactly as a
third-party package would. Module level stays import-light: torch, transformers and
datasets are imported inside the methods that need them.
"""

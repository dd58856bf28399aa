"""Preset configs from installed plugins: the ``selfloop.presets`` entry-point group.

``[project.entry-points."selfloop.presets"] NAME = "package.with.yaml"`` adds that package
to Hydra's search path (through ``hydra_plugins.selfloop_presets``). Reading the entry
points and listing the YAML files imports nothing from the plugin.
"""

from __future__ import annotations

from importlib import resources
from importlib.metadata import entry_points

GROUP = "selfloop.presets"


def preset_packages() -> list[tuple[str, str]]:
    """(entry-point name, package) pairs, sorted by name for a stable search order."""
    return sorted((ep.name, ep.value) for ep in entry_points(group=GROUP))


def installed_presets() -> list[dict]:
    """Each preset package with its distribution, version and presets (``selfloop plugins``)."""
    return [
        {
            "name": ep.name,
            "package": ep.value,
            "distribution": ep.dist.metadata["Name"] if ep.dist else None,
            "version": ep.dist.version if ep.dist else None,
            "presets": list_presets(ep.value),
        }
        for ep in sorted(entry_points(group=GROUP), key=lambda ep: ep.name)
    ]


def list_presets(package: str) -> list[str]:
    """The ``group/option`` names a preset package provides (``[]`` if it cannot be read)."""
    try:
        root = resources.files(package)
    except (ModuleNotFoundError, TypeError):
        return []
    found = []
    for group in root.iterdir():
        if group.is_dir() and not group.name.startswith(("_", ".")):
            found += [f"{group.name}/{f.name[:-5]}" for f in group.iterdir() if f.name.endswith(".yaml")]
    return sorted(found)


def search_path() -> list[str]:
    """``hydra.searchpath`` entries for every installed preset package (after selfloop's own)."""
    return [f"pkg://{package}" for _, package in preset_packages()]


def register_resolver() -> None:
    """``${selfloop_presets:}`` in conf/config.yaml: Hydra reads it before composing."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("selfloop_presets"):
        OmegaConf.register_new_resolver("selfloop_presets", search_path)

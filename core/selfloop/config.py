"""The Hydra bridge: typed run configuration and every registered strategy as a Hydra option.

Each strategy's ``Config`` dataclass is stored in Hydra's ConfigStore under its kind's
group with package ``<kind>.<name>``, so ``filter=[uncertainty]`` selects it and
``filter.uncertainty.min_agreement=0.8`` sets an option, type-checked, with no YAML.
Import-light: only omegaconf and hydra's ConfigStore, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from selfloop.errors import SelfloopError, UnknownStrategyError
from selfloop.presets import register_resolver
from selfloop.registry import KINDS, SINGLE_CHOICE, Registry

register_resolver()  # conf/config.yaml's hydra.searchpath names installed plugins' presets

CONFIG_MODULE = "selfloop.conf"
PRIMARY = "config"


class Advance(str, Enum):
    """How the curriculum moves to the next difficulty level."""

    paced = "paced"  # only when enough of this level's problems passed the filters
    always = "always"  # one level per promoted round, ready or not


@dataclass
class BootstrapConfig:
    """Round 0: the only labelled data of a run (counted in the report)."""

    levels: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6])
    n_problems: int = 20000
    # Round 0 option overrides per optimizer name, e.g. {sft: {max_steps: 1500}}: more steps
    # from scratch. Entries for optimizers that are not selected are ignored.
    optimize: dict[str, Any] = field(default_factory=dict)


@dataclass
class CurriculumConfig:
    start_level: int = 7
    advance: Advance = Advance.paced
    # paced: the share of a round's acquired rows that must pass the filters to advance.
    min_kept_fraction: float = 0.8
    max_level: Optional[int] = None


@dataclass
class PromotionConfig:
    # A candidate is rejected when an autonomous evaluator scores it lower than the
    # incumbent by more than this.
    tolerance: float = 0.02


@dataclass
class LoopConfig:
    rounds: int = 8
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    # Difficulty levels the evaluators measure (None: every level of the task).
    eval_levels: Optional[list[int]] = None
    # The label-free guarantee: references never reach training after the bootstrap
    # unless this is set explicitly.
    allow_references_in_training: bool = False
    # Compute guard: no new round starts after this many minutes of the run.
    max_minutes: Optional[float] = None


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    loop: LoopConfig = field(default_factory=LoopConfig)
    # One node per kind, filled by the chosen options: {name: config}.
    task: Any = None
    model: Any = None
    acquire: Any = None
    filter: Any = None
    optimize: Any = None
    refine: Any = None
    evaluate: Any = None


def register_configs(registry: Registry) -> None:
    """Store the run schema and every registered strategy's Config in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="selfloop_schema", node=RunConfig)
    for kind in KINDS:
        for name, entry in registry.entries[kind].items():
            store.store(group=kind, name=name, node=entry.cls.Config, package=f"{kind}.{name}", provider=entry.plugin)


def selected(cfg: DictConfig, kind: str) -> list[str]:
    """The strategy names chosen for ``kind``, in configured order."""
    node = cfg.get(kind)
    if node is None:
        names: list[str] = []
    elif isinstance(node, DictConfig):
        names = [str(k) for k in node.keys()]
    else:
        raise SelfloopError(f"config `{kind}` must map strategy names to options, got {node!r}")
    if kind in SINGLE_CHOICE and len(names) != 1:
        raise SelfloopError(f"exactly one {kind} must be chosen (e.g. `{kind}=NAME`), got {names or 'none'}")
    return names


def strategy_config(registry: Registry, kind: str, name: str, node: Any, overrides: dict | None = None) -> Any:
    """Validate ``node`` (plus ``overrides``) against the strategy's Config; return an instance."""
    entry = registry.get(kind, name)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(entry.cls.Config), node or {}, overrides or {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        where = f"{kind}.{name}.{key}" if key else f"{kind}.{name}"
        raise SelfloopError(f"bad options for {kind} {name!r}: {where}: {str(exc).splitlines()[0]}") from None


def instantiate(registry: Registry, cfg: DictConfig, kind: str, overrides: dict | None = None) -> list[Any]:
    """Build the configured strategies of one kind, in order."""
    out = []
    for name in selected(cfg, kind):
        entry = registry.get(kind, name)
        out.append(entry.cls(strategy_config(registry, kind, name, cfg[kind][name], overrides)))
    return out


def check_known(registry: Registry, cfg: DictConfig) -> None:
    """Fail early, naming the culprit and the installed names, if the config names an
    uninstalled strategy (e.g. a resumed run whose plugin was uninstalled)."""
    for kind in KINDS:
        for name in selected(cfg, kind):
            registry.get(kind, name)


def validate_run_config(cfg: DictConfig) -> RunConfig:
    """Type-check the non-strategy part of a (possibly reloaded) config."""
    plain = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in KINDS and k != "hydra"}
    try:
        typed = OmegaConf.merge(OmegaConf.structured(RunConfig), plain)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise SelfloopError(f"bad run option {key or ''}: {str(exc).splitlines()[0]}") from None
    return OmegaConf.to_object(typed)


def check_override_names(overrides: list[str], registry: Registry) -> None:
    """Name unknown strategies in ``kind=name`` / ``kind=[a,b]`` overrides, with the installed ones.

    Hydra lists the available options for ``filter=nope`` but not for ``filter=[nope]``.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException:
        return  # malformed: Hydra itself reports it, with the position of the error
    for override in parsed:
        kind = override.key_or_group
        if kind not in KINDS or override.is_delete():
            continue
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        for value in values:
            for name in value if isinstance(value, list) else [value]:
                if isinstance(name, str):
                    try:
                        registry.get(kind, name)
                    except UnknownStrategyError as exc:
                        raise UnknownStrategyError(f"{exc} (in override {override.input_line!r})") from None


def prune_unselected(cfg: DictConfig) -> list[str]:
    """Drop options a preset set for strategies that were not selected; return their paths.

    A selected strategy's node keeps its Config type after composition; options a global
    preset (e.g. ``loop=smoke``) set for an unselected one form a plain dict. Call this on a
    freshly composed config, before it is saved.
    """
    from omegaconf import open_dict

    dropped = []
    for kind in KINDS:
        node = cfg.get(kind)
        if not isinstance(node, DictConfig):
            continue
        with open_dict(node):
            for name in list(node.keys()):
                if OmegaConf.get_type(node[name]) is dict:
                    del node[name]
                    dropped.append(f"{kind}.{name}")
    return dropped


def compose(overrides: list[str] | None = None, registry: Registry | None = None) -> DictConfig:
    """Compose a run config in-process, as ``selfloop run`` would (for tests and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if registry is not None:
        check_override_names(list(overrides or []), registry)
        register_configs(registry)
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = hydra_compose(config_name=PRIMARY, overrides=list(overrides or []))
    prune_unselected(cfg)
    return cfg

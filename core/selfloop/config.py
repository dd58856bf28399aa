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

from selfloop.errors import OptionError, SelfloopError, UnknownStrategyError
from selfloop.presets import register_resolver
from selfloop.registry import KINDS, SINGLE_CHOICE, Registry

register_resolver()  # conf/config.yaml's hydra.searchpath names installed plugins' presets

CONFIG_MODULE = "selfloop.conf"
PRIMARY = "config"


class Advance(str, Enum):
    """How the curriculum moves to the next difficulty level."""

    paced = "paced"  # after a promoted round in which enough of this level's problems passed the filters
    always = "always"  # after every promoted round, ready or not
    fixed = "fixed"  # every `every_rounds` rounds at a level, promoted or not (a fixed pacing function)


def _require(ok: bool, option: str, value: Any, accepted: str) -> None:
    if not ok:
        raise OptionError(option, value, accepted)


def _is_levels(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


@dataclass
class BootstrapConfig:
    """Round 0: the only labelled data of a run (counted in the report)."""

    # None: the task's own bootstrap levels (Task.bootstrap_levels)
    levels: Optional[list[int]] = None
    n_problems: int = 20000
    # Round 0 option overrides per optimizer name, e.g. {sft: {max_steps: 1500}}: more steps
    # from scratch. Entries for optimizers that are not selected are ignored.
    optimize: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        _require(self.levels is None or _is_levels(self.levels), "loop.bootstrap.levels", self.levels, "null (the task's own) or a non-empty list of levels")
        _require(self.n_problems >= 1, "loop.bootstrap.n_problems", self.n_problems, "an integer >= 1")


@dataclass
class CurriculumConfig:
    # None: the first task level above the bootstrap levels
    start_level: Optional[int] = None
    advance: Advance = Advance.paced
    # paced: the share of a round's acquired rows that must pass the filters to advance.
    min_kept_fraction: float = 0.8
    # fixed: rounds spent at each level before it advances
    every_rounds: int = 1
    # task levels climbed per advance (capped at max_level)
    step: int = 1
    max_level: Optional[int] = None

    def __post_init__(self):
        _require(0.0 <= self.min_kept_fraction <= 1.0, "loop.curriculum.min_kept_fraction", self.min_kept_fraction, "a number in [0, 1]")
        _require(self.every_rounds >= 1, "loop.curriculum.every_rounds", self.every_rounds, "an integer >= 1")
        _require(self.step >= 1, "loop.curriculum.step", self.step, "an integer >= 1")


@dataclass
class PromotionConfig:
    # A candidate is rejected when an autonomous evaluator scores it lower than the
    # incumbent by more than this.
    tolerance: float = 0.02

    def __post_init__(self):
        _require(self.tolerance >= 0.0, "loop.promotion.tolerance", self.tolerance, "a number >= 0")


@dataclass
class LoopConfig:
    rounds: int = 8
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    # Difficulty levels the evaluators measure: "auto" (every level up to the curriculum
    # level + 4: the curves always show where the model still fails), "all", or a list.
    eval_levels: Any = "auto"
    # The label-free guarantee: references never reach training after the bootstrap
    # unless this is set explicitly.
    allow_references_in_training: bool = False
    # Compute budgets: no new round starts after max_minutes; generation and training stop
    # within one batch or step of the others. The run ends with status budget_exhausted and
    # can be resumed with a larger budget.
    max_minutes: Optional[float] = None
    max_generated_tokens: Optional[int] = None
    max_train_tokens: Optional[int] = None
    max_flops: Optional[float] = None
    # A round whose filters keep no row is starved: nothing is trained or promoted. The run
    # stops after this many starved rounds in a row.
    max_starved_rounds: int = 3
    # A stage fails when strategies could not process more than this share of its rows
    # (each such row is in the stage's row_errors.jsonl with the strategy and reason).
    max_row_error_share: float = 0.5
    # Long training stages save a checkpoint at most this often (minutes; 0: never), so a
    # killed run resumes inside the stage instead of at its start.
    checkpoint_minutes: float = 5.0

    def __post_init__(self):
        _require(self.rounds >= 0, "loop.rounds", self.rounds, "an integer >= 0 (0: the bootstrap only)")
        levels = self.eval_levels
        _require(levels in ("auto", "all") or _is_levels(levels), "loop.eval_levels", levels, "auto, all, or a non-empty list of levels")
        for option in ("max_minutes", "max_generated_tokens", "max_train_tokens", "max_flops"):
            value = getattr(self, option)
            _require(value is None or value >= 0, f"loop.{option}", value, "null (no limit) or a number >= 0")
        _require(self.max_starved_rounds >= 1, "loop.max_starved_rounds", self.max_starved_rounds, "an integer >= 1")
        _require(0.0 <= self.max_row_error_share <= 1.0, "loop.max_row_error_share", self.max_row_error_share, "a number in [0, 1]")
        _require(self.checkpoint_minutes >= 0, "loop.checkpoint_minutes", self.checkpoint_minutes, "a number >= 0 (0: no checkpoints)")


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

    def __post_init__(self):
        ok = self.device in ("auto", "cpu", "cuda", "mps") or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        _require(ok, "device", self.device, "auto, cpu, cuda, cuda:N or mps")


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


def _fields(cls: type) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(cls)]


def unknown_option(path: str, valid: list[str]) -> OptionError:
    """``unknown option filter.x.max_bit; options of filter 'x': max_bits (did you mean max_bits?)``"""
    import difflib

    parent, _, key = path.rpartition(".")
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {parent}.{close[0]}?)" if close else ""
    error = OptionError(path, None, "")
    error.args = (f"unknown option {path}; valid options of {parent}: {', '.join(valid) or 'none'}{hint}",)
    return error


def _check_keys(node: Any, cls: type, prefix: str) -> None:
    """Keys of ``node`` (nested dataclass fields included) that ``cls`` does not define."""
    import dataclasses

    if not isinstance(node, (dict, DictConfig)):
        return
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in node.keys():
        if key not in fields:
            raise unknown_option(f"{prefix}{key}", list(fields))
        ftype = fields[key].type
        sub = ftype if isinstance(ftype, type) else None
        if sub is None and isinstance(ftype, str):  # postponed annotations
            import typing

            sub = typing.get_type_hints(cls).get(key)
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            _check_keys(node[key], sub, f"{prefix}{key}.")


def _located(exc: BaseException, prefix: str) -> SelfloopError:
    """A Config's own validation error as one line naming the option's full path."""
    if isinstance(exc, OptionError):
        return exc.located(prefix)
    return SelfloopError(f"bad options {prefix.rstrip('.')}: {exc}")


def _omegaconf_error(exc: OmegaConfBaseException, prefix: str) -> SelfloopError:
    key = getattr(exc, "full_key", None) or ""
    first = str(exc).splitlines()[0]
    value = getattr(exc, "value", None)  # hydra/omegaconf keep the offending value on some errors
    path = f"{prefix}{key}" if key else prefix.rstrip(".")
    return SelfloopError(f"bad option {path}{'=' + repr(value) if value is not None else ''}: {first}")


def strategy_config(registry: Registry, kind: str, name: str, node: Any, overrides: dict | None = None) -> Any:
    """Validate ``node`` (plus ``overrides``) against the strategy's Config; return an instance.

    Unknown keys (e.g. set with Hydra's ``+`` prefix) and the Config's own checks (its
    ``__post_init__`` raising :class:`OptionError` or ``ValueError``) fail here, as one line.
    """
    entry = registry.get(kind, name)
    prefix = f"{kind}.{name}."
    for extra in (node, overrides):
        _check_keys(extra, entry.cls.Config, prefix)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(entry.cls.Config), node or {}, overrides or {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, prefix) from None
    except (ValueError, TypeError) as exc:
        raise _located(exc, prefix) from None


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
    _check_keys(plain, RunConfig, "")
    try:
        typed = OmegaConf.merge(OmegaConf.structured(RunConfig), plain)
        return OmegaConf.to_object(typed)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, "") from None
    except (ValueError, TypeError) as exc:
        raise _located(exc, "") from None


def resolve_levels(run: RunConfig, task: Any) -> list[str]:
    """Fill the task-dependent loop settings in ``run`` (in place) from the task's levels;
    return warnings for settings clipped to levels the task has.

    ``loop.bootstrap.levels: null`` takes ``task.bootstrap_levels``; ``start_level: null`` the
    first level above them. Explicit levels the task does not have are dropped with a warning
    (presets such as ``loop=smoke`` serve every task); none left is an error.
    """
    levels = list(task.levels)
    if not levels:
        raise SelfloopError(f"task {task.name!r} has no difficulty levels")
    span = f"{levels[0]}..{levels[-1]}" if levels == list(range(levels[0], levels[-1] + 1)) else str(levels)
    warnings = []
    loop = run.loop

    def clip(option: str, wanted: list[int]) -> list[int]:
        kept = [v for v in wanted if v in levels]
        if not kept:
            raise OptionError(option, wanted, f"levels of task {task.name!r} ({span})")
        if len(kept) < len(wanted):
            warnings.append(f"{option}: task {task.name!r} has no level(s) {sorted(set(wanted) - set(kept))} (its levels: {span}); using {kept}")
        return kept

    boot = loop.bootstrap
    default = list(getattr(task, "bootstrap_levels", None) or levels[: max(1, len(levels) // 2)])
    boot.levels = clip("loop.bootstrap.levels", list(boot.levels) if boot.levels is not None else default)
    cur = loop.curriculum
    if cur.start_level is None:
        above = [v for v in levels if v > max(boot.levels)]
        cur.start_level = above[0] if above else levels[-1]
    elif cur.start_level not in levels:
        nearest = min(levels, key=lambda v: (abs(v - cur.start_level), v))
        warnings.append(f"loop.curriculum.start_level={cur.start_level}: task {task.name!r} has no such level (its levels: {span}); using {nearest}")
        cur.start_level = nearest
    if cur.max_level is not None and cur.max_level < cur.start_level:
        raise OptionError("loop.curriculum.max_level", cur.max_level, f"null or a level >= the start level {cur.start_level}")
    if isinstance(loop.eval_levels, list):
        loop.eval_levels = clip("loop.eval_levels", list(loop.eval_levels))
    return warnings


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


def _schema_at(path: list[str], registry: Registry | None) -> type | None:
    """The dataclass that holds the option at ``path`` (a strategy's Config or the run schema)."""
    import dataclasses
    import typing

    if path and path[0] in KINDS:
        if registry is None or len(path) < 3 or path[1] not in registry.entries[path[0]]:
            return None
        cls, rest = registry.entries[path[0]][path[1]].cls.Config, path[2:-1]
    else:
        cls, rest = RunConfig, path[:-1]
    for part in rest:
        hints = typing.get_type_hints(cls)
        cls = hints.get(part)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return None
    return cls


def hydra_error(exc: BaseException, registry: Registry | None = None) -> SelfloopError:
    """Hydra's multi-line composition error as one line naming the option."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = exc.__cause__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        parts = key.split(".")
        schema = _schema_at(parts, registry)
        if schema is not None:
            return unknown_option(key, _fields(schema))
        if parts[0] in KINDS and len(parts) == 2:  # `filter.x.opt=1` with x not selected: Hydra stops at `filter.x`
            return SelfloopError(f"{parts[0]} {parts[1]!r} is not selected; select it with {parts[0]}=[...,{parts[1]}] (option {key})")
        if parts[0] in KINDS and registry is not None and parts[1] in registry.entries[parts[0]]:  # a key in a dict option
            parent = ".".join(parts[:-1])
            return SelfloopError(f"bad option {key}: {parent} is a mapping without that key; add it with +{key}=VALUE")
    if isinstance(cause, OmegaConfBaseException):
        return _omegaconf_error(cause, "")
    options = getattr(exc, "options", None)
    missing = getattr(exc, "missing_cfg_file", None)
    if missing and options is not None:  # an unknown preset such as loop=nope
        group, _, name = str(missing).rpartition("/")
        return SelfloopError(f"unknown {group} {name!r}; available: {', '.join(options) or 'none'}")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.strip().startswith(("provider=", "Config search path"))]
    return SelfloopError("; ".join(lines))


def check_override_targets(overrides: list[str], cfg: DictConfig) -> None:
    """Options given for a strategy that is not selected fail, naming the selection.

    (Without this, ``+filter.x.opt=1`` for an unselected ``x`` would be dropped silently with
    the presets' options for unselected strategies.)
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException:
        return
    for override in parsed:
        parts = override.key_or_group.split(".")
        if len(parts) < 2 or parts[0] not in KINDS or override.is_delete():
            continue
        kind, name = parts[0], parts[1]
        node = cfg.get(kind)
        # selected strategies keep their Config type; options set for others form plain dicts
        chosen = [n for n in node if OmegaConf.get_type(node[n]) is not dict] if isinstance(node, DictConfig) else []
        if name not in chosen:
            shown = f"{kind}=[{','.join(chosen)}]" if kind not in SINGLE_CHOICE else f"{kind}={chosen[0] if chosen else '?'}"
            add = f"{kind}=[{','.join([*chosen, name])}]" if kind not in SINGLE_CHOICE else f"{kind}={name}"
            raise SelfloopError(f"{name!r} is not in {shown}, so {override.input_line!r} would be ignored; selected: {', '.join(chosen) or 'none'} (to use it: {add})")


def compose(overrides: list[str] | None = None, registry: Registry | None = None) -> DictConfig:
    """Compose a run config in-process, as ``selfloop run`` would (for tests and notebooks).

    Every problem is one :class:`SelfloopError` line: unknown strategies (with the installed
    ones), unknown options (with the valid ones), wrong types, options of unselected strategies.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    overrides = list(overrides or [])
    if registry is not None:
        check_override_names(overrides, registry)
        register_configs(registry)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = hydra_compose(config_name=PRIMARY, overrides=overrides)
    except HydraException as exc:
        raise hydra_error(exc, registry) from None
    check_override_targets(overrides, cfg)
    prune_unselected(cfg)
    return cfg

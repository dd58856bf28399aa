"""selfloop: closed-loop self-improvement for language models, with little or no labelling.

usage:
  selfloop run [HYDRA OVERRIDES...]      compose a run with Hydra and execute it
                                         (e.g. selfloop run loop=smoke filter=[uncertainty])
  selfloop resume RUN_DIR [--redo round-NNN/STAGE]
                                         continue a stopped run from its first incomplete stage
  selfloop infer RUN_DIR [--input FILE|-] [--output FILE] [--format jsonl|text] [--no-refine]
                                         answer prompts with the run's promoted model through its refiners
  selfloop report RUN_DIR                rebuild report.md and curves.png from metrics.jsonl
  selfloop compare RUN_DIR... | SWEEP_DIR [--out DIR]
                                         compare runs side by side: a table, CSV/JSON and plots
                                         (default output: <common parent>/comparison)
  selfloop plugins [--json]              installed plugins and what each provides
  selfloop new-plugin NAME --stage STAGE [--dir DIR | --into PACKAGE_DIR]
                                         scaffold a plugin package (entry point, config, tests),
                                         or add a strategy to one

selfloop run --help lists every option; docs: README.md and docs/ in the repository.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from selfloop.errors import RunDirError, RunInterrupted, SelfloopError

COMMANDS = ("run", "resume", "infer", "plugins", "report", "compare", "new-plugin")
log = logging.getLogger("selfloop")


def _fail(message: str) -> int:
    print(f"selfloop: error: {message}", file=sys.stderr)
    return 2


# the run directory of the run in progress, for the one-line resume hint on Ctrl-C / SIGTERM
_ACTIVE: dict[str, Path] = {}


def build_loop(cfg, run_dir: Path, plugins):
    """The loop for ``run_dir``: validates the config and builds every strategy, writing nothing."""
    from selfloop.loop import Loop
    from selfloop.rundir import RunDir

    return Loop(cfg, RunDir(run_dir), plugins, echo=log.info)


def discard_if_unused(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but Hydra's empty log (a run that never started)."""
    import shutil

    entries = list(run_dir.iterdir()) if run_dir.is_dir() else []
    if all(e.name in ("selfloop.log", "run.lock") and e.is_file() and e.stat().st_size == 0 for e in entries):
        shutil.rmtree(run_dir, ignore_errors=True)


def execute(loop) -> str:
    """Run the loop (the caller holds the run directory's lock), then print the report."""
    from selfloop.report import print_table
    from selfloop.rundir import read_metrics_jsonl

    rd = loop.run_dir
    _ACTIVE["run_dir"] = rd.root  # kept if the run is interrupted: main() prints the resume hint
    status = loop.execute()
    _ACTIVE.pop("run_dir", None)
    if rd.metrics_jsonl.exists():
        print_table(read_metrics_jsonl(rd.metrics_jsonl))
        print(f"run {status}: {rd.root} (report.md, curves.png, metrics.jsonl)")
    else:
        print(f"run {status}: {rd.root} (no round finished, so no report)")
    info = rd.read_run_json()
    if info.get("stop_reason"):
        print(f"reason: {info['stop_reason']}")
    if status not in ("completed", "failed"):
        print(f"continue it with: selfloop resume {rd.root}")
    return status


def cmd_run(overrides: list[str]) -> int:
    import hydra
    from hydra._internal.utils import get_args_parser  # Hydra's own CLI grammar (--cfg job, -m, ...)
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from selfloop.config import CONFIG_MODULE, PRIMARY, check_override_names, compose, prune_unselected, register_configs
    from selfloop.loop import prepare
    from selfloop.plugins import load_plugins
    from selfloop.rundir import RunDir, atomic_write_text

    plugins = load_plugins()
    args = get_args_parser().parse_known_args(overrides)[0]
    check_override_names(args.overrides, plugins.registry)
    if args.multirun and args.cfg:
        return _fail(f"--cfg {args.cfg} prints one run's config and cannot be combined with -m/--multirun; "
                     "give one value per option (e.g. the sweep's first) to see that job's config")
    if not args.multirun:
        # everything is validated here, in under a second and before Hydra creates a directory
        cfg = compose(args.overrides, plugins.registry)
        prepare(cfg, plugins.registry, RunDir("(not created)"))
        if args.cfg == "job":  # a dry run: the config the run would save
            print(OmegaConf.to_yaml(cfg, resolve=bool(args.resolve)), end="")
            return 0
    register_configs(plugins.registry)
    outcome = {"code": 0}

    @hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name=PRIMARY, version_base="1.3")
    def task(cfg) -> None:
        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        rd = RunDir(run_dir)
        multirun = hydra_cfg.mode.name == "MULTIRUN"
        prune_unselected(cfg)
        try:  # bad options of a sweep's job fail here, before anything is written
            loop = build_loop(cfg, run_dir, plugins)
        except SelfloopError as exc:
            discard_if_unused(run_dir)
            outcome["code"] = _fail(str(exc))
            if multirun:
                raise
            return
        config_yaml = OmegaConf.to_yaml(cfg)
        try:
            with rd.lock():  # before anything is written: a second run into this directory stops here
                if rd.holds_a_run():
                    raise RunDirError(f"{run_dir} already holds a run; continue it with `selfloop resume {run_dir}` or choose another hydra.run.dir")
                import hashlib

                rd.write_run_json(status="starting", config_sha256=hashlib.sha256(config_yaml.encode()).hexdigest())
                # selfloop saves the composed config itself (hydra.output_subdir is null), after the checks above
                meta = run_dir / ".hydra"
                atomic_write_text(meta / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(hydra_cfg.overrides.task))))
                atomic_write_text(meta / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg)})))
                atomic_write_text(meta / "config.yaml", config_yaml)
                execute(loop)
        except SelfloopError as exc:
            outcome["code"] = _fail(f"{exc} (run directory: {run_dir})")
            if multirun:
                raise

    sys.argv = ["selfloop run", *overrides]
    task()
    return outcome["code"]


def cmd_resume(path: str, redo: str | None = None) -> int:
    from omegaconf import OmegaConf

    from selfloop.plugins import load_plugins
    from selfloop.rundir import RunDir, parse_stage

    run_dir = Path(path)
    rd = RunDir(run_dir)
    rd.validate_for_resume()
    try:
        cfg = OmegaConf.load(rd.config_path)
    except Exception as exc:
        raise RunDirError(f"{rd.config_path} is corrupt: {exc}") from None
    loop = build_loop(cfg, run_dir, load_plugins())  # validated before anything is touched
    with rd.lock():
        # Hydra configures logging for `run`; do the same here: terminal plus the run's log file.
        formatter = logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "selfloop.log")):
            handler.setFormatter(formatter)
            log.addHandler(handler)
        log.setLevel(logging.INFO)
        if redo:
            round_, stage = parse_stage(redo)
            removed = rd.redo(round_, stage)
            log.info("redo: removed %s; resume recomputes them", ", ".join(removed))
        execute(loop)
    return 0


def plugins_summary() -> dict:
    from selfloop.plugins import load_plugins
    from selfloop.presets import installed_presets

    plugins = load_plugins()
    provided = plugins.registry.by_plugin()
    return {
        "plugins": [
            {
                "name": info.name,
                "distribution": info.distribution,
                "version": info.version,
                "module": info.module,
                "hooks": info.hooks,
                "provides": provided.get(info.name, {}),
                "error": info.error,
            }
            for info in plugins.info.values()
        ],
        "presets": installed_presets(),
        "problems": plugins.problems(),
    }


def cmd_plugins(as_json: bool) -> int:
    summary = plugins_summary()
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    rows = []
    for p in summary["plugins"]:
        provides = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in sorted(p["provides"].items()))
        observes = [h for h in p["hooks"] if not h.startswith("selfloop_register_")]
        if observes:
            provides = "; ".join(filter(None, [provides, f"hooks: {', '.join(observes)}"]))
        if p["error"]:
            provides = f"{provides}  ERROR: {p['error']}".strip()
        rows.append((p["name"], f"{p['distribution'] or '?'} {p['version'] or ''}".strip(), provides or "nothing"))
    for p in summary["presets"]:
        rows.append((p["name"], f"{p['distribution'] or '?'} {p['version'] or ''}".strip(),
                     f"presets: {', '.join(p['presets']) or 'none found in ' + p['package']}"))
    widths = [max(len(r[i]) for r in [("plugin", "distribution", ""), *rows]) + 2 for i in (0, 1)]
    for name, origin, provides in [("plugin", "distribution", "provides"), *rows]:
        print(f"{name:<{widths[0]}}{origin:<{widths[1]}}{provides}")
    for problem in summary["problems"]:
        print(f"problem: {problem}")
    return 0


def cmd_report(path: str) -> int:
    from selfloop.report import print_table, render

    run_dir = Path(path)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    print_table(render(run_dir))
    print(f"wrote {run_dir / 'report.md'} and {run_dir / 'curves.png'}")
    return 0


def cmd_new_plugin(name: str, stage: str, dest: str | None, into: str | None = None) -> int:
    from selfloop.scaffold import add, render

    if dest and into:
        raise SelfloopError("give --dir (a new package) or --into (an existing one), not both")
    target = Path(into or dest or f"selfloop-{name.replace('_', '-')}")
    for path in (add(name, stage, target) if into else render(name, stage, target)):
        print(f"wrote {path}")
    print(f"next: cd {target} && pip install -e '.[test]' && python -m pytest" + (" (reinstall: the entry points changed)" if into else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from selfloop.threads import configure_environment

    configure_environment()  # before torch is imported: graceful beside other CPU-bound work
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if command == "run":
            return cmd_run(rest)
        parser = argparse.ArgumentParser(prog=f"selfloop {command}")
        if command == "resume":
            parser.add_argument("run_dir")
            parser.add_argument("--redo", metavar="round-NNN/STAGE", help="recompute this completed stage and everything after it (e.g. after a damaged file)")
            args = parser.parse_args(rest)
            return cmd_resume(args.run_dir, args.redo)
        if command == "plugins":
            parser.add_argument("--json", action="store_true", help="machine-readable output")
            return cmd_plugins(parser.parse_args(rest).json)
        if command == "report":
            parser.add_argument("run_dir")
            return cmd_report(parser.parse_args(rest).run_dir)
        if command == "infer":
            from selfloop.infer import add_arguments, cmd_infer

            add_arguments(parser)
            return cmd_infer(**vars(parser.parse_args(rest)))
        if command == "compare":
            from selfloop.compare import cmd_compare

            parser.add_argument("paths", nargs="+", metavar="RUN_DIR", help="run directories, or a sweep directory (multirun/<time>) holding them")
            parser.add_argument("--out", metavar="DIR", help="where to write the comparison (default: <common parent>/comparison; never inside a run)")
            args = parser.parse_args(rest)
            return cmd_compare(args.paths, args.out)
        if command == "new-plugin":
            from selfloop.scaffold import STAGES

            parser.add_argument("name", help="the strategy name, e.g. my_filter (lowercase, digits, _)")
            parser.add_argument("--stage", required=True, choices=STAGES)
            parser.add_argument("--dir", help="where to write a new package, named after it (default: ./selfloop-NAME)")
            parser.add_argument("--into", metavar="PACKAGE_DIR", help="add the strategy to an existing plugin package instead")
            args = parser.parse_args(rest)
            return cmd_new_plugin(args.name, args.stage, args.dir, args.into)
    except SelfloopError as exc:
        return _fail(str(exc))
    except (KeyboardInterrupt, RunInterrupted) as exc:
        name = getattr(exc, "signal_name", "Ctrl-C")
        where = _ACTIVE.get("run_dir")
        hint = f"; nothing finished is lost: continue with `selfloop resume {where}`" if where else ""
        print(f"\nselfloop: interrupted ({name}){hint}", file=sys.stderr)
        return 143 if name == "SIGTERM" else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return _fail(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")


def _on_sigterm(signum, frame) -> None:
    raise RunInterrupted("SIGTERM")


if __name__ == "__main__":
    sys.exit(main())

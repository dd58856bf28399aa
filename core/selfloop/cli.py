"""The ``selfloop`` command.

    selfloop run [HYDRA OVERRIDES...]     compose a run with Hydra and execute it
    selfloop resume RUN_DIR               continue a stopped run from its first incomplete stage
    selfloop plugins [--json]             installed plugins and what each provides (fast: no torch)
    selfloop report RUN_DIR               rebuild report.md and curves.png from metrics.jsonl
    selfloop new-plugin NAME --stage STAGE [--dir DIR]
                                          scaffold a plugin package (entry point, config, tests)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from selfloop.errors import RunDirError, SelfloopError

COMMANDS = ("run", "resume", "plugins", "report", "new-plugin")
log = logging.getLogger("selfloop")


def _fail(message: str) -> int:
    print(f"selfloop: error: {message}", file=sys.stderr)
    return 2


@contextlib.contextmanager
def _run_lock(run_dir: Path):
    """One process per run directory: a second `resume` of a live run is refused."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "run.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(f"{run_dir} is in use by another selfloop process") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_loop(cfg, run_dir: Path, plugins):
    """The loop for ``run_dir``: validates the config and builds every strategy, writing nothing."""
    from selfloop.loop import Loop
    from selfloop.rundir import RunDir

    return Loop(cfg, RunDir(run_dir), plugins, echo=log.info)


def discard_if_unused(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but Hydra's empty log (a run that never started)."""
    import shutil

    entries = list(run_dir.iterdir()) if run_dir.is_dir() else []
    if all(e.name == "selfloop.log" and e.is_file() and e.stat().st_size == 0 for e in entries):
        shutil.rmtree(run_dir, ignore_errors=True)


def execute(loop) -> str:
    """Run the loop in its run directory under a lock, then write and print the report."""
    import datasets

    from selfloop.report import print_table, render

    datasets.disable_progress_bars()  # stage saves are quick; keep the log readable
    rd = loop.run_dir
    run_dir = rd.root
    records = None
    with _run_lock(run_dir):
        try:
            status = loop.execute()
        finally:  # a failed run still gets the report of its finished rounds
            if rd.metrics_jsonl.exists():
                records = render(run_dir)
    if records:
        print_table(records)
    print(f"run {status}: {run_dir} (report.md, curves.png, metrics.jsonl)")
    return status


def cmd_run(overrides: list[str]) -> int:
    import hydra
    from hydra._internal.utils import get_args_parser  # Hydra's own CLI grammar (--cfg job, -m, ...)
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from selfloop.config import CONFIG_MODULE, PRIMARY, check_override_names, prune_unselected, register_configs
    from selfloop.plugins import load_plugins
    from selfloop.rundir import atomic_write_text

    plugins = load_plugins()
    args = get_args_parser().parse_known_args(overrides)[0]
    check_override_names(args.overrides, plugins.registry)
    if args.cfg == "job" and not args.multirun:
        # a dry run: the config the run would save (Hydra's own --cfg prints it unpruned)
        from selfloop.config import compose

        cfg = compose(args.overrides, plugins.registry)
        print(OmegaConf.to_yaml(cfg, resolve=bool(args.resolve)), end="")
        return 0
    register_configs(plugins.registry)
    outcome = {"code": 0}

    @hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name=PRIMARY, version_base="1.3")
    def task(cfg) -> None:
        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        if (run_dir / "run.json").exists():
            outcome["code"] = _fail(f"{run_dir} already holds a run; continue it with `selfloop resume {run_dir}` or choose another hydra.run.dir")
            return
        prune_unselected(cfg)
        try:  # bad options fail here, before anything is written
            loop = build_loop(cfg, run_dir, plugins)
        except SelfloopError as exc:
            discard_if_unused(run_dir)
            outcome["code"] = _fail(str(exc))
            if hydra_cfg.mode.name == "MULTIRUN":
                raise
            return
        # We save the composed config ourselves (hydra.output_subdir is null) so that a
        # run directory that already holds a run is never overwritten.
        meta = run_dir / ".hydra"
        atomic_write_text(meta / "config.yaml", OmegaConf.to_yaml(cfg))
        atomic_write_text(meta / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(hydra_cfg.overrides.task))))
        atomic_write_text(meta / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg)})))
        try:
            execute(loop)
        except SelfloopError as exc:
            outcome["code"] = _fail(f"{exc} (run directory: {run_dir})")
            if hydra_cfg.mode.name == "MULTIRUN":
                raise

    sys.argv = ["selfloop run", *overrides]
    try:
        task()
    except SelfloopError as exc:
        return _fail(str(exc))
    return outcome["code"]


def cmd_resume(path: str) -> int:
    from omegaconf import OmegaConf

    from selfloop.plugins import load_plugins
    from selfloop.rundir import RunDir

    run_dir = Path(path)
    RunDir(run_dir).validate_for_resume()
    # Hydra configures logging for `run`; do the same here: terminal plus the run's log file.
    formatter = logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "selfloop.log")):
        handler.setFormatter(formatter)
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        cfg = OmegaConf.load(RunDir(run_dir).config_path)
    except Exception as exc:
        raise RunDirError(f"{run_dir}/.hydra/config.yaml is corrupt: {exc}") from None
    execute(build_loop(cfg, run_dir, load_plugins()))
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


def cmd_new_plugin(name: str, stage: str, dest: str | None) -> int:
    from selfloop.scaffold import render

    target = Path(dest or f"selfloop-{name.replace('_', '-')}")
    for path in render(name, stage, target):
        print(f"wrote {path}")
    print(f"next: cd {target} && pip install -e '.[test]' && python -m pytest")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if command == "run":
            return cmd_run(rest)
        parser = argparse.ArgumentParser(prog=f"selfloop {command}")
        if command == "resume":
            parser.add_argument("run_dir")
            return cmd_resume(parser.parse_args(rest).run_dir)
        if command == "plugins":
            parser.add_argument("--json", action="store_true", help="machine-readable output")
            return cmd_plugins(parser.parse_args(rest).json)
        if command == "report":
            parser.add_argument("run_dir")
            return cmd_report(parser.parse_args(rest).run_dir)
        if command == "new-plugin":
            from selfloop.scaffold import STAGES

            parser.add_argument("name", help="the strategy name, e.g. my_filter (lowercase, digits, _)")
            parser.add_argument("--stage", required=True, choices=STAGES)
            parser.add_argument("--dir", help="where to write the package (default: ./selfloop-NAME)")
            args = parser.parse_args(rest)
            return cmd_new_plugin(args.name, args.stage, args.dir)
    except SelfloopError as exc:
        return _fail(str(exc))
    return _fail(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")


if __name__ == "__main__":
    sys.exit(main())

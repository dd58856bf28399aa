"""``selfloop infer RUN_DIR``: answer prompts with a run's promoted model, through the run's
configured refiners (voting, self-correction, retrieval...), exactly as the loop generates.

    selfloop infer RUN_DIR [--input FILE|-] [--output FILE] [--format jsonl|text]
                           [--max-new-tokens N] [--batch-size N] [--no-refine] [--device D]

The model is the last round record's ``incumbent_round``'s ``optimize/model`` (checked
against its stage marker). Input: one prompt per line (blank lines are skipped), or JSONL
with a ``prompt`` field (``--input x.jsonl``); stdin when no file is given. Output: one JSON
object per prompt (``prompt``, ``answer``, ``agreement``, ``extra`` with what the refiners
recorded: samples' log-probabilities, votes, critiques, retrieved passages, rationales), or
one answer per line with ``--format text``. What the refiners counted (sequences sampled,
critiques, index builds) goes to stderr at the end.

Nothing is written into the run directory and no lock is taken: a running loop is not
disturbed (a stage that completes meanwhile is only read once verified).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any, Iterable, TextIO

from selfloop.data import jsonable
from selfloop.errors import RunDirError, SelfloopError

FORMATS = ("jsonl", "text")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``selfloop infer`` (shared by the CLI and ``python -m selfloop.infer``)."""
    parser.add_argument("run_dir", help="a run directory with at least one finished round")
    parser.add_argument("--input", dest="input_path", metavar="FILE",
                        help="prompts: one per line, or .jsonl with a 'prompt' field (default: stdin; '-' is stdin)")
    parser.add_argument("--output", metavar="FILE", help="where to write the answers (default: stdout)")
    parser.add_argument("--format", dest="output_format", choices=FORMATS, default="jsonl",
                        help="jsonl: prompt, answer, agreement, extra per line; text: the answers, one per line")
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help="longest answer in tokens (default: the task's bound at its hardest level)")
    parser.add_argument("--batch-size", type=int, default=256, metavar="N", help="prompts per call of the refiner chain")
    parser.add_argument("--no-refine", dest="refine", action="store_false", help="one greedy completion per prompt, no refiners")
    parser.add_argument("--device", help="override the run's device (auto, cpu, cuda, cuda:N, mps)")


def incumbent_model_dir(run_dir: Path) -> tuple[int, Path, dict[str, Any]]:
    """(round, model directory, last record) of a run's promoted model."""
    from selfloop.rundir import RunDir

    rd = RunDir(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    if not rd.config_path.is_file():
        raise RunDirError(f"{run_dir} is not a selfloop run directory (no .hydra/config.yaml)")
    records = rd.records()
    if not records:
        raise RunDirError(f"{run_dir} has no finished round yet, so no promoted model (run or resume it first)")
    last = records[-1]
    round_ = last.get("incumbent_round")
    if round_ is None:
        raise RunDirError(f"{run_dir}: the last round record names no incumbent model")
    path = rd.stage_dir(round_, "optimize") / "model"
    if not rd.is_complete(round_, "optimize") or not path.is_dir():
        raise RunDirError(f"{run_dir}: the promoted model of round {round_} is missing ({path})")
    rd.verify(round_, "optimize")
    return round_, path, last


def read_prompts(source: TextIO, jsonl: bool, where: str) -> list[str]:
    prompts = []
    for n, line in enumerate(source, 1):
        line = line.rstrip("\n").rstrip("\r")
        if not line.strip():
            continue
        if jsonl:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SelfloopError(f"{where} line {n} is not JSON: {exc}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise SelfloopError(f"{where} line {n} has no string field 'prompt'")
            prompts.append(obj["prompt"])
        else:
            prompts.append(line)
    return prompts


def build_context(run_dir: Path, device: str | None):
    """The run's context as the loop builds it (every option and setup check), positioned
    after its last round: refiners see the whole verified memory."""
    from omegaconf import OmegaConf

    from selfloop.loop import prepare
    from selfloop.model import resolve_device
    from selfloop.plugins import load_plugins
    from selfloop.rundir import RunDir

    round_, model_dir, last = incumbent_model_dir(run_dir)
    rd = RunDir(run_dir)
    try:
        cfg = OmegaConf.load(rd.config_path)
    except Exception as exc:
        raise RunDirError(f"{rd.config_path} is corrupt: {exc}") from None
    ctx = prepare(cfg, load_plugins().registry, rd)
    ctx.device = str(resolve_device(device or ctx.run.device))
    ctx.round, ctx.level, ctx.stage = last["round"] + 1, last["next_level"], "infer"
    ctx.rng = random.Random(ctx.run.seed)
    ctx.model = ctx.reload_model(model_dir)
    return ctx, round_


def answer(ctx, prompts: list[str], max_new_tokens: int, batch_size: int, refine: bool) -> Iterable[Any]:
    from selfloop.progress import progress

    with progress(len(prompts), "infer", "prompt") as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            yield from ctx.generate(chunk, max_new_tokens=max_new_tokens, refine=refine)
            bar.update(len(chunk))


def cmd_infer(run_dir: str | Path, input_path: str | None = None, output: str | None = None, output_format: str = "jsonl",
              max_new_tokens: int | None = None, batch_size: int = 256, refine: bool = True, device: str | None = None,
              stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Answer prompts from ``input_path`` (or stdin) with the run's promoted model; returns
    the exit status. Errors are :class:`SelfloopError` (one line in the CLI)."""
    from selfloop.context import seed_everything

    if output_format not in FORMATS:
        raise SelfloopError(f"unknown --format {output_format!r}; accepted: {', '.join(FORMATS)}")
    if batch_size < 1 or (max_new_tokens is not None and max_new_tokens < 1):
        raise SelfloopError("--batch-size and --max-new-tokens take integers >= 1")
    run_dir = Path(run_dir)
    ctx, round_ = build_context(run_dir, device)  # a bad run directory fails before stdin is read
    if input_path and input_path != "-":
        path = Path(input_path)
        if not path.is_file():
            raise SelfloopError(f"--input {input_path}: no such file")
        with path.open(encoding="utf-8") as fh:
            prompts = read_prompts(fh, path.suffix.lower() == ".jsonl", str(path))
    else:
        prompts = read_prompts(stdin or sys.stdin, False, "stdin")
    seed_everything(ctx.run.seed)
    limit = max_new_tokens or max(ctx.task.max_new_tokens(level) for level in ctx.task.levels)
    out = stdout or sys.stdout
    sink = Path(output).open("w", encoding="utf-8") if output else out
    try:
        for gen in answer(ctx, prompts, limit, batch_size, refine):
            if output_format == "text":
                sink.write(gen.answer.replace("\n", " ") + "\n")
            else:
                row = {"prompt": gen.prompt, "answer": gen.answer, "agreement": jsonable(gen.agreement), "extra": jsonable(gen.extra)}
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if output:
            sink.close()
    names = [r.name for r in ctx.strategies.get("refine", [])] if refine else []
    summary = {"answered": len(prompts), "model": f"round-{round_:03d}/optimize/model", "refine": names, "notes": jsonable(ctx.notes)}
    print(json.dumps(summary), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfloop infer", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_infer(**vars(args))
    except SelfloopError as exc:
        print(f"selfloop: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Reading event files back, and playing rounds through the hooks as the loop would."""

from __future__ import annotations


def read_events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})  # 0: keep every point
    acc.Reload()
    return acc


def curves(path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` as TensorBoard shows it. Its two Python loaders handle a
    restart differently (the server's takes a run's first SessionLog.START for the initial
    one), so both must agree. (The default fast loader, a Rust binary, replaces a tag's points
    when its step goes back, which the step-ordered replay satisfies.)"""
    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.util import tensor_util

    acc = read_events(path)
    out = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    server = plugin_event_accumulator.EventAccumulator(str(path), size_guidance={"tensors": 0})
    server.Reload()
    served = {
        tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in server.Tensors(tag)]
        for tag in server.Tags()["tensors"]
        if server.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
    }
    assert served == out
    return out


def texts(path, tag) -> list[tuple[int, str]]:
    acc = read_events(path)
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]


def stage_metrics(round_: int) -> dict[str, dict]:
    """Per-stage metrics shaped like the loop's, with values that change every round."""
    evaluators = {
        "self_consistency": {"score": 0.5 + 0.1 * round_, "by_level": {"4": 0.9, "5": 0.4 + 0.1 * round_}, "uses_references": False},
        "exact_match": {"score": 0.3 + 0.1 * round_, "by_level": {"4": 0.8, "8": 0.05 * round_}, "uses_references": True},
    }
    cost = {"seconds": 1.5 + round_, "generated_sequences": 100 * round_, "train_steps": 0}
    return {
        "acquire": {"rows": 200, "by_level": {"4": 200}, "label_precision": 0.9 if round_ else None, **cost},
        "filter": {"acquired": 200, "kept": 150 + round_, "kept_fraction": (150 + round_) / 200, "kept_fraction_at_level": 0.7,
                   "filters": [{"filter": "uncertainty", "kept": 150 + round_, "of": 200}], "label_precision": 0.95, **cost},
        "optimize": {"rows": 150, "labels_used": 0, "parameters": 1000, "train_loss": 1.0 / (round_ + 1), **cost, "train_steps": 60},
        "evaluate": {"evaluators": evaluators, **cost},
    }


def record(round_: int, stages: dict[str, dict]) -> dict:
    """A round record shaped like Loop.promote's (plus the promote stage's own cost)."""
    ev = stages["evaluate"]["evaluators"]
    return {
        "round": round_, "stage": "promote", "level": None if round_ == 0 else 3 + round_, "labels_used": 0 if round_ else 600,
        "labelled_levels": [] if round_ else [1, 2, 3], "acquired": 200, "kept": stages["filter"]["kept"],
        "kept_fraction": stages["filter"]["kept_fraction"], "label_precision_acquired": stages["acquire"]["label_precision"],
        "label_precision_kept": 0.95, "autonomous": {"self_consistency": ev["self_consistency"]["score"]},
        "gate": {"self_consistency": [0.6 + round_, 0.5]} if round_ else {}, "promoted": round_ != 2,
        "reason": "no autonomous evaluator got worse", "incumbent_round": round_, "next_level": 4 + round_,
        "meta": {"exact_match": ev["exact_match"]["by_level"]}, "candidate_meta": {"exact_match": ev["exact_match"]["by_level"]},
        "compute": {"seconds": 10.0 + round_, "generated_sequences": 400 * round_, "train_steps": 60},
        "seconds": 0.01, "generated_sequences": 0, "train_steps": 0,
    }


def run_stage(ctx, stage: str, metrics: dict) -> dict:
    """As Loop.stage does: write the stage (outputs, metrics, COMPLETE), then the observer hook."""
    import selfloop_tensorboard as tb

    metrics = {"round": ctx.round, "stage": stage, "level": ctx.level, **metrics}
    ctx.run_dir.write_stage(ctx.round, stage, metrics)
    tb.selfloop_on_stage_end(ctx=ctx, stage=stage, metrics=metrics, replayed=False)
    return metrics


def run_round(ctx, round_: int, upto: str = "promote") -> None:
    """Play one round through the hooks, stopping after stage ``upto`` (a simulated kill)."""
    import selfloop_tensorboard as tb

    ctx.round = round_
    stages = stage_metrics(round_)
    for stage in ("acquire", "filter", "optimize", "evaluate"):
        if not (round_ == 0 and stage == "filter"):
            run_stage(ctx, stage, stages[stage])
        if stage == upto:
            return
    rec = run_stage(ctx, "promote", record(round_, stages))
    ctx.run_dir.write_metrics_jsonl()
    tb.selfloop_on_round_end(ctx=ctx, record=rec, replayed=False)

"""Benchmark the acquisition path's generation: batched with the KV cache vs one prompt at a time,
against the machine's compute roof, all measured in one process.

    python bench/generate.py [--threads 2] [--prompts 500] [--n 5] [--level 8] [--n-embd 128 --n-layer 3]

What acquisition does (task_sampler + self_consistency, default run): ``ModelHandle.generate``
on 500 prompts at a time, 5 samples each at temperature 0.7, ``max_new_tokens = level + 2``.
The model is the default run's (tiny NoPE GPT-2, 3 layers x 128), briefly trained on reversal so
that it answers with digits and stops at EOS (``--train-steps 0``: untrained). Measured:

- batched: ``ModelHandle.generate(prompts, n, ...)`` (the acquisition path), batch by batch;
- loop: the same call once per prompt (its n samples still batched), on ``--loop-prompts``
  prompts spread over the batches: batched and loop alternate, so load bursts hit both;
- one batch: ``generate`` on one full batch (``--batch-size`` sequences, its default 1024)
  against a bare greedy decode loop over the model with the KV cache (no sampling, logits
  processors or stopping checks) on the same batch for the same steps;
- roof: a float32 matmul microbenchmark (``--matmul`` square) on the same threads.

Time is this process's CPU time (``time.process_time``), so the load other sessions put on a
shared machine does not enter the rates; wall-clock rates are reported alongside. Tokens are
generated tokens up to each completion's EOS (``ModelHandle.generated_tokens``): steps spent on
finished rows of a batch count against the batched path. Model FLOPs per token = 2 x
parameters (the budget meter's convention). Target: batched >= 10x the loop.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time


def clocks() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def matmul_roof(size: int, seconds: float = 1.0) -> float:
    """Peak FLOP per CPU-second of a float32 square matmul on the current threads (best call)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.process_time()
        torch.mm(a, b)
        best = min(best, time.process_time() - start)
    return 2 * size**3 / best


def trained_handle(args):
    """The default run's model, trained briefly on reversal (levels 1 to --level)."""
    import torch

    from selfloop.data import make_rows
    from selfloop.testing import build_ctx
    from selfloop_plugins.optimize.sft import SFT, SFTConfig

    heads = max(1, args.n_embd // 32)
    overrides = [f"model.tiny.n_embd={args.n_embd}", f"model.tiny.n_layer={args.n_layer}", f"model.tiny.n_head={heads}", "loop.checkpoint_minutes=0"]
    ctx = build_ctx(tempfile.mkdtemp(prefix="bench-generate-"), overrides, with_model=True, preset="")
    if not args.train_steps:
        return ctx, ctx.model
    problems = [p for level in range(1, args.level + 1) for p in ctx.task.sample(random.Random(level), level, 400)]
    data = make_rows(dict(id=str(i), prompt=p.prompt, answer=p.reference, difficulty=p.difficulty) for i, p in enumerate(problems))
    torch.manual_seed(0)
    sft = SFT(SFTConfig(max_steps=args.train_steps, batch_size=64, learning_rate=3e-3, replay_fraction=0.0))
    return ctx, sft.optimize(ctx, data.remove_columns("reference"))


def bare_decode(handle, prompts: list[str], n: int, steps: int) -> float:
    """CPU seconds of a bare greedy decode with the KV cache on one batch: the forward passes
    alone, without generate's sampling and bookkeeping."""
    import torch

    tok = handle.tokenizer
    encoded = [ids for ids in tok(prompts)["input_ids"] for _ in range(n)]
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(encoded):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    model = handle.model
    with torch.inference_mode():
        start = time.process_time()
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps - 1):
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model(input_ids=nxt, attention_mask=mask, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--loop-prompts", type=int, default=30)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--level", type=int, default=8)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=1024, help="sequences per batch (ModelHandle.generate's default)")
    parser.add_argument("--matmul", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    import torch

    from selfloop.model import ModelHandle

    torch.set_num_threads(args.threads)
    ctx, handle = trained_handle(args)
    task, level = ctx.task, args.level
    prompts = [p.prompt for p in task.sample(random.Random(0), level, args.prompts)]
    max_new = task.max_new_tokens(level)
    sample = dict(n=args.n, temperature=args.temperature, max_new_tokens=max_new, batch_size=args.batch_size)
    per_batch = max(1, args.batch_size // args.n)  # prompts per generate batch

    def timed(fn) -> tuple[float, float, int]:
        """(CPU seconds, wall seconds, generated tokens) of fn()."""
        tokens, (cpu, wall) = ModelHandle.generated_tokens, clocks()
        fn()
        cpu_end, wall_end = clocks()
        return cpu_end - cpu, wall_end - wall, ModelHandle.generated_tokens - tokens

    handle.generate(prompts[:8], **sample)  # warm-up
    chunks = [prompts[i : i + per_batch] for i in range(0, len(prompts), per_batch)]
    loop_each = max(1, args.loop_prompts // len(chunks))
    batched, loop, one_batch, decode, roof = [], [], [], [], []
    for _ in range(args.repeat):
        roof.append(matmul_roof(args.matmul))
        for chunk in chunks:
            batched.append(timed(lambda chunk=chunk: handle.generate(chunk, **sample)))
            loop.append(timed(lambda chunk=chunk: [handle.generate([p], **sample) for p in chunk[:loop_each]]))
        one_batch.append(timed(lambda: handle.generate(prompts[:per_batch], **sample)))
        decode.append(bare_decode(handle, prompts[:per_batch], args.n, max_new))

    def rate(runs, clock: int = 0) -> float:  # tokens per second (clock 0: CPU time, 1: wall)
        return sum(r[2] for r in runs) / sum(r[clock] for r in runs)

    params = handle.num_parameters
    roof_flops = max(roof)  # per CPU-second; x threads for the wall-clock roof of that many cores
    b, lp = rate(batched), rate(loop)
    gen_cpu, dec_cpu = statistics.median(r[0] for r in one_batch), statistics.median(decode)
    useful = statistics.median(r[2] for r in one_batch) / (per_batch * args.n * max_new)  # decoding steps not spent on finished rows
    prompt_tokens = statistics.mean(len(ids) for ids in handle.tokenizer(prompts[:per_batch])["input_ids"])
    positions = per_batch * args.n * (prompt_tokens + max_new)  # prefill and every step, finished rows included
    greedy = handle.generate(prompts[:200], max_new_tokens=max_new)
    correct = sum(task.check(o[0], p.rstrip("=")[::-1]) for o, p in zip(greedy, prompts[:200])) / 200
    print(json.dumps({
        "threads": args.threads,
        "model": {"parameters": params, "n_embd": args.n_embd, "n_layer": args.n_layer, "greedy_accuracy_at_level": round(correct, 3)},
        "workload": {"prompts": args.prompts, "n": args.n, "temperature": args.temperature, "level": level, "max_new_tokens": max_new,
                     "batch_sequences": per_batch * args.n},
        "tokens_per_cpu_s": {"batched": round(b), "loop": round(lp)},
        "tokens_per_wall_s": {"batched": round(rate(batched, 1)), "loop": round(rate(loop, 1))},
        "batched_over_loop": round(b / lp, 1),
        "batched_over_loop_wall": round(rate(batched, 1) / rate(loop, 1), 1),
        "target_10x_met": b / lp >= 10,
        "matmul_roof_gflops_per_core": round(roof_flops / 1e9, 1),
        "matmul_roof_gflops_all_threads": round(args.threads * roof_flops / 1e9, 1),
        "batched_useful_share_of_roof": round(2 * params * b / roof_flops, 4),
        "one_batch": {"generate_cpu_s": round(gen_cpu, 3), "bare_decode_cpu_s": round(dec_cpu, 3),
                      "generate_over_bare_decode": round(gen_cpu / dec_cpu, 2),
                      "computed_positions_share_of_roof": round(2 * params * positions / gen_cpu / roof_flops, 4),
                      "useful_share_of_decoding_steps": round(useful, 3)},
        "repeats": args.repeat,
    }, indent=2))


if __name__ == "__main__":
    main()

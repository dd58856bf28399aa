"""CPU oversubscription: the smoke loop alone and beside one busy process, per thread policy.

    python bench/threads.py [--repeat 1] [--busy torch|python]

Each configuration runs `selfloop run loop=smoke` (quick sizes: bootstrap 200 steps, one
round) in a fresh process and records wall and CPU seconds; "beside" starts one CPU-bound
process first (`torch`: a torch matmul loop with its default threads, like a second training
job; `python`: a one-thread pure-Python loop). Ratios are to the same policy's time alone, and
to the default policy alone, measured in this same script so machine noise hits all alike.

Policies:
  default       what torch does with no settings (one OpenMP thread per core, spin-waiting)
  passive       OMP_WAIT_POLICY=PASSIVE: idle threads sleep instead of spinning
  one-thread    OMP_NUM_THREADS=1
  selfloop      what `selfloop run` does when the user set nothing (selfloop.threads)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

SMOKE = ["loop=smoke", "loop.rounds=1", "loop.bootstrap.optimize.sft.max_steps=200", "optimize.sft.max_steps=40"]
POLICIES = {
    "default": {"SELFLOOP_THREADS": "off"},
    "passive": {"SELFLOOP_THREADS": "off", "OMP_WAIT_POLICY": "PASSIVE"},
    "one-thread": {"SELFLOOP_THREADS": "off", "OMP_NUM_THREADS": "1"},
    "selfloop": {},
}
BUSY = {
    "torch": "import torch\nx = torch.randn(512, 512)\nwhile True:\n    x = torch.tanh(x @ x / 512)\n",
    "python": "while True:\n    sum(i * i for i in range(10000))\n",
}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "SELFLOOP_THREADS")


def run_smoke(policy: dict[str, str]) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(policy, HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "selfloop.cli", "run", *SMOKE, f"hydra.run.dir={tmp}/run"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--busy", choices=sorted(BUSY), default="torch")
    parser.add_argument("--policies", default=",".join(POLICIES))
    args = parser.parse_args()
    chosen = args.policies.split(",")
    results: dict[str, dict[str, list[dict]]] = {p: {"alone": [], "beside": []} for p in chosen}
    for _ in range(args.repeat):
        for policy in chosen:  # interleaved: noise hits every policy alike
            results[policy]["alone"].append(run_smoke(POLICIES[policy]))
            busy = subprocess.Popen([sys.executable, "-c", BUSY[args.busy]], env={**os.environ, **{k: "" for k in ()}})
            try:
                time.sleep(2)  # let it start spinning
                results[policy]["beside"].append(run_smoke(POLICIES[policy]))
            finally:
                busy.kill()
                busy.wait()

    def median(rows: list[dict], key: str) -> float:
        values = sorted(r[key] for r in rows)
        return values[len(values) // 2]

    base = median(results[chosen[0]]["alone"], "wall_s")
    summary = {}
    for policy in chosen:
        alone, beside = (median(results[policy][k], "wall_s") for k in ("alone", "beside"))
        summary[policy] = {
            "alone_wall_s": alone,
            "beside_wall_s": beside,
            "beside_over_alone": round(beside / alone, 2),
            f"alone_over_{chosen[0]}_alone": round(alone / base, 2),
            f"beside_over_{chosen[0]}_alone": round(beside / base, 2),
            "beside_cpu_s": median(results[policy]["beside"], "cpu_s"),
        }
    print(json.dumps({"busy": args.busy, "cores": os.cpu_count(), "runs": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()

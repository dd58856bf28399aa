"""sft's options: where a round starts (init), replay of earlier rounds, LoRA adapters, and
data-parallel training under accelerate (2 CPU processes, gloo)."""

import collections
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfloop.data import make_rows, save
from selfloop.errors import OptionError
from selfloop.model import ModelHandle
from selfloop_plugins.optimize.sft import SFT, SFTConfig

TINY = ["model.tiny.n_embd=32", "model.tiny.n_layer=1", "model.tiny.n_head=2"]


def rows(prompts_answers, source="acquire/task_sampler", round_=1, reference=False):
    data = make_rows(dict(id=f"{source}-{round_}-{i}", prompt=p, answer=a, reference=a, source=source, round=round_)
                     for i, (p, a) in enumerate(prompts_answers))
    return data if reference else data.remove_columns("reference")


def reversal_rows(n=40, level=3, seed=1):
    rng = random.Random(seed)
    strings = ["".join(rng.choice("0123456789") for _ in range(level)) for _ in range(n)]
    return rows([(s + "=", s[::-1]) for s in strings])


def write_round(ctx, round_, data, promoted=True, model=None):
    """A finished round in ctx's run directory: its kept rows (or bootstrap rows), its model, its record."""
    stage = "acquire" if round_ == 0 else "filter"
    ctx.run_dir.write_stage(round_, stage, {}, lambda tmp: save(data, tmp / "data"))
    if model is not None:
        ctx.run_dir.write_stage(round_, "optimize", {}, lambda tmp: model.save(tmp / "model"))
    ctx.run_dir.write_stage(round_, "promote", {"round": round_, "promoted": promoted, "incumbent_round": round_})


def perturbed(handle, scale):
    """A copy of ``handle`` with every trainable weight moved by ``scale`` (a distinct model)."""
    copy = handle.clone()
    with torch.no_grad():
        for p in copy.model.parameters():
            if p.requires_grad:
                p.add_(scale)
    return copy


def close_to(a, b, atol=1e-4):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return all(torch.allclose(sa[k], sb[k].to(sa[k].device), atol=atol) for k in sa)


# -- init: where a round starts --------------------------------------------------------------
@pytest.fixture
def three_models(make_ctx):
    """A round-2 context whose incumbent, round 0's model and the provider's initial model all differ."""
    from selfloop.context import seed_everything, stage_seed

    ctx = make_ctx(TINY, round_=2)
    provider = ctx.strategies["model"][0]
    seed_everything(stage_seed(ctx.run.seed, 0, "model"))
    initial = provider.build(ctx)  # what round 0 got from the provider
    bootstrap = perturbed(initial, 0.05)
    write_round(ctx, 0, rows([("1=", "1")] * 4, source="bootstrap", round_=0, reference=True), model=bootstrap)
    ctx.model = perturbed(initial, -0.05)
    return ctx, {"incumbent": ctx.model, "bootstrap": bootstrap, "initial": initial}


@pytest.mark.parametrize("init", ["incumbent", "bootstrap", "initial"])
def test_init_starts_from_the_chosen_model(three_models, init):
    ctx, models = three_models
    # one step at a tiny learning rate: the candidate stays within 1e-6 of where it started
    sft = SFT(SFTConfig(max_steps=1, batch_size=4, learning_rate=1e-7, warmup_ratio=0.0, init=init, replay_fraction=0.0))
    before = {k: v.clone() for k, v in ctx.model.model.state_dict().items()}
    candidate = sft.optimize(ctx, reversal_rows(8))
    assert [name for name, m in models.items() if close_to(candidate, m)] == [init]
    assert all(torch.equal(before[k], v) for k, v in ctx.model.model.state_dict().items())  # incumbent untouched
    assert ctx.notes["sft"]["init"] == init


def test_round_0_starts_from_the_incumbent_whatever_init_says(three_models):
    ctx, models = three_models
    ctx.round = 0
    candidate = SFT(SFTConfig(max_steps=1, batch_size=4, learning_rate=1e-7, init="bootstrap", replay_fraction=0.0)).optimize(ctx, reversal_rows(8))
    assert close_to(candidate, models["incumbent"])


# -- replay ----------------------------------------------------------------------------------
def test_replay_mixes_bootstrap_and_earlier_self_labels_of_promoted_rounds(make_ctx):
    ctx = make_ctx(TINY, round_=3)
    write_round(ctx, 0, rows([("1=", "1")] * 5, source="bootstrap", round_=0, reference=True))
    write_round(ctx, 1, rows([("22=", "22")] * 5, round_=1))
    write_round(ctx, 2, rows([("333=", "333")] * 5, round_=2), promoted=False)  # rejected: never replayed
    new = rows([("4444=", "4444")] * 5, round_=3)
    sft = SFT(SFTConfig(max_steps=20, batch_size=10, replay_fraction=0.5, replay_bootstrap_share=0.5))
    pools = sft.mixture(ctx, new)
    assert [share for share, _ in pools] == pytest.approx([0.5, 0.25, 0.25])
    assert all("reference" not in ds.column_names for _, ds in pools)
    from selfloop_plugins.models.tiny import char_tokenizer

    tok = char_tokenizer(ctx.task.alphabet)
    train, lengths = sft.training_rows(ctx, pools, tok)
    prompts = collections.Counter(tok.decode(ids, skip_special_tokens=True).split("=")[0] + "=" for ids in train["input_ids"])
    assert prompts == {"4444=": 100, "1=": 50, "22=": 50}  # 200 rows = max_steps x batch_size, by share
    assert len(lengths) == 200
    # the default replays the bootstrap only (the default acquirer relabels earlier levels instead)
    assert [ds["source"][0] for _, ds in SFT(SFTConfig()).mixture(ctx, new)] == ["acquire/task_sampler", "bootstrap"]


# -- LoRA ------------------------------------------------------------------------------------
@pytest.fixture
def on_disk(make_ctx, tmp_path):
    """A context whose incumbent was loaded from disk (as the loop loads every round's model)."""
    ctx = make_ctx(TINY)
    ctx.strategies["model"][0].build(ctx).save(tmp_path / "incumbent")
    ctx.model = ModelHandle.load(tmp_path / "incumbent", device="cpu")
    return ctx


def lora(**options):
    return SFT(SFTConfig(max_steps=8, batch_size=8, learning_rate=1e-2, replay_fraction=0.0, lora_rank=4, **options))


def test_lora_trains_only_the_adapted_layers_and_merges(on_disk, tmp_path):
    ctx = on_disk
    before = {k: v.clone() for k, v in ctx.model.model.state_dict().items()}
    candidate = lora(lora_target_modules=["c_attn"]).optimize(ctx, reversal_rows())
    after = candidate.model.state_dict()
    assert set(after) == set(before)  # merged: a plain model again
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".attn.c_attn." in k for k in changed)  # nothing else moved
    n_embd = ctx.model.model.config.n_embd
    assert ctx.notes["sft"]["trainable_parameters"] == 4 * (n_embd + 3 * n_embd)  # rank x (in + out), one layer
    candidate.save(tmp_path / "merged")
    again = ModelHandle.load(tmp_path / "merged", device="cpu")
    prompts = ["12=", "345=", "6789="]
    assert again.generate(prompts, max_new_tokens=5) == candidate.generate(prompts, max_new_tokens=5)


def test_lora_saved_as_adapters_reloads_generates_the_same_and_continues(on_disk, tmp_path):
    ctx = on_disk
    candidate = lora(lora_save="adapter").optimize(ctx, reversal_rows())  # peft's default targets for GPT-2
    candidate.save(tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    again = ModelHandle.load(tmp_path / "adapter", device="cpu")  # the base comes from the incumbent's directory
    prompts = ["12=", "345=", "6789="]
    assert again.generate(prompts, max_new_tokens=5) == candidate.generate(prompts, max_new_tokens=5)
    assert again.logprobs(prompts, ["21", "543", "9876"]) == pytest.approx(candidate.logprobs(prompts, ["21", "543", "9876"]), abs=1e-5)
    # the next round continues these adapters (not fresh ones, whose lora_B starts at zero)
    ctx.model = again
    adapters = {k.split("base_model.model.")[-1]: v for k, v in candidate.model.state_dict().items() if "lora_" in k}
    nxt = SFT(SFTConfig(max_steps=1, batch_size=8, learning_rate=1e-7, warmup_ratio=0.0, replay_fraction=0.0, lora_rank=4, lora_save="adapter")).optimize(ctx, reversal_rows())
    continued = {k.split("base_model.model.")[-1]: v for k, v in nxt.model.state_dict().items() if "lora_" in k}
    assert continued.keys() == adapters.keys() and all(torch.allclose(continued[k], adapters[k], atol=1e-5) for k in adapters)
    assert any(v.abs().sum() > 0 for k, v in continued.items() if "lora_B" in k)


def test_full_fine_tuning_needs_no_peft(on_disk, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails, as where it is not installed
    before = {k: v.clone() for k, v in on_disk.model.model.state_dict().items()}
    candidate = SFT(SFTConfig(max_steps=2, batch_size=8, replay_fraction=0.0)).optimize(on_disk, reversal_rows())
    assert any(not torch.equal(before[k], v) for k, v in candidate.model.state_dict().items())


def test_lora_target_modules_the_model_lacks_are_named_with_those_it_has(on_disk):
    with pytest.raises(OptionError, match=r"optimize\.sft\.lora_target_modules=\['q_proj', 'c_attn'\].*c_attn, c_fc, c_proj.*not found: q_proj"):
        lora(lora_target_modules=["q_proj", "c_attn"]).optimize(on_disk, reversal_rows())


def test_adapters_need_a_base_on_disk(make_ctx):
    ctx = make_ctx(TINY)
    ctx.model = ctx.strategies["model"][0].build(ctx)  # built from a config: never saved
    with pytest.raises(OptionError, match=r"lora_save='adapter'.*never saved to disk.*lora_rank=0"):
        lora(lora_save="adapter").optimize(ctx, reversal_rows())


def test_adapters_through_the_loop_continue_round_after_round(selfloop_smoke_loop):
    # round 0 trains fully; rounds 1 and 2 save adapters, round 2 continuing round 1's (the loop
    # reloads each round's adapters with ModelHandle.load to evaluate and to start the next round)
    run = selfloop_smoke_loop(["optimize.sft.lora_rank=4", "+loop.bootstrap.optimize.sft.lora_rank=0", "optimize.sft.lora_save=adapter",
                               "filter=[]", "loop.promotion.tolerance=1.0"], rounds=2)
    assert run.status == "completed" and [r["promoted"] for r in run.records] == [True, True, True]
    for round_ in (1, 2):
        files = {p.name for p in (run.run_dir / f"round-00{round_}" / "optimize" / "model").iterdir()}
        assert "adapter_model.safetensors" in files and "model.safetensors" not in files
        assert run.stage_metrics(round_, "optimize")["notes"]["sft"]["trainable_parameters"] < 5000  # adapters only
    assert "model.safetensors" in {p.name for p in (run.run_dir / "round-000" / "optimize" / "model").iterdir()}
    r1 = ModelHandle.load(run.run_dir / "round-001" / "optimize" / "model", device="cpu").model.state_dict()
    r2 = ModelHandle.load(run.run_dir / "round-002" / "optimize" / "model", device="cpu").model.state_dict()
    lora = [k for k in r1 if "lora_" in k]
    assert lora and any(not torch.equal(r1[k], r2[k]) for k in lora)  # round 2 trained them further


@pytest.mark.parametrize(("option", "value"), [("init", "base"), ("lora_rank", -1), ("lora_save", "both"), ("lora_dropout", 1.0), ("lora_target_modules", [])])
def test_bad_options_are_refused(option, value):
    with pytest.raises(OptionError, match=option):
        SFTConfig(**{option: value})


# -- data parallelism through accelerate -----------------------------------------------------
SCRIPT = '''
"""sft's training on tiny sizes; each process writes the rows it trained on and its weights."""
import hashlib, json, os, random, sys
from pathlib import Path

import torch
import trl.trainer.sft_trainer as sft_trainer

from selfloop.data import make_rows
from selfloop.testing import build_ctx
from selfloop_plugins.optimize.sft import SFT, SFTConfig

out, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
seen = []
collate = sft_trainer.DataCollatorForLanguageModeling.torch_call

def spy(self, examples):  # the rows of each batch this process trains on
    seen.append([list(e["input_ids"]) for e in examples])
    return collate(self, examples)

sft_trainer.DataCollatorForLanguageModeling.torch_call = spy
ctx = build_ctx(run_dir, ["model.tiny.n_embd=32", "model.tiny.n_layer=1", "model.tiny.n_head=2"], with_model=True)
problems = ctx.task.sample(random.Random(1), 3, 40)
rows = make_rows(dict(id=str(i), prompt=p.prompt, answer=p.reference) for i, p in enumerate(problems)).remove_columns("reference")
sft = SFT(SFTConfig(max_steps=4, batch_size=8, replay_fraction=0.0, learning_rate=3e-3))
start = {k: v.clone() for k, v in ctx.model.model.state_dict().items()}
ctx.rng = random.Random(0)
candidate = sft.optimize(ctx, rows)
ctx.rng = random.Random(0)
expected, _ = sft.training_rows(ctx, sft.mixture(ctx, rows), ctx.model.tokenizer)
weights = candidate.model.state_dict()
(out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({
    "processes": ctx.notes["sft"].get("processes", 1),
    "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
    "batches": seen,
    "expected": [list(r) for r in expected["input_ids"]],
    "digest": hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest(),
    "trained": any(not torch.equal(start[k], weights[k]) for k in start),
}))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes importing torch, transformers and TRL: about a minute on 2 shared cores
def test_sft_trains_data_parallel_under_accelerate_launch(tmp_path):
    (tmp_path / "out").mkdir()
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    accelerate = Path(sys.executable).with_name("accelerate")
    # --multi_gpu selects accelerate's torchrun launcher; on a machine without GPUs the Trainer
    # (use_cpu) joins a gloo process group (`--cpu` alone starts one process, or needs MPI)
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(script), str(tmp_path / "out"), str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["processes"] == 2 and r["backend"] == "gloo" and r["trained"] for r in ranks)
    # every step's 8 rows were split 4 + 4 across the processes, each row trained on exactly once ...
    assert all([len(b) for b in r["batches"]] == [4, 4, 4, 4] for r in ranks)
    seen = collections.Counter(tuple(row) for r in ranks for batch in r["batches"] for row in batch)
    assert seen == collections.Counter(tuple(row) for row in ranks[0]["expected"])
    # ... and the gradients were averaged: different rows, identical weights
    assert ranks[0]["batches"] != ranks[1]["batches"] and ranks[0]["digest"] == ranks[1]["digest"]

"""Model providers: `pretrained` on tiny GPT-2 and Llama-shaped models saved to a temp dir
(nothing downloaded), and the configuration `vllm` builds (vllm is not installed here)."""

import importlib.util
import json
import types

import pytest
import torch

from selfloop.errors import OptionError, SelfloopError
from selfloop.model import ModelHandle
from selfloop.testing import ModelProviderContract
from selfloop_plugins.models import vllm as vllm_provider
from selfloop_plugins.models.pretrained import CHAT_KEY, PAD_KEY, Pretrained, PretrainedConfig
from selfloop_plugins.models.vllm import VLLM, VLLMConfig, engine_kwargs, sampling, trl_vllm_args

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def bpe_tokenizer(chat_template=None, pad=False):
    """A small byte-level BPE tokenizer trained here (covers any text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = ["123= 321", "4567= 7654", "user assistant", "hello world"] * 10
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **({"pad_token": "<unk>"} if pad else {}))
    if chat_template:
        tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """{"gpt2": dir, "llama": dir}: a GPT-2 whose tokenizer has no pad token, and a Llama-shaped
    model whose tokenizer has a ChatML chat template (hidden 32, 2 layers each)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    out = {}
    tok = bpe_tokenizer()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    out["gpt2"] = root / "gpt2"
    gpt2.save_pretrained(out["gpt2"])
    tok.save_pretrained(out["gpt2"])
    tok = bpe_tokenizer(CHATML, pad=True)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    out["llama"] = root / "llama"
    llama.save_pretrained(out["llama"])
    tok.save_pretrained(out["llama"])
    return out


def provider(path, **options):
    return Pretrained(PretrainedConfig(name_or_path=str(path), **options))


def selecting(path, **options):
    """Overrides that select `pretrained` on ``path`` (the contract suites compose with them)."""
    return ["model=pretrained", f"model.pretrained.name_or_path={path}", *(f"model.pretrained.{k}={v}" for k, v in options.items())]


class TestPretrainedGPT2(ModelProviderContract):
    @pytest.fixture
    def strategy(self, saved_models):
        self.overrides = selecting(saved_models["gpt2"])  # the path exists only once the fixture ran
        return provider(saved_models["gpt2"])


class TestPretrainedLlamaChat(ModelProviderContract):
    @pytest.fixture
    def strategy(self, saved_models):
        self.overrides = selecting(saved_models["llama"], chat="always")
        return provider(saved_models["llama"], chat="always")


# -- loading --------------------------------------------------------------------------
def test_loads_the_saved_weights_in_the_requested_dtype(make_ctx, saved_models):
    from transformers import AutoModelForCausalLM

    ctx = make_ctx()
    handle = provider(saved_models["llama"], dtype="bfloat16").build(ctx)
    assert handle.model.dtype == torch.bfloat16 and handle.device.type == "cpu"
    reference = AutoModelForCausalLM.from_pretrained(saved_models["llama"])
    name, weight = next(iter(reference.state_dict().items()))
    assert torch.equal(handle.model.state_dict()[name], weight.to(torch.bfloat16))  # the saved weights, not a fresh init
    assert provider(saved_models["llama"]).build(ctx).model.dtype == torch.float32


def test_device_option_overrides_the_runs_device(make_ctx, saved_models, tmp_path):
    ctx = make_ctx()
    ctx.device = "meta"  # a run device that cannot hold weights: the option must win
    chosen = provider(saved_models["gpt2"], device="cpu")
    handle = chosen.build(ctx)
    assert handle.device.type == "cpu"
    handle.save(tmp_path / "round1")
    assert chosen.load(ctx, tmp_path / "round1").device.type == "cpu"  # a later round's model, reloaded by its provider


def test_a_tokenizer_without_a_pad_token_gets_one_and_it_is_recorded(make_ctx, saved_models, tmp_path):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(saved_models["gpt2"]).pad_token is None
    ctx = make_ctx(["model=pretrained", f"model.pretrained.name_or_path={saved_models['gpt2']}"])
    assert any("no pad token" in w and "</s>" in w for w in ctx.setup_warnings)  # in run.json and the report
    handle = ctx.strategies["model"][0].build(ctx)
    assert handle.tokenizer.pad_token == "</s>" and handle.model.config.pad_token_id == handle.tokenizer.eos_token_id
    handle.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())[PAD_KEY] == "eos:</s>"
    # padded batches generate what single prompts do (left padding is masked)
    prompts = ["1=", "12345=", "12="]
    assert handle.generate(prompts, max_new_tokens=4) == [handle.generate([p], max_new_tokens=4)[0] for p in prompts]


def test_a_tokenizer_without_pad_or_eos_gets_a_new_pad_token():
    from selfloop_plugins.models.pretrained import add_pad_token
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = bpe_tokenizer()
    tok.eos_token = None
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=32))
    before = len(tok)
    assert add_pad_token(tok, model) == "added:<pad>"
    assert len(tok) == before + 1 and model.get_input_embeddings().weight.shape[0] == len(tok)


# -- chat templates -------------------------------------------------------------------
def test_chat_template_frames_prompts_for_generation_training_and_reloads(make_ctx, saved_models, tmp_path):
    from selfloop_plugins.optimize.sft import tokenize_rows

    ctx = make_ctx()
    handle = provider(saved_models["llama"], chat="always").build(ctx)
    tok = handle.tokenizer
    expected = tok.apply_chat_template([{"role": "user", "content": "123="}], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert tok("123=")["input_ids"] == expected  # what generate and logprobs tokenize
    ids, labels = tokenize_rows(tok, ["123="], ["321"])  # what sft trains on
    assert ids[0][: len(expected)] == expected and labels[0][: len(expected)] == [-100] * len(expected)
    assert tok("321", add_special_tokens=False)["input_ids"] == ids[0][len(expected) : -1]  # the answer itself unframed
    handle.save(tmp_path / "m")
    again = ModelHandle.load(tmp_path / "m", device="cpu")  # how the loop loads every later round's model
    assert again.tokenizer("123=")["input_ids"] == expected
    assert json.loads((tmp_path / "m" / "config.json").read_text())[CHAT_KEY] is True


def test_chat_auto_follows_the_task_and_never_turns_it_off(make_ctx, saved_models):
    ctx = make_ctx()
    raw = provider(saved_models["llama"]).build(ctx).tokenizer("123=")["input_ids"]
    assert raw == provider(saved_models["llama"], chat="never").build(ctx).tokenizer("123=")["input_ids"]
    assert "<|im_start|>" not in provider(saved_models["llama"]).build(ctx).tokenizer.decode(raw)  # reversal asks for no chat format
    ctx.task = types.SimpleNamespace(chat_format=True, name="chatty")
    framed = provider(saved_models["llama"]).build(ctx).tokenizer("123=")["input_ids"]
    assert len(framed) > len(raw)


def test_chat_always_without_a_template_is_refused_at_setup(make_ctx, saved_models):
    with pytest.raises(OptionError, match=r"model\.pretrained\.chat='always'.*has no chat template"):
        make_ctx(["model=pretrained", f"model.pretrained.name_or_path={saved_models['gpt2']}", "model.pretrained.chat=always"])


# -- bad input ------------------------------------------------------------------------
def test_a_missing_path_is_one_clear_error_before_the_run(make_ctx, tmp_path):
    with pytest.raises(OptionError, match=r"model\.pretrained\.name_or_path=.*no-such-model.*no such directory"):
        make_ctx(["model=pretrained", f"model.pretrained.name_or_path={tmp_path / 'no-such-model'}"])


def test_a_model_that_is_not_a_causal_lm_is_refused_by_its_config(make_ctx, tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(OptionError, match=r"accepted: a causal language model; its config\.json names BertForMaskedLM"):
        make_ctx(["model=pretrained", f"model.pretrained.name_or_path={tmp_path / 'bert'}"])


def test_a_directory_without_config_or_safetensors_is_refused(make_ctx, saved_models, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(OptionError, match="no config.json"):
        make_ctx(["model=pretrained", f"model.pretrained.name_or_path={tmp_path / 'empty'}"])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((saved_models["gpt2"] / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(OptionError, match=r"safetensors weights.*found pytorch_model\.bin"):
        make_ctx(["model=pretrained", f"model.pretrained.name_or_path={pickled}"])


def test_an_uncached_hub_name_offline_is_one_clear_error(make_ctx):
    with pytest.raises(SelfloopError, match=r"model 'nobody-here/no-such-model': cannot read its config"):
        make_ctx(["model=pretrained", "model.pretrained.name_or_path=nobody-here/no-such-model"])


@pytest.mark.parametrize(("option", "value"), [("dtype", "float8"), ("chat", "yes"), ("device", "gpu 0")])
def test_bad_options_are_refused(option, value):
    with pytest.raises(OptionError, match=option):
        PretrainedConfig(name_or_path="x", **{option: value})


# -- vllm (not installed here: the configuration it builds, and its code path on a stand-in engine) --
HAS_VLLM = importlib.util.find_spec("vllm") is not None


class TestVLLMProvider(ModelProviderContract):
    @pytest.fixture
    def strategy(self, saved_models):
        self.overrides = ["model=vllm", f"model.vllm.name_or_path={saved_models['gpt2']}"]
        return VLLM(VLLMConfig(name_or_path=str(saved_models["gpt2"])))

    def test_builds_a_model_that_generates_and_round_trips(self, strategy, request):
        if not HAS_VLLM:
            pytest.skip("vllm is not installed (it needs a CUDA GPU)")
        super().test_builds_a_model_that_generates_and_round_trips(strategy, request.getfixturevalue("ctx"), request.getfixturevalue("tmp_path"))


@pytest.mark.skipif(HAS_VLLM, reason="checks the message shown when vllm is missing")
def test_vllm_without_the_package_is_one_clear_error_at_setup(make_ctx, saved_models):
    with pytest.raises(SelfloopError, match=r"needs the vllm package, which is not installed: `pip install vllm`.*model=pretrained"):
        make_ctx(["model=vllm", f"model.vllm.name_or_path={saved_models['gpt2']}"])


def test_vllm_engine_and_sampling_settings_are_trls_own_arguments():
    import inspect

    from trl.generation.vllm_generation import VLLMGeneration

    config = VLLMConfig(name_or_path="x", gpu_memory_utilization=0.5, tensor_parallel_size=2, max_model_len=256, enable_sleep_mode=False)
    kwargs = engine_kwargs(config)
    assert kwargs == {"mode": "colocate", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.5, "max_model_length": 256,
                      "enable_sleep_mode": False, "trust_remote_code": False, "logprobs": 0}
    accepted = set(inspect.signature(VLLMGeneration.__init__).parameters)
    assert set(kwargs) <= accepted
    settings = sampling(0.7, 12)
    assert settings == {"temperature": 0.7, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "max_completion_length": 12}
    assert set(settings) <= accepted  # attributes VLLMGeneration.generate reads
    assert sampling(0, 4)["temperature"] == 0.0  # greedy


def test_trl_vllm_args_turn_on_grpos_vllm_rollouts():
    import dataclasses

    from trl import GRPOConfig

    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    colocate = trl_vllm_args(types.SimpleNamespace(strategies={"model": [VLLM(VLLMConfig(name_or_path="x", gpu_memory_utilization=0.4))]}))
    assert colocate == {"use_vllm": True, "vllm_mode": "colocate", "vllm_enable_sleep_mode": True, "vllm_gpu_memory_utilization": 0.4,
                        "vllm_tensor_parallel_size": 1, "vllm_max_model_length": None}
    server = trl_vllm_args(types.SimpleNamespace(strategies={"model": [VLLM(VLLMConfig(name_or_path="x", grpo_mode="server", server_base_url="http://h:8000"))]}))
    assert server["vllm_mode"] == "server" and server["vllm_server_base_url"] == "http://h:8000"
    assert set(colocate) <= fields and set(server) <= fields
    assert trl_vllm_args(types.SimpleNamespace(strategies={"model": [Pretrained(PretrainedConfig(name_or_path="x"))]})) == {}
    with pytest.raises(OptionError, match="server_base_url"):
        VLLMConfig(name_or_path="x", grpo_mode="server")


class FakeEngine:
    """Stands in for TRL's VLLMGeneration: answers each prompt with its token ids reversed."""

    def __init__(self, model, tokenizer, kwargs):
        self.model, self.kwargs, self.calls, self.syncs = model, kwargs, [], 0
        self.enable_sleep_mode = kwargs["enable_sleep_mode"]

    def sync_weights(self):
        self.syncs += 1

    def generate(self, prompts, images, num_generations):
        self.calls.append({"prompts": prompts, "n": num_generations, "temperature": self.temperature, "top_k": self.top_k,
                           "max_completion_length": self.max_completion_length})
        completions = [list(reversed(p))[: self.max_completion_length] for p in prompts]
        return prompts, completions, [[[-0.5]] * len(c) for c in completions], None


def test_vllm_handle_generates_through_the_engine(make_ctx, saved_models, monkeypatch, tmp_path):
    engines = []
    monkeypatch.setattr(vllm_provider, "_require_vllm", lambda: None)
    monkeypatch.setattr(vllm_provider, "make_engine", lambda m, t, kw: engines.append(FakeEngine(m, t, kw)) or engines[-1])
    monkeypatch.setattr(vllm_provider, "_ENGINES", {})
    ctx = make_ctx()
    provider = VLLM(VLLMConfig(name_or_path=str(saved_models["gpt2"]), dtype="float32"))
    handle = provider.build(ctx)
    before = ModelHandle.generated_sequences
    outs, logprobs = handle.generate(["12=", "345="], n=2, temperature=0.7, max_new_tokens=3, return_logprobs=True)
    (engine,) = engines
    assert engine.kwargs == engine_kwargs(provider.config) and engine.model is handle.model
    (call,) = engine.calls
    ids = [handle.tokenizer(p)["input_ids"] for p in ("12=", "345=")]
    assert call == {"prompts": [ids[0], ids[0], ids[1], ids[1]], "n": 2, "temperature": 0.7, "top_k": 0, "max_completion_length": 3}
    expected = [handle.tokenizer.decode(list(reversed(i))[:3], skip_special_tokens=True) for i in ids]
    assert outs == [[expected[0]] * 2, [expected[1]] * 2] and logprobs == [[-0.5] * 2] * 2
    assert ModelHandle.generated_sequences - before == 4
    # a later round's model (as the loop reloads it) pushes its weights into the same engine
    handle.save(tmp_path / "round1")
    later = provider.load(ctx, tmp_path / "round1")
    later.generate(["6="], max_new_tokens=2)
    assert len(engines) == 1 and engine.model is later.model and engine.syncs == 1 and engine.calls[-1]["temperature"] == 0.0


def test_the_loop_reloads_saved_rounds_through_the_model_provider(selfloop_smoke_loop, monkeypatch):
    from selfloop_plugins.models.tiny import Tiny

    loaded = []

    def load(self, ctx, path):
        loaded.append(path.parent.parent.name)
        return ModelHandle.load(path, device=ctx.device)

    monkeypatch.setattr(Tiny, "load", load)
    run = selfloop_smoke_loop(["filter=[]"], rounds=1)
    assert run.status == "completed"
    assert loaded and set(loaded) <= {"round-000", "round-001"} and "round-001" in loaded  # each candidate, through its provider


def test_a_provider_without_load_gets_the_default_reload(make_ctx, tmp_path):
    ctx = make_ctx()
    saved = ctx.strategies["model"][0].build(ctx).save(tmp_path / "m")
    ctx.strategies["model"] = [types.SimpleNamespace(name="old_style")]  # an 0.1 provider: build only
    handle = ctx.reload_model(saved)
    assert isinstance(handle, ModelHandle) and handle.device == torch.device(ctx.device)


# -- tiny with Abacus digit-index embeddings (McLeish et al. 2024) ---------------------------
def abacus_handle(make_ctx, **options):
    overrides = ["task=addition", "filter=[uncertainty]", "model.tiny.positional=abacus", "model.tiny.n_layer=2", "model.tiny.n_embd=32", "model.tiny.n_head=2"]
    ctx = make_ctx(overrides + [f"model.tiny.{k}={v}" for k, v in options.items()])
    handle = ctx.strategies["model"][0].build(ctx)
    with torch.no_grad():  # large weights, so a wrong position id changes the argmax
        for param in handle.model.parameters():
            param.normal_(0, 1.0)
    return ctx, handle


def test_abacus_positions_count_digits_within_each_number():
    from selfloop_plugins.models.abacus import abacus_positions
    from selfloop_plugins.models.tiny import char_tokenizer

    tok = char_tokenizer("0123456789+=")
    ids = torch.tensor([tok("12+345=6789")["input_ids"], tok("9+9=81")["input_ids"] + [tok.pad_token_id] * 5])
    digits = torch.tensor(tok.convert_tokens_to_ids(list("0123456789")))
    # <bos> 1 2 + 3 4 5 = 6 7 8 9
    assert abacus_positions(ids, digits)[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert abacus_positions(ids, digits)[1].tolist() == [0, 1, 0, 1, 0, 1, 2, 0, 0, 0, 0, 0]
    shifted = abacus_positions(ids, digits, offset=torch.tensor([10, 0]), limit=14)
    assert shifted[0].tolist() == [10, 11, 12, 10, 11, 12, 13, 10, 11, 12, 13, 13]  # clipped to the table
    assert shifted[1].tolist() == abacus_positions(ids, digits)[1].tolist()


def test_abacus_generation_with_a_cache_matches_full_forward_passes(make_ctx):
    from transformers import GPT2LMHeadModel

    from selfloop_plugins.models.abacus import abacus_positions

    ctx, handle = abacus_handle(make_ctx)
    model, tok = handle.model.eval(), handle.tokenizer
    assert type(model).__name__ == "AbacusGPT2LMHeadModel"
    plain = GPT2LMHeadModel(model.config).eval()  # the same weights without the Abacus hook
    plain.load_state_dict(model.state_dict())
    digits = torch.tensor(model.config.abacus_digit_ids)
    for prompt in ["12+34=", "999+1=", "1234+5678="]:
        x = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            out = model.generate(x, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
            cached = torch.stack(out.logits, 1)[0]  # the logits of each step, computed with the cache
            full = out.sequences[:, :-1]
            abacus = plain(input_ids=full, position_ids=abacus_positions(full, digits)).logits[0, x.shape[1] - 1 :]
            counted = plain(input_ids=full).logits[0, x.shape[1] - 1 :]
        assert torch.allclose(cached, abacus, atol=1e-4), prompt
        assert not torch.allclose(cached, counted, atol=1e-2), prompt  # the check can tell them apart
    prompts = ["12+34=", "999+1=", "5+50="]  # batched and left-padded, as the loop generates
    assert handle.generate(prompts, max_new_tokens=5) == [handle.generate([p], max_new_tokens=5)[0] for p in prompts]


def test_abacus_offsets_are_random_in_training_only_and_survive_a_reload(make_ctx, tmp_path):
    ctx, handle = abacus_handle(make_ctx, abacus_max_offset=8)
    model, tok = handle.model, handle.tokenizer
    x = torch.tensor([tok("123+45=")["input_ids"]] * 4)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(input_ids=x).logits, model(input_ids=x).logits)
        model.train()
        torch.manual_seed(0)
        trained = model(input_ids=x).logits
        assert not all(torch.allclose(trained[0], trained[i]) for i in range(1, 4))  # each row its own offset
    handle.save(tmp_path / "m")
    again = ctx.strategies["model"][0].load(ctx, tmp_path / "m")
    assert type(again.model).__name__ == "AbacusGPT2LMHeadModel" and again.model.config.abacus_max_offset == 8
    prompts = ["12+34=", "9+999="]
    assert again.generate(prompts, max_new_tokens=5) == handle.generate(prompts, max_new_tokens=5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task=reversal", "task.reversal.alphabet=abc"], r"no digits in its alphabet"),
        (["task=addition", "filter=[uncertainty]", "model.tiny.n_positions=16"], r"n_positions=16 is too small .* abacus_max_offset \(5\) \+ 11 digits"),
    ],
)
def test_abacus_refuses_tasks_it_cannot_serve(make_ctx, overrides, message):
    with pytest.raises(SelfloopError, match=message):
        make_ctx(["model.tiny.positional=abacus", *overrides])


def test_abacus_in_a_bad_option_lists_the_accepted_ones():
    from selfloop_plugins.models.tiny import TinyConfig

    with pytest.raises(OptionError, match="none .*learned or abacus"):
        TinyConfig(positional="alibi")

"""longseq.hf refuses what it cannot do correctly, clearly and before any work: a cache the model would not
attend through, models a longseq cache cannot serve, bad load_hf / evaluate_hf arguments and damaged
folders. Each refusal is checked to leave the model (its attention implementation) and the files as they
were."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import longseq  # noqa: E402
import longseq.hf as lh  # noqa: E402
import longseq.hf.evaluate as hf_evaluate  # noqa: E402
from longseq.cache import TOVA, Full  # noqa: E402
from longseq.testing import assert_close  # noqa: E402

BASE = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def tiny(arch: str = "llama", attn: str = "sdpa", **fields) -> torch.nn.Module:
    """A tiny random HF model of ``arch`` (nothing downloaded) with the attention implementation ``attn``."""
    config = AutoConfig.for_model(arch, **{**BASE, **fields})
    config._attn_implementation = attn
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def prompt(T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, BASE["vocab_size"], (1, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# LongseqCache built directly


def test_a_cache_without_the_models_config_is_refused():
    with pytest.raises(TypeError, match=r"needs the model's config \(config=model.config\)"):
        lh.LongseqCache(TOVA(64), 2)


def test_a_layer_that_never_attended_through_longseq_stops_the_cache():
    """A config that claims "longseq" on a model that attends with SDPA (as a model whose attention modules
    bypass AttentionInterface would): the prefill is right (nothing is cached yet), the next step raises
    instead of attending over the new token alone, and leaves no hand-over behind for other models."""
    model = tiny()
    x = prompt(8)
    # TOVA(2): a left-over hand-over used by a later call would evict, and change its logits
    c = lh.LongseqCache(TOVA(2), 2, types.SimpleNamespace(_attn_implementation=lh.ATTN_IMPLEMENTATION))
    with torch.no_grad():
        assert_close(model(input_ids=x, past_key_values=c, use_cache=True).logits, model(x).logits, name="prefill")
        with pytest.raises(RuntimeError, match="layer 0 of this LongseqCache .* never reached longseq's attention"):
            model(input_ids=prompt(1, seed=1), past_key_values=c, use_cache=True)
        switched = copy.deepcopy(model)
        lh.cache(switched, Full())  # no longseq cache passed below: plain attention, as before the switch
        assert_close(switched(x).logits, model(x).logits, name="a longseq model without a longseq cache")


# --------------------------------------------------------------------------------------------------
# cache(): everything checked before the model is switched


@pytest.mark.parametrize("policy, error, match", [
    (512, TypeError, "CachePolicy such as TOVA"),
    (TOVA, TypeError, "CachePolicy such as TOVA"),
    ("tovaa:8", ValueError, "unknown cache policy 'tovaa'"),
])
def test_a_bad_policy_leaves_the_model_as_it_was(policy, error, match):
    model = tiny()
    with pytest.raises(error, match=match):
        lh.cache(model, policy)
    assert model.config._attn_implementation == "sdpa"


DEEPSEEK = dict(kv_lora_rank=16, q_lora_rank=None, num_key_value_heads=4, qk_rope_head_dim=8, qk_nope_head_dim=16,
                v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                first_k_dense_replace=2, moe_intermediate_size=32)


@pytest.mark.parametrize("arch, attn, fields, match", [
    ("gemma2", "eager", dict(head_dim=16), r"soft-capping \(gemma2: attn_logit_softcapping=50.0\)"),
    ("gpt_oss", "eager", dict(num_local_experts=2, num_experts_per_tok=1, head_dim=16,
                              layer_types=["full_attention"] * 2), r"attention sinks parameters \(gpt_oss\)"),
    ("deepseek_v3", "eager", DEEPSEEK, "deepseek_v3 model has key heads of 24 and value heads of 8"),
    ("falcon", "sdpa", dict(new_decoder_architecture=True, num_kv_heads=2),
     r"FalconForCausalLM \(falcon\) does not route its attention through transformers' AttentionInterface"),
    ("gptj", "eager", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8), r"GPTJForCausalLM \(gptj\) does not route"),
], ids=lambda v: v if isinstance(v, str) and v.isidentifier() else None)
def test_models_a_longseq_cache_cannot_serve_are_refused_up_front(arch, attn, fields, match):
    model = tiny(arch, attn, **fields)
    with pytest.raises(NotImplementedError, match=match):
        lh.cache(model, TOVA(8))
    assert model.config._attn_implementation == attn


def test_value_heads_of_another_size_are_refused_at_attention_too():
    """A cache made by hand (skipping cache()'s checks) on a DeepSeek-style model: a clear error at the first
    attention call, not a shape error deep in the KV cache."""
    model = tiny("deepseek_v3", "eager", **DEEPSEEK)
    lh.register_attention()
    model.set_attn_implementation(lh.ATTN_IMPLEMENTATION)
    c = lh.LongseqCache(TOVA(8), 2, model.config)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="keys and values of one head size; got 24 and 8"):
        model(input_ids=prompt(5), past_key_values=c, use_cache=True)


def test_a_config_without_a_layer_count_is_refused():
    """transformers' own configs always have num_hidden_layers; a custom model's need not."""
    model = torch.nn.Linear(2, 2)
    model.config = types.SimpleNamespace(model_type="custom", _attn_implementation="sdpa")
    with pytest.raises(NotImplementedError, match="config.num_hidden_layers; this custom model's config has None"):
        lh.cache(model, TOVA(8))
    assert model.config._attn_implementation == "sdpa"


def test_a_longseq_model_is_pointed_to_its_own_state_cache():
    hf = lh.LongseqForCausalLM.from_longseq(longseq.build_model("transformer", "tiny"))
    with pytest.raises(TypeError, match="LongseqStateCache"):
        lh.cache(hf, TOVA(8))


# --------------------------------------------------------------------------------------------------
# load_hf: arguments first, then every damaged file named


@pytest.fixture
def saved(tmp_path):
    """``(save(name) -> folder, the model)``: fresh save_hf folders of one tiny model."""
    model = longseq.build_model("transformer", "tiny").eval()
    return (lambda name: lh.save_hf(model, tmp_path / name)), model


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def truncate_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dtype="bfloat16"), TypeError, "dtype must be a floating torch.dtype .* got 'bfloat16'"),
    (dict(dtype=torch.int64), TypeError, "got torch.int64"),
    (dict(device="gpu"), ValueError, "device 'gpu' is not a device longseq can use"),
], ids=str)
def test_load_hf_checks_its_arguments_before_reading(saved, kwargs, error, match):
    save, _ = saved
    folder = save("m")
    truncate_weights(folder)  # reading the weights would raise another error
    with pytest.raises(error, match=match):
        lh.load_hf(folder, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_load_hf_refuses_cuda_without_cuda_before_reading(saved):
    save, _ = saved
    folder = save("m")
    truncate_weights(folder)
    with pytest.raises(ValueError, match="device cuda asked for CUDA but torch.cuda.is_available"):
        lh.load_hf(folder, device="cuda")


def test_load_hf_names_each_damaged_file(saved):
    save, model = saved
    folder = save("list")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list/config.json must hold a JSON object; got a list"):
        lh.load_hf(folder)
    folder = save("string")
    edit_config(folder, longseq_config="oops")
    with pytest.raises(ValueError, match=r"string/config.json: longseq_config must be a JSON object .* got 'oops'"):
        lh.load_hf(folder)
    folder = save("tokenizer")
    edit_config(folder, longseq_tokenizer="hf")
    truncate_weights(folder)  # the missing tokenizer is found before the weights are read
    with pytest.raises(FileNotFoundError, match=r"names a 'hf' tokenizer but .*tokenizer has no tokenizer/ folder"):
        lh.load_hf(folder)
    folder = save("truncated")
    truncate_weights(folder)
    with pytest.raises(ValueError, match=r"truncated/model.safetensors is not a readable safetensors file"):
        lh.load_hf(folder)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():  # the checks refuse nothing good
        assert torch.equal(lh.load_hf(save("good"), dtype=torch.float64)(ids), model.double()(ids))


# --------------------------------------------------------------------------------------------------
# evaluate_hf: inputs first, longseq models pointed elsewhere


@pytest.fixture
def hf_folder(tmp_path, monkeypatch):
    """A saved tiny llama; loading any model in the test fails (every refusal must come first)."""
    tiny().save_pretrained(tmp_path / "llama")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(hf_evaluate, "load_hf_causal_lm", no_loading)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    return tmp_path / "llama"


DOC = [("doc", torch.arange(3, 33))]


@pytest.mark.parametrize("args, kwargs, match", [
    ((DOC, ["tovaa"], [8]), {}, "unknown cache policy 'tovaa'"),
    ((DOC, ["tova"], [8]), dict(metric="bpc"), "metric must be one of"),
    ((DOC, ["tova"], [0]), {}, r"budgets must be >= 1; got \[0\]"),
    (([], ["tova"], [8]), {}, "needs at least one document"),
    ((DOC, ["tova"], [8]), dict(chunk_size=0), "chunk_size must be >= 1"),
    (([("doc", torch.zeros(2, 5, dtype=torch.long))], ["tova"], [8]), {}, "must be a 1-D integer tensor"),
], ids=["policy", "metric", "budget", "no documents", "chunk size", "document shape"])
def test_evaluate_hf_checks_inputs_before_loading(hf_folder, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lh.evaluate_hf(hf_folder, *args, **kwargs)


def test_evaluate_hf_points_longseq_models_to_longseqs_own_sweep(hf_folder, tmp_path):
    model = longseq.build_model("transformer", "tiny")
    folder = lh.save_hf(model, tmp_path / "saved")
    with pytest.raises(ValueError, match=r"is a longseq model folder .*`longseq eval "):
        lh.evaluate_hf(folder, DOC, ["tova"], [8])
    with pytest.raises(ValueError, match=r"run_sweep\(model.lm"):
        lh.evaluate_hf(lh.LongseqForCausalLM.from_longseq(model), DOC, ["tova"], [8])

"""HuggingFace integration: longseq policies as a transformers Cache, HF-style save/load, evaluate_hf.

The brute-force reference for bounded caches shares no code with ``longseq.cache`` or ``longseq.ops``: at
every token it re-runs the HF model from scratch on the whole prefix (original positions), with a registered
reference attention function that gives each layer (and, for TOVA-head, each kv head) its own explicit
"may attend" mask -- row ``i`` sees exactly the tokens that layer kept before token ``i``, plus ``i`` -- and
records the new token's attention row, from which the policy's rule (by its definition) picks the victim.
"""

from __future__ import annotations

import copy
import json
import math
import os
import stat
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache  # noqa: E402

import longseq  # noqa: E402
import longseq.hf as lh  # noqa: E402
from longseq.cache import H2O, TOVA, CachePolicy, Full, Sink, Window  # noqa: E402
from longseq.testing import assert_close  # noqa: E402
from test_cache_policies import reference_victim  # noqa: E402  (tests/ is on sys.path; one reference rule)

V = 96  # vocabulary of the tiny HF models; ids 0..2 are special (pad 0), prompts use 3..V-1

# --------------------------------------------------------------------------------------------------
# tiny HF models


def _config(arch: str):
    common = dict(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
    )
    if arch == "llama":
        return transformers.LlamaConfig(**common, intermediate_size=64, num_key_value_heads=2)
    if arch == "mistral":
        return transformers.MistralConfig(
            **common, intermediate_size=64, num_key_value_heads=2, sliding_window=None
        )
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, intermediate_size=64, num_key_value_heads=2)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, intermediate_size=64, num_key_value_heads=2, head_dim=8)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(**common, intermediate_size=64, rotary_pct=0.5)
    raise AssertionError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gpt_neox"]
_MODELS: dict[str, torch.nn.Module] = {}


def hf_model(arch: str) -> torch.nn.Module:
    """A float64 tiny model with weights large enough that attention is peaked (HF's std-0.02 init gives
    near-uniform attention, where eviction decisions would hinge on rounding)."""
    if arch not in _MODELS:
        torch.manual_seed(0)
        cfg = _config(arch)
        cfg._attn_implementation = "sdpa"
        model = AutoModelForCausalLM.from_config(cfg).double().eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    scale = 1.0 if "emb" in name else 1.2 / math.sqrt(p.shape[1])
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
        _MODELS[arch] = model
    return _MODELS[arch]


def sut(arch: str) -> torch.nn.Module:
    """The model under test: its own copy, since longseq.hf.cache switches the attention implementation."""
    key = arch + "/sut"
    if key not in _MODELS:
        _MODELS[key] = copy.deepcopy(hf_model(arch))
    return _MODELS[key]


def prompt(T: int, seed: int = 0, B: int = 1) -> torch.Tensor:
    return torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, n, **kwargs):
    out = model.generate(
        input_ids=ids,
        max_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences, torch.stack(out.logits, 1)  # [B, T + n], [B, n, V]


# --------------------------------------------------------------------------------------------------
# brute-force reference

_REF: dict[str, dict[int, torch.Tensor]] = {"masks": {}, "rows": {}}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain softmax attention with an explicit per-layer, per-group mask ``[G, T, T]`` (True: may attend);
    records the last query's attention row ``[H, T]``."""
    H, Hkv = query.shape[1], key.shape[1]
    allowed = _REF["masks"][module.layer_idx]
    k = key.repeat_interleave(H // Hkv, dim=1)
    v = value.repeat_interleave(H // Hkv, dim=1)
    scores = (query @ k.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed.repeat_interleave(H // allowed.shape[0], dim=0)[None], float("-inf"))
    w = scores.softmax(-1)
    _REF["rows"][module.layer_idx] = w[0, :, -1]
    return (w @ v).transpose(1, 2).contiguous(), None


AttentionInterface.register("longseq_test_reference", _reference_attention)


@torch.no_grad()
def reference_generate(arch: str, ids: torch.Tensor, n_new: int, policy: CachePolicy):
    """Greedy decoding of ``ids [1, T0]`` under ``policy``, the slow way. Returns the tokens ``[T0 + n_new]``,
    the logits ``[T0 + n_new - 1, V]`` of every fed token, and after each fed token every layer's kept
    positions (a list per layer of sorted lists, one per kv group)."""
    model = copy.deepcopy(hf_model(arch))
    model.set_attn_implementation("longseq_test_reference")
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    Hkv = getattr(cfg, "num_key_value_heads", H)
    G = Hkv if policy.per_head else 1
    tokens = ids[0].tolist()
    kept = [[set() for _ in range(G)] for _ in range(L)]
    acc = [[{} for _ in range(G)] for _ in range(L)]
    masks = [torch.zeros(G, 0, 0, dtype=torch.bool) for _ in range(L)]
    logits, history = [], []
    for t in range(ids.shape[1] + n_new - 1):
        for layer in range(L):
            grown = torch.zeros(G, t + 1, t + 1, dtype=torch.bool)
            grown[:, :t, :t] = masks[layer]
            for g in range(G):
                grown[g, t, sorted(kept[layer][g] | {t})] = True
            masks[layer] = grown
        _REF["masks"] = dict(enumerate(masks))
        out = model(
            input_ids=torch.tensor([tokens[: t + 1]]), position_ids=torch.arange(t + 1)[None], use_cache=False
        )
        logits.append(out.logits[0, t])
        for layer in range(L):
            row = _REF["rows"][layer]  # [H, t + 1]
            for g in range(G):
                heads = range(H) if G == 1 else range(g * (H // G), (g + 1) * (H // G))
                kept[layer][g].add(t)
                score = {p: float(row[list(heads), p].mean()) for p in kept[layer][g]}
                for p, s in score.items():
                    acc[layer][g][p] = acc[layer][g].get(p, 0.0) + s
                if policy.budget is not None and len(kept[layer][g]) > policy.budget:
                    kept[layer][g].remove(reference_victim(policy, kept[layer][g], score, acc[layer][g]))
        history.append([[sorted(s) for s in kept[layer]] for layer in range(L)])
        if t + 1 == len(tokens):
            tokens.append(int(out.logits[0, t].argmax()))
    return torch.tensor(tokens), torch.stack(logits), history


def kept_lists(c, layer: int, row: int = 0) -> list[list[int]]:
    kept = c.kept_positions(layer, row=row)[0]  # [n] or [H_kv, n]
    return [kept.tolist()] if kept.dim() == 1 else [k.tolist() for k in kept]


# --------------------------------------------------------------------------------------------------
# Cache: equality with plain generate when nothing is evicted


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "policy", [Full(), TOVA(64), TOVA(64, per_head=True), H2O(64), Window(64), Sink(64)], ids=str
)
def test_no_eviction_equals_plain_generate(arch, policy):
    ids = prompt(11, seed=1)
    ref_seq, ref_logits = greedy(hf_model(arch), ids, 9)
    c = lh.cache(sut(arch), policy)
    seq, logits = greedy(sut(arch), ids, 9, past_key_values=c)
    assert torch.equal(seq, ref_seq)
    assert_close(logits, ref_logits, name="logits")
    assert c.get_seq_length() == 11 + 9 - 1
    assert all(kept == list(range(19)) for kept in kept_lists(c, 1))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_sampling_equals_plain_generate(arch):
    ids = prompt(7, seed=2, B=2)
    torch.manual_seed(5)
    ref = hf_model(arch).generate(input_ids=ids, max_new_tokens=12, do_sample=True, top_k=0, temperature=1.3)
    for policy in (Full(), TOVA(32)):
        torch.manual_seed(5)
        out = sut(arch).generate(
            input_ids=ids,
            max_new_tokens=12,
            do_sample=True,
            top_k=0,
            temperature=1.3,
            past_key_values=lh.cache(sut(arch), policy),
        )
        assert torch.equal(out, ref)


def test_beam_search_full_equals_plain():
    ids = prompt(6, seed=3)
    kwargs = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    ref = hf_model("qwen2").generate(input_ids=ids, **kwargs)
    out = sut("qwen2").generate(input_ids=ids, past_key_values=lh.cache(sut("qwen2"), Full()), **kwargs)
    assert torch.equal(out, ref)


def test_model_without_longseq_cache_still_works():
    """After lh.cache switched the attention implementation, plain (padded) generate is unchanged."""
    model = sut("llama")
    lh.cache(model, TOVA(4))
    assert model.config._attn_implementation == lh.ATTN_IMPLEMENTATION
    ids = prompt(9, seed=4, B=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ref_seq, ref_logits = greedy(hf_model("llama"), ids, 5, attention_mask=mask)
    seq, logits = greedy(model, ids, 5, attention_mask=mask)
    assert torch.equal(seq, ref_seq)
    assert_close(logits, ref_logits, name="logits")


# --------------------------------------------------------------------------------------------------
# Cache: bounded policies against the brute-force reference


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "policy",
    [TOVA(5), TOVA(5, per_head=True), H2O(6, recent=2), H2O(5, recent=0), Window(5), Sink(6, sinks=2)],
    ids=str,
)
def test_bounded_cache_matches_reference(arch, policy):
    T0, n_new = 12, 7
    ids = prompt(T0, seed=6)
    ref_tokens, ref_logits, history = reference_generate(arch, ids, n_new, policy)
    c = lh.cache(sut(arch), policy)
    seq, logits = greedy(sut(arch), ids, n_new, past_key_values=c)
    assert seq[0].tolist() == ref_tokens.tolist()
    assert_close(logits[0], ref_logits[T0 - 1 :], name="logits of the generated steps")
    for layer in range(2):
        assert kept_lists(c, layer) == history[-1][layer], f"layer {layer}"


@pytest.mark.parametrize("policy", [TOVA(5), H2O(6, recent=2), Window(5)], ids=str)
def test_chunked_forward_matches_reference(policy):
    """Prefill in uneven chunks through forward(); logits of every token and kept sets after every chunk."""
    arch, T = "qwen2", 17
    ids = prompt(T, seed=7)
    _, ref_logits, history = reference_generate(arch, ids, 1, policy)
    c = lh.cache(sut(arch), policy)
    start = 0
    for size in (3, 6, 1, 7):
        out = sut(arch)(input_ids=ids[:, start : start + size], past_key_values=c, use_cache=True)
        assert_close(
            out.logits[0], ref_logits[start : start + size], name=f"logits [{start}, {start + size})"
        )
        start += size
        for layer in range(2):
            assert kept_lists(c, layer) == history[start - 1][layer]
    assert c.get_seq_length() == T


# --------------------------------------------------------------------------------------------------
# Cache: left-padded batches


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt_neox"])
@pytest.mark.parametrize(
    "policy", [TOVA(6), TOVA(8, per_head=True), H2O(6), Window(6), Sink(8), Full()], ids=str
)
def test_left_padding_equals_rows_alone(arch, policy):
    """Rows of lengths 13, 9, 5 left-padded to 13: each row generates as it would alone. TOVA(8) makes the
    short row fill up only during decoding, so the rows merge into one batched cache mid-generation."""
    lengths, n_new = [13, 9, 5], 8
    rows = [prompt(n, seed=10 + i) for i, n in enumerate(lengths)]
    T = max(lengths)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - r.shape[1] :] = r[0]
        mask[b, T - r.shape[1] :] = 1
    c = lh.cache(sut(arch), policy)
    seq, logits = greedy(sut(arch), ids, n_new, attention_mask=mask, past_key_values=c)
    for b, r in enumerate(rows):
        c1 = lh.cache(sut(arch), policy)
        seq1, logits1 = greedy(sut(arch), r, n_new, past_key_values=c1)
        assert seq[b, T:].tolist() == seq1[0, r.shape[1] :].tolist(), f"row {b}"
        assert_close(logits[b], logits1[0], name=f"row {b} logits")
        for layer in range(2):
            assert kept_lists(c, layer, row=b) == kept_lists(c1, layer), f"row {b} layer {layer}"
    if policy.budget is not None:
        assert all(layer.batched is not None and layer.rows is None for layer in c.layers), "rows merged"


def _prefill_in_inference_mode_then_generate(model, c, ids, mask, extra):
    """Prefill ``ids`` into the cache ``c`` under ``torch.inference_mode()``, then let ``generate`` (outside
    it) continue from the prompt ``ids + extra``; returns generate's tokens and logits."""
    with torch.inference_mode():
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded rows
        model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=c, use_cache=True)
    mask = torch.cat([mask, torch.ones_like(extra)], 1)
    return greedy(model, torch.cat([ids, extra], 1), 5, attention_mask=mask, past_key_values=c)


@pytest.mark.parametrize("padded", [False, True], ids=["batched", "padded rows"])
@pytest.mark.parametrize("policy", [Full(), TOVA(64)], ids=str)
def test_prefill_in_inference_mode_then_generate_outside_it(policy, padded):
    """Tensors made under inference mode cannot be updated in place outside it; the cache copies them, so
    this flow works as with HF's DynamicCache (and gives its tokens and logits)."""
    ids, mask = prompt(9, seed=30, B=2), torch.ones(2, 9, dtype=torch.long)
    if padded:
        ids[1, :4], mask[1, :4] = 0, 0
    extra = prompt(2, seed=31, B=2)
    ref_seq, ref_logits = _prefill_in_inference_mode_then_generate(hf_model("llama"), DynamicCache(), ids, mask, extra)
    c = lh.cache(sut("llama"), policy)
    seq, logits = _prefill_in_inference_mode_then_generate(sut("llama"), c, ids, mask, extra)
    assert (c.layers[0].rows is not None) == padded
    assert torch.equal(seq, ref_seq)
    assert_close(logits, ref_logits, name="logits")


def test_a_chunk_in_inference_mode_between_calls_outside_it():
    """Full's buffers grow (6 -> 9 slots) during a chunk fed under inference mode, between calls outside it
    that write into their spare slot: as DynamicCache."""
    ids, chunk, extra = prompt(6, seed=34, B=2), prompt(2, seed=35, B=2), prompt(1, seed=36, B=2)

    def run(model, c):
        with torch.no_grad():
            model(input_ids=ids, past_key_values=c, use_cache=True)
        with torch.inference_mode():
            model(input_ids=chunk, past_key_values=c, use_cache=True)
        if isinstance(c, lh.LongseqCache):
            assert c.layers[0].batched.capacity == 9
        return greedy(model, torch.cat([ids, chunk, extra], 1), 5, past_key_values=c)

    ref_seq, ref_logits = run(hf_model("llama"), DynamicCache())
    seq, logits = run(sut("llama"), lh.cache(sut("llama"), Full()))
    assert torch.equal(seq, ref_seq)
    assert_close(logits, ref_logits, name="logits")


def test_prefill_in_inference_mode_then_evicting_outside_it():
    """With eviction: the same tokens, logits and kept positions as the whole flow outside inference mode."""
    ids, mask, extra = prompt(9, seed=32, B=2), torch.ones(2, 9, dtype=torch.long), prompt(2, seed=33, B=2)
    c = lh.cache(sut("qwen2"), TOVA(5))
    seq, logits = _prefill_in_inference_mode_then_generate(sut("qwen2"), c, ids, mask, extra)
    c_ref = lh.cache(sut("qwen2"), TOVA(5))
    with torch.no_grad():
        sut("qwen2")(input_ids=ids, past_key_values=c_ref, use_cache=True)
    ref_seq, ref_logits = greedy(sut("qwen2"), torch.cat([ids, extra], 1), 5, past_key_values=c_ref)
    assert torch.equal(seq, ref_seq)
    assert_close(logits, ref_logits, name="logits")
    assert all(torch.equal(c.kept_positions(i), c_ref.kept_positions(i)) for i in range(2))


# --------------------------------------------------------------------------------------------------
# evaluate_hf


def test_evaluate_hf_on_a_local_folder(tmp_path):
    folder = tmp_path / "tiny-llama"
    hf_model("llama").save_pretrained(folder)
    doc = prompt(30, seed=20)[0]
    result = lh.evaluate_hf(folder, [("doc", doc)], ["tova", "window"], [8, 64], chunk_size=7)
    # The full cache's loss is the plain forward's next-token loss.
    with torch.no_grad():
        logits = hf_model("llama")(doc[None]).logits[0]
    nats = float(torch.nn.functional.cross_entropy(logits[:-1], doc[1:], reduction="sum"))
    assert result.full.tokens == 29
    assert math.isclose(result.full.nats, nats, rel_tol=1e-9)
    # A budget above the length evicts nothing; a small one changes the loss.
    assert math.isclose(result.scores["tova"][64].nats, nats, rel_tol=1e-9)
    assert result.scores["tova"][8].nats != result.scores["window"][8].nats
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        lh.evaluate_hf(tmp_path / "missing", [("doc", doc)], ["tova"], [8])


# --------------------------------------------------------------------------------------------------
# save_hf / load_hf and AutoModelForCausalLM


@pytest.mark.parametrize(
    "kind,overrides",
    [
        ("transformer", {"n_kv_heads": 1}),
        ("gla", {}),
        ("megabyte", {}),
        ("transformer", {"tie_embeddings": True}),
    ],
    ids=str,
)
def test_save_load_round_trip(tmp_path, kind, overrides):
    torch.manual_seed(0)
    model = longseq.build_model(kind, "tiny", **overrides).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    folder = lh.save_hf(model, tmp_path / "m")
    lh.save_hf(model, folder)  # overwriting a previous save is allowed
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "longseq" and config["architectures"] == ["LongseqForCausalLM"]
    loaded = lh.load_hf(folder)
    with torch.no_grad():
        expected = model(ids)
        assert torch.equal(loaded(ids), expected)
        hf = AutoModelForCausalLM.from_pretrained(
            folder, trust_remote_code=True, local_files_only=True
        ).eval()
        assert isinstance(hf, lh.LongseqForCausalLM)
        assert torch.equal(hf(input_ids=ids, use_cache=False).logits, expected)
    if overrides.get("tie_embeddings"):
        assert loaded.head.weight is loaded.embed.weight and hf.lm.head.weight is hf.lm.embed.weight
    # generate passes the longseq state through past_key_values: equal to a manual greedy step loop.
    out = hf.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    state = model.init_state(2)
    step_logits, state = model.step(ids, state)
    manual = []
    for _ in range(6):
        nxt = step_logits[:, -1].argmax(-1, keepdim=True)
        manual.append(nxt)
        step_logits, state = model.step(nxt, state)
    assert torch.equal(out[:, 16:], torch.cat(manual, 1))


def test_save_pretrained_after_a_remote_code_load(tmp_path):
    """A model loaded with trust_remote_code saves with save_pretrained (transformers would otherwise copy
    longseq's own source into the folder and fail on its relative imports), and the folder loads again both
    ways."""
    torch.manual_seed(0)
    model = longseq.build_model("gla", "tiny").eval()
    hf = AutoModelForCausalLM.from_pretrained(
        lh.save_hf(model, tmp_path / "m"), trust_remote_code=True, local_files_only=True
    )
    hf.save_pretrained(tmp_path / "again")
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True, local_files_only=True)
        assert torch.equal(again(input_ids=ids, use_cache=False).logits, model(ids))
        assert torch.equal(lh.load_hf(tmp_path / "again")(ids), model(ids))


def test_register_loads_without_remote_code(tmp_path):
    model = longseq.build_model("gla", "tiny").eval()
    folder = lh.save_hf(model, tmp_path / "gla")
    lh.register()
    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert isinstance(hf, lh.LongseqForCausalLM)
    wrapped = lh.LongseqForCausalLM.from_longseq(model)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(wrapped(input_ids=ids, use_cache=False).logits, model(ids))
        assert torch.equal(hf(input_ids=ids, use_cache=False).logits, model(ids))


def test_bounded_state_cache_for_longseq_transformer(tmp_path):
    model = longseq.build_model("transformer", "tiny").eval()
    hf = lh.LongseqForCausalLM.from_longseq(model)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    state_cache = lh.LongseqStateCache(TOVA(8))
    out = hf.generate(input_ids=ids, max_new_tokens=5, do_sample=False, past_key_values=state_cache)
    state = model.init_state(1, cache=TOVA(8))
    logits, state = model.step(ids, state)
    toks = []
    for _ in range(5):
        toks.append(logits[:, -1].argmax(-1, keepdim=True))
        logits, state = model.step(toks[-1], state)
    assert torch.equal(out[:, 20:], torch.cat(toks, 1))
    assert state_cache.state.kept_positions(0).shape == (1, 8)


def test_save_load_errors(tmp_path):
    model = longseq.build_model("transformer", "tiny")
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        lh.load_hf(tmp_path / "missing")
    hf_model("llama").save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="not a longseq model folder"):
        lh.load_hf(tmp_path / "llama")
    with pytest.raises(FileExistsError, match="did not write"):
        lh.save_hf(model, tmp_path / "llama")  # never replaces a foreign folder
    folder = lh.save_hf(model, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["longseq_config"]["n_heads"] = 3  # 64 is not divisible by 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="incompatible longseq config"):
        lh.load_hf(folder)
    config["longseq_config"].update(n_heads=4, n_kv_heads=1)  # a valid config, other weight shapes
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match its config"):
        lh.load_hf(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "m"]  # no temporary folders left


def test_a_failed_overwrite_keeps_the_previous_save(tmp_path, monkeypatch):
    """The second rename (the new copy into place) fails: the previous save comes back, bit for bit."""
    torch.manual_seed(0)
    old = longseq.build_model("transformer", "tiny").eval()
    folder = lh.save_hf(old, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    calls = []
    real_rename, real_replace = os.rename, os.replace

    def failing_second(real):
        def rename(src, dst, *args, **kwargs):
            calls.append((src, dst))
            if len(calls) == 2:
                raise OSError("simulated failure of the second rename")
            return real(src, dst, *args, **kwargs)

        return rename

    monkeypatch.setattr(os, "rename", failing_second(real_rename))
    monkeypatch.setattr(os, "replace", failing_second(real_replace))
    with pytest.raises(OSError, match="simulated"):
        lh.save_hf(longseq.build_model("transformer", "tiny"), folder)
    monkeypatch.undo()
    assert len(calls) >= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or set-aside folder left
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(lh.load_hf(folder)(ids), old(ids))


def test_saved_folders_get_the_umasks_mode(tmp_path):
    model = longseq.build_model("gla", "tiny")
    umask = os.umask(0o022)
    try:
        (tmp_path / "plain").mkdir()
        first = stat.S_IMODE(lh.save_hf(model, tmp_path / "m").stat().st_mode)
        again = stat.S_IMODE(lh.save_hf(model, tmp_path / "m").stat().st_mode)  # an overwrite
    finally:
        os.umask(umask)
    assert first == again == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o755


# --------------------------------------------------------------------------------------------------
# optional dependency


def test_lazy_import_and_install_hint():
    code = (
        "import sys; sys.modules['transformers'] = None\n"  # make `import transformers` fail
        "import longseq, longseq.sweep, longseq.evaluate, longseq.generate, longseq.hf\n"
        "import tempfile, pathlib\n"
        "model = longseq.build_model('gla', 'tiny')\n"
        "folder = longseq.hf.save_hf(model, pathlib.Path(tempfile.mkdtemp()) / 'm')\n"
        "longseq.hf.load_hf(folder)\n"
        "try:\n"
        "    longseq.hf.cache\n"
        "except ImportError as e:\n"
        "    assert \"pip install 'longseq[hf]'\" in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    code = (
        "import sys, longseq, longseq.sweep, longseq.cli, longseq.hf\n"
        "assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

"""Layers and language models: against hand-written references and the step == forward identity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import longseq
from longseq.models import GLAConfig, TransformerConfig, build_model
from longseq.nn import Attention, GatedLinearAttention, RMSNorm, SwiGLU
from longseq.ops.gla import gla_recurrent
from longseq.testing import assert_close

KINDS = ["transformer", "gla"]


def tiny(kind: str, **overrides) -> longseq.LanguageModel:
    torch.manual_seed(0)
    return build_model(kind, "tiny", **overrides).double().eval()


# ---------------------------------------------------------------------------------------------- layers
def test_rmsnorm_and_swiglu_match_formulas():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    norm = RMSNorm(8).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    ref = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert_close(norm(x), ref, rtol=1e-12)
    mlp = SwiGLU(8, 12).double()
    w_gate, w_up = mlp.gate_up.weight[:12], mlp.gate_up.weight[12:]
    ref = (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ mlp.down.weight.T
    assert_close(mlp(x), ref, rtol=1e-12)


def _rope_reference(x, positions, theta=10000.0):
    """RoPE written out pair by pair: channel i rotates with channel i + D/2."""
    D = x.shape[-1]
    out = x.clone()
    for i in range(D // 2):
        freq = theta ** (-2 * i / D)
        ang = positions.double() * freq
        c, s = ang.cos(), ang.sin()
        a, b = x[..., i], x[..., i + D // 2]
        out[..., i] = a * c - b * s
        out[..., i + D // 2] = b * c + a * s
    return out


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_attention_layer_matches_explicit_softmax(n_heads, n_kv_heads):
    torch.manual_seed(0)
    d, T, B = 32, 11, 2
    attn = Attention(d, n_heads, n_kv_heads).double()
    x = torch.randn(B, T, d, dtype=torch.float64)
    D = d // n_heads
    qkv = x @ attn.qkv.weight.T
    q = qkv[..., : n_heads * D].view(B, T, n_heads, D)
    k = qkv[..., n_heads * D : (n_heads + n_kv_heads) * D].view(B, T, n_kv_heads, D)
    v = qkv[..., (n_heads + n_kv_heads) * D :].view(B, T, n_kv_heads, D)
    pos = torch.arange(T)
    q = _rope_reference(q.transpose(1, 2), pos)
    k = _rope_reference(k.transpose(1, 2), pos)
    v = v.transpose(1, 2)
    out = torch.zeros(B, n_heads, T, D, dtype=torch.float64)
    group = n_heads // n_kv_heads
    for h in range(n_heads):
        kh, vh = k[:, h // group], v[:, h // group]
        for t in range(T):
            w = torch.softmax(q[:, h, t : t + 1] @ kh[:, : t + 1].transpose(-1, -2) / math.sqrt(D), -1)
            out[:, h, t] = (w @ vh[:, : t + 1])[:, 0]
    ref = out.transpose(1, 2).reshape(B, T, d) @ attn.out.weight.T
    assert_close(attn(x), ref, rtol=1e-10)


def test_gla_layer_matches_paper_equations():
    torch.manual_seed(0)
    d, H, B, T = 16, 2, 2, 9
    layer = GatedLinearAttention(d, H).double()
    with torch.no_grad():
        layer.gate_up.bias.uniform_(-1, 3)
        layer.out_gate.bias.uniform_(-1, 1)
    x = torch.randn(B, T, d, dtype=torch.float64)
    K, V = d // 2 // H, d // H
    q = (x @ layer.q_proj.weight.T).view(B, T, H, K)
    k = (x @ layer.k_proj.weight.T).view(B, T, H, K)
    v = (x @ layer.v_proj.weight.T).view(B, T, H, V)
    alpha = torch.sigmoid(x @ layer.gate_down.weight.T @ layer.gate_up.weight.T + layer.gate_up.bias) ** (1 / 16)
    o, _ = gla_recurrent(q, k, v, alpha.log().view(B, T, H, K), K**-0.5)
    o = o / torch.sqrt((o**2).mean(-1, keepdim=True) + 1e-5) * layer.head_norm.weight
    r = F.silu(x @ layer.out_gate.weight.T + layer.out_gate.bias)
    ref = (r * o.reshape(B, T, d)) @ layer.out.weight.T
    out, state = layer(x)
    assert state is None
    assert_close(out, ref, rtol=1e-10)


# ---------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("kind", KINDS)
def test_step_token_by_token_reproduces_forward(kind):
    model = tiny(kind)
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(1))
    ref = model(ids)
    state = model.init_state(2)
    logits = [model.step(ids[:, t : t + 1], state)[0] for t in range(ids.shape[1])]
    assert state.position == 70
    assert_close(torch.cat(logits, dim=1), ref, rtol=1e-9)


@settings(max_examples=10, deadline=None)
@given(kind=st.sampled_from(KINDS), cuts=st.lists(st.integers(1, 149), max_size=5, unique=True))
def test_step_in_uneven_chunks_reproduces_forward(kind, cuts):
    model = tiny(kind)
    ids = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(2))
    ref = model(ids)
    bounds = [0, *sorted(cuts), 150]
    state = model.init_state(1)
    logits = [model.step(ids[:, a:b], state)[0] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert_close(torch.cat(logits, dim=1), ref, rtol=1e-9)


def test_gqa_transformer_step_matches_forward():
    model = tiny("transformer", n_heads=4, n_kv_heads=2, d_model=32)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    state = model.init_state(2)
    out = torch.cat([model.step(ids[:, :25], state)[0], model.step(ids[:, 25:], state)[0]], dim=1)
    assert_close(out, model(ids), rtol=1e-9)


def test_state_sizes():
    gla = tiny("gla")
    state = gla.init_state(3)
    cfg = gla.config
    head_k, head_v = cfg.d_model // 2 // cfg.n_heads, cfg.d_model // cfg.n_heads
    expected = cfg.n_layers * 3 * cfg.n_heads * head_k * head_v * 8  # fp64 model -> fp64 matrices
    assert state.nbytes() == expected
    gla.step(torch.zeros(3, 50, dtype=torch.long), state)
    assert state.nbytes() == expected  # constant in the context length
    with pytest.raises(TypeError, match="matrix state"):
        state.kept_positions(0)
    assert build_model("gla", "tiny").to(torch.bfloat16).init_state(1).layers[0].dtype == torch.float32

    tr = tiny("transformer")
    state = tr.init_state(2)
    tr.step(torch.zeros(2, 30, dtype=torch.long), state)
    tr.step(torch.zeros(2, 5, dtype=torch.long), state)
    c = tr.config
    per_token = 2 * c.n_kv_heads * (c.d_model // c.n_heads) * 8 + 8  # k and v in fp64 + an int64 position
    assert state.nbytes() == c.n_layers * 2 * 35 * per_token
    assert torch.equal(state.kept_positions(1), torch.arange(35).expand(2, 35))


def test_tiny_models_overfit_a_short_byte_string():
    text = b"longseq models long sequences; gated linear attention meets bounded caches. " * 2
    ids = torch.tensor(list(text))[None]
    for kind in KINDS:
        torch.manual_seed(0)
        model = build_model(kind, "tiny")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(150):
            loss = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.1 * losses[0], (kind, losses[0], losses[-1])


# ---------------------------------------------------------------------------------------------- factory/config
def test_build_model_presets_and_overrides():
    model = build_model("gla", "tiny", n_layers=1, d_model=32)
    assert isinstance(model, longseq.GLALM) and model.config.n_layers == 1 and len(model.blocks) == 1
    assert isinstance(build_model("transformer"), longseq.TransformerLM)
    cfg = TransformerConfig.from_preset("base")
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.n_kv_heads == cfg.n_heads and cfg.mlp_hidden % 32 == 0


@pytest.mark.parametrize(
    "kind,preset,expected",
    [
        ("transformer", "base", 127.8e6), ("gla", "base", 128.2e6),
        ("transformer", "medium", 354.7e6), ("gla", "medium", 355.5e6),
    ],
)
def test_preset_sizes_match_their_names(kind, preset, expected):
    with torch.device("meta"):
        model = build_model(kind, preset)
    assert abs(model.num_params() - expected) / expected < 0.02


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: build_model("rnn"), "unknown model kind 'rnn'"),
        (lambda: build_model("gla", "huge"), "unknown gla preset 'huge'"),
        (lambda: build_model("gla", n_layer=2), r"unknown GLAConfig field\(s\) \['n_layer'\]"),
        (lambda: build_model("transformer", n_layers="two"), "'n_layers' expects int; got 'two'"),
        (lambda: build_model("transformer", n_layers=2.5), "'n_layers' expects int; got 2.5"),
        (lambda: build_model("transformer", d_model=30, n_heads=4), "divisible by n_heads"),
        (lambda: build_model("gla", backend="cuda"), "unknown GLA backend 'cuda'"),
        (lambda: build_model("gla", n_layers=0), "'n_layers' must be >= 1"),
    ],
)
def test_bad_configs_raise(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_string_overrides_are_parsed_like_the_cli():
    cfg = GLAConfig.from_preset("tiny", n_layers="3", gate_normalizer="8", tie_embeddings="true")
    assert (cfg.n_layers, cfg.gate_normalizer, cfg.tie_embeddings) == (3, 8.0, True)


def test_bad_model_inputs_raise():
    model = tiny("gla")
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 256\); got values in \[0, 300\]"):
        model(torch.tensor([[0, 300]]))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\]"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 3))
    state = model.init_state(2)
    with pytest.raises(ValueError, match="batch 1 but the state was made for batch 2"):
        model.step(torch.zeros(1, 3, dtype=torch.long), state)
    with pytest.raises(ValueError, match="cache policy does not apply"):
        model.init_state(1, cache=longseq.Full())
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        model.init_state(0)
    with pytest.raises(TypeError, match="CachePolicy"):
        tiny("transformer").init_state(1, cache="tova")

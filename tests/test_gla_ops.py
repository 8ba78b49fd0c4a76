"""The GLA op: chunk and auto backends against the recurrent ground truth; errors on bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from longseq.ops.gla import gated_linear_attention, gla_chunk, gla_recurrent
from longseq.testing import assert_close


def make_inputs(B, T, H, K, V, *, dtype=torch.float64, gate_scale=1.0, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    k = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen, dtype=dtype) * 2 + 1) * gate_scale
    s0 = torch.randn(B, H, K, V, generator=gen, dtype=dtype)
    tensors = [q, k, v, g, s0]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return tensors


def naive_gla(q, k, v, g, scale, s0):
    """A second, independently written recurrence (explicit per-head matrix products in float64)."""
    B, T, H, K = q.shape
    out = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    S = s0.double().clone() if s0 is not None else torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64)
    for t in range(T):
        for b in range(B):
            for h in range(H):
                decay = torch.diag(g[b, t, h].double().exp())
                S[b, h] = decay @ S[b, h] + torch.outer(k[b, t, h].double(), v[b, t, h].double())
                out[b, t, h] = scale * q[b, t, h].double() @ S[b, h]
    return out, S


def exact_gla_scan(q, k, v, g, scale):
    """GLA in float64 by a doubling (Hillis-Steele) scan, the long-sequence ground truth: ``log2(T)``
    vectorised steps instead of ``T`` Python steps, and no code shared with either backend.

    Token t is the affine map ``S -> a_t * S + b_t`` (``a_t = exp(g_t)``, ``b_t = k_t^T v_t``); step ``d``
    composes each map with the one ``d`` tokens earlier, so after ``ceil(log2 T)`` steps ``b_t`` is
    ``S_t``. Decays are only ever multiplied (never ``exp`` of a difference), so it holds for any ``g``
    in ``[-inf, 0]``, off by float64 roundings alone: at most ~T units of 2**-53 (1e-11 at T = 1e5,
    if float64 ``exp`` were one ulp off the same way every time), far below fp32 roundoff.
    Returns ``o [B, T, H, V]`` and the final state ``[B, H, K, V]``, float64.
    """
    q, k, v, g = (x.double() for x in (q, k, v, g))
    a = g.exp()[..., None]  # [B, T, H, K, 1]
    b = k[..., None] * v[..., None, :]  # [B, T, H, K, V]
    d = 1
    while d < q.shape[1]:
        b = torch.cat([b[:, :d], a[:, d:] * b[:, :-d] + b[:, d:]], dim=1)
        a = torch.cat([a[:, :d], a[:, d:] * a[:, :-d]], dim=1)
        d *= 2
    return torch.einsum("bthk,bthkv->bthv", q * scale, b), b[:, -1]


def test_recurrent_matches_independent_naive_loop():
    q, k, v, g, s0 = make_inputs(2, 7, 2, 3, 5)
    o, s = gla_recurrent(q, k, v, g, 0.7, s0)
    o_ref, s_ref = naive_gla(q, k, v, g, 0.7, s0)
    assert_close(o, o_ref, rtol=1e-12)
    assert_close(s, s_ref, rtol=1e-12)


@pytest.mark.parametrize("backend", ["chunk", "auto"])
@pytest.mark.parametrize(
    "B,T,H,K,V",
    [(1, 1, 1, 4, 4), (2, 63, 3, 60, 20), (1, 64, 1, 8, 8), (2, 65, 2, 16, 12), (1, 200, 1, 5, 9), (1, 16, 2, 7, 3)],
)
@pytest.mark.parametrize("with_state", [False, True])
def test_backends_match_recurrent_float64(backend, B, T, H, K, V, with_state):
    q, k, v, g, s0 = make_inputs(B, T, H, K, V)
    s0 = s0 if with_state else None
    o_ref, s_ref = gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, backend="recurrent")
    o, s = gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, backend=backend)
    assert_close(o, o_ref, rtol=1e-6, name="o")
    assert_close(s, s_ref, rtol=1e-6, name="final_state")
    assert o.dtype == torch.float64 and s.dtype == torch.float64


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2), T=st.integers(1, 140), H=st.integers(1, 3), K=st.integers(1, 24), V=st.integers(1, 24),
    with_state=st.booleans(), gate_scale=st.sampled_from([1e-6, 1.0, 20.0]), seed=st.integers(0, 2**16),
)
def test_chunk_matches_recurrent_fuzzed(B, T, H, K, V, with_state, gate_scale, seed):
    q, k, v, g, s0 = make_inputs(B, T, H, K, V, gate_scale=gate_scale, seed=seed)
    s0 = s0 if with_state else None
    o_ref, s_ref = gla_recurrent(q, k, v, g, K**-0.5, s0)
    o, s = gla_chunk(q, k, v, g, K**-0.5, s0)
    assert_close(o, o_ref, rtol=1e-6, name="o")
    assert_close(s, s_ref, rtol=1e-6, name="final_state")


def test_scale_and_no_final_state():
    q, k, v, g, _ = make_inputs(1, 30, 2, 4, 6)
    o, s = gated_linear_attention(q, k, v, g, scale=0.3, backend="chunk")
    o_ref, _ = gla_recurrent(q, k, v, g, 0.3)
    assert s is None
    assert_close(o, o_ref, rtol=1e-6)


@pytest.mark.parametrize("T", [1, 63, 130])
def test_chunk_gradients_match_recurrent(T):
    B, H, K, V = 2, 2, 6, 5
    inputs = make_inputs(B, T, H, K, V, requires_grad=True, seed=3)
    w_o = torch.randn(B, T, H, V, dtype=torch.float64)
    w_s = torch.randn(B, H, K, V, dtype=torch.float64)
    grads = {}
    for backend in ("recurrent", "chunk"):
        q, k, v, g, s0 = inputs
        o, s = gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, backend=backend)
        loss = (o * w_o).sum() + (s * w_s).sum()
        grads[backend] = torch.autograd.grad(loss, inputs)
    for name, got, ref in zip("q k v g initial_state".split(), grads["chunk"], grads["recurrent"], strict=True):
        assert_close(got, ref, rtol=1e-6, name=f"d{name}")


def test_float32_chunk_close_to_float64_truth():
    q, k, v, g, s0 = make_inputs(2, 300, 2, 32, 32, seed=5)
    o_ref, s_ref = gla_recurrent(q, k, v, g, 32**-0.5, s0)
    o, s = gated_linear_attention(
        q.float(), k.float(), v.float(), g.float(), initial_state=s0.float(), output_final_state=True, backend="chunk"
    )
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert_close(o, o_ref, rtol=1e-5)
    assert_close(s, s_ref, rtol=1e-5)


def test_bfloat16_inputs_keep_fp32_state_and_bf16_output():
    q, k, v, g, _ = make_inputs(1, 40, 1, 8, 8, dtype=torch.float32)
    o, s = gated_linear_attention(
        q.bfloat16(), k.bfloat16(), v.bfloat16(), g, output_final_state=True, backend="chunk"
    )
    o_ref, s_ref = gla_recurrent(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, 8**-0.5)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert_close(o, o_ref.bfloat16(), rtol=1e-2)
    assert_close(s, s_ref, rtol=1e-5)


def test_exact_scan_matches_independent_naive_loop():
    q, k, v, g, _ = make_inputs(2, 150, 2, 3, 5, seed=13)
    g = g.clone()
    g[0, 40, 1, :] = float("-inf")
    o, s = exact_gla_scan(q, k, v, g, 0.7)
    o_ref, s_ref = naive_gla(q, k, v, g, 0.7, None)
    assert_close(o, o_ref, rtol=1e-12)
    assert_close(s, s_ref, rtol=1e-12)


# fp32 unit roundoff: each fp32 operation is off by at most this relative amount.
U32 = 2.0**-24


@pytest.mark.parametrize("gate", [-20.0, -1e-6])
def test_100k_tokens_strong_and_weak_decay_stay_finite_and_exact(gate):
    """Every path against the float64 scan, never fp32 against fp32 (whose rounding, through ``exp``,
    depends on the CPU's vector unit). gate -20: the state forgets in one token; -1e-6: it keeps all
    1e5 tokens (total decay ~exp(-0.125)), so rounding accumulates over the whole sequence."""
    T, H, K, V = 100_000, 1, 4, 4
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, H, K, generator=gen)
    k = torch.randn(1, T, H, K, generator=gen) * 0.1
    v = torch.randn(1, T, H, V, generator=gen)
    g = torch.full((1, T, H, K), gate) * (1 + 0.5 * torch.rand(1, T, H, K, generator=gen))
    with torch.no_grad():
        o_ref, s_ref = exact_gla_scan(q, k, v, g, K**-0.5)
        o64, s64 = gla_chunk(q.double(), k.double(), v.double(), g.double(), K**-0.5)
        o, s = gated_linear_attention(q, k, v, g, output_final_state=True, backend="chunk")
        o_rec, s_rec = gla_recurrent(q, k, v, g, K**-0.5)
    # The chunk algorithm in float64: only float64 rounding separates it from the scan. Measured 1e-14 and,
    # with another CPU and torch build, 1e-12; 8e-12 with a float64 exp one ulp off the same way every call.
    assert_close(o64, o_ref, rtol=1e-10, name="float64 chunk o")
    assert_close(s64, s_ref, rtol=1e-10, name="float64 chunk state")
    # fp32 chunk: the state crosses T/32 chunk boundaries in float64 (chunk.py), so only each chunk's own fp32
    # work rounds, and that does not grow with T. Measured 1e-7 (o and state, both gates). When the state was
    # passed in fp32 the error grew with T: 1e-6 to 3.4e-6 on two CPUs, 6.5e-5 with an fp32 exp one ulp off
    # the same way on every call.
    assert o.dtype == s.dtype == torch.float32
    assert_close(o, o_ref, rtol=1e-5, name="fp32 chunk o")
    assert_close(s, s_ref, rtol=1e-5, name="fp32 chunk state")
    # fp32 token-by-token loop: a token stays in the state for min(T, 1/|g|) steps, each adding a rounding
    # of the multiply, the add and the exp, so the classical bound is that many units of roundoff (6e-3 at
    # -1e-6). Measured 5.7e-5 (state) here, 2.2e-4 with another CPU and torch build (where the old
    # fp32-vs-fp32 check at 1e-4 failed), 4.2e-3 with the one-ulp-off exp.
    rec_rtol = max(1e-4, min(T, 1 / abs(gate)) * U32)
    assert_close(o_rec, o_ref, rtol=rec_rtol, name="fp32 recurrent o")
    assert_close(s_rec, s_ref, rtol=rec_rtol, name="fp32 recurrent state")


def test_infinite_gate_resets_channel_exactly():
    q, k, v, g, s0 = make_inputs(1, 150, 2, 4, 3, seed=7)
    g = g.clone()
    g[0, 10, 0, :] = float("-inf")  # full reset of head 0 at t=10
    g[0, 70:90, 1, 2] = float("-inf")
    g[0, 149, :, 1] = float("-inf")
    o_ref, s_ref = gla_recurrent(q, k, v, g, 0.5, s0)
    o, s = gla_chunk(q, k, v, g, 0.5, s0)
    assert_close(o, o_ref, rtol=1e-6)
    assert_close(s, s_ref, rtol=1e-6)
    # After a full reset at t=10, head 0's outputs ignore everything before, including the initial state.
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    k2[0, :10], v2[0, :10] = 0, 0
    o2, _ = gla_chunk(q2, k2, v2, g, 0.5, torch.zeros_like(s0))
    torch.testing.assert_close(o2[0, 10:, 0], o[0, 10:, 0], rtol=1e-9, atol=1e-12)


def test_huge_then_tiny_gates_keep_precision():
    """A -1000 gate followed by tiny ones: differences of cumulative sums would lose the tiny decays."""
    q, k, v, g, s0 = make_inputs(1, 64, 1, 4, 4, dtype=torch.float32, seed=11)
    g = torch.full_like(g, -1e-3)
    g[0, 0] = -1000.0
    o_ref, s_ref = gla_recurrent(q.double(), k.double(), v.double(), g.double(), 0.5, s0.double())
    o, s = gla_chunk(q, k, v, g, 0.5, s0)
    assert_close(o, o_ref, rtol=2e-6)
    assert_close(s, s_ref, rtol=2e-6)


# ---------------------------------------------------------------------------------------------- errors
def _ok():
    return make_inputs(1, 5, 2, 4, 3)


def test_positive_gate_is_rejected_with_value():
    q, k, v, g, _ = _ok()
    g = g.clone()
    g[0, 2, 1, 3] = 0.25
    with pytest.raises(ValueError, match=r"g .* <= 0.*0\.25"):
        gated_linear_attention(q, k, v, g)


def test_nan_gate_is_rejected():
    q, k, v, g, _ = _ok()
    g = g.clone()
    g[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gated_linear_attention(q, k, v, g)


def _poisoned(name, value, t=100):
    """fp32 inputs of 200 tokens (chunks [0, 64), [64, 128), ...) with ``value`` at token ``t`` of ``name``."""
    q, k, v, g, s0 = (x.float() for x in make_inputs(1, 200, 2, 4, 3, seed=17))
    inputs = dict(q=q, k=k, v=v, initial_state=s0)
    bad = inputs[name].clone()
    if name == "initial_state":
        bad[0, 1, 2, 0] = value
    else:
        bad[0, t, 1, 2] = value
    inputs[name] = bad
    return inputs, g


@pytest.mark.parametrize("backend", ["chunk", "recurrent", "auto"])
@pytest.mark.parametrize(
    "name, value, where",
    [("v", float("nan"), r"v\[0, 100, 1, 2\] = nan \(index \[b, t, h, v\]\)"),
     ("k", float("inf"), r"k\[0, 100, 1, 2\] = inf \(index \[b, t, h, k\]\)"),
     ("q", float("-inf"), r"q\[0, 100, 1, 2\] = -inf \(index \[b, t, h, k\]\)"),
     ("initial_state", float("nan"), r"initial_state\[0, 1, 2, 0\] = nan \(index \[b, h, k, v\]\)")],
    ids=["nan-v", "inf-k", "-inf-q", "nan-initial_state"],
)
def test_non_finite_inputs_are_rejected_naming_the_first_bad_entry(backend, name, value, where):
    """The chunk backend would spread a NaN/inf at t = 100 back to outputs 64..99 of its chunk: rejected."""
    inputs, g = _poisoned(name, value)
    with pytest.raises(ValueError, match=f"{name} must be finite: {where}, the first of 1 NaN/inf"):
        gated_linear_attention(inputs["q"], inputs["k"], inputs["v"], g, initial_state=inputs["initial_state"],
                               backend=backend)


def test_non_finite_check_reports_the_first_of_several_and_can_be_skipped():
    inputs, g = _poisoned("v", float("nan"), t=150)
    inputs["v"][0, 120, 0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"v\[0, 120, 0, 1\] = inf .* the first of 2 NaN/inf entries of 1200"):
        gated_linear_attention(inputs["q"], inputs["k"], inputs["v"], g)
    # Unchecked (as the models call it), the recurrent backend is causal: NaN from t = 150 on, only.
    o, _ = gated_linear_attention(inputs["q"], inputs["k"], inputs["v"], g, backend="recurrent", check_values=False)
    assert torch.isfinite(o[:, :120]).all() and torch.isnan(o[:, 150]).any()


def test_finite_inputs_whose_sum_overflows_are_accepted():
    """The check screens with one sum per tensor; an overflow of finite values must not be taken for inf."""
    inputs, g = _poisoned("v", 3e38, t=5)
    inputs["v"][0, 6, 1, 2] = 3e38
    assert not torch.isfinite(inputs["v"].sum())  # the screen trips...
    gated_linear_attention(inputs["q"], inputs["k"], inputs["v"], g, backend="recurrent")  # ...and clears


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda q, k, v, g: (q, k[:, :4], v, g), r"k \(1, 4, 2, 4\)"),
        (lambda q, k, v, g: (q, k, v[:, :, :1], g), r"v must be \[B, T, H, V\].*\(1, 5, 1, 3\)"),
        (lambda q, k, v, g: (q[0], k, v, g), r"q must be 4-D.*\(5, 2, 4\)"),
        (lambda q, k, v, g: (q, k, v, g[..., :3]), r"g \(1, 5, 2, 3\)"),
        (lambda q, k, v, g: (q, k, v.long(), g), "floating-point"),
    ],
)
def test_mismatched_shapes_are_rejected(mutate, pattern):
    q, k, v, g, _ = _ok()
    with pytest.raises(ValueError, match=pattern):
        gated_linear_attention(*mutate(q, k, v, g))


def test_bad_initial_state_and_backend():
    q, k, v, g, s0 = _ok()
    with pytest.raises(ValueError, match=r"initial_state must be \[B, H, K, V\] = \(1, 2, 4, 3\)"):
        gated_linear_attention(q, k, v, g, initial_state=s0[:, :, :, :2])
    with pytest.raises(ValueError, match="unknown GLA backend 'fast'"):
        gated_linear_attention(q, k, v, g, backend="fast")


def _step_inputs(B=3, T=5, H=2, K=8, V=12, dtype=torch.float64, seed=4):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen) * 2 + 1)
    s0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    return [x.to(dtype) for x in (q, k, v, g)], s0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decode_step_op_equals_the_recurrence_token_by_token(dtype):
    from longseq.ops.gla import gla_decode_step

    (q, k, v, g), s0 = _step_inputs(dtype=dtype)
    o_ref, s_ref = gla_recurrent(*(x.double() for x in (q, k, v, g)), 0.3, s0)
    state = s0.to(torch.float64 if dtype == torch.float64 else torch.float32).clone()
    ptr = state.data_ptr()
    outs = [gla_decode_step(q[:, t], k[:, t], v[:, t], g[:, t], state, scale=0.3, backend="torch")
            for t in range(q.shape[1])]
    assert state.data_ptr() == ptr and outs[0].dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close(torch.stack(outs, 1), o_ref, rtol=tol, name="o")
    assert_close(state, s_ref, rtol=tol, name="state (in place)")


def test_decode_step_op_rejects_bad_input(monkeypatch):
    from longseq.ops.gla import gla_decode_step

    (q, k, v, g), s0 = _step_inputs(dtype=torch.float32)
    q, k, v, g = q[:, 0], k[:, 0], v[:, 0], g[:, 0]
    s = s0.float()
    with pytest.raises(ValueError, match=r"q, k and g must share one shape \[B, H, K\]"):
        gla_decode_step(q[:, None], k, v, g, s)
    with pytest.raises(ValueError, match=r"v must be \[B, H, V\]"):
        gla_decode_step(q, k, v[:2], g, s)
    with pytest.raises(ValueError, match=r"state must be \[B, H, K, V\] = \(3, 2, 8, 12\)"):
        gla_decode_step(q, k, v, g, s[:, :, :4])
    with pytest.raises(ValueError, match="state must be torch.float32 for torch.float32 inputs"):
        gla_decode_step(q, k, v, g, s0)
    with pytest.raises(ValueError, match="state must be contiguous"):
        gla_decode_step(q, k, v, g, s.transpose(-1, -2).contiguous().transpose(-1, -2))
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        gla_decode_step(q, k, v, g, s, backend="cuda")
    with pytest.raises(ValueError, match="must be on one device; got q on cpu, .* state on meta"):
        gla_decode_step(q, k, v, g, s.to("meta"))  # meta stands in for another device on a CPU-only machine
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend 'triton' cannot run these inputs"):
        gla_decode_step(q, k, v, g, s, backend="triton")

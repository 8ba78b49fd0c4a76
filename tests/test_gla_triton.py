"""The Triton GLA kernels against the recurrent ground truth: outputs, final states, every gradient.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set below before
Triton is first imported) on small, awkward shapes; with CUDA the same tests run compiled, and the
``gpu``-marked tests add realistic shapes in bf16. Kernel outputs are poisoned (NaN-filled
allocations) so an element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must precede the first import of triton and of the kernel modules (jit reads it at decoration).
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from longseq.ops.gla import gated_linear_attention, gla_chunk, gla_recurrent  # noqa: E402
from longseq.ops.gla.triton import (  # noqa: E402
    chunk_bwd,
    chunk_fwd,
    common,
    recurrent_gla,
)
from longseq.testing import assert_close, relative_rms_error, triton_interpreter_problem  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


_problem = triton_interpreter_problem(chunk_fwd.output_kernel)
pytestmark = pytest.mark.skipif(_problem is not None, reason=str(_problem))
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


@pytest.fixture
def poison(monkeypatch):
    """Make every Python-level ``torch.empty_like`` / ``Tensor.new_empty`` return NaN-filled memory."""
    empty_like, new_empty = torch.empty_like, torch.Tensor.new_empty

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(empty_like(*a, **kw)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: fill(new_empty(self, *a, **kw)))


@pytest.fixture(params=["single", "split"])
def intra_path(request, monkeypatch):
    """Force the intra-chunk kernels onto one path: ``single`` = one product per block about the chunk
    start (gates here are mild enough for it), ``split`` = the sub-chunk split in log space."""
    monkeypatch.setattr(common, "MAX_DECAY", 1e4 if request.param == "single" else -1.0)
    return request.param


@pytest.fixture(params=["formed", "prepared"])
def state_operands(request, monkeypatch):
    """Force the state passes' decayed operands: ``formed`` per V tile from k/q and the cumsums, or
    ``prepared`` (stored once by the prepare kernel, read by the passes)."""
    monkeypatch.setattr(common, "PREPARED_FROM_V_TILES", 1 if request.param == "prepared" else 10**6)
    return request.param


def make_inputs(B, T, H, K, V, *, n_states=None, dtype=torch.float32, gate_lo=None, seed=0, device=DEVICE):
    """q, k, v, g, s0 on ``device``; g = logsigmoid(...) or uniform in ``[gate_lo, 0]``.

    s0 is ``[n_states or B, H, K, V]``.
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    if gate_lo is None:
        g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen) * 2 + 1)
    else:
        g = torch.rand(B, T, H, K, generator=gen) * gate_lo
    s0 = torch.randn(n_states or B, H, K, V, generator=gen)
    q, k, v = (x.to(device, dtype) for x in (q, k, v))
    return q, k, v, g.to(device), s0.to(device)


def run_with_grads(backend, q, k, v, g, s0, w_o, w_s, cu_seqlens=None):
    """o, final state and the gradients of ``sum(o * w_o) + sum(S_T * w_s)`` w.r.t. (q, k, v, g, s0)."""
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in (q, k, v, g, s0)]
    o, s = gated_linear_attention(
        *leaves[:4], initial_state=leaves[4], output_final_state=True, backend=backend, cu_seqlens=cu_seqlens
    )
    loss = (o.float() * w_o).sum() + (s * w_s).sum()
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    return o, s, grads


def reference_with_grads(q, k, v, g, s0, w_o, w_s, cu_seqlens=None):
    """The recurrent backend in float64 from the same (possibly low-precision) inputs."""
    to64 = [x.double() if x is not None else None for x in (q, k, v, g, s0)]
    return run_with_grads("recurrent", *to64, w_o.double(), w_s.double(), cu_seqlens=cu_seqlens)


def check_against_reference(q, k, v, g, s0, *, cu_seqlens=None, rtol=2e-5, grad_rtol=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    n_states = (
        s0.shape[0] if s0 is not None else (q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1)
    )
    w_o = torch.randn(v.shape, generator=gen).to(DEVICE)
    w_s = torch.randn(n_states, *q.shape[2:3], q.shape[-1], v.shape[-1], generator=gen).to(DEVICE)
    o, s, grads = run_with_grads("triton", q, k, v, g, s0, w_o, w_s, cu_seqlens)
    o_ref, s_ref, grads_ref = reference_with_grads(q, k, v, g, s0, w_o, w_s, cu_seqlens)
    assert o.dtype == v.dtype and s.dtype == torch.float32
    assert_close(o, o_ref, rtol=rtol, name="o")
    assert_close(s, s_ref, rtol=rtol, name="final_state")
    names = ["dq", "dk", "dv", "dg", "d_initial_state"][: len(grads)]  # no s0: no d_initial_state
    for name, got, ref in zip(names, grads, grads_ref, strict=True):
        assert got.dtype == (
            g.dtype if name == "dg" else torch.float32 if name == "d_initial_state" else q.dtype
        )
        assert_close(got, ref, rtol=grad_rtol or rtol, atol=1e-6, name=name)


# ------------------------------------------------------------------- small shapes (interpreter or GPU)
@pytest.mark.parametrize(
    "B,T,H,K,V,with_state",
    [(2, 37, 2, 16, 32, True), (1, 130, 1, 16, 32, False), (1, 64, 2, 32, 16, True)],
)
def test_chunk_kernels_match_recurrent_fp32(poison, intra_path, state_operands, B, T, H, K, V, with_state):
    q, k, v, g, s0 = make_inputs(B, T, H, K, V, seed=T)
    g = g / 4  # chunk totals of about -10: valid for both intra-chunk paths
    check_against_reference(q, k, v, g, s0 if with_state else None)


def test_head_dims_tiled_over_several_blocks(poison, monkeypatch):
    """Blocks capped at 16: K=24 and V=40 each span 2-3 tiles, the last one partly masked (the output kernel's
    V tiles too)."""
    monkeypatch.setattr(common, "MAX_BLOCK", 16)
    monkeypatch.setattr(common, "OUTPUT_BV", 16)
    q, k, v, g, s0 = make_inputs(1, 70, 1, 24, 40, seed=3)
    check_against_reference(q, k, v, g, s0)


def test_each_kernel_tiles_on_its_own(poison, monkeypatch):
    """Every kernel with tiles of its own (the launch constants of :mod:`.common`), no two alike where a
    kernel takes both: a kernel that assumed another's tiling would read or write the wrong blocks. K = V = 32,
    two sequences with a partial chunk, initial states, both state-operand sources."""
    tiles = dict(PREPARE_BK=16, STATE_BK=32, STATE_BV=16, INTRA_BK=16, OUTPUT_BK=16, OUTPUT_BV=32,
                 VALUE_GRAD_BK=32, VALUE_GRAD_BV=16, QKG_BK=16, QKG_BV=32)
    for name, value in tiles.items():
        monkeypatch.setattr(common, name, value)
    q, k, v, g, s0 = make_inputs(2, 100, 1, 32, 32, seed=21)
    for prepared in (True, False):
        monkeypatch.setattr(common, "PREPARED_FROM_V_TILES", 1 if prepared else 10**6)
        check_against_reference(q, k, v, g, s0)


def test_wide_v_tiles_only_for_bf16_products():
    """The 128-wide V tiles of the state passes and dv were timed on bf16 products; fp32 products (fp16 and fp32
    inputs, twice the registers per operand element) keep 64-wide ones. 256 (sequence, head) pairs: no narrowing
    for an idle card."""
    import triton.language as tl

    info = common.seq_info(16, 2048, None, torch.device("cpu"))
    bf16 = common.KernelDtypes(tl.bfloat16, "tf32", torch.bfloat16, torch.bfloat16)
    fp32, tf32 = common.kernel_dtypes(torch.float32), common.KernelDtypes(tl.float32, "tf32")
    for kd, width in [(bf16, 128), (fp32, 64), (tf32, 64)]:
        assert chunk_fwd.plan_state_passes(128, 128, 16, info, kd, torch.device("cpu")).BV == width
        assert common.v_block_size(128, common.VALUE_GRAD_BV, kd) == width
        assert common.v_block_size(48, common.VALUE_GRAD_BV, kd) == 64  # a narrower head dim keeps its own width


def test_intra_kernel_takes_all_of_k_in_one_tile_only_where_timed():
    """One whole-K tile in the intra-chunk kernel was timed faster at K = 128 on bf16 products and slower as two
    128-wide tiles at K = 256: bf16 up to K = 128 takes K in one tile, wider K and fp32 products 64-wide tiles."""
    import triton.language as tl

    bf16 = common.KernelDtypes(tl.bfloat16, "tf32", torch.bfloat16, torch.bfloat16)
    fp32 = common.kernel_dtypes(torch.float32)
    assert [chunk_fwd.intra_block_size(K, bf16) for K in (32, 100, 128, 256, 512)] == [32, 128, 128, 64, 64]
    assert [chunk_fwd.intra_block_size(K, fp32) for K in (32, 128, 256)] == [32, 64, 64]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("v_tiles", [1, 2])
def test_forward_without_grad_matches_recurrent(poison, intra_path, monkeypatch, packed, v_tiles):
    """Prefill and evaluation (no grad, inputs that require grad): outputs and final states against the float64
    recurrence, 2 chunks and a partial one (or packed sequences of 37 and 93), the outputs in one or two V
    tiles."""
    monkeypatch.setattr(common, "OUTPUT_BV", 32 // v_tiles)
    cu = torch.tensor([0, 37, 130], device=DEVICE) if packed else None
    q, k, v, g, s0 = make_inputs(1 if packed else 2, 130, 2, 16, 32, n_states=2, seed=4)
    g = g / 4  # chunk totals of about -10: valid for both intra-chunk paths
    q, k, v, g, s0 = (x.requires_grad_(True) for x in (q, k, v, g, s0))
    with torch.no_grad():
        o, s = gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, backend="triton",
                                      cu_seqlens=cu)
    q64, k64, v64, g64, s64 = (x.detach().double() for x in (q, k, v, g, s0))
    o_ref, s_ref = gated_linear_attention(q64, k64, v64, g64, initial_state=s64, output_final_state=True,
                                          backend="recurrent", cu_seqlens=cu)
    assert_close(o, o_ref, rtol=2e-5, name="o")
    assert_close(s, s_ref, rtol=2e-5, name="final_state")


def test_varlen_three_sequences_with_states(poison, intra_path, state_operands):
    """Packed lengths 37, 0 (empty: its final state is its initial state) and 91, one launch."""
    cu = torch.tensor([0, 37, 37, 128], device=DEVICE)
    q, k, v, g, s0 = make_inputs(1, 128, 2, 16, 32, n_states=3, seed=5)
    check_against_reference(q, k, v, g, s0, cu_seqlens=cu)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("min_chunks,segments", [(1, (5, 1)), (2, (2, 3))])
def test_segmented_state_passes(poison, monkeypatch, min_chunks, segments, tiled):
    """Sequences cut into 5 segments of 1 chunk or 2 of 3 for the state passes (forced: the rule cuts only when few long
    sequences leave the card idle): packed lengths 37, 0, 300 and 130 with initial states and a final-state
    gradient, so segments carry h0 forwards and dS_T backwards, some sequences have fewer segments than the
    launch, and the last segment is partial. ``tiled``: K = V = 32 in blocks of 16, so each segment's result
    and decay come from several K and V tiles."""
    monkeypatch.setattr(common, "SEGMENT_BELOW_PROGRAMS_PER_SM", 10**6)
    monkeypatch.setattr(common, "SEGMENT_FROM_CHUNKS", 1)
    monkeypatch.setattr(common, "SEGMENT_PROGRAMS_PER_SM", 10**6)
    monkeypatch.setattr(common, "MIN_SEGMENT_CHUNKS", min_chunks)
    monkeypatch.setattr(common, "MIN_SEGMENTS", 2)
    chosen = []
    rule = common.state_segments
    monkeypatch.setattr(common, "state_segments", lambda *a: chosen.append(rule(*a)) or chosen[-1])
    if tiled:
        monkeypatch.setattr(common, "MAX_BLOCK", 16)
    cu = torch.tensor([0, 37, 37, 337, 467], device=DEVICE)
    q, k, v, g, s0 = make_inputs(1, 467, 2, 32 if tiled else 16, 32, n_states=4, seed=13)
    check_against_reference(q, k, v, g, s0, cu_seqlens=cu)
    assert chosen == [segments]  # one plan for the states, their recomputation and the state gradients


def test_varlen_without_initial_state_equals_separate_calls(poison):
    cu = torch.tensor([0, 20, 85, 100], device=DEVICE)
    q, k, v, g, _ = make_inputs(1, 100, 1, 16, 16, seed=6)
    o, s = gated_linear_attention(q, k, v, g, output_final_state=True, backend="triton", cu_seqlens=cu)
    for i, (a, b) in enumerate(zip(cu.tolist()[:-1], cu.tolist()[1:], strict=True)):
        o_i, s_i = gla_recurrent(
            q[:, a:b].double(), k[:, a:b].double(), v[:, a:b].double(), g[:, a:b].double(), 0.25
        )
        assert_close(o[:, a:b], o_i, rtol=2e-5, name=f"o[{i}]")
        assert_close(s[i : i + 1], s_i, rtol=2e-5, name=f"state[{i}]")


def test_strong_and_infinite_gates_stay_finite_and_exact(poison, state_operands):
    """Gates down to -20 plus full resets (-inf), including one on the first token of a chunk."""
    q, k, v, g, s0 = make_inputs(1, 100, 2, 16, 16, gate_lo=-20.0, seed=7)
    g = g.clone()
    g[0, 10, 0, :] = float("-inf")
    g[0, 64, 1, 3] = float("-inf")
    g[0, 70:75, 1, :5] = float("-inf")
    check_against_reference(q, k, v, g, s0, rtol=5e-5)
    # Below the clamp floor the gradient is exactly 0 (the clamp's), not a product of order e^-100, also where
    # the backward reads the clamped gates off the kept cumsums (fp32 g) rather than g itself.
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.ones_like(v)
        _, _, grads = run_with_grads("triton", q, k, v, g.to(dtype), s0, w, torch.ones_like(s0))
        dg = grads[3]
        assert dg.dtype == dtype and bool((dg[g == float("-inf")] == 0).all()) and bool((dg[g > -20] != 0).any())


@pytest.mark.parametrize("programs_per_sm", [3, 64])
def test_strong_kernels_walk_the_queue_with_several_programs(poison, monkeypatch, programs_per_sm):
    """Off CUDA the strong-decay kernels get one program; here a pretend 1-SM GPU gives them 3 (each walks every
    third queued tile from its own start) or 64 (capped at the tile count: one tile each). Every chunk of both
    heads decays past ``MAX_DECAY``: 10 queued chunks in the forward, 20 queued K tiles in the backward (16-wide
    tiles of K = 32), none of them a multiple of 3. Each tile must be taken exactly once (``poison`` catches
    one left out) and land where its id says."""
    monkeypatch.setattr(common, "MAX_BLOCK", 16)
    monkeypatch.setattr(common, "STRONG_PROGRAMS_PER_SM", programs_per_sm)
    monkeypatch.setattr(common, "cuda_sm_count", lambda device: 1)
    grids = []  # (queue capacity, programs) of each strong-decay launch
    strong_programs = chunk_fwd.strong_programs

    def recorded(tiles, device):
        grids.append((tiles, strong_programs(tiles, device)))
        return grids[-1][1]

    monkeypatch.setattr(chunk_fwd, "strong_programs", recorded)
    monkeypatch.setattr(chunk_bwd, "strong_programs", recorded)
    q, k, v, g, s0 = make_inputs(1, 300, 2, 32, 16, gate_lo=-20.0, seed=21)
    check_against_reference(q, k, v, g, s0, rtol=5e-5)
    assert grids == [(10, min(10, programs_per_sm)), (20, min(20, programs_per_sm))]


def test_mixed_decay_takes_both_paths_in_one_call(poison):
    """Default threshold: head 0 decays by ~4 per chunk (single product), head 1 by ~600 (split), and in
    head 0 one chunk sits just above the threshold with large keys, where exp(-b) reaches e^39."""
    q, k, v, g, s0 = make_inputs(1, 192, 2, 16, 16, seed=12)
    g = g.clone()
    g[..., 0, :] = -0.06
    g[0, 64:128, 0, :] = -39.5 / 64
    k = k.clone()
    k[0, 64:128, 0, :] *= 30
    g[..., 1, :] = -10.0 * torch.rand_like(g[..., 1, :])
    assert common.MAX_DECAY == 40.0
    check_against_reference(q, k, v, g, s0, rtol=5e-5)


def test_mixed_decay_across_the_k_tiles_of_one_chunk(poison, monkeypatch):
    """16-wide K tiles of K = 32: in the middle chunk only the second tile decays past the threshold. The forward's
    strong-decay launch owns that whole chunk (A sums both tiles) and takes the single product for its bounded first
    tile; in the backward that first tile stays with the bounded launch and the second goes to the strong one. The
    other chunks stay with the bounded launches; every output written once (``poison``)."""
    monkeypatch.setattr(common, "MAX_BLOCK", 16)
    q, k, v, g, s0 = make_inputs(1, 150, 2, 32, 16, seed=13)
    g = g.clone()
    g[...] = -0.05
    g[0, 64:128, :, 16:] = -2.0  # ~-128 across the chunk in the second K tile only
    assert common.MAX_DECAY == 40.0
    check_against_reference(q, k, v, g, s0, rtol=5e-5)


def test_one_masked_k_tile_wider_than_k(poison, monkeypatch):
    """A 128-wide intra tile over K = 100 (the bf16 path's whole-K tile, forced here on fp32 products), its last 28
    columns masked, with one chunk of strong decay among mild ones."""
    monkeypatch.setattr(common, "INTRA_BK", 128)
    q, k, v, g, s0 = make_inputs(1, 130, 1, 100, 16, seed=14)
    g = g.clone()
    g[...] = -0.05
    g[0, 64:128, :, 40:60] = -1.5
    check_against_reference(q, k, v, g, s0, rtol=5e-5)


def test_bfloat16_inputs(poison):
    q, k, v, g, s0 = make_inputs(1, 80, 2, 32, 16, dtype=torch.bfloat16, seed=8)
    # The interpreter truncates fp32 -> bf16 stores (the GPU rounds to nearest), doubling the
    # rounding error of o and dv: allow 2x fla's tolerances there.
    loose = 1 if HAS_CUDA else 2
    check_against_reference(q, k, v, g, s0, rtol=4e-3 * loose, grad_rtol=5e-3 * loose)


@pytest.mark.parametrize("T", [1, 5])
def test_decode_kernel_matches_recurrent(poison, T):
    q, k, v, g, s0 = make_inputs(3, T, 2, 16, 48, seed=9)
    with torch.no_grad():
        o, s = gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, backend="triton")
    o_ref, s_ref = gla_recurrent(q.double(), k.double(), v.double(), g.double(), 0.25, s0.double())
    assert_close(o, o_ref, rtol=1e-5, name="o")
    assert_close(s, s_ref, rtol=1e-5, name="final_state")


@(pytest.mark.gpu if HAS_CUDA else (lambda test: test))  # the GPU suite runs it compiled
def test_public_decode_step_op_runs_the_kernel_in_place(poison):
    from longseq.ops.gla import gla_decode_step

    q, k, v, g, s0 = make_inputs(3, 4, 2, 16, 48, seed=11)
    o_ref, s_ref = gla_recurrent(q.double(), k.double(), v.double(), g.double(), 0.25, s0.double())
    state = s0.clone()
    with torch.no_grad():
        outs = [gla_decode_step(q[:, t], k[:, t], v[:, t], g[:, t], state, scale=0.25, backend="triton")
                for t in range(4)]
    assert_close(torch.stack(outs, 1), o_ref, rtol=1e-5, name="o")
    assert_close(state, s_ref, rtol=1e-5, name="state (in place)")


def test_decode_kernel_in_place_and_varlen():
    q, k, v, g, s0 = make_inputs(1, 7, 2, 16, 16, n_states=2, seed=10)
    cu = torch.tensor([0, 3, 7], device=DEVICE)
    state = s0.clone()
    with torch.no_grad():
        o, out = recurrent_gla(q, k, v, g, 0.25, state, cu_seqlens=cu, out_state=state)
    assert out.data_ptr() == state.data_ptr()
    o_ref, s_ref = gated_linear_attention(
        q.double(),
        k.double(),
        v.double(),
        g.double(),
        scale=0.25,
        initial_state=s0.double(),
        output_final_state=True,
        backend="recurrent",
        cu_seqlens=cu,
    )
    assert_close(o, o_ref, rtol=1e-5, name="o")
    assert_close(state, s_ref, rtol=1e-5, name="state (in place)")


def test_short_input_with_grad_uses_chunk_kernels(poison):
    """T <= 16 with grad falls back from the forward-only decode kernel to the chunk kernels."""
    q, k, v, g, s0 = make_inputs(1, 9, 1, 16, 16, seed=11)
    check_against_reference(q, k, v, g, s0)


def test_triton_backend_rejects_unsupported_inputs(monkeypatch):
    q, k, v, g, s0 = make_inputs(1, 4, 1, 16, 16)
    from longseq.ops.gla.triton import autograd

    monkeypatch.setattr(autograd, "MAX_CHUNKS", 1)  # the grid-axis cap, lowered so a tiny call crosses it
    q2, k2, v2, g2, _ = make_inputs(1, 65, 1, 16, 16)
    with pytest.raises(ValueError, match="at most 1 chunks of 64 tokens per call; got 2"):
        autograd.chunk_gla(q2, k2, v2, g2, 0.25)
    with pytest.raises(ValueError, match="float64"):
        gated_linear_attention(q.double(), k.double(), v.double(), g.double(), backend="triton")
    big = torch.zeros(1, 4, 1, 600, device=DEVICE)
    with pytest.raises(ValueError, match="head dims K=600"):
        gated_linear_attention(big, big, v, big, backend="triton")


@(pytest.mark.gpu if HAS_CUDA else (lambda test: test))  # on CUDA the check is read after the launches
@pytest.mark.parametrize("name, value", [("v", float("nan")), ("k", float("inf"))])
@pytest.mark.parametrize("T, t", [(130, 100), (5, 3)], ids=["chunk-kernels", "decode-kernel"])
def test_triton_backend_rejects_non_finite_inputs(name, value, T, t):
    """As every backend does: the chunk kernels would spread it to earlier tokens of its chunk."""
    inputs = dict(zip("qkv", make_inputs(1, T, 1, 16, 16)[:3], strict=True))
    inputs[name][0, t, 0, 3] = value
    g = torch.full((1, T, 1, 16), -0.1, device=DEVICE)
    with pytest.raises(ValueError, match=rf"{name} must be finite: {name}\[0, {t}, 0, 3\] = {value}"):
        gated_linear_attention(*inputs.values(), g, backend="triton")


# ----------------------------------------------------------------------------------------- GPU only
def _bf16_case(B, T, H, K, V, *, cu_seqlens=None, gate_lo=None, seed):
    """bf16 kernels vs the fp32 chunk reference on the same bf16 inputs (fla's tolerances)."""
    n = cu_seqlens.numel() - 1 if cu_seqlens is not None else B
    q, k, v, g, s0 = make_inputs(B, T, H, K, V, n_states=n, dtype=torch.bfloat16, gate_lo=gate_lo, seed=seed)
    w_o = torch.randn(B, T, H, V, device=DEVICE)
    w_s = torch.randn(n, H, K, V, device=DEVICE)
    o, s, grads = run_with_grads("triton", q, k, v, g, s0, w_o, w_s, cu_seqlens)
    o_ref, s_ref, grads_ref = run_with_grads(
        "chunk", *(x.float() for x in (q, k, v, g, s0)), w_o, w_s, cu_seqlens
    )
    assert o.dtype == torch.bfloat16
    assert_close(o, o_ref, rtol=4e-3, name="o")
    assert_close(s, s_ref, rtol=4e-3, name="final_state")
    for name, got, ref in zip(["dq", "dk", "dv", "dg", "d_initial_state"], grads, grads_ref, strict=True):
        assert_close(got, ref, rtol=5e-3, name=name)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    "B,T,H,K,V",
    [
        (2, 2048, 8, 128, 128),
        (1, 4096, 4, 256, 512),
        (4, 1000, 4, 64, 64),
        (2, 777, 2, 100, 36),
        (8, 63, 4, 16, 256),
        (1, 32768, 4, 128, 128),  # few long sequences: segmented state passes (16 segments on an H100)
    ],
)
def test_gpu_bf16_matches_fp32_reference(B, T, H, K, V):
    _bf16_case(B, T, H, K, V, seed=B * T + K)


@gpu
@pytest.mark.gpu
def test_gpu_bf16_varlen():
    cu = torch.tensor([0, 1, 700, 700, 2100, 4096], device=DEVICE)
    _bf16_case(1, 4096, 8, 128, 128, cu_seqlens=cu, seed=1)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("gate_lo", [-20.0, -1e-3])
def test_gpu_64k_tokens_strong_and_weak_gates(gate_lo):
    T, H, K, V = 65_536, 2, 64, 64
    q, k, v, g, s0 = make_inputs(1, T, H, K, V, dtype=torch.bfloat16, gate_lo=gate_lo, seed=2)
    k = k * 0.1
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v, g, s0)]
    o, s = gated_linear_attention(
        *leaves[:4], initial_state=leaves[4], output_final_state=True, backend="triton"
    )
    (o.float().square().mean() + s.square().mean()).backward()
    for name, x in [("o", o), ("state", s)] + [(f"grad {i}", t.grad) for i, t in enumerate(leaves)]:
        assert torch.isfinite(x).all(), name
    with torch.no_grad():  # the reference in float64, never another fp32 computation of 64K steps
        qd, kd, vd, gd, sd = (x.double() for x in (q, k, v, g, s0))
        o_ref, s_ref = gla_chunk(qd, kd, vd, gd, K**-0.5, initial_state=sd)
    assert relative_rms_error(o, o_ref) <= 4e-3
    assert relative_rms_error(s, s_ref) <= 4e-3


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("B,T,K,V", [(1, 1, 128, 128), (64, 1, 128, 128), (64, 4, 256, 512), (5, 16, 64, 32)])
def test_gpu_decode_kernel_bf16(B, T, K, V):
    q, k, v, g, s0 = make_inputs(B, T, 4, K, V, dtype=torch.bfloat16, seed=B + T)
    with torch.no_grad():
        o, s = gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, backend="auto")
    o_ref, s_ref = gla_recurrent(q, k, v, g, K**-0.5, s0)
    assert o.dtype == torch.bfloat16
    assert_close(o, o_ref, rtol=4e-3, name="o")
    assert_close(s, s_ref, rtol=1e-5, name="state")


@gpu
@pytest.mark.gpu
def test_gpu_decode_step_op_asks_again_for_other_dtypes():
    """Whether Triton can run a call's inputs is remembered per device, dtypes and head dims: after a bf16 call ran
    the kernel, float64 inputs (no kernel for them) are still refused with the reason, and 'auto' runs them in
    PyTorch."""
    from longseq.ops.gla import gla_decode_step

    q, k, v, g, s0 = make_inputs(2, 1, 2, 16, 16, dtype=torch.bfloat16, seed=13)
    q, k, v, g = (x[:, 0] for x in (q, k, v, g))
    with torch.no_grad():
        state = s0.float().clone()
        gla_decode_step(q, k, v, g, state, backend="triton")
        wide = [x.double() for x in (q, k, v, g)]
        with pytest.raises(ValueError, match="float64"):
            gla_decode_step(*wide, s0.double().clone(), backend="triton")
        state64 = s0.double().clone()
        o = gla_decode_step(*wide, state64, backend="auto")
    o_ref, s_ref = gla_recurrent(*(x[:, None] for x in wide), 0.25, s0.double())
    assert_close(o, o_ref[:, 0], rtol=1e-12, name="o (float64, PyTorch)")
    assert_close(state64, s_ref, rtol=1e-12, name="state (float64, PyTorch)")


@gpu
@pytest.mark.gpu
def test_gpu_auto_picks_triton():
    q, k, v, g, s0 = make_inputs(2, 300, 4, 64, 64, dtype=torch.bfloat16, seed=3)
    o_auto, _ = gated_linear_attention(q, k, v, g, initial_state=s0)
    o_triton, _ = gated_linear_attention(q, k, v, g, initial_state=s0, backend="triton")
    torch.testing.assert_close(o_auto, o_triton, rtol=0, atol=0)


def test_frozen_copy_for_ab_runs_like_the_package(tmp_path, monkeypatch):
    """``benchmarks/ab_gla_triton.py --freeze worktree:NAME`` makes a top-level package of these kernels (its
    imports from the rest of longseq made absolute) that computes what the package computes, bit for bit; a
    second freeze into that folder is refused before anything is written, so edits to a copy are never lost, and so is
    a folder named like a module (``queue``) that it would shadow."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ab_gla_triton.py"

    def freeze(*specs):
        return subprocess.run([sys.executable, str(script), "--root", str(tmp_path), "--freeze", *specs],
                              capture_output=True, text=True)

    done = freeze("worktree:frozen_gla")
    assert done.returncode == 0, done.stderr
    assert "from ..." not in "".join(f.read_text() for f in (tmp_path / "frozen_gla").glob("*.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    import frozen_gla

    q, k, v, g, s0 = make_inputs(1, 70, 2, 16, 32, seed=8)
    got = frozen_gla.chunk_gla(q, k, v, g, 0.25, initial_state=s0, output_final_state=True)
    want = gated_linear_attention(q, k, v, g, scale=0.25, initial_state=s0, output_final_state=True,
                                  backend="triton")
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    for name in [m for m in sys.modules if m == "frozen_gla" or m.startswith("frozen_gla.")]:
        del sys.modules[name]

    (tmp_path / "frozen_gla" / "common.py").write_text("edited")
    again = freeze("worktree:other_gla", "worktree:frozen_gla")
    assert again.returncode != 0 and f"{tmp_path / 'frozen_gla'} already exists" in again.stderr
    assert (tmp_path / "frozen_gla" / "common.py").read_text() == "edited" and not (tmp_path / "other_gla").exists()
    # A folder named like a module torch imports would shadow it once on sys.path: refused, nothing written.
    shadow = freeze("worktree:queue")
    assert shadow.returncode != 0 and "would shadow the module queue (standard library)" in shadow.stderr
    assert not (tmp_path / "queue").exists()


def test_kernel_resource_report_compiles_every_launch_for_the_gpu():
    """``benchmarks/gla_kernel_resources.py`` compiles each kernel launch of one forward+backward for an H100 on this
    CPU-only machine and reads its registers from ptxas: the ten launches in order (the intra-chunk and dq/dk/dg
    kernels each have a second one for the tiles of strong decay), a register count for each, and
    program counts as the launch code's grids give them (dq/dk/dg: K tiles x chunks x heads, here 2 x 2 x 2; its strong
    kernel: min(tiles, STRONG_PROGRAMS_PER_SM x SMs), here the 8 tiles). With
    ``scale`` typed fp64, as torch.compile passes it, every launch still compiles, free of fp64 arithmetic."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gla_kernel_resources.py"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script), "--shapes", "2x32x32x1x128", "--set", "QKG_BK=16"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in done.stdout.splitlines()
            if line.startswith("| 2x32x32x1x128 |")]
    forward = ["prepare_kernel", "chunk_states_kernel", "intra_attention_kernel",
               "intra_attention_strong_kernel", "output_kernel"]
    # An fp32 gate's cumsums are kept for the backward, and one V tile forms its state operands: no prepare launch.
    backward = ["chunk_states_kernel", "state_grads_kernel", "value_grad_kernel", "qkg_grad_kernel",
                "qkg_grad_strong_kernel"]
    assert [row[1] for row in rows] == forward + backward
    assert all(0 < int(row[5]) <= 255 for row in rows)
    assert all(row[2] == "8" and row[3] == "8" for row in rows[-2:])  # programs, warps (QKG_WARPS)
    # torch.compile (inductor) types the float `scale` fp64: every kernel still compiles (a loop-carried fp32 state
    # scaled by an fp64 would not) and keeps no fp64 arithmetic.
    fp64 = subprocess.run([sys.executable, str(script), "--shapes", "2x32x32x1x128", "--set", "QKG_BK=16",
                           "--scale-fp64"], capture_output=True, text=True, env=env, timeout=900)
    assert fp64.returncode == 0, fp64.stderr
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in fp64.stdout.splitlines()
            if line.startswith("| 2x32x32x1x128 |")]
    decode = ["recurrent_kernel (decode step)"]
    assert [row[1] for row in rows] == forward + backward + decode and all(row[-1] == "0" for row in rows)
    bad = subprocess.run([sys.executable, str(script), "--shapes", "2x32x32x1x128", "--set", "QKG_BK=wide"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert bad.returncode != 0 and "--set: QKG_BK=wide is not of type int" in bad.stderr and "| 2x32" not in bad.stdout


@pytest.mark.gpu
@gpu
def test_gpu_gla_layer_under_torch_compile_matches_eager():
    """``torch.compile`` (inductor) passes the kernels' float ``scale`` as fp64; each kernel casts it to fp32, so the
    compiled layer trains: its output and gradients match the eager layer's."""
    from longseq.nn.gla import GatedLinearAttention

    torch.manual_seed(0)
    layer = GatedLinearAttention(256, 2, backend="triton").to(DEVICE)
    x = torch.randn(2, 300, 256, device=DEVICE, requires_grad=True)
    results = []
    for fn in (layer, torch.compile(layer)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = fn(x)
        grads = torch.autograd.grad(out.float().square().mean(), [x, layer.q_proj.weight, layer.gate_up.weight])
        results.append([out.float(), *grads])
    for got, want in zip(results[1], results[0], strict=True):
        assert relative_rms_error(got, want) < 1e-2


@pytest.mark.gpu
@gpu
def test_gpu_strong_gates_fill_the_queue_under_cuda_graph_and_torch_compile():
    """Gates decaying by ~64 per chunk (past ``MAX_DECAY`` in every tile) send every tile to the strong-decay kernels:
    1024 queued chunks of the forward and 1024 dq/dk/dg tiles for a grid of at most 4 programs per SM, so the atomics
    and the grid-stride walk run with many programs at once (the interpreter runs one). Replayed from a CUDA graph, the
    forward matches the float64 reference at every replay (the graph re-zeroes the queue); under torch.compile the
    output and every gradient match eager's."""
    B, T, H, K, V = 2, 8192, 4, 64, 64
    q, k, v, g, s0 = make_inputs(B, T, H, K, V, dtype=torch.bfloat16, gate_lo=-2.0, seed=7)
    with torch.no_grad():
        qd, kd, vd, gd, sd = (x.double() for x in (q, k, v, g, s0))
        o_ref, s_ref = gla_chunk(qd, kd, vd, gd, K**-0.5, initial_state=sd)

    def forward():
        return gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, backend="triton",
                                      check_values=False)

    with torch.no_grad():
        forward()  # compiles the kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o_g, s_g = forward()
        for _ in range(2):
            o_g.fill_(float("nan"))
            s_g.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert relative_rms_error(o_g, o_ref) <= 4e-3
            assert relative_rms_error(s_g, s_ref) <= 4e-3

    def with_grads(fn):
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g, s0)]
        o, s = fn(*leaves)
        grads = torch.autograd.grad(o.float().square().mean() + s.square().mean(), leaves)
        return [o.float(), s, *grads]

    def op(q, k, v, g, s0):
        return gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, backend="triton")

    eager = with_grads(op)
    assert relative_rms_error(eager[0], o_ref) <= 4e-3
    compiled = with_grads(torch.compile(op))
    for name, got, want in zip(["o", "state", "dq", "dk", "dv", "dg", "ds0"], compiled, eager, strict=True):
        assert torch.isfinite(got).all(), name
        assert relative_rms_error(got, want) <= 1e-3, name

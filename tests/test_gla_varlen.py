"""Packed variable-length batches (``cu_seqlens``) on the PyTorch backends, and their validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longseq.ops.gla import gated_linear_attention, gla_recurrent
from longseq.testing import assert_close


def packed_inputs(lengths, H=2, K=6, V=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q = torch.randn(1, T, H, K, generator=gen, dtype=torch.float64)
    k = torch.randn(1, T, H, K, generator=gen, dtype=torch.float64)
    v = torch.randn(1, T, H, V, generator=gen, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(1, T, H, K, generator=gen, dtype=torch.float64) * 2 + 1)
    s0 = torch.randn(len(lengths), H, K, V, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return q, k, v, g, s0, cu


@pytest.mark.parametrize("backend", ["recurrent", "chunk", "auto"])
@pytest.mark.parametrize("with_state", [False, True])
def test_packed_sequences_equal_separate_calls(backend, with_state):
    lengths = [5, 0, 70, 1, 64]
    q, k, v, g, s0, cu = packed_inputs(lengths)
    s0 = s0 if with_state else None
    o, s = gated_linear_attention(
        q, k, v, g, initial_state=s0, output_final_state=True, backend=backend, cu_seqlens=cu
    )
    assert o.shape == v.shape and s.shape == (len(lengths), 2, 6, 5)
    for i, (a, b) in enumerate(zip(cu.tolist()[:-1], cu.tolist()[1:], strict=True)):
        init = s0[i : i + 1] if s0 is not None else None
        o_i, s_i = gla_recurrent(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], 6**-0.5, init)
        if b > a:
            assert_close(o[:, a:b], o_i, rtol=1e-9, name=f"o[{i}]")
        assert_close(s[i : i + 1], s_i, rtol=1e-9, name=f"state[{i}]")


def test_packed_gradients_reach_every_input():
    q, k, v, g, s0, cu = packed_inputs([30, 50, 20], seed=1)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, s0)]
    o, s = gated_linear_attention(
        *leaves[:4], initial_state=leaves[4], output_final_state=True, backend="chunk", cu_seqlens=cu
    )
    grads = torch.autograd.grad(o.sum() + s.square().sum(), leaves)
    ref = [x.clone().requires_grad_(True) for x in (q, k, v, g, s0)]
    o_r, s_r = gated_linear_attention(
        *ref[:4], initial_state=ref[4], output_final_state=True, backend="recurrent", cu_seqlens=cu
    )
    grads_ref = torch.autograd.grad(o_r.sum() + s_r.square().sum(), ref)
    for name, got, want in zip(["q", "k", "v", "g", "s0"], grads, grads_ref, strict=True):
        assert_close(got, want, rtol=1e-9, name=f"d{name}")


@pytest.mark.parametrize(
    "cu, pattern",
    [
        (torch.tensor([[0, 10]]), "1-D integer"),
        (torch.tensor([0.0, 10.0]), "1-D integer"),
        (torch.tensor([0]), "at least 2"),
        (torch.tensor([1, 10]), "start at 0 and end at T=10"),
        (torch.tensor([0, 9]), "start at 0 and end at T=10"),
        (torch.tensor([0, 6, 4, 10]), "non-decreasing"),
    ],
)
def test_bad_cu_seqlens_are_rejected(cu, pattern):
    q, k, v, g, _, _ = packed_inputs([10])
    with pytest.raises(ValueError, match=pattern):
        gated_linear_attention(q, k, v, g, cu_seqlens=cu)


def test_packed_needs_batch_one_and_per_sequence_states():
    q, k, v, g, s0, cu = packed_inputs([4, 6])
    with pytest.raises(ValueError, match="B must be 1"):
        gated_linear_attention(
            q.expand(2, -1, -1, -1),
            k.expand(2, -1, -1, -1),
            v.expand(2, -1, -1, -1),
            g.expand(2, -1, -1, -1),
            cu_seqlens=cu,
        )
    with pytest.raises(ValueError, match=r"initial_state must be \[N, H, K, V\] = \(2, 2, 6, 5\)"):
        gated_linear_attention(q, k, v, g, initial_state=s0[:1], cu_seqlens=cu)

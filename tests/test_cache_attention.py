"""``attention_over_cache`` against a dense per-head reference: masks, GQA, per-kv-head layouts, blocks."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longseq.ops.attention import attention_over_cache
from longseq.testing import assert_close


def dense_reference(q, k, v, q_pos, k_pos, window=None, sinks=0):
    """Loop over heads with an explicit mask; k_pos ``[B, H_kv or 1, S]`` -> ``(o, weights)``."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    o = torch.zeros_like(q)
    w_all = torch.zeros(B, H, T, k.shape[2], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)
            kp = k_pos[b, kv if k_pos.shape[1] > 1 else 0]
            for t in range(T):
                p = q_pos[b, t]
                visible = (kp >= 0) & (kp <= p)
                if window is not None:
                    visible &= (kp >= p - window) | (kp < sinks)
                s = (k[b, kv] @ q[b, h, t]) / math.sqrt(D)
                w = torch.softmax(s.masked_fill(~visible, float("-inf")), 0)
                o[b, h, t] = w @ v[b, kv]
                w_all[b, h, t] = w
    return o, w_all


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 2),
    heads=st.sampled_from([(2, 2), (2, 1), (4, 2), (6, 3)]),
    T=st.integers(1, 9),
    S_old=st.integers(0, 7),
    per_head=st.booleans(),
    block=st.integers(1, 5),
    window=st.sampled_from([None, (1, 0), (3, 2), (4, 0)]),
    seed=st.integers(0, 10**6),
)
def test_attention_over_cache_matches_dense(B, heads, T, S_old, per_head, block, window, seed):
    H, Hkv = heads
    D = 4
    g = torch.Generator().manual_seed(seed)
    S = S_old + T
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    q_pos = torch.arange(S_old, S).expand(B, T) + 3
    # keys in a random slot order, some old slots empty (-1); each kv head its own layout if per_head
    G = Hkv if per_head else 1
    k_pos = torch.empty(B, G, S, dtype=torch.long)
    for b in range(B):
        for h in range(G):
            old = torch.randperm(S_old + 3, generator=g)[:S_old]
            old = torch.where(torch.rand(S_old, generator=g) < 0.2, -1, old)
            k_pos[b, h] = torch.cat([old, q_pos[b]])[torch.randperm(S, generator=g)]
    win, sinks = window if window is not None else (None, 0)
    ref_o, ref_w = dense_reference(q, k, v, q_pos, k_pos, win, sinks)
    kp = k_pos if per_head else k_pos[:, 0]
    o, _ = attention_over_cache(q, k, v, q_pos, kp, window=win, sinks=sinks, block_size=block)
    assert_close(o, ref_o, rtol=1e-12, name="sdpa path")
    o, w = attention_over_cache(
        q, k, v, q_pos, kp, return_weights=True, window=win, sinks=sinks, block_size=block
    )
    assert w is not None and w.dtype == torch.float64
    assert_close(o, ref_o, rtol=1e-12, name="weights path")
    assert_close(w, ref_w, rtol=1e-12, name="weights")
    o, ws = attention_over_cache(
        q,
        k,
        v,
        q_pos,
        kp,
        return_weights=True,
        sum_over_queries=True,
        window=win,
        sinks=sinks,
        block_size=block,
    )
    assert ws is not None and ws.shape == (B, H, S)
    assert_close(ws, ref_w.sum(2), rtol=1e-12, name="weights summed over queries")


def test_unmasked_decode_and_low_precision_weights():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 1, 8, generator=g)
    k, v = torch.randn(3, 2, 11, 8, generator=g), torch.randn(3, 2, 11, 8, generator=g)
    k_pos = torch.arange(11).expand(3, 11)
    q_pos = torch.full((3, 1), 11)
    ref, ref_w = attention_over_cache(q, k, v, q_pos, k_pos, return_weights=True)
    o, w = attention_over_cache(q, k, v, q_pos, None, return_weights=True)
    assert_close(o, ref, rtol=1e-6)
    assert_close(w, ref_w, rtol=1e-6)
    ob, wb = attention_over_cache(q.bfloat16(), k.bfloat16(), v.bfloat16(), q_pos, None, return_weights=True)
    assert ob.dtype == torch.bfloat16 and wb.dtype == torch.float32  # softmax rows kept in fp32
    assert_close(wb, ref_w, rtol=3e-2)
    assert torch.allclose(wb.sum(-1), torch.ones(3, 4, 1))

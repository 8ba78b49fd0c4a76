"""The split-KV decode attention kernel against its PyTorch reference and a brute-force softmax.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is first
imported) on tiny shapes with small key blocks and several splits; with CUDA they run compiled, and the
``gpu``-marked tests add the decode benchmark's shapes in bf16 and a CUDA-graph replay as the cache fills.
Slots at or beyond ``n_slots`` are poisoned with NaN and given *visible* positions, so a kernel that read
them would fail; the output buffers are allocated by the kernel wrapper with ``torch.empty`` and every
element is checked finite.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must precede the first import of triton and of the kernel module (jit reads it at decoration).
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from longseq.ops import decode_attention as da  # noqa: E402
from longseq.ops.attention import attention_over_cache  # noqa: E402
from longseq.ops.decode_attention import (  # noqa: E402
    decode_attention,
    decode_attention_reference,
    num_splits_for,
)
from longseq.testing import triton_interpreter_problem  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


_problem = triton_interpreter_problem(da._split_kernel)
pytestmark = pytest.mark.skipif(_problem is not None, reason=str(_problem))


def brute_force(q, k, v, q_pos, k_pos, n_slots):
    """float64 loops: for each (row, head, query) the softmax over the visible keys, read one by one.

    q ``[B, H, T, D]``, k/v ``[B, H_kv, S, D]``, q_pos ``[B, T]``, k_pos ``[B, 1 or H_kv, S]``
    (or None), n_slots ``[B]``.
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    if k_pos is not None:
        k_pos = k_pos.expand(B, Hkv, k.shape[2])  # a layout shared by the kv heads: [B, 1, S]
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                keys = [
                    s for s in range(int(n_slots[b]))
                    if k_pos is None or 0 <= int(k_pos[b, h // G, s]) <= int(q_pos[b, t])
                ]
                if not keys:
                    continue  # no visible key: 0
                kk = k[b, h // G, keys].double()
                scores = kk @ q[b, h, t].double() / math.sqrt(D)
                w = torch.softmax(scores, 0)
                out[b, h, t] = w @ v[b, h // G, keys].double()
    return out


def make_case(B, Hkv, G, T, S, D, n_slots, *, per_head=False, dtype=torch.float32, seed=0):
    """Random q/k/v; positions = slot index with holes (-1) in the middle; slots >= n_slots poisoned."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, T, D, generator=gen)
    k = torch.randn(B, Hkv, S, D, generator=gen)
    v = torch.randn(B, Hkv, S, D, generator=gen)
    k_pos = torch.arange(S).repeat(B, Hkv if per_head else 1, 1)  # [B, 1 or H_kv, S]
    k_pos[:, :, 3:7] = -1  # empty slots in the middle
    if per_head:
        k_pos[:, -1, 10:12] = -1  # and a kv head with its own holes
    n = torch.tensor(n_slots, dtype=torch.int32)
    for b in range(B):
        k[b, :, n[b] :] = float("nan")  # never read...
        v[b, :, n[b] :] = float("nan")
        k_pos[b, :, n[b] :] = 0  # ...although visible if they were
    # Queries sit at the end of their row's filled prefix (decode), earlier ones of a chunk see less.
    q_pos = (n.long()[:, None] - T + torch.arange(T)[None, :]).clamp(min=0)
    return q.to(dtype), k.to(dtype), v.to(dtype), q_pos, k_pos, n


def _to(device, *xs):
    return [x.to(device) if isinstance(x, torch.Tensor) else x for x in xs]


@pytest.mark.parametrize(
    "G, D, T",
    [(1, 16, 1), (2, 32, 1), (4, 64, 1), (1, 32, 3), (2, 16, 4), (4, 16, 5)],
)
def test_kernel_matches_reference_and_brute_force(G, D, T):
    B, Hkv, S = 3, 2, 45
    q, k, v, q_pos, k_pos, n = make_case(B, Hkv, G, T, S, D, [37, 20, 45], per_head=(G == 2))
    expected = brute_force(q, k, v, q_pos, k_pos, n)
    ref = decode_attention_reference(q, k, v, q_pos, k_pos, n)
    torch.testing.assert_close(ref.double(), expected, rtol=1e-5, atol=1e-5)
    for splits in (1, 4):  # one split, and several with ranges cut from each row's own n_slots
        got = decode_attention(*_to(DEVICE, q, k, v, q_pos, k_pos, n), num_splits=splits, block_n=16)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-5, atol=1e-5)


def brute_force_weights(q, k_pos, k, q_pos, n_slots):
    """float64 softmax weights ``[B, H, T, S]`` over the visible keys, one (row, head, query) at a time."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    out = torch.zeros(B, H, T, S, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                keys = [s for s in range(int(n_slots[b])) if 0 <= int(k_pos[b, min(h // G, k_pos.shape[1] - 1), s])
                        <= int(q_pos[b, t])]
                if keys:
                    scores = k[b, h // G, keys].double() @ q[b, h, t].double() / math.sqrt(D)
                    out[b, h, t, keys] = torch.softmax(scores, 0)
    return out


@pytest.mark.parametrize("G, T, n_slots", [(1, 1, None), (2, 1, [37, 20, 45]), (4, 3, [37, 0, 45])])
def test_weights_match_brute_force(G, T, n_slots):
    """The softmax weights TOVA evicts by: every slot (empty, past ``n_slots``, or an all-hidden row) is
    written -- 0 where a query cannot see the key -- and the output is unchanged by asking for them."""
    B, Hkv, S, D = 3, 2, 45, 16
    q, k, v, q_pos, k_pos, n = make_case(B, Hkv, G, T, S, D, n_slots or [S] * B, per_head=(G == 2))
    expected = brute_force_weights(q, k_pos, k, q_pos, n)
    args = _to(DEVICE, q, k, v, q_pos, k_pos, None if n_slots is None else n)
    o_ref, w_ref = decode_attention_reference(*[a.cpu() if a is not None else None for a in args], return_weights=True)
    torch.testing.assert_close(w_ref.double(), expected, rtol=1e-5, atol=1e-6)
    for splits in (1, 4):
        o, w = decode_attention(*args, num_splits=splits, block_n=16, return_weights=True)
        assert w.shape == (B, Hkv * G, T, S) and w.dtype == torch.float32 and torch.isfinite(w).all()
        torch.testing.assert_close(w.cpu().double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(o, decode_attention(*args, num_splits=splits, block_n=16), rtol=0, atol=0)
        torch.testing.assert_close(o.cpu(), o_ref, rtol=1e-5, atol=1e-5)
        # The same rows before their normalisation (for a consumer that normalises as it reads them).
        o2, logits, lse = decode_attention(*args, num_splits=splits, block_n=16, return_logits=True)
        assert logits.shape == (B, Hkv * G, T, S) and lse.shape == (B, Hkv * G, T)
        torch.testing.assert_close(o2, o, rtol=0, atol=0)
        torch.testing.assert_close(torch.exp2(logits - lse[..., None]).cpu().double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="the weights or their logits, not both"):
        decode_attention(*args, return_weights=True, return_logits=True)


def test_attention_over_cache_weights_of_a_query_that_sees_nothing_are_zero():
    """The PyTorch path (CPU here) gives the kernel's weights: 0, not NaN, for a query with no visible key;
    the other rows are the brute-force softmax."""
    B, Hkv, G, T, S, D = 2, 2, 2, 2, 12, 16
    q, k, v, q_pos, k_pos, n = make_case(B, Hkv, G, T, S, D, [S, S], per_head=True)
    k_pos[1] = torch.where(k_pos[1] >= 0, k_pos[1] + 100, -1)  # row 1: every key after both queries
    _, w = attention_over_cache(q, k, v, q_pos, k_pos, return_weights=True)
    assert torch.isfinite(w).all() and (w[1] == 0).all()
    torch.testing.assert_close(w.double(), brute_force_weights(q, k_pos, k, q_pos, n), rtol=1e-5, atol=1e-6)


def test_empty_rows_give_zero():
    """A row whose slots are all empty, a row with n_slots = 0, and queries before every key."""
    B, Hkv, G, T, S, D = 3, 1, 2, 2, 20, 16
    q, k, v, q_pos, k_pos, n = make_case(B, Hkv, G, T, S, D, [20, 0, 12])
    k_pos[0] = -1  # row 0: every slot empty
    k_pos[2, :, :3] = 5  # row 2: first visible key at position 5 ...
    k_pos[2, :, 3:12] = 6
    q_pos[2] = torch.tensor([4, 6])  # ... so its first query sees nothing, its second sees all
    got = decode_attention(*_to(DEVICE, q, k, v, q_pos, k_pos, n), num_splits=3, block_n=16).cpu()
    assert torch.isfinite(got).all()
    assert (got[:2] == 0).all() and (got[2, :, 0] == 0).all()
    torch.testing.assert_close(got.double(), brute_force(q, k, v, q_pos, k_pos, n), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decode_attention_reference(q, k, v, q_pos, k_pos, n), got, rtol=1e-5, atol=1e-5)


def test_position_layouts_and_defaults():
    """k_pos ``[S]`` / ``[B, S]`` / None, q_pos ``[T]``, one-element and int64 n_slots, default split count."""
    B, Hkv, G, T, S, D = 2, 2, 2, 1, 150, 32
    q, k, v, _, _, _ = make_case(B, Hkv, G, T, S, D, [S, S])
    k_pos_1d = torch.arange(S)
    k_pos_1d[40:50] = -1
    q_pos_1d = torch.tensor([120])
    n = torch.tensor([130])  # int64, one element: shared by the rows
    expected = brute_force(q, k, v, q_pos_1d.expand(B, T), k_pos_1d.expand(B, Hkv, S), n.expand(B))
    assert num_splits_for(S, B * Hkv, 132, 16) == min(4 * 132 // (B * Hkv), 10)  # 10 blocks of 16 keys
    for kp in (k_pos_1d, k_pos_1d.expand(B, S)):
        got = decode_attention(*_to(DEVICE, q, k, v, q_pos_1d, kp, n), block_n=16)  # default splits: 10
        torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-5, atol=1e-5)
    # No positions: the first n_slots keys are all visible.
    expected = brute_force(q, k, v, None, None, torch.tensor([100, 7]))
    got = decode_attention(*_to(DEVICE, q, k, v, None, None, torch.tensor([100, 7], dtype=torch.int32)), block_n=16)
    torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-5, atol=1e-5)
    # Neither positions nor n_slots: plain attention over all S keys (default block size: 3 splits of 64).
    expected = brute_force(q, k, v, None, None, torch.tensor([S, S]))
    torch.testing.assert_close(decode_attention(*_to(DEVICE, q, k, v, None, None)).cpu().double(), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
            not HAS_CUDA, reason="Triton's interpreter misreads bf16 tl.dot operands (triton 3.9)")),
    ],
)
def test_16bit_output_dtype_and_accuracy(dtype):
    B, Hkv, G, T, S, D = 2, 2, 1, 1, 64, 32
    q, k, v, q_pos, k_pos, n = make_case(B, Hkv, G, T, S, D, [50, 64], dtype=dtype)
    got = decode_attention(*_to(DEVICE, q, k, v, q_pos, k_pos, n), num_splits=2, block_n=16)
    assert got.dtype == dtype
    ref = decode_attention_reference(q.float(), k.float(), v.float(), q_pos, k_pos, n)
    torch.testing.assert_close(got.cpu().float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("D, T, dtype", [(48, 1, torch.float32), (512, 1, torch.float32), (8, 1, torch.float32),
                                         (32, 17, torch.float32), (32, 1, torch.float64)])
def test_rejects_unsupported_shapes(D, T, dtype):
    q = torch.zeros(1, 2, T, D, dtype=dtype)
    k = torch.zeros(1, 2, 8, D, dtype=dtype)
    with pytest.raises(ValueError):
        decode_attention(q, k, k, None, None)


def test_attention_over_cache_n_slots_on_the_sdpa_path():
    """Off CUDA (or when the kernel does not apply) ``n_slots`` masks the slots beyond it, as the kernel does."""
    B, Hkv, G, T, S, D = 2, 2, 2, 1, 30, 16
    q, k, v, q_pos, k_pos, n = make_case(B, Hkv, G, T, S, D, [30, 30])
    k_pos[:, :, 20:] = 0  # visible, yet beyond n_slots below
    n = torch.tensor([20, 12])
    masked = k_pos.clone()
    for b in range(B):
        masked[b, :, n[b] :] = -1
    expected = brute_force(q, k, v, q_pos, masked, torch.tensor([S, S]))
    o, _ = attention_over_cache(q, k, v, q_pos, k_pos, n_slots=n, return_weights=True)  # always the SDPA path
    torch.testing.assert_close(o.double(), expected, rtol=1e-5, atol=1e-5)
    o, _ = attention_over_cache(q, k, v, q_pos, None, n_slots=n, return_weights=True)
    torch.testing.assert_close(o.double(), brute_force(q, k, v, None, None, n), rtol=1e-5, atol=1e-5)


# -- GPU: the decode benchmark's shapes, dispatch, CUDA graphs ------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("G", [1, 4])
def test_gpu_realistic_bf16(B, G):
    """12 query heads, D = 64, a 20000-slot static buffer filled to 4097 slots (the rest poisoned)."""
    H, D, S, filled = 12, 64, 20000, 4097
    Hkv = H // G
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, 1, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, S, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, S, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    k[:, :, filled:] = float("nan")
    v[:, :, filled:] = float("nan")
    k_pos = torch.arange(S, device="cuda").repeat(B, 1, 1)
    k_pos[:, :, filled:] = 0
    q_pos = torch.full((B, 1), filled - 1, device="cuda")
    n = torch.full((B,), filled, dtype=torch.int32, device="cuda")
    ref = decode_attention_reference(q.float(), k.float(), v.float(), q_pos, k_pos, n)
    got = decode_attention(q, k, v, q_pos, k_pos, n)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)
    # Through the dispatch of attention_over_cache (CUDA, T = 1, no weights, no window).
    o, w = attention_over_cache(q, k, v, q_pos, k_pos, n_slots=n)
    assert w is None
    torch.testing.assert_close(o, got, rtol=0, atol=0)
    # With the weights (TOVA's eviction scores): the same output, weights against the fp32 reference.
    _, w_ref = decode_attention_reference(q.float(), k.float(), v.float(), q_pos, k_pos, n, return_weights=True)
    o, w = attention_over_cache(q, k, v, q_pos, k_pos, n_slots=n, return_weights=True)
    torch.testing.assert_close(o, got, rtol=0, atol=0)
    assert w.shape == (B, H, 1, S) and (w[..., filled:] == 0).all()
    torch.testing.assert_close(w, w_ref, rtol=2e-2, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_cuda_graph_replays_as_the_cache_fills():
    """Capture once at a short fill, then grow ``n_slots`` in place and replay: the same launch follows."""
    B, H, D, S = 2, 12, 64, 20000
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(B, H, 1, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(B, H, S, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(B, H, S, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    k_pos = torch.arange(S, device="cuda").repeat(B, 1, 1)
    q_pos = torch.zeros(B, 1, dtype=torch.long, device="cuda")
    n = torch.zeros(B, dtype=torch.int32, device="cuda")

    def set_fill(lengths):
        n.copy_(torch.tensor(lengths, dtype=torch.int32))
        q_pos.copy_(n.long()[:, None] - 1)

    set_fill([10, 3])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode_attention(q, k, v, q_pos, k_pos, n)  # warm-up: compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, q_pos, k_pos, n)
    for lengths in ([10, 3], [4097, 200], [20000, 1], [777, 19999]):
        set_fill(lengths)
        graph.replay()
        ref = decode_attention_reference(q.float(), k.float(), v.float(), q_pos, k_pos, n)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2, msg=lambda m, x=lengths: f"{x}: {m}")

"""``torch.autograd.Function`` around the chunk kernels, and the entry points the dispatcher calls."""

from __future__ import annotations

import torch
from torch import Tensor

from ...hardware import device_of
from .chunk_bwd import chunk_backward
from .chunk_fwd import chunk_output, chunk_states, intra_attention, plan_state_passes, prepare_chunks
from .common import CHUNK, MAX_CHUNKS, MAX_HEAD_DIM, KernelDtypes, SeqInfo, kernel_dtypes, seq_info
from .recurrent import fused_recurrent

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ChunkGLAFunction(torch.autograd.Function):
    """Packed inputs ``q, k, g`` ``[TT, H, K]``, ``v`` ``[TT, H, V]``, ``h0`` ``[N, H, K, V]`` or None.

    Saves the inputs and the intra-chunk attention ``A`` (``[TT, H, 64]`` fp32: the bytes of one
    bf16 input with K = 128), so the backward does not redo the forward's most exp-heavy kernel;
    it recomputes the decayed q and k and the chunk states (``h`` would cost far more to keep). An fp32 ``g``
    is kept as its chunk cumsums instead, sparing the backward their recompute (the backward reads clamped gates
    off the cumsums' steps, :func:`.chunk_bwd.qkg_tile`). That costs no memory where ``g`` is an
    intermediate nothing else keeps (the GLA layer's gate), and one more ``g``-sized fp32 buffer where ``g`` stays
    alive anyway (a leaf, or saved by another op); a bf16 ``g`` is kept as itself (its cumsums would double it).
    """

    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale: float, info: SeqInfo, output_final_state: bool):
        kd = kernel_dtypes_for(q, k, v)
        plan = plan_state_passes(k.shape[-1], v.shape[-1], k.shape[1], info, kd, q.device)
        p = prepare_chunks(q, k, g, info, kd, plan, want_qd=False)
        h, ht = chunk_states(p, k, v, h0, info, kd, plan, output_final_state)
        a = intra_attention(q, k, p.b, scale, info, kd)
        o = chunk_output(q, v, p.b, h, a, scale, info, kd)
        ctx.g_as_cumsum = g.dtype == torch.float32
        ctx.save_for_backward(q, k, v, p.b if ctx.g_as_cumsum else g, h0, a)
        ctx.scale, ctx.info, ctx.kd, ctx.plan = scale, info, kd, plan
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, a = ctx.saved_tensors
        info, kd, scale, plan = ctx.info, ctx.kd, ctx.scale, ctx.plan
        b, g = (g, None) if ctx.g_as_cumsum else (None, g)
        p = prepare_chunks(q, k, g, info, kd, plan, want_qd=True, b=b)
        h, _ = chunk_states(p, k, v, h0, info, kd, plan, want_final=False)
        dht = dht.contiguous() if dht is not None else None
        dq, dk, dv, dg, dh0 = chunk_backward(
            q,
            k,
            v,
            g,
            p,
            h,
            a,
            do.contiguous(),
            dht,
            scale,
            info,
            kd,
            plan,
            need_dh0=h0 is not None and ctx.needs_input_grad[4],
        )
        return dq, dk, dv, dg, dh0.to(h0.dtype) if dh0 is not None else None, None, None, None


def kernel_dtypes_for(q: Tensor, k: Tensor, v: Tensor) -> KernelDtypes:
    """The kernels' compute dtypes for these inputs: the bf16 path only when q, k and v are all bf16,
    IEEE fp32 only when all are fp32, TF32 on fp32 operands otherwise (see :func:`kernel_dtypes`)."""
    dtypes = {q.dtype, k.dtype, v.dtype}
    return kernel_dtypes(dtypes.pop() if len(dtypes) == 1 else torch.float16)


def check_supported(q: Tensor, v: Tensor) -> None:
    """Raise ValueError for inputs the Triton kernels do not handle."""
    K, V = q.shape[-1], v.shape[-1]
    if max(K, V) > MAX_HEAD_DIM:
        raise ValueError(f"the triton GLA backend supports head dims up to {MAX_HEAD_DIM}; got K={K}, V={V}")


def chunk_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunkwise GLA in Triton, differentiable in q, k, v, g and initial_state.

    Args:
        q, k, g: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (fp32, bf16 or fp16; g is best fp32).
        initial_state: ``[N, H, K, V]`` (``N = B``, or the number of packed sequences), or None.
        cu_seqlens: ``[N + 1]`` int offsets of packed sequences (then ``B == 1``), or None.
    Returns:
        ``o`` ``[B, T, H, V]`` in v's dtype and the final state ``[N, H, K, V]`` fp32 (or None).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    info = seq_info(B, T, cu_seqlens, q.device)
    if info.num_chunks > MAX_CHUNKS:
        raise ValueError(
            f"the triton GLA backend handles at most {MAX_CHUNKS} chunks of {CHUNK} tokens per call; got "
            f"{info.num_chunks} (B={B}, T={T}): split the batch into several calls"
        )
    flat = [x.reshape(B * T, H, x.shape[-1]).contiguous() for x in (q, k, v, g)]
    h0 = initial_state.contiguous() if initial_state is not None else None
    with device_of(q):
        o, ht = ChunkGLAFunction.apply(*flat, h0, scale, info, output_final_state)
    return o.view(B, T, H, V), ht


def recurrent_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    out_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused recurrent GLA for decoding (no autograd). Layouts as :func:`chunk_gla`; the final state
    ``[N, H, K, V]`` fp32 is always returned, written into ``out_state`` when given (may be
    ``initial_state`` itself, for an in-place update)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if cu_seqlens is None:
        cu = _dense_offsets(B, T, q.device)
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    flat = [x.reshape(B * T, H, x.shape[-1]).contiguous() for x in (q, k, v, g)]
    h0 = initial_state.contiguous() if initial_state is not None else None
    with device_of(q):
        o, ht = fused_recurrent(*flat, scale, cu, h0, out_state)
    return o.view(B, T, H, V), ht


def recurrent_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, state: Tensor) -> Tensor:
    """One token per row, the state updated in place: q, k, g ``[B, H, K]``, v ``[B, H, V]``, state ``[B, H, K, V]``
    fp32, contiguous. Returns ``o`` ``[B, H, V]`` in v's dtype. No autograd and no checks (the caller's).

    ``[B, H, K]`` rows are already the packed layout of B one-token sequences, so unlike :func:`recurrent_gla`
    this adds no view or copy around the launch: per-call host time is what a decode loop of small batches
    waits on.
    """
    cu = _dense_offsets(q.shape[0], 1, q.device)
    with device_of(q):
        o, _ = fused_recurrent(q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), scale, cu, state, state)
    return o


_OFFSETS: dict[tuple[int, int, torch.device], Tensor] = {}


def _dense_offsets(B: int, T: int, device: torch.device) -> Tensor:
    """``[B + 1]`` int32 offsets of B rows of T tokens, kept per shape for the life of the process: a decode
    step then launches no kernel to make them, and a CUDA graph captured with one can replay forever (never
    freed; a few bytes per batch size and T <= 16). Never kept when made during capture: the graph's pool
    owns that memory."""
    key = (B, T, device)
    cu = _OFFSETS.get(key)
    if cu is None:
        cu = torch.arange(B + 1, device=device, dtype=torch.int32) * T
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _OFFSETS[key] = cu
    return cu

"""``torch.autograd.Function`` around the chunk kernels, and the entry points the dispatcher calls."""

from __future__ import annotations

import torch
from torch import Tensor

from .chunk_bwd import chunk_backward
from .chunk_fwd import chunk_output, chunk_states, intra_attention
from .common import MAX_HEAD_DIM, SeqInfo, dot_precision, seq_info
from .recurrent import fused_recurrent

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ChunkGLAFunction(torch.autograd.Function):
    """Packed inputs ``q, k, g`` ``[TT, H, K]``, ``v`` ``[TT, H, V]``, ``h0`` ``[N, H, K, V]`` or None.

    Saves only the inputs; the backward recomputes the chunk states and the intra-chunk attention.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale: float, info: SeqInfo, output_final_state: bool):
        prec = dot_precision(q.dtype, k.dtype, v.dtype)
        h = chunk_states(k, v, g, h0, info, prec)
        a = intra_attention(q, k, g, scale, info, prec)
        o = chunk_output(q, v, g, h, a, scale, info, prec)
        ht = None
        if output_final_state:
            # Each sequence's final state sits right after its chunk-start states in h.
            ht = h[(info.chunk_offsets[1:] + torch.arange(info.num_seqs, device=h.device)).long()]
        ctx.save_for_backward(q, k, v, g, h0)
        ctx.scale, ctx.info, ctx.prec = scale, info, prec
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0 = ctx.saved_tensors
        info, prec, scale = ctx.info, ctx.prec, ctx.scale
        h = chunk_states(k, v, g, h0, info, prec)
        a = intra_attention(q, k, g, scale, info, prec)
        dht = dht.contiguous() if dht is not None else None
        dq, dk, dv, dg, dh0 = chunk_backward(
            q,
            k,
            v,
            g,
            h,
            a,
            do.contiguous(),
            dht,
            scale,
            info,
            prec,
            need_dh0=h0 is not None and ctx.needs_input_grad[4],
        )
        return (
            dq.to(q.dtype),
            dk.to(k.dtype),
            dv,
            dg,
            dh0.to(h0.dtype) if dh0 is not None else None,
            None,
            None,
            None,
        )


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
    flat = [x.reshape(B * T, H, x.shape[-1]).contiguous() for x in (q, k, v, g)]
    h0 = initial_state.contiguous() if initial_state is not None else None
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
        cu = torch.arange(B + 1, device=q.device, dtype=torch.int32) * T
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    flat = [x.reshape(B * T, H, x.shape[-1]).contiguous() for x in (q, k, v, g)]
    h0 = initial_state.contiguous() if initial_state is not None else None
    o, ht = fused_recurrent(*flat, scale, cu, h0, out_state)
    return o.view(B, T, H, V), ht

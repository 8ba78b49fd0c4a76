"""Shared pieces of the Triton GLA kernels: chunk bookkeeping for (packed) sequences and tile sizes.

Every kernel sees the batch as *packed sequences*: ``q`` ``[B, T, H, K]`` is viewed as
``[B * T, H, K]`` (the same memory) and sequence ``s`` owns tokens ``cu_seqlens[s]:cu_seqlens[s+1]``.
Fixed-length batches are the special case ``cu_seqlens = [0, T, 2T, ..., B*T]``, so one code path
serves both, and chunks never straddle two sequences.

Chunk bookkeeping (all int32, on the inputs' device):

* ``chunk_offsets`` ``[N + 1]``: ``chunk_offsets[s]`` = number of chunks in sequences ``< s``.
* ``chunk_indices`` ``[NT, 2]``: for global chunk ``n``, ``(s, c)`` = its sequence and its index there.
* The chunk-boundary states live in one fp32 buffer ``h`` of ``[NT + N, H, K, V]``: sequence ``s``
  owns the ``nchunks[s] + 1`` consecutive slots starting at ``chunk_offsets[s] + s`` (the state
  before each of its chunks, then its final state). So chunk ``n`` of sequence ``s`` starts from
  ``h[n + s]`` and ends in ``h[n + s + 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CHUNK = 64  # tokens per chunk (C in the paper); fixed: the kernels' sub-chunk layout assumes 4 x 16
SUB_CHUNK = 16  # tokens per sub-chunk (c); 16 is also the smallest tl.dot tile
MAX_HEAD_DIM = 512  # K and V are tiled in blocks of MAX_BLOCK, so this bounds only registers per tile loop
# -inf gates (a full reset) are clamped to this floor inside the kernels: every decay spanning such a
# gate is then exp(<= -100), which is 0 or a denormal in fp32, exactly as exp(-inf) = 0 would be, but
# cumulative sums stay finite, so differences of them never form -inf - -inf = NaN. The gradient of
# the clamp is 0 below the floor, matching d/dg exp(g) x = exp(g) x ~ 0 there.
G_FLOOR = -100.0
# Upper bound on BLOCK_K / BLOCK_V. Head dims above it are tiled and looped over. Tests lower it to
# exercise the tile loops at small head dims.
MAX_BLOCK = 64


@dataclass(frozen=True)
class SeqInfo:
    """Sequence/chunk bookkeeping of a (packed) batch; see the module docstring."""

    cu_seqlens: Tensor  # [N + 1] int32
    chunk_offsets: Tensor  # [N + 1] int32
    chunk_indices: Tensor  # [NT, 2] int32
    num_seqs: int
    num_chunks: int


def seq_info(batch: int, seqlen: int, cu_seqlens: Tensor | None, device: torch.device) -> SeqInfo:
    """Build :class:`SeqInfo` for ``[batch, seqlen]`` inputs, or for packed ``cu_seqlens`` (batch 1).

    Fixed-length batches need no host sync; packed ones read the chunk count back once.
    """
    if cu_seqlens is None:
        per_seq = -(-seqlen // CHUNK)
        cu = torch.arange(batch + 1, device=device, dtype=torch.int32) * seqlen
        offsets = torch.arange(batch + 1, device=device, dtype=torch.int32) * per_seq
        seq = torch.arange(batch, device=device, dtype=torch.int32).repeat_interleave(per_seq)
        idx = torch.arange(per_seq, device=device, dtype=torch.int32).repeat(batch)
        return SeqInfo(cu, offsets, torch.stack([seq, idx], 1).contiguous(), batch, batch * per_seq)
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    lengths = cu[1:] - cu[:-1]
    nchunks = (lengths + CHUNK - 1) // CHUNK
    offsets = torch.cat([nchunks.new_zeros(1), nchunks.cumsum(0)]).to(torch.int32)
    total = int(offsets[-1])
    n = cu.numel() - 1
    seq = torch.repeat_interleave(
        torch.arange(n, device=device, dtype=torch.int32), nchunks, output_size=total
    )
    idx = torch.arange(total, device=device, dtype=torch.int32) - offsets[seq.long()]
    return SeqInfo(cu, offsets, torch.stack([seq, idx], 1).contiguous(), n, total)


def block_size(dim: int) -> int:
    """Tile width for a head dim: the next power of two, at least 16 (tl.dot's minimum), at most MAX_BLOCK."""
    return max(16, min(MAX_BLOCK, triton_next_power_of_2(dim)))


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def num_warps_for(*blocks: int) -> int:
    """8 warps once the main fp32 tile reaches 64 x 64, else 4.

    The chunk kernels hold several such tiles at once; at 4 warps (32 registers a thread per tile)
    ptxas spills them (checked with cuobjdump on sm_90 builds), at 8 it mostly does not.
    """
    return 8 if max(blocks) * min(blocks) >= 64 * 64 else 4


def dot_precision(*dtypes: torch.dtype) -> str:
    """tl.dot precision: operands are fp32 throughout; TF32 tensor cores when any input is 16-bit,
    exact IEEE fp32 products when all are fp32 (TF32's 10-bit mantissa would cost fp32 users digits)."""
    return "ieee" if all(d == torch.float32 for d in dtypes) else "tf32"

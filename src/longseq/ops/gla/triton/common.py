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

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from ...hardware import cuda_sm_count

CHUNK = 64  # tokens per chunk (C in the paper); fixed: the kernels' sub-chunk layout assumes 4 x 16
SUB_CHUNK = 16  # tokens per sub-chunk (c); 16 is also the smallest tl.dot tile
# Chunk kernels put the chunk index on grid axis 1, which CUDA caps at 65535: at most 65535 * 64 ~ 4.2M
# tokens per call (B * T, or the packed length); larger calls are rejected up front with that reason.
MAX_CHUNKS = 65535
MAX_HEAD_DIM = 512  # K and V are tiled (see the tile constants below), so this bounds only registers per tile loop
# -inf gates (a full reset) are clamped to this floor inside the kernels: every decay spanning such a
# gate is then exp(<= -100), which is 0 or a denormal in fp32, exactly as exp(-inf) = 0 would be, but
# cumulative sums stay finite, so differences of them never form -inf - -inf = NaN. The gradient of
# the clamp is 0 below the floor, matching d/dg exp(g) x = exp(g) x ~ 0 there.
G_FLOOR = -100.0
# The intra-chunk kernels factor exp(b_i - b_j) = exp(b_i) * exp(-b_j) about the chunk start when every
# in-chunk gate cumsum b of the tile is >= -MAX_DECAY: then exp(-b) <= e^40 ~ 2e17 cannot overflow and
# exp(b) >= e^-40 cannot underflow (fp32 and bf16 share an 8-bit exponent), so each term is a product of
# two correctly rounded factors and the whole block is one matrix product. Stronger decay takes the
# sub-chunk path. Tests set it to -1 (never) and +inf-like values to exercise both paths.
MAX_DECAY = 40.0
# Cap on every tile (BLOCK_K / BLOCK_V) of the chunk kernels; head dims above a kernel's tile are looped over.
# Tests lower it to exercise the tile loops at small head dims.
MAX_BLOCK = 128
# Launch shape of each chunk kernel: the widest K and V tiles it takes (a head dim gets its next power of two,
# up to this and MAX_BLOCK), its warps and its software-pipeline stages. Module attributes read at launch, so
# `benchmarks/ab_gla_triton.py` times other settings side by side (rules and evidence: docs/tuning.md).
PREPARE_BK = 64
PREPARE_WARPS = 4
STATE_BK = 64  # both sequential state passes (forward states, backward state gradients)
# 128-wide V tiles in the state passes and in dv: fewer programs re-read the key side (and, in dv, A): 4% faster
# fwd+bwd at T <= 2K on both benchmark shapes, less at longer T (H100, RESULTS "session 24"). The state passes
# still narrow the tile when few programs would leave SMs idle (chunk_fwd.state_block_sizes).
STATE_BV = 128
STATE_WARPS = 4
STATE_STAGES = 2
INTRA_BK = 64
# On the bf16 path a K of at most this many columns takes one whole-K tile in the intra-chunk kernel: at K = 128 the
# forward was 5-6% faster than with two 64-wide tiles (fwd+bwd 1.2-1.8%), while at K = 256 two 128-wide tiles were
# 6-7% slower forward than four 64-wide ones (H100, RESULTS "session 26"). fp32 products keep INTRA_BK (untimed).
INTRA_WHOLE_K_MAX = 128
INTRA_WARPS = 8  # from 64-wide K tiles; narrower ones take 4
OUTPUT_BK = 64
# A 128-wide output V tile reads q, its gate factors and the chunk's A (and computes exp(b)) fewer times per
# chunk: 8% faster forward at V = 512 than 64 (H200).
OUTPUT_BV = 128
OUTPUT_WARPS = 4
OUTPUT_STAGES = 2
VALUE_GRAD_BK = 64
VALUE_GRAD_BV = 128
VALUE_GRAD_WARPS = 4
VALUE_GRAD_STAGES = 2
QKG_BK = 64
QKG_BV = 64
QKG_WARPS = 8
QKG_STAGES = 1
# The intra-chunk and dq/dk/dg kernels take the single-product path for tiles of bounded decay and queue the others
# for a second kernel with the sub-chunk split, which walks the queue with this many programs per SM.
STRONG_PROGRAMS_PER_SM = 4
# fp32 products (fp16 and fp32 inputs) hold twice the registers per operand element, and the 128-wide V tiles
# of the state passes and dv were timed on the bf16 path only: fp32 products keep 64.
FP32_PRODUCTS_MAX_BV = 64
# The sequential state passes walk each sequence's chunks one after another, one program per (K tile, V tile,
# sequence, head). When few long sequences leave the card idle, each sequence is cut into segments: a first
# launch finds every segment's state contribution from a zero start, a second one walks each segment again
# from its carried-in state (the earlier segments' contributions, decayed), storing the chunk states. Twice
# the work, in parallel. A/B on an H100 at B*T = 32K (RESULTS.md, session 23): at T = 32K (128 or 256 programs
# of 512 chunks) 16 programs per SM beat 8 and 4 (fwd+bwd 2-6% faster); at T = 8K (256 or 512 programs of 128
# chunks) a cut into 4 was 6-13% slower, and at 16K not cutting was 3% faster at H4 K256 V512 and 1% slower
# at H16 K=V=128. So: cut only below SEGMENT_BELOW_PROGRAMS_PER_SM programs per SM and from
# SEGMENT_FROM_CHUNKS chunks (T = 32K), aiming at SEGMENT_PROGRAMS_PER_SM programs per SM, segments of at
# least MIN_SEGMENT_CHUNKS chunks. Tests force tiny segments through these constants.
SEGMENT_BELOW_PROGRAMS_PER_SM = 2
SEGMENT_FROM_CHUNKS = 512
SEGMENT_PROGRAMS_PER_SM = 16
MIN_SEGMENT_CHUNKS = 32
MIN_SEGMENTS = 3  # fewer segments than this would not repay the doubled work
# The state passes read decayed operands stored once (instead of forming them per V tile) from this many V
# tiles, or when cut into segments; see chunk_fwd.plan_state_passes. H100, B*T = 32K, H16 K=V=128 with 64-wide
# V tiles (2 tiles): from 2 tiles fwd+bwd took 4.33 ms at T = 4K against 4.53 from 4 tiles, and no more at any
# other T from 1K to 32K (RESULTS.md, session 23); with STATE_BV = 128 that shape has one V tile. Tests set 1
# (always) or a large value (never).
PREPARED_FROM_V_TILES = 2
# Storage of the chunk states h and their gradients dh on the bf16 path (see KernelDtypes); the
# benchmark's variant runs flip them.
STATES_IN_BF16 = True
DSTATES_IN_BF16 = True


@dataclass(frozen=True)
class SeqInfo:
    """Sequence/chunk bookkeeping of a (packed) batch; see the module docstring."""

    cu_seqlens: Tensor  # [N + 1] int32
    chunk_offsets: Tensor  # [N + 1] int32
    chunk_indices: Tensor  # [NT, 2] int32
    num_seqs: int
    num_chunks: int
    max_seq_chunks: int  # chunks of the longest sequence


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
        return SeqInfo(cu, offsets, torch.stack([seq, idx], 1).contiguous(), batch, batch * per_seq, per_seq)
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    lengths = cu[1:] - cu[:-1]
    nchunks = (lengths + CHUNK - 1) // CHUNK
    offsets = torch.cat([nchunks.new_zeros(1), nchunks.cumsum(0)]).to(torch.int32)
    n = cu.numel() - 1
    total, longest = torch.stack([offsets[-1], nchunks.max() if n else offsets[-1]]).tolist()  # one host sync
    seq = torch.repeat_interleave(
        torch.arange(n, device=device, dtype=torch.int32), nchunks, output_size=total
    )
    idx = torch.arange(total, device=device, dtype=torch.int32) - offsets[seq.long()]
    return SeqInfo(cu, offsets, torch.stack([seq, idx], 1).contiguous(), n, total, longest)


def state_segments(max_seq_chunks: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(segments per sequence, chunks per segment) for a sequential state pass of ``programs`` programs
    over sequences of at most ``max_seq_chunks`` chunks; ``(1, max_seq_chunks)`` when the programs already
    fill the card or the sequences are too short to cut (see ``SEGMENT_PROGRAMS_PER_SM``)."""
    sms = cuda_sm_count(device) or 1  # off CUDA: the interpreter, one program at a time
    if programs >= SEGMENT_BELOW_PROGRAMS_PER_SM * sms or max_seq_chunks < SEGMENT_FROM_CHUNKS:
        return 1, max(max_seq_chunks, 1)
    segments = min(SEGMENT_PROGRAMS_PER_SM * sms // max(programs, 1), max_seq_chunks // max(MIN_SEGMENT_CHUNKS, 1))
    if segments < MIN_SEGMENTS:
        return 1, max(max_seq_chunks, 1)
    per_segment = -(-max_seq_chunks // segments)
    return -(-max_seq_chunks // per_segment), per_segment


def block_size(dim: int, cap: int) -> int:
    """Tile width for a head dim: the next power of two, at least 16 (tl.dot's minimum), at most ``cap`` (a
    kernel's tile constant above) and MAX_BLOCK."""
    return max(16, min(cap, MAX_BLOCK, triton_next_power_of_2(dim)))


def v_block_size(V: int, cap: int, kd: KernelDtypes) -> int:
    """:func:`block_size` of a V tile whose width was chosen for bf16 products: at most
    ``FP32_PRODUCTS_MAX_BV`` when the products take fp32 operands."""
    return block_size(V, cap if kd.dot_torch == torch.bfloat16 else min(cap, FP32_PRODUCTS_MAX_BV))


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class KernelDtypes:
    """How the kernels compute for one input dtype.

    * ``dot``: operand dtype of every ``tl.dot`` (exp-scaled tiles are cast to it just before the
      product; accumulation is always fp32);
    * ``prec``: ``tl.dot`` input precision for fp32 operands;
    * ``states`` / ``dstates``: storage dtype of the chunk states ``h`` and of their gradients ``dh``.

    Every product casts ``h`` and ``dh`` to ``dot`` anyway, so on the bf16 path storing both in bf16
    changes only ``dg``'s state term ``sum_v H dH`` (summed in fp32 from the stored values) and halves
    the kernels' largest memory traffic: 1.2x faster forward+backward at H=4, K=256, V=512 on an H200.
    Measured there against the fp32 ``chunk`` backend, every error was unchanged to the third digit
    (dg 2.60e-3 with fp32 states, 2.61e-3 with bf16 ones): ``dg`` no longer forms the cancelling
    reverse cumsum, which is what made it sensitive to state rounding. fp16 and fp32 inputs keep
    fp32 states (fp16's range is too small for long, slowly decaying sequences).
    """

    dot: object  # a triton.language dtype
    prec: str
    states: torch.dtype = torch.float32
    dstates: torch.dtype = torch.float32

    @property
    def dot_torch(self) -> torch.dtype:
        """``dot`` as a torch dtype: the storage of operands stored ready for a product (bf16 or fp32)."""
        import triton.language as tl

        return torch.bfloat16 if self.dot == tl.bfloat16 else torch.float32


def kernel_dtypes(dtype: torch.dtype) -> KernelDtypes:
    """The compute dtypes for one input dtype.

    bf16 inputs: bf16 tensor-core products with fp32 accumulation (the GPU tests hold them to fla's
    4e-3 / 5e-3 relative RMS). fp16 inputs: fp32 operands on TF32, since the states (and the
    ``exp(-b)``-scaled keys) of long, slowly decaying sequences can exceed fp16's range. fp32 inputs:
    exact IEEE fp32 products (TF32's 10-bit mantissa would cost fp32 users digits).

    Under ``TRITON_INTERPRET=1`` bf16 runs like fp16: the interpreter's ``tl.dot`` mishandles bf16
    operands, so CPU tests exercise the fp32-operand path and the GPU tests the bf16 one.
    """
    import triton.language as tl

    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if dtype == torch.bfloat16 and not interpreted:
        return KernelDtypes(
            tl.bfloat16,
            "tf32",
            torch.bfloat16 if STATES_IN_BF16 else torch.float32,
            torch.bfloat16 if DSTATES_IN_BF16 else torch.float32,
        )
    if dtype == torch.float32:
        return KernelDtypes(tl.float32, "ieee")
    return KernelDtypes(tl.float32, "tf32")

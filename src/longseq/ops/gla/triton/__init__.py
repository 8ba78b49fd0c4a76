r"""Gated linear attention in Triton: chunkwise forward/backward (FlashLinearAttention) and fused decode.

Written from the GLA paper (Yang et al., 2024, Sec. 4); shares no code with ``fla``.

Recurrence, per head: ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t``, with
``q, k, g`` rows of ``[B, T, H, K]``, ``v`` of ``[B, T, H, V]``, ``S`` ``[K, V]`` fp32 (``S_0`` = the
initial state). Batches are handled as packed sequences (``cu_seqlens``; see :mod:`.common`).

Forward, chunks of ``C = 64`` tokens
------------------------------------
Inside chunk ``c`` (tokens ``i, j``; per key channel) let ``b_i = sum_{m <= i} g_m`` (inclusive
cumsum from the chunk start) and ``b_C`` the chunk total. ``prepare_kernel`` stores ``b`` and, when the
state passes below read them (several V tiles, or segments), the decayed operands ``k_j * exp(b_C - b_j)``,
``q_i * exp(b_i)`` and the decay ``exp(b_C)``. With ``H_c`` the state before the chunk:

* states (``chunk_states_kernel``, sequential over chunks, one program per (K tile, V tile, seq, head)):
  ``H_{c+1} = diag(exp(b_C)) H_c + sum_j (k_j * exp(b_C - b_j))^T v_j``. When few long sequences would
  leave the card idle, each is cut into segments: one launch finds every segment's contribution from a
  zero start and its total decay, a second walks the segments again from their carried-in states;
* intra-chunk attention (``intra_attention_kernel``): ``A_ij = scale sum_k q_ik k_jk exp(b_ik - b_jk)``
  for ``j <= i``, on sub-chunks of 16. For query sub-chunk ``I`` and key sub-chunk ``J < I`` the decay
  is split at the end ``p`` of sub-chunk ``I - 1``: ``exp(b_i - b_p) * exp(b_p - b_j)``, both factors
  ``exp(<= 0)``, each computed as a segment sum (the cumsum inside ``I``; the gates after ``j`` in
  ``J`` plus the totals of the sub-chunks between), then one ``tl.dot``. Diagonal 16 x 16 blocks are
  done pairwise in log space (``b_i - b_j`` masked to ``j <= i`` before exp);
* outputs (``output_kernel``): ``o_i = scale (q_i * exp(b_i)) H_c + sum_j A_ij v_j``.

Gates are clamped at ``G_FLOOR = -100`` in-kernel, so ``-inf`` (a reset) gives decays of exactly
``exp(<= -100) = 0`` without ``-inf - -inf``. Exponents are differences of cumsums of at most 64 gates,
so their absolute error is ~``eps * |b|`` (``|b| <= 64 * 100``): always finite, for any ``T``.

Backward
--------
``A`` is saved by the forward, and so are the gate cumsums of an fp32 ``g`` (other dtypes recompute them);
``h`` is recomputed. With ``dH_{c+1}`` the gradient
w.r.t. the state after chunk ``c`` (``dS_T``, the final state's gradient, for the last chunk; 0 if none):

* ``dH_c = diag(exp(b_C)) dH_{c+1} + scale sum_i (q_i * exp(b_i))^T do_i`` (``state_grads_kernel``,
  segmented as the forward's states, mirrored), and ``d initial_state = dH_0``: the backward state
  carried past the first chunk;
* ``dA_ij = do_i . v_j`` (``j <= i``); ``dv_j = sum_i A_ij do_i + (k_j * exp(b_C - b_j)) dH_{c+1}``;
* ``dq_i = scale exp(b_i) * (do_i H_c^T) + scale sum_{j<=i} dA_ij k_j exp(b_i - b_j)``,
  ``dk_j = exp(b_C - b_j) * (v_j dH_{c+1}^T) + scale sum_{i>=j} dA_ij q_i exp(b_i - b_j)`` (intra parts
  with the same sub-chunk split as ``A``);
* ``dg``. Write ``B_t`` for the cumsum of g from the sequence start. Then
  ``o_t = scale (q_t e^{B_t}) (S_0 + sum_{j<=t} (k_j e^{-B_j})^T v_j)`` and
  ``S_T = diag(e^{B_T}) (S_0 + sum_j (k_j e^{-B_j})^T v_j)``, so ``B_t`` enters only through
  ``q_t e^{B_t}``, ``k_t e^{-B_t}`` and (for ``t = T``) the prefactor of ``S_T``:
  ``dL/dB_t = q_t dq_t - k_t dk_t + [t = T] sum_v S_T * dS_T`` (``dq, dk`` the full gradients).
  ``g_m`` shifts every ``B_t`` with ``t >= m``, so ``dg_m = sum_{t >= m} dL/dB_t``. Each term of that sum
  is a pair (key ``j``, query ``i >= j``) counted ``+`` through ``q_i dq_i`` and ``-`` through
  ``k_j dk_j``, so only pairs with ``j < m <= i`` survive. Computed as written, the others cancel in
  floating point and their rounding errors do not (bf16 products pushed ``dg`` past 5e-3 that way), so
  the kernel sums only surviving pairs. With ``m`` in chunk ``c`` (end ``e``; ``H_c`` the state before it,
  ``dH_{c+1}`` the gradient after it), splitting ``dq, dk`` into intra- and inter-chunk parts:

  - queries ``i`` in ``[m, e]`` against keys before the chunk: ``sum_{t >= m} q_t dq_t^inter``;
  - keys ``j`` in ``[c's start, m)`` against queries after the chunk: ``sum_{t < m} k_t dk_t^inter``;
  - keys before the chunk against queries after it: ``sum_v (e^{b_C} H_c) * dH_{c+1}``;
  - pairs inside the chunk: ``sum_{t >= m} (q_t dq_t^intra - k_t dk_t^intra)``, where the bf16 path
    forms both products from the same rounded factors ``q e^{b}``, ``dA``, ``k e^{-b}``, so the pairs
    inside ``[m, e]`` cancel up to fp32 accumulation rounding, not bf16 rounding.

  All local to the chunk: no sequence-long cumsum (``qkg_grad_kernel``).
  Below the clamp floor ``dg = 0``. (An fp32 ``g``, whose cumsums the backward reads instead, gets 0 also from the
  floor up to 0.01 above it, where the exact gradient is of order ``e^-100``.)

Precision: ``tl.dot`` operands are bf16 for bf16 inputs, fp32 (TF32) for fp16 inputs and fp32 (IEEE)
for fp32 inputs, always with fp32 accumulation (:func:`.common.kernel_dtypes`). Gate cumsums, states,
``A`` and ``dA`` are fp32; outputs and gradients are stored in their inputs' dtypes. Where a chunk's
total decay is bounded (``MAX_DECAY``) the intra-chunk blocks are single products about the chunk
start; otherwise they take the sub-chunk split described above. ``A`` and ``dq/dk/dg`` each have two kernels:
one over every tile that computes the bounded ones and queues the others, and one that walks the queue with the
split (a kernel holding both paths is sized by the longer one's registers, and spilled for dq/dk/dg).
"""

from __future__ import annotations

from .autograd import SUPPORTED_DTYPES, check_supported, chunk_gla, recurrent_gla, recurrent_step

__all__ = ["SUPPORTED_DTYPES", "check_supported", "chunk_gla", "recurrent_gla", "recurrent_step"]

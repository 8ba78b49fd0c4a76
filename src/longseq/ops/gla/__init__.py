"""Gated linear attention: ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``.

Backends (pick with ``backend=``):

* ``"recurrent"`` — the token-by-token loop of :mod:`.reference`; the ground truth.
* ``"chunk"`` — the chunkwise (FlashLinearAttention) form of :mod:`.chunk`, pure PyTorch, autograd.
* ``"triton"`` — the Triton kernels of :mod:`.triton` (CUDA tensors, or any under ``TRITON_INTERPRET=1``):
  chunkwise forward/backward, and the fused recurrent kernel for ``T <= 16`` new tokens without grad.
* ``"auto"`` (default) — the best available. On CUDA: ``triton`` when Triton imports, else ``chunk``
  (saying once why). On CPU: ``recurrent`` for a handful of tokens (decoding), ``chunk`` otherwise.

Packed variable-length batches: ``cu_seqlens`` ``[N + 1]`` (B must be 1) marks ``N`` sequences in the T
dim, each with its own initial/final state ``[N, H, K, V]``. The Triton backend runs them in one launch;
the others run sequence by sequence.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .chunk import gla_chunk
from .reference import gla_recurrent
from .step import gla_decode_step

__all__ = ["gated_linear_attention", "gla_chunk", "gla_decode_step", "gla_recurrent", "BACKENDS"]

BACKENDS = ("auto", "recurrent", "chunk", "triton")
# Below this many new tokens a plain loop beats padding a chunk (64 tokens in Triton, 32 in PyTorch).
_RECURRENT_MAX_T = 16
_log = logging.getLogger("longseq.ops.gla")
_said: set[str] = set()


def _say_once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        _log.info(msg)


def _triton_import_error() -> str | None:
    """None when the Triton backend imports, else why not (cached)."""
    global _TRITON_ERROR
    if _TRITON_ERROR is _UNCHECKED:
        try:
            from . import triton as _  # noqa: F401
            _TRITON_ERROR = None
        except ImportError as e:  # triton not installed, or too old for the kernels
            _TRITON_ERROR = f"{type(e).__name__}: {e}"
    return _TRITON_ERROR


_UNCHECKED = object()
_TRITON_ERROR: object = _UNCHECKED


def _check_cu_seqlens(cu_seqlens: Tensor, batch: int, seqlen: int) -> int:
    """Validate packed-sequence offsets; return the number of sequences N."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() \
            or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [N + 1] of sequence offsets")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens needs at least 2 entries (one sequence); got {cu_seqlens.numel()}")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the sequences are packed along T, so B must be 1; got B={batch}")
    if not torch.compiler.is_compiling():
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != seqlen:
            raise ValueError(f"cu_seqlens must start at 0 and end at T={seqlen}; got {cu[0]} ... {cu[-1]}")
        if any(b < a for a, b in zip(cu[:-1], cu[1:], strict=True)):
            raise ValueError(f"cu_seqlens must be non-decreasing; got {cu}")
    return cu_seqlens.numel() - 1


def _check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    initial_state: Tensor | None,
    num_states: int | None = None,
) -> None:
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, {'V' if name == 'v' else 'K'}]; got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
    if k.shape != q.shape or g.shape != q.shape:
        raise ValueError(
            f"q, k and g must share the shape [B, T, H, K]; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"g {tuple(g.shape)}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with q's B, T, H = {tuple(q.shape[:3])}; got {tuple(v.shape)}")
    B, _, H, K = q.shape
    V = v.shape[-1]
    if initial_state is not None:
        if num_states is None and tuple(initial_state.shape) != (B, H, K, V):
            raise ValueError(
                f"initial_state must be [B, H, K, V] = {(B, H, K, V)}; got {tuple(initial_state.shape)}"
            )
        if num_states is not None and tuple(initial_state.shape) != (num_states, H, K, V):
            raise ValueError(
                f"with cu_seqlens, initial_state must be [N, H, K, V] = {(num_states, H, K, V)}; "
                f"got {tuple(initial_state.shape)}"
            )


class _ValueCheck:
    """The value check of :func:`gated_linear_attention`: queued on the inputs' device when made, read by
    :meth:`raise_if_bad`.

    The op queues it, then its kernels, and reads it last, so the host waits only for the screen's reductions
    (one read of each input) and never leaves the GPU idle while it launches the kernels. Reading it before the
    launches (a plain ``bool(screen)``) stalled both for 0.65-1.16 ms per call at B*T = 32K, H16 K=V=128 on an
    H100, 60-90% of the forward (RESULTS.md, session 25). The op's outputs are never returned for bad inputs.
    """

    @torch.no_grad()
    def __init__(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None):
        self.inputs = (q, k, v, g, initial_state)
        named = [q, k, v] + ([initial_state] if initial_state is not None else [])
        # One reduction per tensor: a sum is NaN/inf whenever a term is (and may overflow on finite ones: the
        # exact checks then find nothing), and max(g) propagates NaN.
        screen = sum(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32) for x in named)
        if g.numel():
            screen = screen + torch.where(g.max() <= 0, 0.0, float("nan"))
        self.event = None
        if screen.is_cuda:  # into pinned host memory, behind the reductions on the inputs' device's current stream
            stream = torch.cuda.current_stream(screen.device)
            screen = screen.to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(stream)
        self.screen = screen

    def raise_if_bad(self) -> None:
        """``ValueError`` unless q, k, v and initial_state are finite and g is NaN-free and ``<= 0`` (``-inf``
        allowed), naming the tensor and its first bad entry."""
        if self.event is not None:
            self.event.synchronize()
        if not bool(torch.isfinite(self.screen)):
            _raise_on_bad_values(*self.inputs)


@torch.no_grad()
def _raise_on_bad_values(q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None) -> None:
    """The exact checks behind a failed screen: raise naming the first bad tensor and entry."""
    named = [("q", q), ("k", k), ("v", v)] + ([("initial_state", initial_state)] if initial_state is not None else [])
    for name, x in named:
        bad = ~torch.isfinite(x)
        if bad.any():
            first = tuple(bad.nonzero()[0].tolist())
            dims = "[b, h, k, v]" if name == "initial_state" else f"[b, t, h, {'v' if name == 'v' else 'k'}]"
            raise ValueError(
                f"{name} must be finite: {name}[{', '.join(map(str, first))}] = {x[first].item()} (index "
                f"{dims}), the first of {int(bad.sum())} NaN/inf entries of {x.numel()}"
            )
    if torch.isnan(g).any():
        raise ValueError(f"g contains NaN at {int(torch.isnan(g).sum())} of {g.numel()} entries")
    if (g > 0).any():
        raise ValueError(f"g is the log forget gate and must be <= 0; got max(g) = {g.max().item():.4g}")


def gated_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: str | None = None,
    cu_seqlens: Tensor | None = None,
    check_values: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention over a sequence, optionally continuing from a state.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys.
        v: ``[B, T, H, V]`` values (``V`` may differ from ``K``).
        g: ``[B, T, H, K]`` log forget gates, ``<= 0`` (``-inf`` allowed: a full reset of that channel).
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` state before the first token (``[N, H, K, V]`` with
            ``cu_seqlens``), or None for zeros.
        output_final_state: also return the state after the last token.
        backend: ``"recurrent"``, ``"chunk"``, ``"triton"`` or ``"auto"``/None.
        cu_seqlens: ``[N + 1]`` integer offsets of ``N`` sequences packed along T (``B == 1``):
            sequence ``i`` is ``[cu_seqlens[i], cu_seqlens[i+1])``; states never cross a boundary.
        check_values: verify that q, k, v and initial_state are finite and that g has no NaN and is
            ``<= 0``, with one host sync (on CUDA read after the kernels are queued, so the host waits only
            for the check's own reductions; the outputs are never returned for bad inputs). The chunkwise
            backends (``chunk``, ``triton``) mix the tokens of a chunk (32 tokens in PyTorch, 64 in Triton)
            in matrix products, so a NaN or inf would reach outputs of its chunk *before* it (the recurrent
            backend only those from it on): every backend rejects it instead. Callers that control their
            inputs (the models) turn it off so decoding never waits on the GPU; then a non-finite input gives
            undefined outputs, up to 63 tokens before it.
    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, H, V]`` in ``v``'s dtype; ``final_state`` is
        ``[B, H, K, V]`` (``[N, H, K, V]`` with ``cu_seqlens``) in float32 (float64 when the inputs
        are float64), or None unless asked for.
    Raises:
        ValueError: on mismatched shapes, an unknown backend, NaN in ``g`` or ``g > 0``, NaN or inf
            in q, k, v or initial_state (naming the tensor and the first bad index), bad
            ``cu_seqlens``, or inputs the chosen backend cannot run (``"triton"``: CUDA tensors of
            fp32/bf16/fp16 with head dims <= 512, and an importable ``triton``).
    """
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown GLA backend {backend!r}; choose one of {BACKENDS}")
    num_seqs = None
    if cu_seqlens is not None and q.dim() == 4:
        num_seqs = _check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
    _check_inputs(q, k, v, g, initial_state, num_seqs)
    backend = _resolve_backend(backend, q, k, v, g, initial_state)  # (no device work: before the value check)
    # The value check reads its result back (a host sync): skipped while a graph is being traced.
    value_check = _ValueCheck(q, k, v, g, initial_state) if check_values and not torch.compiler.is_compiling() \
        else None
    if value_check is not None and value_check.event is None:
        value_check.raise_if_bad()  # already on the host: raise before any work
        value_check = None
    K = q.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, initial_state)
    )
    if backend == "triton":
        o, state = _run_triton(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, needs_grad)
    elif cu_seqlens is None:
        o, state = _dense(backend, q, k, v, g, scale, initial_state, needs_grad)
    else:
        o, state = _dense_packed(backend, q, k, v, g, scale, initial_state, needs_grad, cu_seqlens)
    if value_check is not None:
        value_check.raise_if_bad()
    return o.to(v.dtype), (state if output_final_state else None)


def _resolve_backend(
    backend: str, q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None
) -> str:
    """The backend that runs q, k, g ``[B, T, H, K]``, v ``[B, T, H, V]``: ``"auto"`` resolved (see the module
    docstring); ``ValueError`` when ``"triton"`` was asked for and cannot run them."""
    if backend == "auto":
        backend = "recurrent" if q.shape[1] <= _RECURRENT_MAX_T else "chunk"
        if q.is_cuda:
            why_not = _triton_unusable(q, k, v, g, initial_state)
            if why_not is None:
                backend = "triton"
            elif backend == "chunk":
                _say_once(f"longseq: GLA backend 'auto' -> 'chunk' (PyTorch): {why_not}")
    if backend == "triton":
        why_not = _triton_unusable(q, k, v, g, initial_state)
        if why_not is not None:
            raise ValueError(f"GLA backend 'triton' cannot run these inputs: {why_not}")
    return backend


def _run_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor | None,
    needs_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """The Triton backend on q, k, g ``[B, T, H, K]``, v ``[B, T, H, V]``: ``(o [B, T, H, V], state)``, the
    state ``[B or N, H, K, V]`` (None from the chunk kernels unless ``output_final_state``)."""
    from .triton import chunk_gla, recurrent_gla

    if q.shape[1] <= _RECURRENT_MAX_T and not needs_grad:
        # Decoding: the fused recurrent kernel, no chunk padding. Its state is always computed.
        return recurrent_gla(q, k, v, g, scale, initial_state, cu_seqlens)
    return chunk_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def _dense_packed(
    backend: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float,
    initial_state: Tensor | None,
    needs_grad: bool,
    cu_seqlens: Tensor,
) -> tuple[Tensor, Tensor]:
    """A PyTorch backend on ``N`` sequences packed along T (q, k, g ``[1, T, H, K]``, v ``[1, T, H, V]``,
    initial_state ``[N, H, K, V]`` or None): each runs on its own and the results are stitched, giving
    ``o`` ``[1, T, H, V]`` and the final states ``[N, H, K, V]``."""
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        s0 = initial_state[i : i + 1] if initial_state is not None else None
        part = (x[:, start:end] for x in (q, k, v, g))
        o_i, s_i = _dense(backend, *part, scale, s0, needs_grad)
        outs.append(o_i)
        states.append(s_i)
    return torch.cat(outs, dim=1), torch.cat(states, dim=0)


def _triton_unusable(q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None) -> str | None:
    """None if the Triton backend can run these inputs, else the reason.

    For CUDA tensors the answer depends only on the device, the dtypes and the head dims, so it is remembered per
    those (a decode loop asks once per token and layer); off CUDA it also depends on ``TRITON_INTERPRET`` and is
    worked out each time (and while ``torch.compile`` traces, which keeps the traced code free of the cache)."""
    if not q.is_cuda or torch.compiler.is_compiling():
        return _why_triton_cannot_run(q, k, v, g, initial_state)
    key = (q.device, q.dtype, k.dtype, v.dtype, g.dtype, initial_state.dtype if initial_state is not None else None,
           q.shape[-1], v.shape[-1])
    if key not in _TRITON_ANSWERS:
        _TRITON_ANSWERS[key] = _why_triton_cannot_run(q, k, v, g, initial_state)
    return _TRITON_ANSWERS[key]


_TRITON_ANSWERS: dict[tuple, str | None] = {}


def _why_triton_cannot_run(q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None) -> str | None:
    err = _triton_import_error()
    if err is not None:
        return f"the Triton kernels do not import ({err}); pip install 'longseq[triton]'"
    from .triton import SUPPORTED_DTYPES
    from .triton.common import MAX_HEAD_DIM

    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return "tensors are not on a CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    tensors = [q, k, v, g] + ([initial_state] if initial_state is not None else [])
    bad = sorted({str(t.dtype) for t in tensors if t.dtype not in SUPPORTED_DTYPES})
    if bad:
        return f"dtypes {bad} are not supported (float32, bfloat16, float16)"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims K={q.shape[-1]}, V={v.shape[-1]} exceed {MAX_HEAD_DIM}"
    return None


def _dense(
    backend: str, q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float, initial_state: Tensor | None,
    needs_grad: bool,
) -> tuple[Tensor, Tensor]:
    """One batch of equal-length sequences on a PyTorch backend (``recurrent`` or ``chunk``)."""
    if backend == "recurrent" or q.shape[1] == 0:
        return gla_recurrent(q, k, v, g, scale, initial_state)
    if needs_grad:
        # As in the paper, keep only the inputs for backward and recompute the chunk internals there:
        # the intra-chunk decay tensors are ~16x the size of q and would dominate activation memory.
        return checkpoint(gla_chunk, q, k, v, g, scale, initial_state, use_reentrant=False)
    return gla_chunk(q, k, v, g, scale, initial_state)

"""The residual blocks longseq's models stack, each with its own state, its single-token step and the
factory of that state.

Every block type has the same three methods:

* ``forward(h, positions, state=None, *, row_mask=None, options=None) -> h``: any number of tokens
  ``h`` ``[B, T, d_model]`` at ``positions`` (``[T]``, or ``[B, T]`` per row), stateless (``state=None``:
  training, full-sequence forward) or continuing ``state`` (updated in place);
* ``step(h, positions, state, *, row_mask=None) -> h``: one token per row (``[B, 1, d_model]``), the
  decode step; the fused decode kernels of :mod:`longseq.ops.decode_block` sit behind it;
* ``init_state(batch_size, *, cache=None, device=None, static_len=None) -> LayerState``;
* optionally ``check_state(state, index)``: ``ValueError`` unless ``state`` is one this block's
  ``init_state`` could have made (its kind and shape), so that a model's ``step`` refuses another model's
  state before any work.

``row_mask`` (``[B]`` bool, static states only) advances only the rows where it is True; the others keep
their state (MEGABYTE's global model, which advances only the rows that complete a patch).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..cache.kv import KVCache
from ..cache.policies import CachePolicy
from ..cache.recurrent import RecurrentState
from ..ops import decode_block
from ..ops.rope import RopeScaling
from .attention import Attention, AttentionOptions
from .fused import fused_rows, plain_modules
from .gla import GatedLinearAttention
from .mlp import SwiGLU
from .norm import RMSNorm


class TransformerBlock(nn.Module):
    """Pre-RMSNorm Transformer++ block: RoPE attention (GQA) then SwiGLU, each with a residual add.
    Its state is a :class:`KVCache`."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, mlp_hidden: int, norm_eps: float = 1e-5,
                 rope_theta: float = 10000.0, *, head_dim: int | None = None, qkv_bias: bool = False,
                 out_bias: bool = False, mlp_bias: bool = False, qk_norm: bool = False,
                 rope_scaling: RopeScaling | None = None) -> None:
        """The keyword options describe pretrained families (see :class:`~longseq.models.TransformerConfig`):
        a head dim other than ``d_model / n_heads``, biases, per-head q/k RMSNorm, Llama 3 RoPE scaling."""
        super().__init__()
        self.attn_norm = RMSNorm(d_model, eps=norm_eps)
        self.attn = Attention(d_model, n_heads, n_kv_heads, rope_theta, head_dim=head_dim, qkv_bias=qkv_bias,
                              out_bias=out_bias, qk_norm=qk_norm, norm_eps=norm_eps, rope_scaling=rope_scaling)
        self.mlp_norm = RMSNorm(d_model, eps=norm_eps)
        self.mlp = SwiGLU(d_model, mlp_hidden, bias=mlp_bias)

    def forward(self, h: Tensor, positions: Tensor, cache: KVCache | None = None, *,
                row_mask: Tensor | None = None, options: AttentionOptions | None = None) -> Tensor:
        h = h + self.attn(self.attn_norm(h), positions, cache, row_mask=row_mask, options=options)
        return h + self.mlp(self.mlp_norm(h))

    def step(self, h: Tensor, positions: Tensor, cache: KVCache, *, row_mask: Tensor | None = None) -> Tensor:
        """One token per row: ``h`` ``[B, 1, d_model]``, ``positions`` ``[B, 1]``. Where
        :meth:`can_fuse_step` holds, 4 GEMV launches with the norms, SiLU and residual adds folded in
        (attention still goes through the cache, so every policy works); else :meth:`forward`. Both
        compute the same function with the same rounding points."""
        if not self.can_fuse_step(h):
            return self(h, positions, cache, row_mask=row_mask)
        attn, mlp = self.attn, self.mlp
        x = h[:, 0]
        qkv = decode_block.norm_linear(x, attn.qkv.weight, self.attn_norm.weight, self.attn_norm.eps)
        x = decode_block.linear_residual(attn.attend_packed(qkv, positions, cache, row_mask), attn.out.weight, x)
        a = decode_block.norm_swiglu(x, self.mlp_norm.weight, self.mlp_norm.eps, mlp.gate_up.weight)
        return decode_block.linear_residual(a, mlp.down.weight, x)[:, None]

    def can_fuse_step(self, h: Tensor) -> bool:
        """Whether :meth:`step` may take the fused kernels for ``h`` ``[B, 1, d]`` (see
        :mod:`longseq.nn.fused`): exactly this class (a subclass may compute something else), its own
        Attention/SwiGLU/RMSNorm modules and plain ``nn.Linear`` projections, no hooks, no autograd,
        fusable rows."""
        if type(self) is not TransformerBlock or type(self.attn) is not Attention or type(self.mlp) is not SwiGLU:
            return False
        if type(self.attn_norm) is not RMSNorm or type(self.mlp_norm) is not RMSNorm or not fused_rows(h):
            return False
        if self.attn.q_norm is not None:  # the fused kernels rotate raw projections
            return False
        attn, mlp = self.attn, self.mlp
        return plain_modules(h, (self,), (attn.qkv, attn.out, mlp.gate_up, mlp.down))

    def check_state(self, state: object, index: int) -> None:
        """``ValueError`` unless ``state`` is a :class:`KVCache` with this block's KV heads and head size (layer
        ``index`` of its model's state)."""
        if not isinstance(state, KVCache):
            raise ValueError(f"layer {index} is a Transformer block, which keeps a KVCache; the state holds a "
                             f"{type(state).__name__} there (pass a state from this model's init_state)")
        want = (self.attn.n_kv_heads, self.attn.head_dim)
        if state.k is not None and (state.k.shape[1], state.k.shape[-1]) != want:
            raise ValueError(f"layer {index}: the KVCache holds {state.k.shape[1]} heads of size {state.k.shape[-1]}, "
                             f"this block {want[0]} of size {want[1]} (pass a state from this model's init_state)")

    def init_state(self, batch_size: int, *, cache: CachePolicy | None = None, device: torch.device | None = None,
                   static_len: int | None = None) -> KVCache:
        """A :class:`KVCache` under ``cache`` (default ``Full()``); static with ``static_len`` slots for
        ``Full`` (``budget + 1`` for bounded policies) when ``static_len`` is given, in the weights' dtype."""
        if cache is not None and not isinstance(cache, CachePolicy):
            raise TypeError(f"cache must be a CachePolicy such as Full(); got {type(cache).__name__}")
        kv = KVCache(cache)
        if static_len is not None:
            kv.allocate(batch_size, self.attn.n_kv_heads, self.attn.head_dim, max_len=static_len,
                        dtype=self.attn.qkv.weight.dtype, device=device)
        return kv


class GLABlock(nn.Module):
    """Pre-RMSNorm GLA block: gated linear attention then SwiGLU (Yang et al. 2024). Its state is a
    :class:`RecurrentState` holding the ``[B, H, K, V]`` matrix; it needs no positions."""

    def __init__(self, d_model: int, n_heads: int, mlp_hidden: int, *, expand_k: float = 0.5,
                 expand_v: float = 1.0, gate_rank: int = 16, gate_normalizer: float = 16.0,
                 norm_eps: float = 1e-5, backend: str = "auto") -> None:
        super().__init__()
        self.attn_norm = RMSNorm(d_model, eps=norm_eps)
        self.attn = GatedLinearAttention(d_model, n_heads, expand_k, expand_v, gate_rank, gate_normalizer,
                                         norm_eps, backend)
        self.mlp_norm = RMSNorm(d_model, eps=norm_eps)
        self.mlp = SwiGLU(d_model, mlp_hidden)

    def forward(self, h: Tensor, positions: Tensor, state: RecurrentState | None = None, *,
                row_mask: Tensor | None = None, options: AttentionOptions | None = None) -> Tensor:
        """As :meth:`TransformerBlock.forward` (``positions`` and ``options`` do not apply to GLA)."""
        mixed, new = self.attn(self.attn_norm(h), None if state is None else state.matrix)
        if state is not None:
            assert new is not None
            state.update_(new, row_mask)
        h = h + mixed
        return h + self.mlp(self.mlp_norm(h))

    def step(self, h: Tensor, positions: Tensor, state: RecurrentState, *, row_mask: Tensor | None = None) -> Tensor:
        """One token per row (the GLA op takes its recurrent decode kernel for it)."""
        return self(h, positions, state, row_mask=row_mask)

    def check_state(self, state: object, index: int) -> None:
        """``ValueError`` unless ``state`` is a :class:`RecurrentState` of this block's ``[H, K, V]`` (layer
        ``index`` of its model's state)."""
        if not isinstance(state, RecurrentState):
            raise ValueError(f"layer {index} is a GLA block, which keeps a RecurrentState; the state holds a "
                             f"{type(state).__name__} there (pass a state from this model's init_state)")
        want = (self.attn.n_heads, self.attn.head_k, self.attn.head_v)
        if tuple(state.shape[1:]) != want:
            raise ValueError(f"layer {index}: the RecurrentState is [B, H, K, V] = {list(state.shape)}, this block "
                             f"keeps [B, {', '.join(map(str, want))}] (pass a state from this model's init_state)")

    def init_state(self, batch_size: int, *, cache: CachePolicy | None = None, device: torch.device | None = None,
                   static_len: int | None = None) -> RecurrentState:
        """Zeros ``[B, H, K, V]``, fp32 for fp32/bf16/fp16 weights (fp64 models, in exactness tests, keep fp64)."""
        if cache is not None:
            raise ValueError("GLA layers keep a fixed-size matrix state; a cache policy does not apply to them")
        attn = self.attn
        dtype = torch.promote_types(attn.q_proj.weight.dtype, torch.float32)
        shape = (batch_size, attn.n_heads, attn.head_k, attn.head_v)
        return RecurrentState.zeros(shape, dtype=dtype, device=device, static=static_len is not None)

"""Transformer++ language model: pre-RMSNorm blocks of RoPE attention and SwiGLU."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..cache.kv import KVCache
from ..cache.policies import CachePolicy
from ..nn.attention import Attention
from ..nn.mlp import SwiGLU
from ..nn.norm import RMSNorm
from ..ops import decode_block
from .base import LanguageModel
from .config import TransformerConfig
from .fused_step import fused_rows, plain_modules


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, h: Tensor, positions: Tensor, cache: KVCache | None) -> tuple[Tensor, KVCache | None]:
        h = h + self.attn(self.attn_norm(h), positions, cache)
        return h + self.mlp(self.mlp_norm(h)), cache

    def fused_step(self, h: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
        """``self(h, positions, cache)[0]`` for one token per row through the fused decode kernels of
        :mod:`longseq.ops.decode_block` (4 GEMV launches with the norms, SiLU and residual adds folded
        in; attention still goes through the cache, so every cache policy works).

        h: ``[B, 1, d_model]``; positions: ``[B, 1]`` or ``[1]``. Check :meth:`can_fuse_step` first.
        """
        attn = self.attn
        B = h.shape[0]
        H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
        x = h[:, 0]
        qkv = decode_block.norm_linear(x, attn.qkv.weight, self.attn_norm.weight, self.attn_norm.eps)
        if cache.can_attend_packed(qkv, positions):  # static Full cache: RoPE + cache write fused too
            o = cache.attend_packed(qkv, positions, H, attn.rope.inv_freq_fp32(x.device))
        else:
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = attn.rope(q.reshape(B, H, 1, D), positions)
            k = attn.rope(k.reshape(B, Hkv, 1, D), positions)
            o = cache.attend(q, k, v.reshape(B, Hkv, 1, D), positions)  # [B, H, 1, D]
        x = decode_block.linear_residual(o.reshape(B, H * D), attn.out.weight, x)
        a = decode_block.norm_swiglu(x, self.mlp_norm.weight, self.mlp_norm.eps, self.mlp.gate_up.weight)
        return decode_block.linear_residual(a, self.mlp.down.weight, x)[:, None]

    def can_fuse_step(self, h: Tensor) -> bool:
        """Whether :meth:`fused_step` may run for ``h`` ``[B, 1, d]`` (see :mod:`.fused_step`): exactly this
        class (a subclass may compute something else), its own Attention/SwiGLU/RMSNorm modules and plain
        ``nn.Linear`` projections, no hooks, no autograd, fusable rows."""
        if type(self) is not TransformerBlock or type(self.attn) is not Attention or type(self.mlp) is not SwiGLU:
            return False
        if type(self.attn_norm) is not RMSNorm or type(self.mlp_norm) is not RMSNorm or not fused_rows(h):
            return False
        attn, mlp = self.attn, self.mlp
        return plain_modules(h, (self,), (attn.qkv, attn.out, mlp.gate_up, mlp.down))


class TransformerLM(LanguageModel):
    """Decoder-only Transformer++. Its recurrent state is one :class:`KVCache` per layer."""

    config: TransformerConfig

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self._finish_init()

    def _init_layer_state(
        self, layer: int, batch_size: int, cache: CachePolicy | None, device: torch.device
    ) -> KVCache:
        if cache is not None and not isinstance(cache, CachePolicy):
            raise TypeError(f"cache must be a CachePolicy such as Full(); got {type(cache).__name__}")
        return KVCache(cache)

"""HF Llama-family parameter names -> the native Transformer's (``q/k/v_proj`` -> one ``qkv``, ``gate/up_proj``
-> one ``gate_up``, and so on)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..models.config import TransformerConfig


def _strip_prefix(names: list[str]) -> str:
    """The prefix in front of ``layers.0...`` / ``embed_tokens`` (``model.``, or none for a bare base model)."""
    for name in names:
        if name.endswith("embed_tokens.weight"):
            return name[: -len("embed_tokens.weight")]
    raise ValueError("no embed_tokens.weight among the checkpoint's tensors: not a Llama-family checkpoint")


def native_state_dict(cfg: TransformerConfig, get: Callable[[str], Tensor], names: list[str]) -> dict[str, Tensor]:
    """The native ``state_dict`` from a checkpoint whose tensors ``get(name)`` returns (``names``: all of them).

    Raises ``ValueError`` naming the first missing tensor."""
    p = _strip_prefix(names)
    available = set(names)

    def take(name: str) -> Tensor:
        if name not in available:
            raise ValueError(f"the checkpoint has no tensor {name!r} (not a complete {cfg.n_layers}-layer model?)")
        return get(name)

    out: dict[str, Tensor] = {"embed.weight": take(f"{p}embed_tokens.weight"), "norm.weight": take(f"{p}norm.weight")}
    if not cfg.tie_embeddings:
        out["head.weight"] = take("lm_head.weight")
    for i in range(cfg.n_layers):
        src, dst = f"{p}layers.{i}.", f"blocks.{i}."
        attn = f"{src}self_attn."
        out[f"{dst}attn_norm.weight"] = take(f"{src}input_layernorm.weight")
        out[f"{dst}mlp_norm.weight"] = take(f"{src}post_attention_layernorm.weight")
        out[f"{dst}attn.qkv.weight"] = torch.cat([take(f"{attn}{x}_proj.weight") for x in "qkv"])
        if cfg.qkv_bias:
            out[f"{dst}attn.qkv.bias"] = torch.cat([take(f"{attn}{x}_proj.bias") for x in "qkv"])
        out[f"{dst}attn.out.weight"] = take(f"{attn}o_proj.weight")
        if cfg.out_bias:
            out[f"{dst}attn.out.bias"] = take(f"{attn}o_proj.bias")
        if cfg.qk_norm:
            out[f"{dst}attn.q_norm.weight"] = take(f"{attn}q_norm.weight")
            out[f"{dst}attn.k_norm.weight"] = take(f"{attn}k_norm.weight")
        mlp = f"{src}mlp."
        out[f"{dst}mlp.gate_up.weight"] = torch.cat([take(f"{mlp}gate_proj.weight"), take(f"{mlp}up_proj.weight")])
        out[f"{dst}mlp.down.weight"] = take(f"{mlp}down_proj.weight")
        if cfg.mlp_bias:
            out[f"{dst}mlp.gate_up.bias"] = torch.cat([take(f"{mlp}gate_proj.bias"), take(f"{mlp}up_proj.bias")])
            out[f"{dst}mlp.down.bias"] = take(f"{mlp}down_proj.bias")
    return out

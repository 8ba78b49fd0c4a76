"""The reference implementations ``longseq bench decode --against hf`` times next to longseq's models.

A Transformer is compared with HF ``LlamaForCausalLM`` and GLA with fla's ``GLAForCausalLM``, each built
with the longseq config's shape (random weights) and timed through its own ``generate()``. Other kinds
have no baseline.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .timing import peak_memory_gib, reset_peak_memory, timed


def build_hf_llama(cfg, dtype: torch.dtype, device: torch.device, max_positions: int):
    """HF ``LlamaForCausalLM`` with a longseq ``TransformerConfig``'s shape (random weights, SDPA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=max_positions, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=False, attn_implementation="sdpa", pad_token_id=0, bos_token_id=None,
        eos_token_id=None,
    )
    return LlamaForCausalLM(hf_cfg).to(device=device, dtype=dtype).eval()


def build_fla_gla(cfg, dtype: torch.dtype, device: torch.device, max_positions: int | None = None):
    """fla's ``GLAForCausalLM`` with a longseq ``GLAConfig``'s shape (random weights). ``max_positions`` is
    accepted for a signature like :func:`build_hf_llama`'s and unused: GLA has no position table."""
    from fla.models import GLAConfig as FlaGLAConfig
    from fla.models import GLAForCausalLM

    fla_cfg = FlaGLAConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_heads=cfg.n_heads, expand_k=cfg.expand_k, expand_v=cfg.expand_v, intermediate_size=cfg.mlp_hidden,
        pad_token_id=0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
    )
    return GLAForCausalLM(fla_cfg).to(device=device, dtype=dtype).eval()


@dataclass(frozen=True)
class Baseline:
    """How one model kind's reference implementation is built and labelled in the results.

    ``policy`` is what its rows show in the policy column: ``"full"`` for a KV cache, ``"-"`` for a
    recurrent state. ``requires`` names a module that must import for the rows to be run at all, and
    ``missing`` the note the report carries when it does not.
    """

    impl: str
    policy: str
    build: Callable[..., Any]
    requires: str | None = None
    missing: str = ""

    def unavailable(self) -> str | None:
        """The report's note when this baseline cannot run here, else ``None``."""
        if self.requires is not None and importlib.util.find_spec(self.requires) is None:
            return self.missing
        return None


# Without ``requires``, a baseline is always attempted: if it cannot import, its rows carry the ImportError.
BASELINES: dict[str, Baseline] = {
    "transformer": Baseline("hf-llama", "full", build_hf_llama),
    "gla": Baseline(
        "fla-gla", "-", build_fla_gla, requires="fla",
        missing="fla is not importable: no fla GLA rows (pip install flash-linear-attention)",
    ),
}


def hf_generate_timing(hf_model, context: int, batch: int, steps: int, device: torch.device) -> dict[str, Any]:
    """HF ``generate()`` timing: prefill = a 1-token generate; ms/step from an N-token one."""
    prompt = torch.randint(0, 256, (batch, context), device=device)
    mask = torch.ones_like(prompt)

    def run(n: int):
        return hf_model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)

    run(2)  # warm-up
    reset_peak_memory(device)
    t1 = min(timed(device, lambda: run(1))[0] for _ in range(3))  # the prefill; the best of 3 (noise)
    tn, out = timed(device, lambda: run(steps + 1))
    assert out.shape[1] == context + steps + 1
    return {
        "prefill_s": t1,
        "ms_per_step": (tn - t1) / steps * 1e3,
        "tok_s": batch * steps / max(tn - t1, 1e-9),
        "peak_gib": peak_memory_gib(device),
    }


def bench_baseline(
    baseline: Baseline, cfg, context: int, batch: int, steps: int, dtype: torch.dtype, device: torch.device
) -> dict[str, Any]:
    """Build ``baseline`` with ``cfg``'s shape and time ``steps`` greedy decode steps after a ``context``-byte
    prefill of ``batch`` rows; the result includes its parameter count."""
    ref = baseline.build(cfg, dtype, device, context + steps + 8)
    try:
        return {"params_m": ref.num_parameters() / 1e6, **hf_generate_timing(ref, context, batch, steps, device)}
    finally:
        del ref  # before a smaller retry of largest_batch allocates again

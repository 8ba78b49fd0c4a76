"""The gated linear attention layer of Yang et al. (2024), Sec. 4.4."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.gla import gated_linear_attention
from .norm import RMSNorm


class GatedLinearAttention(nn.Module):
    """GLA token mixer, ``[B, T, d_model] -> [B, T, d_model]``, carrying a ``[B, H, K, V]`` fp32 state.

    * q, k: ``d_model * expand_k`` channels (paper: d/2); v: ``d_model * expand_v`` (paper: d).
    * forget gate ``alpha = sigmoid(x W1 W2 + b) ** (1 / tau)``, low rank ``gate_rank`` (16), ``tau``
      = ``gate_normalizer`` (16); in log space ``g = logsigmoid(x W1 W2 + b) / tau``.
    * per-head RMSNorm of the output, swish output gate ``silu(x W_r + b_r)``, output projection.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_rank: int = 16,
        gate_normalizer: float = 16.0,
        norm_eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        key_dim, value_dim = int(d_model * expand_k), int(d_model * expand_v)
        if key_dim % n_heads or value_dim % n_heads:
            raise ValueError(
                f"key dim {key_dim} and value dim {value_dim} must be divisible by n_heads={n_heads}"
            )
        self.n_heads = n_heads
        self.head_k, self.head_v = key_dim // n_heads, value_dim // n_heads
        self.gate_normalizer = gate_normalizer
        self.backend = backend
        self.q_proj = nn.Linear(d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, value_dim, bias=False)
        self.gate_down = nn.Linear(d_model, gate_rank, bias=False)
        self.gate_up = nn.Linear(gate_rank, key_dim, bias=True)
        self.out_gate = nn.Linear(d_model, value_dim, bias=True)
        self.head_norm = RMSNorm(self.head_v, eps=norm_eps)
        self.out = nn.Linear(value_dim, d_model, bias=False)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x: ``[B, T, d_model]``; state: ``[B, H, K, V]`` to continue from (decoding), or None.

        Returns the output and, when a state was given, the state after the last token.
        """
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_proj(x).view(B, T, H, self.head_k)
        k = self.k_proj(x).view(B, T, H, self.head_k)
        v = self.v_proj(x).view(B, T, H, self.head_v)
        # The gate in fp32: logsigmoid of large negative logits loses its small tail in bf16.
        gate_logits = self.gate_up(self.gate_down(x))
        g = F.logsigmoid(gate_logits.to(torch.promote_types(gate_logits.dtype, torch.float32))) / self.gate_normalizer
        o, new_state = gated_linear_attention(
            q, k, v, g.view(B, T, H, self.head_k),
            initial_state=state, output_final_state=state is not None, backend=self.backend,
            check_values=False,  # logsigmoid(.) / tau <= 0 by construction; skipping saves a sync per layer
        )
        o = self.head_norm(o).reshape(B, T, H * self.head_v)
        return self.out(o * F.silu(self.out_gate(x))), new_state

"""MEGABYTE's static state and its single-byte step: the computation a CUDA graph captures.

Rows may sit at different positions ``n`` (a batch of prompts of different lengths). In one step every
row writes its byte into its pending patch; the rows whose byte completes a patch advance the global
model by one patch position (masked: the others' global state is untouched) and restart their local
model. Whether the global model runs at all is decided on the host (:meth:`StaticDecode.decode_key`),
so there are two graphs: steps in which some row completes a patch, and steps in which none does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ...cache.policies import CachePolicy
from ...nn.fused import head_logits
from .state import MegabyteState

if TYPE_CHECKING:
    from .model import MegabyteLM


class StaticDecode:
    """Mixin of :class:`~longseq.models.MegabyteLM`: static states and their single-byte step."""

    def _init_static_state(
        self: MegabyteLM, batch_size: int, cache: CachePolicy | None, device: torch.device | str | None, max_len: int
    ) -> MegabyteState:
        self._check_length(max_len)
        dynamic = self.init_state(batch_size, cache=cache, device=device)
        device = torch.device(device) if device is not None else self.device
        self._start(dynamic, device)  # target t = 0, then copied into the static buffers below
        P = self.config.patch_size
        global_states = self.global_blocks.init_states(batch_size, cache=cache, device=device,
                                                       static_len=max_len // P + 2)
        local_states = self.local_blocks.init_states(batch_size, device=device, static_len=P)  # slot p: position p
        static = MegabyteState(layers=global_states + local_states, batch_size=batch_size,
                               n_global_layers=len(global_states), patch_size=P, started=True)
        static.make_static_(max_len, device)
        static.patch_ids = torch.zeros(batch_size, P, dtype=torch.long, device=device)
        static.local_from_global = torch.zeros(
            batch_size, P, self.config.d_local, dtype=self.head.weight.dtype, device=device
        )
        return static.load_(dynamic)

    def decode_key(self: MegabyteLM, state: Any) -> bool:
        """True when, in the next single-byte step, some row completes an input patch (so the global
        model runs, for those rows); the two kinds of step are two different graphs."""
        assert state.host_positions is not None
        P = self.config.patch_size
        return any((n + 1) % P == 0 for n in state.host_positions)

    def _static_steps(self: MegabyteLM, input_ids: Tensor, state: MegabyteState) -> Tensor:
        """``step`` on a static state: one byte per row per :meth:`_static_byte_step` (``T > 1``: a loop)."""
        if input_ids.shape[1] > 1:
            logits = [self._static_byte_step(input_ids[:, j : j + 1], state)[:, 0] for j in range(input_ids.shape[1])]
            return torch.stack(logits, 1)
        return self._static_byte_step(input_ids, state)

    def _static_byte_step(self: MegabyteLM, input_ids: Tensor, state: MegabyteState) -> Tensor:
        """One byte per row: ``input_ids`` ``[B, 1]`` -> ``[B, 1, vocab]`` (see the module docstring)."""
        assert state.positions is not None and state.patch_ids is not None
        assert state.local_from_global is not None
        B = input_ids.shape[0]
        P, DL = self.config.patch_size, self.config.d_local
        n = state.positions  # [B]
        x = input_ids[:, 0]
        state.patch_ids.scatter_(1, (n % P)[:, None], x[:, None])
        p = (n + 1) % P  # in-patch position of the target t = n + 1
        completes = p == 0  # [B]
        if self.decode_key(state):
            self._static_global_step(state, n, completes)
            for layer in state.local_layers:  # a new patch restarts the local model
                layer.restart_rows_(completes)
        emb = self.local_embed(x)  # [B, D_L]
        emb = torch.where(completes[:, None], self.local_pad.to(emb.dtype), emb)
        cond = state.local_from_global.gather(1, p[:, None, None].expand(B, 1, DL))  # [B, 1, D_L]
        h = self.local_blocks.step(emb[:, None] + cond, p[:, None], state.local_layers)
        state.positions += 1
        state.advance_(1)
        return head_logits(self.norm, self.head, h)

    def _static_global_step(self: MegabyteLM, state: MegabyteState, n: Tensor, completes: Tensor) -> None:
        """Advance the global model by the patch each row in ``completes`` (``[B]`` bool) has just filled
        (patch position ``n // P + 1``) and take its conditioning for the next target patch; the other rows
        keep their global state and conditioning."""
        assert state.patch_ids is not None and state.local_from_global is not None
        B = n.shape[0]
        P, DG = self.config.patch_size, self.config.byte_dim
        k_cur = n // P
        byte_pos = (k_cur * P)[:, None] + torch.arange(P, device=n.device)  # [B, P]
        g_in = (self.global_embed(state.patch_ids) + self.pos_embed(byte_pos)).reshape(B, 1, P * DG)
        h = self.global_blocks.step(g_in, (k_cur + 1)[:, None], state.global_layers, row_mask=completes)
        g_local = self.global_to_local(self.global_norm(h).view(B, P, DG))  # [B, P, D_L]
        state.local_from_global.copy_(torch.where(completes[:, None, None], g_local, state.local_from_global))

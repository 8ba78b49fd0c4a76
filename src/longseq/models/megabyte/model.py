"""The MEGABYTE model: construction, the full-sequence forward and the dynamic (any-length) ``step``.

The single-byte step on a static state, which a CUDA graph captures, is in :mod:`.decode`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend

from ...cache.policies import CachePolicy
from ...nn.attention import AttentionOptions
from ...nn.norm import RMSNorm
from ..base import LanguageModel, check_state_args
from ..config import MegabyteConfig, ModelConfig
from ..gla import gla_block
from ..init import init_weights
from ..stack import BlockStack
from ..state import ModelState
from ..transformer import transformer_block
from .decode import StaticDecode
from .state import MegabyteState, check_megabyte_state


def _make_block(backbone: str, cfg: ModelConfig) -> nn.Module:
    return transformer_block(cfg) if backbone == "transformer" else gla_block(cfg)  # type: ignore[arg-type]


class MegabyteLM(StaticDecode, LanguageModel):
    """MEGABYTE byte-level language model with a pluggable global (and local) backbone.

    ``forward``: ``[B, T]`` byte ids -> ``[B, T, 256]`` logits, ``logits[:, i]`` predicting byte
    ``i + 1``; internally the global :class:`BlockStack` runs on ``[B, K, d_global]`` (``K = T // P + 1``
    patches) and the local one on ``[B * K, P, d_local]``. See the package docstring for the exact wiring.
    """

    config: MegabyteConfig

    #: Stateless local Transformer blocks (``forward``, whole patches in ``step``) fold RoPE into their qkv
    #: weight (every local position is an in-patch position ``p < P``: one batched matmul replaces the
    #: rotation of every query and key); ``False`` rotates as everywhere else. Same function either way.
    fast_stateless: bool = True
    #: SDPA backends for the local model's stateless attention (``L <= P`` keys per patch), e.g.
    #: ``[SDPBackend.EFFICIENT_ATTENTION]``; ``None``: PyTorch's choice. A plain attribute, not config.
    local_sdpa_backends: list[SDPBackend] | None = None

    def __init__(self, config: MegabyteConfig) -> None:
        super().__init__()
        self.config = config
        V, P, DG, DL = config.vocab_size, config.patch_size, config.byte_dim, config.d_local
        gcfg, lcfg = config.global_config(), config.local_config()
        # Global path.
        self.global_embed = nn.Embedding(V, DG)
        self.pos_embed = nn.Embedding(config.max_seq_len, DG)
        self.global_pad = nn.Parameter(torch.empty(P * DG))
        n_global, n_local = config.n_global_layers, config.n_local_layers
        self.global_blocks = BlockStack(_make_block(config.global_backbone, gcfg) for _ in range(n_global))
        self.global_norm = RMSNorm(config.d_global, eps=config.norm_eps)
        self.global_to_local = nn.Linear(DG, DL, bias=False)  # the paper's w^GL, shared by the P slices
        # Local path.
        self.local_embed = nn.Embedding(V, DL)
        self.local_pad = nn.Parameter(torch.empty(DL))
        self.local_blocks = BlockStack(_make_block(config.local_backbone, lcfg) for _ in range(n_local))
        self.norm = RMSNorm(DL, eps=config.norm_eps)
        self.head = nn.Linear(DL, V, bias=False)
        depths = {"global_blocks.": config.n_global_layers, "local_blocks.": config.n_local_layers}
        init_weights(self, config.init_std, depths, extra=(self.global_pad, self.local_pad))
        if config.tie_embeddings:
            self.head.weight = self.local_embed.weight

    def embedding_weights(self) -> list[Tensor]:
        return [self.global_embed.weight, self.pos_embed.weight, self.local_embed.weight]

    def _check_length(self, end: int) -> None:
        if end > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {end} exceeds max_seq_len={self.config.max_seq_len} of this MEGABYTE model "
                f"(its byte-position embedding has max_seq_len entries)"
            )

    # -- the two stacks ------------------------------------------------------------------------------
    def _embed_patches(self, ids: Tensor, start: int) -> Tensor:
        """``[B, m * P]`` complete input patches starting at byte position ``start`` -> ``[B, m, P * D_G]``
        global inputs (byte embedding + byte-position embedding, the P bytes of a patch concatenated)."""
        B, n = ids.shape
        P = self.config.patch_size
        positions = torch.arange(start, start + n, device=ids.device)
        h = self.global_embed(ids) + self.pos_embed(positions)
        return h.reshape(B, n // P, P * self.config.byte_dim)

    def _run_global(self, h: Tensor, positions: Tensor, states: list[Any] | None) -> Tensor:
        """Global blocks over ``[B, K, d_global]`` at patch ``positions`` ``[K]`` (``states`` updated in
        place); returns the projected per-byte conditioning ``[B, K, P, D_L]`` (``w_GL`` applied to each of
        the P slices of width D_G)."""
        h = self.global_norm(self.global_blocks(h, positions, states))
        B, K, _ = h.shape
        return self.global_to_local(h.view(B, K, self.config.patch_size, self.config.byte_dim))

    def _run_local(self, h: Tensor, positions: Tensor, states: list[Any] | None) -> Tensor:
        """Local blocks over ``[N, L, D_L]`` (N independent patches, L <= P bytes each) at in-patch
        ``positions`` ``[L]`` (``states`` updated in place); returns ``[N, L, vocab]`` logits."""
        options = None
        if states is None and self.fast_stateless:
            backends = None if self.local_sdpa_backends is None else tuple(self.local_sdpa_backends)
            options = AttentionOptions(fold_rope=True, sdpa_backends=backends)
        return self.head(self.norm(self.local_blocks(h, positions, states, options=options)))

    # -- full-sequence forward -----------------------------------------------------------------------
    def forward(self, input_ids: Tensor) -> Tensor:
        """``[B, T]`` byte ids -> ``[B, T, vocab]`` logits; ``logits[:, i]`` predicts byte ``i + 1``.

        Any ``0 <= T <= max_seq_len``: the targets are padded up to whole patches inside and the
        padding is cut off before returning.
        """
        self.check_input_ids(input_ids)
        B, T = input_ids.shape
        self._check_length(T)
        P, DL = self.config.patch_size, self.config.d_local
        K = T // P + 1  # target patches covering targets t = 0..T
        device = input_ids.device
        # Global: the pad patch, then the complete input patches; patch k sees bytes < kP.
        g_in = self._embed_patches(input_ids[:, : (K - 1) * P], start=0)
        g_in = torch.cat([self.global_pad.to(g_in.dtype).expand(B, 1, -1), g_in], dim=1)  # [B, K, P*D_G]
        g_local = self._run_global(g_in, torch.arange(K, device=device), None)  # [B, K, P, D_L]
        # Local: target t gets byte t - 1 (prev[:, t] = x_{t-1}), the pad at every patch start.
        prev = F.pad(input_ids, (1, K * P - 1 - T))  # [B, K*P]; the 0s are never a real prev byte
        l_in = self.local_embed(prev).view(B, K, P, DL)
        l_in = torch.cat([self.local_pad.to(l_in.dtype).expand(B, K, 1, DL), l_in[:, :, 1:]], dim=2)
        h = (l_in + g_local).reshape(B * K, P, DL)
        logits = self._run_local(h, torch.arange(P, device=device), None)
        # Output i is target t = i + 1: drop target 0 and the padding targets past T.
        return logits.reshape(B, K * P, -1)[:, 1 : T + 1]

    # -- recurrent form ------------------------------------------------------------------------------
    def init_state(
        self,
        batch_size: int = 1,
        *,
        cache: CachePolicy | None = None,
        device: torch.device | str | None = None,
        max_len: int | None = None,
    ) -> MegabyteState:
        """A fresh state for ``batch_size`` byte sequences.

        ``cache`` is the KV-cache policy of the global Transformer's layers (default ``Full()``); the
        local model's cache never holds more than ``P`` bytes and is always full. A GLA global model
        keeps fixed-size matrices and rejects a policy.

        ``max_len`` (``<= max_seq_len``) makes the state static, as for every model (see
        :meth:`LanguageModel.init_state`): global caches get ``max_len // P + 2`` patch slots (``Full``)
        or ``budget + 1``, local caches ``P`` slots. The pads' target ``t = 0`` is run here, so a static
        state is ready for single-byte steps.
        """
        check_state_args(batch_size, max_len)
        if max_len is not None:
            return self._init_static_state(batch_size, cache, device, max_len)
        if cache is not None and not isinstance(cache, CachePolicy):
            raise TypeError(f"cache must be a CachePolicy such as Full(); got {type(cache).__name__}")
        if cache is not None and self.config.global_backbone != "transformer":
            raise ValueError(
                f"global_backbone={self.config.global_backbone!r} keeps a fixed-size matrix state; "
                f"a cache policy ({type(cache).__name__}) does not apply to it"
            )
        device = torch.device(device) if device is not None else self.device
        global_states = self.global_blocks.init_states(batch_size, cache=cache, device=device)
        return MegabyteState(
            layers=global_states + self.local_blocks.init_states(batch_size, device=device),
            batch_size=batch_size,
            n_global_layers=len(global_states),
            patch_size=self.config.patch_size,
            patch_ids=torch.zeros(batch_size, 0, dtype=torch.long, device=device),
        )

    def _start(self, state: MegabyteState, device: torch.device) -> None:
        """Run target ``t = 0`` (the pads): global position 0 and local position 0 of patch 0; the
        targets of patch 0 attend to it, its own prediction is dropped as in ``forward``."""
        B = state.batch_size
        zero = torch.zeros(1, dtype=torch.long, device=device)
        g_local = self._run_global(self.global_pad.expand(B, 1, -1), zero, state.global_layers)
        state.local_from_global = g_local[:, 0].clone()  # [B, P, D_L]
        local = self.local_blocks.init_states(B, device=device)
        self._run_local(self.local_pad.expand(B, 1, -1) + state.local_from_global[:, :1], zero, local)
        state.set_local(local)
        state.started = True

    def step(self, input_ids: Tensor, state: ModelState) -> tuple[Tensor, MegabyteState]:
        """Consume ``[B, T]`` new bytes (any ``T >= 1``) after ``state``; returns ``[B, T, vocab]`` logits
        (position ``j`` predicts the byte after ``input_ids[:, j]``) and the state, updated in place.

        The global model advances only over input patches completed in this call (one position each),
        the local model over the ``T`` new targets, restarting at each patch boundary; patches that
        start and end inside this call run as one local batch.
        """
        state = check_megabyte_state(state)
        self.check_step_inputs(input_ids, state)
        self.global_blocks.check_states(state.global_layers)
        self.local_blocks.check_states(state.local_layers)
        n, T = state.position, input_ids.shape[1]
        self._check_length(n + T)
        if state.static:
            return self._static_steps(input_ids, state), state
        if not state.started:
            self._start(state, input_ids.device)
        table = self._advance_global(input_ids, state)
        h = self._local_inputs(input_ids, n, table)
        logits = self._advance_local(h, n, state)
        # Copies, not views: a view would keep the whole table (and below, every id of this call) alive in the
        # state, memory that grows with the prompt and that nbytes() does not see.
        state.local_from_global = table[:, -1].clone()
        state.position = n + T
        return logits, state

    def _advance_global(self, input_ids: Tensor, state: MegabyteState) -> Tensor:
        """Run the global model over every input patch these bytes complete (patch positions ``k_cur + 1``,
        ...); returns the conditioning table ``[B, m + 1, P, D_L]`` of target patches ``k_cur .. k_cur + m``."""
        P = self.config.patch_size
        assert state.patch_ids is not None and state.local_from_global is not None
        k_cur = state.position // P  # target patch of the last target seen (t = n)
        ids_all = torch.cat([state.patch_ids, input_ids], dim=1)  # bytes k_cur*P .. n+T-1
        m = ids_all.shape[1] // P
        table = state.local_from_global[:, None]  # [B, 1, P, D_L]: patch k_cur
        if m:
            g_in = self._embed_patches(ids_all[:, : m * P], start=k_cur * P)
            positions = torch.arange(k_cur + 1, k_cur + 1 + m, device=input_ids.device)
            table = torch.cat([table, self._run_global(g_in, positions, state.global_layers)], dim=1)
        state.patch_ids = ids_all[:, m * P :].clone()
        return table

    def _local_inputs(self, input_ids: Tensor, n: int, table: Tensor) -> Tensor:
        """Local inputs ``[B, T, D_L]`` of targets ``t = n+1 .. n+T``: byte ``t - 1`` (= ``input_ids[:, j]``),
        or the pad at ``p = 0``, plus the global conditioning of ``t``'s slot in ``table``."""
        P, T = self.config.patch_size, input_ids.shape[1]
        t = torch.arange(n + 1, n + T + 1, device=input_ids.device)
        p = t % P
        emb = self.local_embed(input_ids)
        emb = torch.where((p == 0)[None, :, None], self.local_pad.to(emb.dtype), emb)
        return emb + table[:, t // P - n // P, p]

    def _advance_local(self, h: Tensor, n: int, state: MegabyteState) -> Tensor:
        """The local model over targets ``n+1 ..`` (``h`` ``[B, T, D_L]``): the rest of the current patch on
        its state, complete new patches as one stateless batch, the last new patch on fresh states (which
        become the state's). Returns ``[B, T, vocab]``."""
        P, DL = self.config.patch_size, self.config.d_local
        B, T, _ = h.shape
        device = h.device
        p = torch.arange(n + 1, n + T + 1, device=device) % P
        outs = []
        head = min(T, (n // P + 1) * P - 1 - n)  # targets left in the current patch
        if head > 0:
            outs.append(self._run_local(h[:, :head], p[:head], state.local_layers))
        rest = T - head
        if rest > 0:
            n_new = -(-rest // P)  # new patches; all but the last are complete within this call
            if n_new > 1:
                full = h[:, head : head + (n_new - 1) * P].reshape(B * (n_new - 1), P, DL)
                o = self._run_local(full, torch.arange(P, device=device), None)
                outs.append(o.reshape(B, (n_new - 1) * P, -1))
            last = h[:, head + (n_new - 1) * P :]
            local = self.local_blocks.init_states(B, device=device)
            outs.append(self._run_local(last, torch.arange(last.shape[1], device=device), local))
            state.set_local(local)
        return torch.cat(outs, dim=1)

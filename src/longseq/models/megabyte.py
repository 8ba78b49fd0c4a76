"""MEGABYTE (Yu et al. 2023, arXiv 2305.07185): a global model over byte patches, a local model per patch.

Wiring (the paper's Sec. 2.2 equations; ``P`` = patch size, ``D_G = d_global / P``, ``D_L = d_local``)::

    h_embed[j]     = E_global[x_j] + E_pos[j]                               byte j, width D_G
    g_in[0]        = pad_global                                             width P * D_G
    g_in[k]        = concat(h_embed[(k-1)P], ..., h_embed[kP - 1])          k >= 1: the *previous* patch
    g_out          = norm(global_blocks(g_in))                              [B, K, P * D_G]
    l_in[k, p]     = w_GL(g_out[k, p*D_G:(p+1)*D_G]) + (pad_local if p == 0 else E_local[x_{kP+p-1}])
    l_out[k]       = local_blocks(l_in[k, 0:P])                             each patch on its own
    p(x_t | x_<t)  = softmax(head(norm(l_out[k, p])))                       t = kP + p

Patch boundaries sit on the *target* bytes ``t``, so the global input of patch ``k`` holds every byte
before the patch's first target ``x_{kP}`` -- no "patch lag": the byte just before a patch reaches
its first target through the global path (the local input there is the pad).

longseq's convention is ``logits[:, i]`` predicts token ``i + 1``, so output ``i`` is the paper's
prediction of target ``t = i + 1``. For ``T`` input bytes the model evaluates targets ``t = 0..T``
(``K = T // P + 1`` patches; the target ``t = 0``, predicted from the pads alone, is computed -- the
targets after it attend to it -- and dropped). Exactly which bytes feed output ``i`` (target
``t = i + 1``, ``k = t // P``, ``p = t % P``):

* global path: ``x_0 .. x_{kP-1}`` -- every complete patch before target ``t``'s patch;
* local path: ``x_{kP} .. x_i`` -- the bytes of the target's patch before ``t``, byte-shifted by one
  (``p = 0``: none, the local input is the pad).

Targets past ``T`` that fill the last patch are padding: they are computed (the local model sees a
0 byte there) and sliced off before ``forward`` returns, so they never enter a loss, and causal
attention keeps them from touching real positions. The natural training window is ``T = mP - 1``
input bytes (``mP`` targets, no padding) but any ``T <= max_seq_len`` works, which strided
evaluation windows rely on.

Recurrent form: the global model advances one position per completed input patch with its own state
(KV caches under the ``cache`` policy, or GLA matrices); the local model advances one byte per
target with a fresh state at every patch boundary. ``step`` over any split equals ``forward``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..cache.kv import KVCache
from ..cache.policies import CachePolicy
from ..nn.norm import RMSNorm
from ..ops import decode_block
from ..ops.attention import causal_attention
from ..ops.rope import rope_frequencies
from .base import LanguageModel
from .config import MegabyteConfig
from .fused_step import has_hooks, head_logits
from .gla import GLABlock
from .state import ModelState
from .transformer import TransformerBlock


@dataclass
class MegabyteState(ModelState):
    """State of a :class:`MegabyteLM` after ``position`` bytes.

    ``layers`` lists the global model's layer states first (``n_global_layers`` of them: one
    :class:`KVCache` over *patch* positions, or one ``[B, H, K, V]`` GLA matrix, per layer), then the
    local model's for the current patch (reset at every patch boundary), so ``nbytes`` and
    ``kept_positions`` work as for the other models (for global layers, kept positions are patch
    indices). Besides those:

    * ``patch_ids``: ``[B, position % P]`` bytes of the input patch not yet complete (the global model
      takes a patch only once all ``P`` bytes are known);
    * ``local_from_global``: ``[B, P, D_L]`` the projected global output of the current target patch.

    A static state (``init_state(..., max_len=N)``) holds fixed buffers instead: ``patch_ids`` is
    ``[B, P]`` (byte ``n`` of a row is written at column ``n % P``), the global KV caches have
    ``N // P + 2`` patch slots (``Full``) or ``budget + 1``, the local caches ``P`` slots, and
    ``local_from_global`` is updated in place.
    """

    n_global_layers: int = 0
    patch_ids: Tensor | None = None
    local_from_global: Tensor | None = None
    started: bool = False

    def load_(self, src: ModelState, rows: int | slice | None = None) -> MegabyteState:
        """As :meth:`ModelState.load_`, plus the pending patch bytes and the current patch's global output
        (``src`` must have consumed at least one byte, or come from a static state)."""
        if not isinstance(src, MegabyteState):
            raise TypeError(f"cannot load a {type(src).__name__} into a MegabyteState")
        if not src.started:
            raise ValueError("load_() needs a started MEGABYTE state (one that has consumed at least one byte)")
        super().load_(src, rows)
        from .state import _as_rows

        rows = _as_rows(rows, self.batch_size)
        assert self.patch_ids is not None and self.local_from_global is not None
        assert src.patch_ids is not None and src.local_from_global is not None
        self.patch_ids[rows, : src.patch_ids.shape[1]] = src.patch_ids
        self.local_from_global[rows] = src.local_from_global
        return self

    @property
    def global_layers(self) -> list[Any]:
        return self.layers[: self.n_global_layers]

    @property
    def local_layers(self) -> list[Any]:
        return self.layers[self.n_global_layers :]

    def nbytes(self) -> int:
        """Bytes held by the global and local layer states plus the pending patch and global slices."""
        total = super().nbytes()
        for t in (self.patch_ids, self.local_from_global):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def to(self, device: torch.device | str) -> MegabyteState:
        super().to(device)
        if self.patch_ids is not None:
            self.patch_ids = self.patch_ids.to(device)
        if self.local_from_global is not None:
            self.local_from_global = self.local_from_global.to(device)
        return self


def _make_block(backbone: str, cfg: Any) -> nn.Module:
    return TransformerBlock(cfg) if backbone == "transformer" else GLABlock(cfg)


# -- stateless fast path of the Transformer blocks (training / full-sequence forward) ----------------------
# ``TransformerBlock.forward`` with ``cache=None`` computed with fewer memory passes, same math:
# * local blocks: RoPE folded into the qkv weight. Every local position is an in-patch position
#   ``p < P``, so ``rope_p(W_q x) = (R_p W_q) x`` with ``R_p`` the rotation of position ``p``: one
#   ``[L, 3d, d]`` weight (``L <= P`` copies, rotated in at least fp32) and a batched matmul over the
#   positions replace the fp32 rotation of every query and key (~40 bytes of memory traffic per q/k
#   element in the forward alone; about a fifth of the non-matmul traffic of a paper95m training step).
# The global blocks keep the module's RoPE (a patch position can be anything up to max_seq_len / P).
def _rope_angles(head_dim: int, theta: float, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``cos, sin`` ``[L, D/2]`` of :class:`~longseq.nn.rotary.RotaryEmbedding` (same float64 frequencies)."""
    angles = positions.to(dtype)[:, None] * rope_frequencies(head_dim, theta, positions.device, dtype)
    return angles.cos(), angles.sin()


def _rope_folded_qkv_weight(block: TransformerBlock, positions: Tensor) -> Tensor:
    """``[L, (H + 2 H_kv) D, d]``: the qkv weight with the RoPE rotation of ``positions[j]`` folded into
    the query and key rows of copy ``j`` ("rotate half": rows ``i`` and ``i + D/2`` of each head)."""
    attn = block.attn
    w = attn.qkv.weight  # [(H + 2 H_kv) D, d]
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    dtype = torch.promote_types(w.dtype, torch.float32)
    cos, sin = _rope_angles(D, attn.rope.theta, positions, dtype)
    cos, sin = cos[:, None, :, None], sin[:, None, :, None]  # [L, 1, D/2, 1]
    w_qk = w[: (H + Hkv) * D].to(dtype).view(H + Hkv, 2, D // 2, -1)
    w1, w2 = w_qk[:, 0], w_qk[:, 1]  # [H + H_kv, D/2, d]
    rotated = torch.stack([w1 * cos - w2 * sin, w2 * cos + w1 * sin], dim=2)  # [L, H + H_kv, 2, D/2, d]
    L = positions.shape[0]
    w_v = w[(H + Hkv) * D :].to(dtype).expand(L, -1, -1)
    return torch.cat([rotated.reshape(L, (H + Hkv) * D, -1), w_v], dim=1).to(w.dtype)


def _local_fused_step(block: TransformerBlock, h: Tensor, p: Tensor, cache: KVCache) -> Tensor:
    """One local byte per row through the fused kernels: ``block(h, p[:, None], cache)[0]`` after the
    cache's restart at ``p == 0`` (slot ``j`` of the patch-local cache holds in-patch position ``j``, so
    RoPE, the cache write and attention over slots ``0..p`` are one kernel). h: ``[B, 1, D_L]``."""
    attn = block.attn
    assert cache.k is not None and cache.v is not None
    x = h[:, 0]
    qkv = decode_block.norm_linear(x, attn.qkv.weight, block.attn_norm.weight, block.attn_norm.eps)
    o = decode_block.patch_attention(qkv, p, cache.k, cache.v, cache.slot_pos, attn.n_heads, attn.n_kv_heads,
                                     attn.rope.inv_freq_fp32(x.device))
    cache.count_written(1)
    x = decode_block.linear_residual(o, attn.out.weight, x)
    a = decode_block.norm_swiglu(x, block.mlp_norm.weight, block.mlp_norm.eps, block.mlp.gate_up.weight)
    return decode_block.linear_residual(a, block.mlp.down.weight, x)[:, None]


def _transformer_block_fast(block: TransformerBlock, h: Tensor, positions: Tensor, fold_rope: bool,
                            sdpa_backends: list[SDPBackend] | None) -> Tensor:
    """``block(h, positions, None)[0]`` for ``h`` ``[N, L, d]``, ``positions`` ``[L]``."""
    attn = block.attn
    N, L, _ = h.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    x = block.attn_norm(h)
    if fold_rope:
        # [L, N, d] @ [L, d, 3d]: the transposed view of x is a valid cuBLAS operand (no copy).
        qkv = torch.bmm(x.transpose(0, 1), _rope_folded_qkv_weight(block, positions).transpose(1, 2))
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)  # [L, N, *]
        q = q.view(L, N, H, D).permute(1, 2, 0, 3)  # [N, H, L, D]
        k = k.view(L, N, Hkv, D).permute(1, 2, 0, 3)
        v = v.view(L, N, Hkv, D).permute(1, 2, 0, 3)
    else:
        q, k, v = attn.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = attn.rope(q.view(N, L, H, D).transpose(1, 2), positions)
        k = attn.rope(k.view(N, L, Hkv, D).transpose(1, 2), positions)
        v = v.view(N, L, Hkv, D).transpose(1, 2)
    if sdpa_backends is None:
        o = causal_attention(q, k, v)
    else:
        with sdpa_kernel(sdpa_backends):
            o = causal_attention(q, k, v)
    h = h + attn.out(o.transpose(1, 2).reshape(N, L, H * D))
    return h + block.mlp(block.mlp_norm(h))


class MegabyteLM(LanguageModel):
    """MEGABYTE byte-level language model with a pluggable global (and local) backbone.

    ``forward``: ``[B, T]`` byte ids -> ``[B, T, 256]`` logits, ``logits[:, i]`` predicting byte
    ``i + 1``; internally the global model runs on ``[B, K, d_global]`` (``K = T // P + 1`` patches)
    and the local model on ``[B * K, P, d_local]``. See the module docstring for the exact wiring.
    """

    config: MegabyteConfig

    #: Stateless Transformer blocks (``forward``, whole patches in ``step``) run through the fast path
    #: above (RoPE folded into the local qkv weight); ``False`` calls the blocks as modules.
    #: Both compute the same function (tests compare them). Blocks with forward hooks always go through
    #: the module call.
    fast_stateless: bool = True
    #: SDPA backends for the local model's attention (``L <= P`` keys per patch), e.g.
    #: ``[SDPBackend.EFFICIENT_ATTENTION]``; ``None``: PyTorch's choice. A plain attribute, not config.
    local_sdpa_backends: list[SDPBackend] | None = None

    def __init__(self, config: MegabyteConfig) -> None:
        # LanguageModel.__init__ builds one embedding/stack/head of width d_model; MEGABYTE has two
        # stacks of different widths, so it builds its own modules and reuses the rest of the API.
        nn.Module.__init__(self)
        self.config = config
        V, P, DG, DL = config.vocab_size, config.patch_size, config.byte_dim, config.d_local
        gcfg, lcfg = config.global_config(), config.local_config()
        # Global path.
        self.global_embed = nn.Embedding(V, DG)
        self.pos_embed = nn.Embedding(config.max_seq_len, DG)
        self.global_pad = nn.Parameter(torch.empty(P * DG))
        self.global_blocks = nn.ModuleList(
            _make_block(config.global_backbone, gcfg) for _ in range(config.n_global_layers)
        )
        self.global_norm = RMSNorm(config.d_global, eps=config.norm_eps)
        self.global_to_local = nn.Linear(DG, DL, bias=False)  # the paper's w^GL, shared by the P slices
        # Local path.
        self.local_embed = nn.Embedding(V, DL)
        self.local_pad = nn.Parameter(torch.empty(DL))
        self.local_blocks = nn.ModuleList(
            _make_block(config.local_backbone, lcfg) for _ in range(config.n_local_layers)
        )
        self.norm = RMSNorm(DL, eps=config.norm_eps)
        self.head = nn.Linear(DL, V, bias=False)
        self._finish_init()

    # -- construction -----------------------------------------------------------------------------
    def _finish_init(self) -> None:
        cfg = self.config
        std = cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.global_pad, mean=0.0, std=std)
        nn.init.normal_(self.local_pad, mean=0.0, std=std)
        # GPT-2 style depth scaling of the residual-writing projections, per stack (each stack is its
        # own residual stream).
        for prefix, depth in (("global_blocks.", cfg.n_global_layers), ("local_blocks.", cfg.n_local_layers)):
            for name, p in self.named_parameters():
                if name.startswith(prefix) and name.endswith(("out.weight", "down.weight")):
                    nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * depth))
        if cfg.tie_embeddings:
            self.head.weight = self.local_embed.weight

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (tied weights counted once); optionally without the byte and
        position embedding tables."""
        params = {id(p): p for p in self.parameters()}
        n = sum(p.numel() for p in params.values())
        if exclude_embeddings:
            tables = {id(m.weight): m.weight for m in (self.global_embed, self.pos_embed, self.local_embed)}
            n -= sum(p.numel() for p in tables.values())
        return n

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

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

    def _run_global(self, h: Tensor, positions: Tensor, states: list[Any] | None) -> tuple[Tensor, list[Any]]:
        """Global blocks over ``[B, K, d_global]`` at patch ``positions`` ``[K]``; returns the projected
        per-byte conditioning ``[B, K, P, D_L]`` (``w_GL`` applied to each of the P slices of width
        D_G) and the new layer states."""
        new_states = []
        for i, block in enumerate(self.global_blocks):
            if states is None and self._fast(block):
                h, s = _transformer_block_fast(block, h, positions, False, None), None
            else:
                h, s = block(h, positions, None if states is None else states[i])
            new_states.append(s)
        h = self.global_norm(h)
        B, K, _ = h.shape
        return self.global_to_local(h.view(B, K, self.config.patch_size, self.config.byte_dim)), new_states

    def _run_local(self, h: Tensor, positions: Tensor, states: list[Any] | None) -> tuple[Tensor, list[Any]]:
        """Local blocks over ``[N, L, D_L]`` (N independent patches, L <= P bytes each) at in-patch
        ``positions`` ``[L]``; returns ``[N, L, vocab]`` logits and the new layer states."""
        new_states = []
        for i, block in enumerate(self.local_blocks):
            if states is None and self._fast(block):
                h, s = _transformer_block_fast(block, h, positions, True, self.local_sdpa_backends), None
            else:
                h, s = block(h, positions, None if states is None else states[i])
            new_states.append(s)
        return self.head(self.norm(h)), new_states

    def _fast(self, block: nn.Module) -> bool:
        # A replaced qkv (e.g. a LoRA wrapper) would be bypassed by the folded weight: module path then.
        return (
            self.fast_stateless
            and isinstance(block, TransformerBlock)
            and type(block.attn.qkv) is nn.Linear
            and not has_hooks(block)
        )

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
        g_local, _ = self._run_global(g_in, torch.arange(K, device=device), None)  # [B, K, P, D_L]
        # Local: target t gets byte t - 1 (prev[:, t] = x_{t-1}), the pad at every patch start.
        prev = F.pad(input_ids, (1, K * P - 1 - T))  # [B, K*P]; the 0s are never a real prev byte
        l_in = self.local_embed(prev).view(B, K, P, DL)
        l_in = torch.cat([self.local_pad.to(l_in.dtype).expand(B, K, 1, DL), l_in[:, :, 1:]], dim=2)
        h = (l_in + g_local).reshape(B * K, P, DL)
        logits, _ = self._run_local(h, torch.arange(P, device=device), None)
        # Output i is target t = i + 1: drop target 0 and the padding targets past T.
        return logits.reshape(B, K * P, -1)[:, 1 : T + 1]

    # -- recurrent form ------------------------------------------------------------------------------
    def _state_dtype(self) -> torch.dtype:
        return torch.promote_types(self.head.weight.dtype, torch.float32)

    def _fresh_layer_state(self, block: nn.Module, backbone: str, batch_size: int, cache: Any,
                           device: torch.device) -> Any:
        if backbone == "transformer":
            return KVCache(cache)
        attn = block.attn
        return torch.zeros(batch_size, attn.n_heads, attn.head_k, attn.head_v, device=device,
                           dtype=self._state_dtype())

    def _fresh_local_states(self, batch_size: int, device: torch.device) -> list[Any]:
        return [self._fresh_layer_state(b, self.config.local_backbone, batch_size, None, device)
                for b in self.local_blocks]

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
        if max_len is not None:
            return self._init_static_state(batch_size, cache, device, max_len)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if cache is not None and not isinstance(cache, CachePolicy):
            raise TypeError(f"cache must be a CachePolicy such as Full(); got {type(cache).__name__}")
        if cache is not None and self.config.global_backbone != "transformer":
            raise ValueError(
                f"global_backbone={self.config.global_backbone!r} keeps a fixed-size matrix state; "
                f"a cache policy ({type(cache).__name__}) does not apply to it"
            )
        device = torch.device(device) if device is not None else self.device
        global_states = [self._fresh_layer_state(b, self.config.global_backbone, batch_size, cache, device)
                         for b in self.global_blocks]
        return MegabyteState(
            layers=global_states + self._fresh_local_states(batch_size, device),
            batch_size=batch_size,
            n_global_layers=len(global_states),
            patch_ids=torch.zeros(batch_size, 0, dtype=torch.long, device=device),
        )

    def _init_static_state(
        self, batch_size: int, cache: CachePolicy | None, device: torch.device | str | None, max_len: int
    ) -> MegabyteState:
        self._check_length(max_len)
        dynamic = self.init_state(batch_size, cache=cache, device=device)
        device = torch.device(device) if device is not None else self.device
        self._start(dynamic, device)  # target t = 0, then copied into the static buffers below
        P = self.config.patch_size
        static = self.init_state(batch_size, cache=cache, device=device)
        self._make_static(static, list(self.global_blocks), max_len, max_len // P + 2, device)
        # Local caches: one patch of P targets (Full: slot p holds in-patch position p).
        static.layers[static.n_global_layers :] = self._fresh_local_states(batch_size, device)
        local_blocks = [None] * static.n_global_layers + list(self.local_blocks)
        self._make_static(static, local_blocks, max_len, P, device)
        static.patch_ids = torch.zeros(batch_size, P, dtype=torch.long, device=device)
        static.local_from_global = torch.zeros(
            batch_size, P, self.config.d_local, dtype=self.head.weight.dtype, device=device
        )
        static.started = True
        return static.load_(dynamic)

    def _state_dtype_for_cache(self) -> torch.dtype:
        return self.head.weight.dtype

    def decode_key(self, state: ModelState) -> bool:
        """True when, in the next single-byte step, some row completes an input patch (so the global
        model runs, for those rows); the two kinds of step are two different graphs."""
        assert state.host_positions is not None
        P = self.config.patch_size
        return any((n + 1) % P == 0 for n in state.host_positions)

    def _static_byte_step(self, input_ids: Tensor, state: MegabyteState) -> Tensor:
        """One byte per row on a static state; rows may be at different positions ``n`` (``[B]``).

        The byte is written into the pending patch (column ``n % P``). Rows whose byte completes a patch
        (target ``t = n + 1`` with ``t % P == 0``) advance the global model by one patch position and
        restart the local model; the others leave the global state untouched (masked writes), so the
        step is one fixed computation whatever the rows' phases. Whether the global model runs at all
        is decided on the host from ``host_positions`` (:meth:`decode_key`).
        """
        assert state.positions is not None and state.patch_ids is not None
        assert state.local_from_global is not None
        B = input_ids.shape[0]
        P, DG, DL = self.config.patch_size, self.config.byte_dim, self.config.d_local
        device = input_ids.device
        n = state.positions  # [B]
        x = input_ids[:, 0]
        state.patch_ids.scatter_(1, (n % P)[:, None], x[:, None])
        t = n + 1
        p = t % P  # in-patch position of the target
        completes = p == 0  # [B]
        if self.decode_key(state):
            k_cur = n // P
            byte_pos = (k_cur * P)[:, None] + torch.arange(P, device=device)  # [B, P]
            g_in = (self.global_embed(state.patch_ids) + self.pos_embed(byte_pos)).reshape(B, 1, P * DG)
            h = g_in
            for i, block in enumerate(self.global_blocks):
                layer = state.layers[i]
                if isinstance(layer, KVCache):
                    layer.row_mask = completes
                try:
                    if isinstance(layer, KVCache) and isinstance(block, TransformerBlock) and block.can_fuse_step(h):
                        h, new = block.fused_step(h, (k_cur + 1)[:, None], layer), layer
                    else:
                        h, new = block(h, (k_cur + 1)[:, None], layer)
                finally:
                    if isinstance(layer, KVCache):
                        layer.row_mask = None
                if isinstance(layer, Tensor):
                    layer.copy_(torch.where(completes[:, None, None, None], new, layer))
            g_local = self.global_to_local(self.global_norm(h).view(B, P, DG))  # [B, P, D_L]
            state.local_from_global.copy_(torch.where(completes[:, None, None], g_local, state.local_from_global))
        emb = self.local_embed(x)  # [B, D_L]
        emb = torch.where(completes[:, None], self.local_pad.to(emb.dtype), emb)
        cond = state.local_from_global.gather(1, p[:, None, None].expand(B, 1, DL))  # [B, 1, D_L]
        h = emb[:, None] + cond
        for j, block in enumerate(self.local_blocks):
            layer = state.layers[state.n_global_layers + j]
            if self._local_step_fusable(block, layer, h):
                # The kernel restarts the cache itself (slots after p read as empty).
                h = _local_fused_step(block, h, p, layer)
                continue
            # A new patch restarts the local model (rows with p == 0).
            if isinstance(layer, KVCache):
                assert layer.slot_pos is not None
                layer.slot_pos.masked_fill_(completes[:, None, None], -1)
            else:
                layer.masked_fill_(completes[:, None, None, None], 0.0)
            h, new = block(h, p[:, None], layer)
            if isinstance(layer, Tensor) and new is not layer:
                layer.copy_(new)
        state.positions += 1
        state.advance_(1)
        return head_logits(self.norm, self.head, h)

    def _local_step_fusable(self, block: nn.Module, layer: Any, h: Tensor) -> bool:
        """Whether a local layer's step may take :func:`_local_fused_step`: a fusable Transformer block
        (:meth:`TransformerBlock.can_fuse_step`) over a static ``Full`` cache of one patch in ``h``'s dtype
        with a power-of-two head dim."""
        if not (isinstance(block, TransformerBlock) and isinstance(layer, KVCache) and layer.static):
            return False
        if layer.budget is not None or layer.k is None or layer.k.shape[2] != self.config.patch_size:
            return False
        D = block.attn.head_dim
        return layer.k.dtype == h.dtype and D & (D - 1) == 0 and block.can_fuse_step(h)

    def _set_local(self, state: MegabyteState, local_states: list[Any]) -> None:
        state.layers = state.layers[: state.n_global_layers] + list(local_states)

    def _start(self, state: MegabyteState, device: torch.device) -> None:
        """Run target ``t = 0`` (the pads): global position 0 and local position 0 of patch 0; the
        targets of patch 0 attend to it, its own prediction is dropped as in ``forward``."""
        B = state.batch_size
        g_in = self.global_pad.expand(B, 1, -1)
        g_local, new_global = self._run_global(g_in, torch.zeros(1, dtype=torch.long, device=device),
                                               state.global_layers)
        state.layers[: state.n_global_layers] = new_global
        state.local_from_global = g_local[:, 0]  # [B, P, D_L]
        h = self.local_pad.expand(B, 1, -1) + state.local_from_global[:, :1]
        _, local = self._run_local(h, torch.zeros(1, dtype=torch.long, device=device),
                                   self._fresh_local_states(B, device))
        self._set_local(state, local)
        state.started = True

    def step(self, input_ids: Tensor, state: ModelState) -> tuple[Tensor, MegabyteState]:
        """Consume ``[B, T]`` new bytes (any ``T >= 1``) after ``state``; returns ``[B, T, vocab]`` logits
        (position ``j`` predicts the byte after ``input_ids[:, j]``) and the state, updated in place.

        The global model advances only over input patches completed in this call (one position each),
        the local model over the ``T`` new targets, restarting at each patch boundary; patches that
        start and end inside this call run as one local batch.
        """
        if not isinstance(state, MegabyteState):
            raise TypeError(f"state must come from MegabyteLM.init_state; got {type(state).__name__}")
        self.check_step_inputs(input_ids, state)
        B, T = input_ids.shape
        n = state.position
        self._check_length(n + T)
        if state.static:
            if T > 1:
                logits = [self._static_byte_step(input_ids[:, j : j + 1], state)[:, 0] for j in range(T)]
                return torch.stack(logits, 1), state
            return self._static_byte_step(input_ids, state), state
        P, DL = self.config.patch_size, self.config.d_local
        device = input_ids.device
        if not state.started:
            self._start(state, device)
        k_cur = n // P  # target patch of the last target seen (t = n)

        # Global: every input patch completed by these bytes becomes global position k_cur + 1, ...
        ids_all = torch.cat([state.patch_ids, input_ids], dim=1)  # bytes k_cur*P .. n+T-1
        m = ids_all.shape[1] // P
        table = state.local_from_global[:, None]  # [B, 1, P, D_L]: patch k_cur
        if m:
            g_in = self._embed_patches(ids_all[:, : m * P], start=k_cur * P)
            positions = torch.arange(k_cur + 1, k_cur + 1 + m, device=device)
            g_local, new_global = self._run_global(g_in, positions, state.global_layers)
            state.layers[: state.n_global_layers] = new_global
            table = torch.cat([table, g_local], dim=1)  # [B, m + 1, P, D_L]: patches k_cur .. k_cur + m
        state.patch_ids = ids_all[:, m * P :]

        # Local inputs of targets t = n+1 .. n+T: byte t-1 (= input_ids[:, j]) or the pad at p = 0.
        t = torch.arange(n + 1, n + T + 1, device=device)
        p = t % P
        emb = self.local_embed(input_ids)
        emb = torch.where((p == 0)[None, :, None], self.local_pad.to(emb.dtype), emb)
        h = emb + table[:, t // P - k_cur, p]  # [B, T, D_L]

        outs = []
        head = min(T, (k_cur + 1) * P - 1 - n)  # targets left in the current patch
        if head > 0:
            o, local = self._run_local(h[:, :head], p[:head], state.local_layers)
            self._set_local(state, local)
            outs.append(o)
        rest = T - head
        if rest > 0:
            n_new = -(-rest // P)  # new patches; all but the last are complete within this call
            if n_new > 1:
                full = h[:, head : head + (n_new - 1) * P].reshape(B * (n_new - 1), P, DL)
                o, _ = self._run_local(full, torch.arange(P, device=device), None)
                outs.append(o.reshape(B, (n_new - 1) * P, -1))
            last = h[:, head + (n_new - 1) * P :]
            o, local = self._run_local(last, torch.arange(last.shape[1], device=device),
                                       self._fresh_local_states(B, device))
            self._set_local(state, local)
            outs.append(o)
        state.local_from_global = table[:, -1]
        state.position = n + T
        return torch.cat(outs, dim=1), state

"""A transformers ``Cache`` that bounds the KV cache of HF models with any longseq policy.

Usage::

    from longseq.cache import TOVA
    import longseq.hf
    out = model.generate(**inputs, past_key_values=longseq.hf.cache(model, TOVA(512)), max_new_tokens=2048)

How it plugs into transformers (no model source is touched)
-----------------------------------------------------------
HF attention layers compute ``q, k, v``, apply RoPE, call ``past_key_values.update(k, v, layer_idx)`` and hand
the query and whatever ``update`` returned to the function registered for ``config._attn_implementation``.
:func:`cache` registers two functions under the name ``"longseq"`` and switches the model to it:

* an attention function (``AttentionInterface``) that passes ``q`` and the *new* ``k, v`` (after RoPE) to the
  layer's longseq :class:`~longseq.cache.KVCache`, which stores them, attends over what it keeps and applies
  the policy -- exactly what longseq's own ``Attention`` layer does. ``update`` only returns the new keys and
  names the layer for the attention call that follows (a thread-local hand-over, since the attention
  function is not given the cache);
* a mask function (``AttentionMaskInterface``) that, for a :class:`LongseqCache`, returns just the validity of
  the new tokens, ``[B, T]`` bool (``None``: all valid), taken from the 2-D ``attention_mask`` -- never a
  ``T x T`` or ``T x cache`` mask. For any other cache (or none) it builds SDPA's usual mask and the attention
  function falls back to SDPA, so the model keeps working without a longseq cache.

Semantics (the same as longseq's models)
----------------------------------------
* Eviction is exact per token, prompts included (``KVCache.attend`` processes a prefill token by token once
  the cache is full).
* Keys are stored after RoPE with their original positions as metadata. A row's positions count its *valid*
  tokens (``0, 1, 2, ...`` after its left padding), which is what ``generate`` passes as ``position_ids``.
* Padding is never stored, attended to or scored: a batch whose new tokens include padding is processed row
  by row (one ``KVCache`` per row, fed only that row's valid tokens). Once every row of a bounded cache is
  full the rows are merged into one batched ``KVCache`` (their slot layouts then agree), so steady-state
  decoding of a left-padded batch is batched again. ``Full()`` with padding stays row by row.
* ``get_seq_length()`` counts every token fed so far, padding included -- what ``generate`` uses to place
  new tokens in the 2-D attention mask -- while each layer keeps at most ``budget`` tokens.

Layouts: HF passes ``q`` as ``[B, H, T, D]``, ``k, v`` as ``[B, H_kv, T, D]``; the attention function returns
``[B, T, H, D]`` as every HF attention function does.

Not supported (clear errors): assisted decoding / ``crop`` (evicted tokens cannot be restored), attention
dropout in training mode, custom 4-D masks; and, refused by :func:`cache` before the model is switched, logit
soft-capping and attention sinks parameters (Gemma 2, GPT-OSS), value heads of another size than key heads
(DeepSeek-V2/V3), linear-attention hybrids, models whose attention does not go through ``AttentionInterface``
(Falcon, GPT-J, Bloom, CodeGen). Models with a *sliding window* (Mistral v0.1, Qwen2 with
``use_sliding_window``) get the policy over all tokens instead of their window (a warning says so).
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import torch
from torch import Tensor

from ..cache.kv import KVCache
from ..cache.policies import CachePolicy, Full, parse_policy
from ._deps import require_transformers

require_transformers()

from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402
from transformers.modeling_utils import AttentionInterface  # noqa: E402

ATTN_IMPLEMENTATION = "longseq"

# Per-thread hand-over between ``LongseqCache.update`` (which knows the layer index) and the attention
# function (which gets the module but not the cache), and between ``get_mask_sizes`` and the mask function.
_LOCAL = threading.local()

def _pending() -> dict[int, LongseqLayer]:
    layers = getattr(_LOCAL, "layers", None)
    if layers is None:
        layers = _LOCAL.layers = {}
    return layers


class LongseqLayer(CacheLayerMixin):
    """The cache of one HF attention layer: a longseq :class:`KVCache` (batched) or one per row (padding).

    ``keys`` / ``values`` stay ``None``: the tokens live in the KVCache(s), in their unordered slots.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, policy: CachePolicy) -> None:
        super().__init__()
        self.policy = policy
        self.batched: KVCache | None = None  # all rows in one KVCache (no padding seen, or merged)
        self.rows: list[KVCache] | None = None  # one single-row KVCache per batch row
        self.next_pos: Tensor | None = None  # [B] int64: position of each row's next valid token
        self.seen = 0  # tokens fed, padding included (HF's notion of sequence length)
        self.handed_over = False  # update() gave keys to the attention function, which has not taken them yet
        self.is_initialized = False  # set by transformers 5's mixin too; 4.56's does not have it

    def __repr__(self) -> str:
        mode = "rows" if self.rows is not None else "batched"
        return f"LongseqLayer({self.policy.spec}, seen={self.seen}, {mode})"

    # -- the CacheLayerMixin API -------------------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor | None = None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Return the new keys/values unchanged: the attention function stores them (it also needs ``q``)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int | Tensor) -> tuple[int, int]:
        # transformers < 5 passes the new tokens' cache_position tensor instead of their count.
        if isinstance(query_length, Tensor):
            query_length = query_length.shape[0]
        # Announce to the mask function (called next by masking_utils) that this mask is for a longseq
        # cache, so it returns the [B, T] validity of the new tokens instead of a [B, 1, T, S] mask.
        _LOCAL.mask_request = (int(query_length), self.seen)
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1  # no length limit: positions grow without bound while at most `budget` tokens are kept

    def get_max_cache_shape(self) -> int:
        return -1  # as get_max_length (the name transformers 4.56 asks for)

    def reset(self) -> None:
        self.batched, self.rows, self.next_pos, self.seen, self.handed_over = None, None, None, 0, False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a longseq cache cannot be cropped (evicted tokens cannot be restored); assisted/speculative "
            "decoding is not supported with it"
        )

    def _select(self, index: list[int]) -> None:
        """Keep / reorder / repeat batch rows (beam search, ``num_return_sequences``)."""
        if self.next_pos is None:
            return
        if self.batched is not None:
            self.batched = self.batched.select_rows(index)
        if self.rows is not None:
            self.rows = [self.rows[i].select_rows([0]) for i in index]
        self.next_pos = self.next_pos[torch.tensor(index, device=self.next_pos.device)]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.next_pos is not None:
            self._select([b for b in range(self.next_pos.shape[0]) for _ in range(repeats)])

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(torch.as_tensor(indices).tolist())

    # -- attention ---------------------------------------------------------------------------------
    def attend(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None) -> Tensor:
        """Store the new tokens, attend, apply the policy.

        Args:
            q: ``[B, H, T, D]``; k, v: ``[B, H_kv, T, D]`` (after RoPE); valid: ``[B, T]`` bool, False for
                padding (None: all valid).
        Returns:
            ``[B, H, T, D]`` (zeros at padding positions).
        """
        B, _, T, _ = q.shape
        if self.next_pos is None:
            self.next_pos = torch.zeros(B, dtype=torch.long, device=q.device)
        elif self.next_pos.shape[0] != B:
            raise ValueError(
                f"batch size changed from {self.next_pos.shape[0]} to {B} within one longseq cache; "
                "make a new cache (longseq.hf.cache(model, policy)) for a new batch"
            )
        elif not torch.is_inference_mode_enabled() and self._has_inference_tensors():
            self._own_tensors()
        if valid is None and self.rows is None:
            if self.batched is None:
                self.batched = KVCache(self.policy)
            positions = self.next_pos[:, None] + torch.arange(T, device=q.device)  # [B, T]
            out = self.batched.attend(q, k, v, positions)
            self.next_pos += T
        else:
            out = self._attend_rows(q, k, v, valid)
        self.seen += T
        return out

    def _has_inference_tensors(self) -> bool:
        """Whether a call under ``torch.inference_mode()`` made some of the tensors (a KVCache allocates all its
        buffers at once, so its keys tell)."""
        caches = self.rows if self.rows is not None else [self.batched]
        return bool(self.next_pos is not None and self.next_pos.is_inference()) or any(
            c is not None and c.k is not None and c.k.is_inference() for c in caches
        )

    def _own_tensors(self) -> None:
        """Copy tensors made under ``torch.inference_mode()`` (a prefill there, decoding outside it, as with
        HF's DynamicCache): outside inference mode they cannot be updated in place."""
        assert self.next_pos is not None
        self.next_pos = self.next_pos.clone()
        if self.batched is not None:
            self.batched = self.batched.select_rows(list(range(self.next_pos.shape[0])))
        if self.rows is not None:
            self.rows = [r.select_rows([0]) for r in self.rows]

    def _attend_rows(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None) -> Tensor:
        """Row by row, each row's KVCache fed only that row's valid tokens (padding is never stored)."""
        assert self.next_pos is not None
        B, H, T, D = q.shape
        if self.rows is None:
            self.rows = (
                [self.batched.select_rows([b]) for b in range(B)]
                if self.batched is not None
                else [KVCache(self.policy) for _ in range(B)]
            )
            self.batched = None
        counts = [T] * B if valid is None else valid.sum(-1).tolist()  # one host sync per layer call
        out = q.new_zeros(B, H, T, D)
        for b, n in enumerate(counts):
            if n == 0:
                continue
            # Left padding makes the valid tokens a suffix: slice (a view) rather than gather when we can.
            idx: slice | Tensor = slice(T - n, T)
            if n != T and not _is_suffix(valid, b, n):
                idx = valid[b].nonzero()[:, 0]  # type: ignore[index]
            positions = self.next_pos[b] + torch.arange(n, device=q.device)
            out[b : b + 1, :, idx] = self.rows[b].attend(
                q[b : b + 1, :, idx], k[b : b + 1, :, idx], v[b : b + 1, :, idx], positions
            )
        self.next_pos += torch.tensor(counts, device=self.next_pos.device)
        budget = self.policy.budget
        if budget is not None and all(len(r) == budget for r in self.rows):
            # Every row is full: equal lengths and capacity, so the slot layouts agree and one batched KVCache
            # (per-row positions, per-row free slots) continues exactly where the rows left off.
            self.batched, self.rows = KVCache.concat(self.rows), None
        return out

    # -- inspection --------------------------------------------------------------------------------
    def kept_positions(self, row: int | None = None) -> Tensor:
        """Original positions kept (temporal order): ``[B, n]`` / ``[B, H_kv, n]`` (per-head policies), or
        ``[1, ...]`` for one ``row``. Rows kept separately (padding) with different counts need ``row``."""
        if self.rows is not None:
            if row is not None:
                return self.rows[row].kept_positions()
            kept = [r.kept_positions() for r in self.rows]
            if len({t.shape for t in kept}) != 1:
                raise ValueError("rows of this padded batch keep different numbers of tokens; pass row=")
            return torch.cat(kept)
        if self.batched is None:
            return torch.empty(0, 0, dtype=torch.long)
        kept = self.batched.kept_positions()
        return kept if row is None else kept[row : row + 1]

    def nbytes(self) -> int:
        """Bytes of the kept tokens' keys, values, positions (and H2O scores), all rows."""
        caches = self.rows if self.rows is not None else ([self.batched] if self.batched is not None else [])
        return sum(c.nbytes() for c in caches)


def _is_suffix(valid: Tensor | None, b: int, n: int) -> bool:
    """Whether row ``b``'s ``n`` valid tokens are exactly its last ``n`` (left padding)."""
    assert valid is not None
    return bool(valid[b, valid.shape[1] - n :].all())


class LongseqCache(Cache):
    """A transformers ``Cache`` with one :class:`LongseqLayer` per decoder layer, all under ``policy``.

    Make it with :func:`cache` (which also switches the model's attention to ``"longseq"``). One cache
    serves one ``generate`` call / one batch, like HF's ``DynamicCache``. ``config`` is the model's config:
    every update checks that its attention implementation is still ``"longseq"``, since any other attention
    would see only the new tokens.
    """

    def __init__(self, policy: CachePolicy, num_layers: int, config: Any = None) -> None:
        if not isinstance(policy, CachePolicy):
            raise TypeError(
                f"policy must be a longseq CachePolicy such as TOVA(512); got {type(policy).__name__}"
            )
        if not hasattr(config, "_attn_implementation"):
            raise TypeError(
                "LongseqCache needs the model's config (config=model.config) to check that the model attends "
                f"through longseq; got {type(config).__name__}. Make the cache with longseq.hf.cache(model, policy)"
            )
        super().__init__(layers=[LongseqLayer(policy) for _ in range(num_layers)])
        self.policy = policy
        self._config = config

    def __repr__(self) -> str:
        return f"LongseqCache({self.policy.spec}, layers={len(self.layers)}, seen={self.get_seq_length()})"

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if self._config._attn_implementation != ATTN_IMPLEMENTATION:
            raise RuntimeError(
                f"a LongseqCache needs the model's attention implementation {ATTN_IMPLEMENTATION!r}, "
                f"but it is {self._config._attn_implementation!r}; make the cache with "
                "longseq.hf.cache(model, policy)"
            )
        layer = self.layers[layer_idx]
        if layer.handed_over:  # type: ignore[union-attr]
            # Its previous keys never reached longseq's attention function: that layer attended over the new
            # tokens alone and its KVCache missed them, so this cache no longer matches the sequence. The
            # hand-overs left behind must not reach a later attention call either.
            _pending().clear()
            raise RuntimeError(
                f"layer {layer_idx} of this LongseqCache got new keys, but its previous ones never reached "
                f"longseq's attention (the model's attention modules do not call the {ATTN_IMPLEMENTATION!r} "
                "implementation, or a forward was interrupted); make a new cache with longseq.hf.cache(model, "
                "policy)"
            )
        keys, values = layer.update(key_states, value_states)
        layer.handed_over = True  # type: ignore[union-attr]
        _pending()[layer_idx] = layer  # type: ignore[assignment]
        return keys, values

    def kept_positions(self, layer: int, row: int | None = None) -> Tensor:
        """Original positions kept by ``layer``: ``[B, n]``, ``[B, H_kv, n]`` per head, or one ``row``."""
        return self.layers[layer].kept_positions(row)  # type: ignore[union-attr]

    def nbytes(self) -> int:
        """Bytes held by all layers (tensor storage of the kept tokens)."""
        return sum(layer.nbytes() for layer in self.layers)  # type: ignore[union-attr]


# -- the registered attention and mask functions -----------------------------------------------------
def longseq_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """HF attention function: ``query [B, H, T, D]``, ``key/value [B, H_kv, T, D]`` -> ``[B, T, H, D]``, None.

    With a :class:`LongseqCache` the layer's KVCache does the attention (``attention_mask`` is then the
    ``[B, T]`` validity of the new tokens, or None); otherwise this is SDPA attention.
    """
    layer = _pending().pop(getattr(module, "layer_idx", -1), None)
    if layer is None:
        if isinstance(attention_mask, Tensor) and attention_mask.dim() == 2:
            raise RuntimeError("longseq attention got a longseq padding mask but no longseq cache layer")
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    layer.handed_over = False
    if key.shape[-1] != value.shape[-1]:
        raise NotImplementedError(
            f"longseq caches need keys and values of one head size; got {key.shape[-1]} and {value.shape[-1]}"
        )
    if dropout:
        raise NotImplementedError(
            "longseq caches are for inference: attention dropout must be 0 (call model.eval())"
        )
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"longseq caches do not support the attention parameter {name!r}")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(
            "longseq caches take a 2-D attention_mask (padding) only, not a custom 4-D mask"
        )
    D = query.shape[-1]
    if scaling is not None and scaling != D**-0.5:
        # KVCache scales scores by D^-1/2; fold the model's own scale into q instead.
        query = query * (scaling * D**0.5)
    out = layer.attend(query, key, value, attention_mask)
    return out.transpose(1, 2).contiguous(), None


def longseq_mask(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor | None:
    """HF mask function: for a longseq cache, the ``[B, T]`` bool validity of the new tokens (None if all
    valid), cut from the 2-D ``attention_mask`` ``[B, past + T]``; for any other cache, SDPA's mask.

    transformers 5 passes ``q_length`` / ``q_offset``; 4.56+ passes ``cache_position`` (the new tokens'
    positions) instead, and gets its arguments back unchanged on the SDPA path."""
    cache_position = kwargs.get("cache_position")
    legacy = q_length is None and cache_position is not None
    if legacy:
        q_length = int(cache_position.shape[0])
        q_offset = int(cache_position[0]) if q_length else 0
    request, _LOCAL.mask_request = getattr(_LOCAL, "mask_request", None), None
    if request != (int(q_length), int(q_offset)):
        if legacy:
            return sdpa_mask(
                batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset, attention_mask=attention_mask,
                **kwargs,
            )
        return sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            attention_mask=attention_mask,
            **kwargs,
        )
    if attention_mask is None:
        return None
    if attention_mask.shape[-1] < q_offset + q_length:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} tokens but the cache has seen {q_offset} and "
            f"{q_length} are new: pass the mask of past and new tokens, [B, {q_offset + q_length}]"
        )
    valid = attention_mask[:, q_offset : q_offset + q_length].bool()
    return None if bool(valid.all()) else valid


def register() -> None:
    """Register the ``"longseq"`` attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, longseq_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, longseq_mask)


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _check_supported(model: Any, config: Any) -> None:
    """Refuse, before the model is touched, what a longseq cache cannot serve (``NotImplementedError``, or
    ``TypeError`` for a longseq model)."""
    model_type = getattr(config, "model_type", type(model).__name__)
    if model_type == "longseq":
        raise TypeError(
            "this is a longseq model (LongseqForCausalLM), which keeps its own state: pass "
            "past_key_values=longseq.hf.LongseqStateCache(policy) to its generate instead"
        )
    layer_types = list(getattr(config, "layer_types", None) or [])
    unsupported = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unsupported:
        raise NotImplementedError(
            f"longseq caches support softmax-attention decoders; this {model_type} model has layer types "
            f"{unsupported}"
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError(
            f"longseq caches do not support attention logit soft-capping ({model_type}: "
            f"attn_logit_softcapping={config.attn_logit_softcapping})"
        )
    if any(name.rpartition(".")[2] == "sinks" for name, _ in model.named_parameters()):
        raise NotImplementedError(f"longseq caches do not support attention sinks parameters ({model_type})")
    key_dim = getattr(config, "qk_head_dim", None) or getattr(config, "head_dim", None)
    value_dim = getattr(config, "v_head_dim", None)
    if value_dim is not None and key_dim is not None and value_dim != key_dim:
        raise NotImplementedError(
            f"longseq caches need keys and values of one head size; this {model_type} model has key heads of "
            f"{key_dim} and value heads of {value_dim}"
        )
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 1:
        raise NotImplementedError(
            f"longseq caches need the decoder's layer count in config.num_hidden_layers; this {model_type} "
            f"model's config has {layers!r}"
        )


def cache(model: Any, policy: CachePolicy | str | None = None) -> LongseqCache:
    """A :class:`LongseqCache` for ``model`` under ``policy`` (a CachePolicy or a spec like ``"tova:512"``;
    default ``Full()``), to pass as ``past_key_values`` to ``generate`` or ``forward``.

    Also switches ``model`` to the ``"longseq"`` attention implementation (it behaves like SDPA whenever no
    longseq cache is used, so the model stays usable as before). Everything is checked first: a bad policy
    raises ``TypeError`` / ``ValueError`` and a model a longseq cache cannot serve (soft-capping, attention
    sinks, value heads of another size than key heads, linear-attention layers, attention that does not go
    through transformers' ``AttentionInterface``) ``NotImplementedError``, leaving the model as it was.
    """
    policy = parse_policy(policy) if isinstance(policy, str) else (policy if policy is not None else Full())
    if not isinstance(policy, CachePolicy):
        raise TypeError(f"policy must be a longseq CachePolicy such as TOVA(512); got {policy!r}")
    config = _text_config(model)
    _check_supported(model, config)
    register()
    previous = model.config._attn_implementation
    if previous != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            # transformers only logs a warning for models without AttentionInterface support.
            if model.config._attn_implementation != previous:
                model.set_attn_implementation(previous)
            raise NotImplementedError(
                f"{type(model).__name__} ({getattr(config, 'model_type', '?')}) does not route its attention "
                "through transformers' AttentionInterface, so a longseq cache cannot serve it"
            )
    window = getattr(config, "sliding_window", None)
    layer_types = list(getattr(config, "layer_types", None) or [])
    if window is not None and (not layer_types or "sliding_attention" in layer_types):
        warnings.warn(
            f"{type(model).__name__} uses sliding-window attention (window {window}); a longseq cache "
            f"applies {policy.spec} over all tokens instead of the window (identical while the context is "
            "shorter than the window)",
            stacklevel=2,
        )
    return LongseqCache(policy, config.num_hidden_layers, model.config)

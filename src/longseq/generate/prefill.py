"""Prefill: prompts through the model before decoding, chunked and uncaptured, into dynamic states that are
then loaded into the rows of a static one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..cache.policies import CachePolicy
from ..models.base import LanguageModel
from ..models.state import ModelState


def prefill(
    model: LanguageModel, ids: Tensor, cache: CachePolicy | None, chunk: int | None
) -> tuple[Tensor, ModelState]:
    """Dynamic state after ``ids`` ``[b, T]`` (in chunks of ``chunk`` tokens; None: one call) and the last
    logits ``[b, V]``. Each call asks the model for its last logits only (:meth:`LanguageModel.step_last`), so a
    long prompt to a large-vocabulary model never holds ``[b, T, V]`` of them."""
    state = model.init_state(ids.shape[0], cache=cache)
    state.reserve(ids.shape[1])  # one allocation, no regrowth while the prompt streams in
    T = ids.shape[1]
    step = T if chunk is None else chunk
    logits = None
    for a in range(0, T, step):
        logits, state = model.step_last(ids[:, a : a + step], state)
    assert logits is not None
    return logits, state


# Tokens per model call when several prompts are prefilled together (see prefill_rows).
GROUP_PREFILL_TOKENS = 32768
# Bytes of temporary (dynamic) state one prefill group may hold beside the static state (see prefill_rows).
GROUP_STATE_BYTES = 2 * 2**30


def prefill_rows(
    model: LanguageModel,
    state: ModelState,
    rows: Sequence[Tensor],
    cache: CachePolicy | None = None,
    chunk: int | None = None,
    max_group: int | None = None,
) -> Tensor:
    """Prefill the ``[1, T_i]`` prompts into dynamic states and load them into rows ``i`` of the static
    ``state``; returns the ``[B, V]`` logits after each prompt's last token.

    Consecutive prompts of equal length are prefilled together, up to ``max_group`` rows at a time, so
    padding never enters a state. Default: runs of equal length when the temporary dynamic state has a
    bounded size per row (recurrent states, bounded KV policies such as TOVA, whose exact
    token-by-token prefill is launch bound and gains the most from batching), as many rows as fit
    :data:`GROUP_STATE_BYTES` of it -- a group of the whole batch would hold a second copy of the
    batch's state beside the static one and halve the batch that fits; one row at a time for unbounded
    (``Full``) KV caches.
    """
    if max_group is None:
        # Only the layers that persist along the sequence decide (MEGABYTE's local caches hold one patch).
        unbounded = not all(layer.bounded for layer in model.init_state(1, cache=cache).persistent_layers)
        # The static state's size per row bounds the dynamic state's (budget + 1 slots at most for both).
        per_row = max(1, state.nbytes() // max(1, state.batch_size))
        max_group = 1 if unbounded else max(1, min(len(rows), GROUP_STATE_BYTES // per_row))
    if max_group < 1:
        raise ValueError(f"max_group must be >= 1, got {max_group}")
    out: list[Tensor] = []
    start = 0
    while start < len(rows):
        end = start + 1
        while end < len(rows) and end - start < max_group and rows[end].shape[-1] == rows[start].shape[-1]:
            end += 1
        n_rows = end - start
        # A group goes through the model in chunks of at most GROUP_PREFILL_TOKENS tokens in all, so
        # batching rows never multiplies the prefill's activation memory (chunked prefill is exact).
        group_chunk = chunk if chunk is not None or n_rows == 1 else max(1, GROUP_PREFILL_TOKENS // n_rows)
        logits, dyn = prefill(model, torch.cat(list(rows[start:end]), 0), cache, group_chunk)
        state.load_(dyn, slice(start, end))
        out.extend(logits)
        del dyn
        start = end
    return torch.stack(out, 0)

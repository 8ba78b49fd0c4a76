"""Replaying score-based KV eviction (TOVA, H2O) over a chunk of new tokens, given their attention scores.

Why: TOVA and H2O decide token by token (each eviction changes what the next token sees), so an exact
prefill of a long prompt is a loop over its tokens. With the scores of every new query against the cache
and the chunk computed up front (one product), what remains sequential is cheap -- per token a softmax
over the entries alive at that moment, a mean over the query heads, and a selection -- but as PyTorch ops
it is still ~12 operator dispatches per token and layer. :func:`replay_evictions` runs the whole loop in
one Triton program per (row, head group) on CUDA (``kernel.py``); :func:`replay_evictions_host` is the CPU
path, the exponentials once per chunk and two small products and an argmin per token in NumPy
(``host.py``); :func:`replay_evictions_reference` is the PyTorch loop both are tested against, and the path
for any other eviction rule (``reference.py``).

Layouts (``S`` = cache slots + ``c`` new tokens; entries ``[S - c, S)`` are the new tokens in order):

* ``scores`` ``[B, H, c, S]`` (fp32 or fp64): query ``t``'s scaled scores against every entry;
* ``key_pos`` ``[B, G, S]`` int64 original positions (``G`` = 1, or ``H_kv`` for per-head policies; the
  ``H / G`` query heads of group ``g`` are ``g * H / G ...``); ``pos`` ``[B, c]`` the new tokens' positions;
* ``alive`` ``[B, G, S]`` bool: the cache's kept entries (new tokens start dead);
* ``acc`` ``[B, G, S]`` accumulated attention (H2O) or None (TOVA).

Token ``t`` joins the alive set; its attention (softmax over the alive entries, per head) averaged over
the group's heads scores them -- TOVA -- or is added to ``acc`` -- H2O, whose candidates are also only
positions ``<= pos_t - recent``; the lowest score leaves, ties to the oldest position (as
:func:`longseq.cache.policies.select_evictions`). Returns ``seen`` ``[B, G, c, S]`` bool (the alive set
query ``t`` attended over, itself included), the final ``alive`` and ``acc``.
"""

from __future__ import annotations

from torch import Tensor

from .host import replay_evictions_host
from .reference import check_replay_inputs, replay_evictions_reference

__all__ = [
    "MAX_ENTRIES",
    "check_replay_inputs",
    "replay_evictions",
    "replay_evictions_host",
    "replay_evictions_reference",
]

MAX_ENTRIES = 8192  # entries (S) per row: the kernel holds their flags, positions and scores in registers


def replay_evictions(
    scores: Tensor, key_pos: Tensor, pos: Tensor, alive: Tensor, acc: Tensor | None, recent: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The replay in one Triton launch (TOVA: ``acc`` None, ``recent`` 0; H2O: ``acc`` and its ``recent``); see
    :func:`.kernel.replay_evictions`. Triton is imported here, on first use, so ``import longseq`` never
    needs it."""
    from .kernel import replay_evictions as run

    return run(scores, key_pos, pos, alive, acc, recent)

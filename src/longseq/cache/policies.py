"""Cache policies: which tokens a bounded KV cache keeps.

A policy is a small immutable description (``budget`` tokens per layer and its rule); the per-layer
:class:`~longseq.cache.kv.KVCache` consults it. ``Full`` keeps everything.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CachePolicy:
    """Base class. ``budget`` is the number of tokens kept per layer (None: unbounded)."""

    @property
    def budget(self) -> int | None:
        return None

    @property
    def needs_attention_weights(self) -> bool:
        """True when the policy scores tokens by the attention rows of the current query."""
        return False


@dataclass(frozen=True)
class Full(CachePolicy):
    """Keep every token: the ordinary, unbounded KV cache."""


# name -> policy class; bounded policies register here so ``parse_policy`` and the CLI know them.
POLICIES: dict[str, type[CachePolicy]] = {"full": Full}


def parse_policy(spec: str) -> CachePolicy:
    """A policy from a short spec: ``"full"`` or ``"<name>:<budget>"`` (e.g. ``"tova:512"``)."""
    name, _, budget = spec.strip().lower().partition(":")
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r} in {spec!r}; choose one of {sorted(POLICIES)}")
    if name == "full":
        if budget:
            raise ValueError(f"policy 'full' takes no budget; got {spec!r}")
        return Full()
    if not budget.isdigit():
        raise ValueError(f"policy spec {spec!r} needs an integer budget, e.g. '{name}:512'")
    return POLICIES[name](int(budget))

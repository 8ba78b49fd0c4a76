"""KV caches and the policies that bound them (the KV cache as a bounded multi-state RNN)."""

from .kv import KVCache
from .policies import (
    ALIASES,
    H2O,
    POLICIES,
    TOVA,
    BoundedPolicy,
    CachePolicy,
    Full,
    Sink,
    Window,
    parse_policy,
    select_evictions,
)

__all__ = [
    "ALIASES",
    "BoundedPolicy",
    "CachePolicy",
    "Full",
    "H2O",
    "KVCache",
    "POLICIES",
    "Sink",
    "TOVA",
    "Window",
    "parse_policy",
    "select_evictions",
]

"""Per-layer states: the :class:`LayerState` interface, KV caches and the policies that bound them (the KV
cache as a bounded multi-state RNN), and the fixed-size :class:`RecurrentState`."""

from .kv import KVCache
from .policies import (
    ALIASES,
    H2O,
    POLICIES,
    TOVA,
    BoundedPolicy,
    CachePolicy,
    EvictionRule,
    Full,
    Sink,
    Window,
    parse_policy,
    select_evictions,
)
from .recurrent import RecurrentState
from .state import LayerState

__all__ = [
    "ALIASES",
    "BoundedPolicy",
    "CachePolicy",
    "EvictionRule",
    "Full",
    "H2O",
    "KVCache",
    "LayerState",
    "POLICIES",
    "RecurrentState",
    "Sink",
    "TOVA",
    "Window",
    "parse_policy",
    "select_evictions",
]

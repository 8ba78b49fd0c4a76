"""KV caches and the policies that bound them."""

from .kv import KVCache
from .policies import POLICIES, CachePolicy, Full, parse_policy

__all__ = ["POLICIES", "CachePolicy", "Full", "KVCache", "parse_policy"]

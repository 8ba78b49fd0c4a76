"""The model registry: one entry per model kind, declaring what the kind is and what it can do.

Code outside ``models/`` (the CLI, training, evaluation, benchmarks, tests) asks the registry instead of
comparing kind strings or probing attributes::

    spec = model_spec("megabyte")
    caps = capabilities(cfg)          # or capabilities(model)
    caps.cache_policies               # init_state(cache=...) applies: the model has softmax KV caches
    caps.seq_multiple                 # training / evaluation windows must be a multiple of this
    caps.state_kinds                  # {"kv"}, {"recurrent"} or both: what its layer states are

A new kind is one model file plus one :func:`register_model` call (see ``tests/toy_kind.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import ModelConfig

if TYPE_CHECKING:
    from .base import LanguageModel

#: The layer-state kinds a model may declare (see :mod:`longseq.cache.state`).
STATE_KINDS = ("kv", "recurrent")


@dataclass(frozen=True)
class Capabilities:
    """What a model built from one config can do.

    * ``state_kinds``: the kinds of its layer states -- ``"kv"`` (a :class:`~longseq.cache.KVCache` per
      softmax-attention layer, bounded by a cache policy) and/or ``"recurrent"`` (a fixed-size matrix).
    * ``seq_multiple``: training and evaluation windows (in tokens) must be a multiple of this (MEGABYTE's
      patch size; 1 elsewhere).
    * ``max_seq_len``: the longest sequence the model can take (``None``: no limit of its own).
    * ``byte_level``: the model only runs on bytes (vocabulary 256, no tokenizer).
    """

    state_kinds: frozenset[str]
    seq_multiple: int = 1
    max_seq_len: int | None = None
    byte_level: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.state_kinds) - set(STATE_KINDS)
        if not self.state_kinds or unknown:
            raise ValueError(f"state_kinds must be a non-empty subset of {STATE_KINDS}; got {sorted(self.state_kinds)}")
        if self.seq_multiple < 1:
            raise ValueError(f"seq_multiple must be >= 1; got {self.seq_multiple}")

    @property
    def cache_policies(self) -> bool:
        """Whether ``init_state(cache=policy)`` applies (the model has softmax-attention KV caches)."""
        return "kv" in self.state_kinds

    def check_seq_len(self, seq_len: int, what: str = "seq_len") -> None:
        """Raise ``ValueError`` unless ``seq_len >= 1``, a multiple of ``seq_multiple`` and within
        ``max_seq_len``."""
        if seq_len < 1:
            raise ValueError(f"{what} must be >= 1; got {seq_len}")
        if seq_len % self.seq_multiple:
            raise ValueError(f"{what}={seq_len} must be a multiple of the model's patch size {self.seq_multiple}")
        if self.max_seq_len is not None and seq_len > self.max_seq_len:
            raise ValueError(f"{what}={seq_len} exceeds the model's max_seq_len={self.max_seq_len}")


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: the kind's name, its config and model classes, a one-line summary, and the
    function that reads a config's :class:`Capabilities`."""

    kind: str
    config_class: type[ModelConfig]
    model_class: type[LanguageModel]
    summary: str
    capabilities: Callable[[Any], Capabilities]

    def build(self, cfg: ModelConfig) -> LanguageModel:
        return self.model_class(cfg)


MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a kind to the registry (``spec.config_class.kind`` must equal ``spec.kind``); returns ``spec``."""
    if spec.config_class.kind != spec.kind:
        raise ValueError(f"{spec.config_class.__name__}.kind is {spec.config_class.kind!r}, not {spec.kind!r}")
    if spec.kind in MODELS and MODELS[spec.kind] != spec:
        raise ValueError(f"model kind {spec.kind!r} is already registered")
    MODELS[spec.kind] = spec
    return spec


def unregister_model(kind: str) -> None:
    """Remove a kind (tests register toy kinds and remove them again)."""
    MODELS.pop(kind, None)


def model_spec(kind: str) -> ModelSpec:
    """The registry entry of ``kind``; ``ValueError`` naming the known kinds otherwise."""
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(MODELS)}")
    return MODELS[kind]


def capabilities(model_or_config: Any) -> Capabilities:
    """The :class:`Capabilities` of a model or a config (read from its kind's registry entry)."""
    cfg = model_or_config if isinstance(model_or_config, ModelConfig) else model_or_config.config
    return model_spec(cfg.kind).capabilities(cfg)

"""Model configurations: dataclasses with named presets and checked overrides.

Parameter counts of the presets at vocabulary 256 (embeddings are negligible at byte level, so the
presets are deeper than their token-level namesakes to reach the same size):

============  =======  ========  ======  ===========  ==========
preset        d_model  n_layers  heads   Transformer  GLA
============  =======  ========  ======  ===========  ==========
tiny          64       2         2/2     ~0.1M        ~0.1M
small         512      8         8/4     ~25M         ~25M
base          768      18        12/4    ~127M        ~128M
medium        1024     28        16/4    ~352M        ~353M
1.3b          2048     26        16/4    ~1.31B       ~1.31B
============  =======  ========  ======  ===========  ==========
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from ..nn.mlp import swiglu_hidden


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Check ``value`` against a field's annotation; strings (from the command line) are parsed."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing}, {})  # annotations are strings under __future__
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        annotation = options[0]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "1", "yes", "false", "0", "no"}:
            return value.lower() in {"true", "1", "yes"}
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ValueError(f"config field {name!r} expects {annotation.__name__}; got {value!r} ({type(value).__name__})")


@dataclass
class ModelConfig:
    """Fields every longseq language model has. Subclasses add their own and a ``presets`` table."""

    kind: ClassVar[str] = ""
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, f.type, getattr(self, f.name)))
        for name in ("vocab_size", "d_model", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"config field {name!r} must be >= 1; got {getattr(self, name)}")

    @classmethod
    def from_preset(cls, preset: str = "tiny", **overrides: Any) -> ModelConfig:
        """The named preset with ``overrides`` applied; unknown presets/fields raise ``ValueError``."""
        if preset not in cls.presets:
            raise ValueError(f"unknown {cls.kind} preset {preset!r}; choose one of {sorted(cls.presets)}")
        return cls.from_dict({**cls.presets[preset], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TransformerConfig(ModelConfig):
    """Transformer++ (pre-RMSNorm, RoPE, SwiGLU, no biases). ``n_kv_heads=0`` means ``n_heads``
    (multi-head attention); ``mlp_hidden=0`` means the SwiGLU default ``8/3 * d_model``."""

    kind: ClassVar[str] = "transformer"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(d_model=64, n_layers=2, n_heads=2),
        "small": dict(d_model=512, n_layers=8, n_heads=8),
        "base": dict(d_model=768, n_layers=18, n_heads=12),
        "medium": dict(d_model=1024, n_layers=28, n_heads=16),
        "1.3b": dict(d_model=2048, n_layers=26, n_heads=16),
    }

    n_heads: int = 4
    n_kv_heads: int = 0
    mlp_hidden: int = 0
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.mlp_hidden = self.mlp_hidden or swiglu_hidden(self.d_model)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim d_model/n_heads = {self.d_model // self.n_heads} must be even for RoPE")


@dataclass
class GLAConfig(ModelConfig):
    """GLA Transformer: GLA token mixer + SwiGLU, pre-RMSNorm (Yang et al. 2024).

    ``backend`` chooses the GLA kernel (``auto``, ``chunk``, ``recurrent``)."""

    kind: ClassVar[str] = "gla"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(d_model=64, n_layers=2, n_heads=2),
        "small": dict(d_model=512, n_layers=8, n_heads=4),
        "base": dict(d_model=768, n_layers=18, n_heads=4),
        "medium": dict(d_model=1024, n_layers=28, n_heads=4),
        "1.3b": dict(d_model=2048, n_layers=26, n_heads=4),
    }

    n_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_rank: int = 16
    gate_normalizer: float = 16.0
    mlp_hidden: int = 0
    backend: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.mlp_hidden = self.mlp_hidden or swiglu_hidden(self.d_model)
        key_dim, value_dim = int(self.d_model * self.expand_k), int(self.d_model * self.expand_v)
        if key_dim % self.n_heads or value_dim % self.n_heads:
            raise ValueError(
                f"GLA key dim {key_dim} and value dim {value_dim} must be divisible by n_heads={self.n_heads}"
            )
        from ..ops.gla import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"unknown GLA backend {self.backend!r}; choose one of {BACKENDS}")

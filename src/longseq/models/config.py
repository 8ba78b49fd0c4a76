"""Model configurations: dataclasses with named presets and checked overrides.

Parameter counts of the presets at vocabulary 256 (embeddings are negligible at byte level, so the
presets are deeper than their token-level namesakes to reach the same size):

============  =======  ========  ======  ===========  ==========  ==========
preset        d_model  n_layers  heads   Transformer  GLA         Hybrid
============  =======  ========  ======  ===========  ==========  ==========
tiny          64       2         2/2     0.14M        0.14M       0.14M
small         512      8         8/4     25.6M        25.7M       25.6M
85m           768      12        12/4    85.3M        85.6M       85.5M
base          768      18        12/4    127.8M       128.2M      128.1M
medium        1024     28        16/4    354.7M       355.5M      355.3M
1.3b          2048     26        16/4    1.311B       1.313B      1.313B
============  =======  ========  ======  ===========  ==========  ==========

(Hybrid: GLA with one softmax-attention layer in four, the attention layers with the Transformer's heads.)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from ..nn.mlp import swiglu_hidden
from ..ops.rope import RopeScaling


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


@dataclass(frozen=True)
class Bound:
    """The range of a numeric config field: ``>= low`` (``> low`` when ``strict``), and finite. ``note``
    says what a special value at the bound means (e.g. ``"0: n_heads"``)."""

    low: float
    strict: bool = False
    note: str = ""

    def check(self, name: str, value: Any) -> None:
        if value is None:  # an optional field left unset
            return
        ok = math.isfinite(value) and (value > self.low if self.strict else value >= self.low)
        if not ok:
            note = f" ({self.note})" if self.note else ""
            raise ValueError(f"config field {name!r} must be {'>' if self.strict else '>='} {self.low}{note}; "
                             f"got {value!r}")


#: The bounds shared by several fields.
AT_LEAST_1, POSITIVE = Bound(1), Bound(0, strict=True)


@dataclass
class ModelConfig:
    """Fields every longseq language model has. Subclasses add their own and a ``presets`` table.

    Every numeric field has a :class:`Bound` in some class's ``bounds`` (subclasses add theirs; a field a
    subclass bounds again takes the subclass's); ``__post_init__`` checks them all before anything else."""

    kind: ClassVar[str] = ""
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    bounds: ClassVar[dict[str, Bound]] = {
        "vocab_size": AT_LEAST_1, "d_model": AT_LEAST_1, "n_layers": AT_LEAST_1,
        "norm_eps": POSITIVE, "init_std": POSITIVE,
    }

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, f.type, getattr(self, f.name)))
        bounds: dict[str, Bound] = {}
        for cls in reversed(type(self).__mro__):
            bounds.update(vars(cls).get("bounds", {}))
        for f in dataclasses.fields(self):
            if f.name in bounds:
                bounds[f.name].check(f.name, getattr(self, f.name))

    @classmethod
    def check_overrides(cls, overrides: dict[str, Any]) -> None:
        """Raise ``ValueError`` for fields a user set together (``--set``) that contradict each other; a kind with
        such fields checks them (the fields' own values are checked when the config is built)."""

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
        # The decode benchmark's size (~85M): d=768, 12 layers, like GPT-2 small / HF Llama of that shape.
        "85m": dict(d_model=768, n_layers=12, n_heads=12),
        "base": dict(d_model=768, n_layers=18, n_heads=12),
        "medium": dict(d_model=1024, n_layers=28, n_heads=16),
        "1.3b": dict(d_model=2048, n_layers=26, n_heads=16),
        # SmolLM2-135M's exact shape (49,152-token vocabulary, tied embeddings), for speed runs with random
        # weights; its real weights come with longseq.load_pretrained.
        "smollm2-135m": dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, mlp_hidden=1536,
                             rope_theta=100000.0, tie_embeddings=True),
    }

    bounds: ClassVar[dict[str, Bound]] = {
        "n_heads": AT_LEAST_1, "n_kv_heads": Bound(0, note="0: n_heads"),
        "mlp_hidden": Bound(0, note="0: the SwiGLU default 8/3 * d_model"), "rope_theta": POSITIVE,
        "head_dim": Bound(0, note="0: d_model / n_heads"), "rope_factor": POSITIVE,
        "rope_low_freq_factor": POSITIVE, "rope_high_freq_factor": POSITIVE, "rope_original_max_len": AT_LEAST_1,
    }

    n_heads: int = 4
    n_kv_heads: int = 0
    mlp_hidden: int = 0
    rope_theta: float = 10000.0
    # Pretrained families (longseq.load_pretrained fills these; the presets keep the defaults).
    head_dim: int = 0  # 0: d_model / n_heads
    qkv_bias: bool = False  # Qwen2
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm of each query and key head before RoPE
    rope_scaling: str = "none"  # "none" or "llama3" (Llama 3.1+'s frequency-dependent stretch)
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192

    def __post_init__(self) -> None:
        super().__post_init__()
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.mlp_hidden = self.mlp_hidden or swiglu_hidden(self.d_model)
        if not self.head_dim and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        self.head_dim = self.head_dim or self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for RoPE")
        if self.rope_scaling not in ("none", "llama3"):
            raise ValueError(f"rope_scaling must be 'none' or 'llama3'; got {self.rope_scaling!r}")
        self.rope_scaling_params()  # checks the factors now, not at the first forward

    def rope_scaling_params(self) -> RopeScaling | None:
        """The RoPE frequency scaling this config asks for (None: plain RoPE)."""
        if self.rope_scaling == "none":
            return None
        return RopeScaling(self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                           self.rope_original_max_len)


@dataclass
class GLAConfig(ModelConfig):
    """GLA Transformer: GLA token mixer + SwiGLU, pre-RMSNorm (Yang et al. 2024).

    ``backend`` chooses the GLA kernel (``auto``, ``chunk``, ``recurrent``)."""

    kind: ClassVar[str] = "gla"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(d_model=64, n_layers=2, n_heads=2),
        "small": dict(d_model=512, n_layers=8, n_heads=4),
        "85m": dict(d_model=768, n_layers=12, n_heads=4),  # the decode benchmark's size
        "base": dict(d_model=768, n_layers=18, n_heads=4),
        "medium": dict(d_model=1024, n_layers=28, n_heads=4),
        "1.3b": dict(d_model=2048, n_layers=26, n_heads=4),
    }
    # gate_rank=0 is refused rather than read as "no low-rank path": the gate would then be its bias alone,
    # the same for every token, which is not GLA's data-dependent gate (and elsewhere 0 means "default").
    bounds: ClassVar[dict[str, Bound]] = {
        "n_heads": AT_LEAST_1, "expand_k": POSITIVE, "expand_v": POSITIVE,
        "gate_rank": Bound(1, note="the rank of the data-dependent forget gate"),
        "gate_normalizer": Bound(0, strict=True, note="the gate's temperature tau"),
        "mlp_hidden": Bound(0, note="0: the SwiGLU default 8/3 * d_model"),
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
        if key_dim % self.n_heads or value_dim % self.n_heads or min(key_dim, value_dim) < self.n_heads:
            raise ValueError(
                f"GLA key dim {key_dim} (d_model * expand_k) and value dim {value_dim} (d_model * expand_v) "
                f"must be positive multiples of n_heads={self.n_heads}"
            )
        from ..ops.gla import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"unknown GLA backend {self.backend!r}; choose one of {BACKENDS}")


@dataclass
class HybridConfig(GLAConfig):
    """GLA blocks with softmax-attention (Transformer++) blocks at chosen layers, as in the GLA paper's hybrid
    ablations, Samba and Jamba: the GLA layers keep a fixed matrix state, the attention layers a KV cache that
    any cache policy bounds, so ``init_state(B, cache=TOVA(512))`` bounds the whole state.

    The attention layers are ``attn_layers`` (comma-separated indices, e.g. ``"3,7"``) or, when that is
    empty, every ``attn_every``-th layer (layers ``attn_every - 1``, ``2 * attn_every - 1``, ...). They have
    ``attn_heads`` query heads (0: ``d_model / 64``) and ``attn_kv_heads`` KV heads (0: ``attn_heads``);
    the GLA fields are :class:`GLAConfig`'s. The presets put one attention layer in four, with the
    Transformer presets' heads, and match the other kinds' parameter counts (0.14M ... 1.31B).
    """

    kind: ClassVar[str] = "hybrid"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(d_model=64, n_layers=2, n_heads=2, attn_heads=2, attn_every=2),
        "small": dict(d_model=512, n_layers=8, n_heads=4, attn_heads=8),
        "85m": dict(d_model=768, n_layers=12, n_heads=4, attn_heads=12),
        "base": dict(d_model=768, n_layers=18, n_heads=4, attn_heads=12),
        "medium": dict(d_model=1024, n_layers=28, n_heads=4, attn_heads=16),
        "1.3b": dict(d_model=2048, n_layers=26, n_heads=4, attn_heads=16),
    }
    bounds: ClassVar[dict[str, Bound]] = {
        "attn_every": Bound(0, note="0: only the layers of attn_layers"),
        "attn_heads": Bound(0, note="0: d_model / 64"), "attn_kv_heads": Bound(0, note="0: attn_heads"),
        "rope_theta": POSITIVE,
    }

    attn_every: int = 4
    attn_layers: str = ""
    attn_heads: int = 0
    attn_kv_heads: int = 0
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.attn_heads = self.attn_heads or max(1, self.d_model // 64)
        self.attn_kv_heads = self.attn_kv_heads or self.attn_heads
        layers = self.attention_layers()  # checks attn_layers now, not at build time
        if not layers:
            raise ValueError(f"a hybrid needs at least one attention layer: attn_every={self.attn_every} and no "
                             f"attn_layers give none of n_layers={self.n_layers} (a model without any is kind 'gla')")
        # The attention blocks' own checks (head divisibility, even head dim for RoPE), now, under this
        # config's field names (the attention blocks call them n_heads / n_kv_heads).
        try:
            self.attention_config()
        except ValueError as err:
            raise ValueError(f"the attention layers (attn_heads={self.attn_heads}, attn_kv_heads="
                             f"{self.attn_kv_heads}) are not valid: {err}") from err

    @classmethod
    def check_overrides(cls, overrides: dict[str, Any]) -> None:
        """Refuse ``attn_layers`` with a nonzero ``attn_every`` among the fields a user set (``--set``): the named
        layers win and the other would be silently ignored. Only what was typed is checked -- every preset and
        saved config carries an ``attn_every``, which ``attn_layers`` then replaces, and the Python API keeps
        that rule for configs built in code."""
        layers, every = overrides.get("attn_layers"), overrides.get("attn_every")
        named = layers is not None and str(layers).strip() != ""
        if named and every is not None and _coerce("attn_every", int, every) != 0:
            raise ValueError(
                f"attn_every={every} and attn_layers={layers} contradict each other: attn_layers names the "
                "attention layers and attn_every would be ignored; set one of them (or attn_every=0 with "
                "attn_layers)"
            )

    def attention_layers(self) -> list[int]:
        """The indices of the softmax-attention layers, in order."""
        text = str(self.attn_layers).replace(" ", "")
        if text:
            try:
                layers = sorted({int(x) for x in text.split(",") if x})
            except ValueError:
                raise ValueError(
                    f"attn_layers must be comma-separated layer indices; got {self.attn_layers!r}"
                ) from None
            bad = [i for i in layers if not 0 <= i < self.n_layers]
            if bad:
                raise ValueError(f"attn_layers {bad} are not layers of a {self.n_layers}-layer model (0 ... "
                                 f"{self.n_layers - 1})")
            return layers
        return [i for i in range(self.n_layers) if self.attn_every and (i + 1) % self.attn_every == 0]

    def attention_config(self) -> TransformerConfig:
        """The :class:`TransformerConfig` the attention blocks are built from."""
        return TransformerConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                                 n_heads=self.attn_heads, n_kv_heads=self.attn_kv_heads, mlp_hidden=self.mlp_hidden,
                                 rope_theta=self.rope_theta, norm_eps=self.norm_eps, init_std=self.init_std)


@dataclass
class MegabyteConfig(ModelConfig):
    """MEGABYTE (Yu et al. 2023): a global model over patches of ``patch_size`` bytes and a local model
    over the bytes of each patch.

    Widths follow the paper's tables: ``d_global`` is the global model's width, i.e. the paper's
    ``P * D_G``, so each byte gets a ``d_global / patch_size``-wide global embedding (the paper's
    ``D_G``) and a patch is the concatenation of its ``P`` byte embeddings. ``d_local`` is the local
    model's width ``D_L``. ``max_seq_len`` bounds the learned byte-position embedding (and so the
    context, in bytes) and must be a multiple of ``patch_size``.

    ``global_backbone`` / ``local_backbone`` pick the block type of each stack (``"transformer"``:
    Transformer++ blocks with RoPE; ``"gla"``: GLA blocks, which use ``gla_backend``). ``d_model`` and
    ``n_layers`` are derived (``d_global`` and the total depth) so code that reads them keeps working.

    Parameter counts (global backbone transformer / gla; local transformer):

    ============  ==  ==============  =============  ===================
    preset        P   global d/L/H    local d/L/H    params
    ============  ==  ==============  =============  ===================
    tiny          4   64 / 2 / 2      32 / 1 / 2     0.158M / 0.161M
    small         8   512 / 8 / 8     256 / 4 / 4    29.2M / 29.3M
    paper95m      8   768 / 12 / 12   512 / 4 / 8    98.7M / 99.0M
    ============  ==  ==============  =============  ===================
    """

    kind: ClassVar[str] = "megabyte"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(
            patch_size=4, d_global=64, n_global_layers=2, n_global_heads=2,
            d_local=32, n_local_layers=1, n_local_heads=2, max_seq_len=1024,
        ),
        "small": dict(
            patch_size=8, d_global=512, n_global_layers=8, n_global_heads=8,
            d_local=256, n_local_layers=4, n_local_heads=4, max_seq_len=8192,
        ),
        # The benchmark size: dims 768/512, depths 12/4, P = 8 (global:local ratios as in the paper).
        "paper95m": dict(
            patch_size=8, d_global=768, n_global_layers=12, n_global_heads=12,
            d_local=512, n_local_layers=4, n_local_heads=8, max_seq_len=8192,
        ),
    }

    bounds: ClassVar[dict[str, Bound]] = {
        **{name: AT_LEAST_1 for name in ("patch_size", "d_global", "n_global_layers", "n_global_heads", "d_local",
                                         "n_local_layers", "n_local_heads", "max_seq_len")},
        "rope_theta": POSITIVE,
    }

    patch_size: int = 8
    d_global: int = 512
    n_global_layers: int = 8
    n_global_heads: int = 8
    d_local: int = 256
    n_local_layers: int = 4
    n_local_heads: int = 4
    global_backbone: str = "transformer"
    local_backbone: str = "transformer"
    max_seq_len: int = 8192
    rope_theta: float = 10000.0
    gla_backend: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("global_backbone", "local_backbone"):
            if getattr(self, name) not in ("transformer", "gla"):
                raise ValueError(f"{name} must be 'transformer' or 'gla'; got {getattr(self, name)!r}")
        from ..ops.gla import BACKENDS

        if self.gla_backend not in BACKENDS:  # checked even when no stack is GLA, so a typo never passes
            raise ValueError(f"unknown GLA backend {self.gla_backend!r}; choose one of {BACKENDS}")
        if self.d_global % self.patch_size:
            raise ValueError(
                f"d_global={self.d_global} must be a multiple of patch_size={self.patch_size} "
                f"(a patch is the concatenation of patch_size byte embeddings of width d_global/patch_size)"
            )
        if self.max_seq_len % self.patch_size:
            raise ValueError(
                f"max_seq_len={self.max_seq_len} must be a multiple of patch_size={self.patch_size}"
            )
        # Derived fields; a conflicting explicit value (other than the base default) is a mistake.
        derived = {"d_model": self.d_global, "n_layers": self.n_global_layers + self.n_local_layers}
        for name, value in derived.items():
            given = getattr(self, name)
            default = next(f.default for f in dataclasses.fields(ModelConfig) if f.name == name)
            if given not in (default, value):
                raise ValueError(
                    f"MegabyteConfig.{name} is derived ({name}={value} from d_global / layer counts); "
                    f"got {given}"
                )
            setattr(self, name, value)
        # Building the sub-configs validates heads, RoPE head dims and the GLA backend now, not later.
        self.global_config()
        self.local_config()

    @property
    def byte_dim(self) -> int:
        """Width of one byte's global embedding (the paper's ``D_G``): ``d_global / patch_size``."""
        return self.d_global // self.patch_size

    def _stack_config(self, backbone: str, d_model: int, n_layers: int, n_heads: int) -> ModelConfig:
        common = dict(vocab_size=self.vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                      norm_eps=self.norm_eps, init_std=self.init_std)
        if backbone == "transformer":
            return TransformerConfig(**common, rope_theta=self.rope_theta)
        return GLAConfig(**common, backend=self.gla_backend)

    def global_config(self) -> ModelConfig:
        """The :class:`TransformerConfig` / :class:`GLAConfig` the global blocks are built from."""
        return self._stack_config(
            self.global_backbone, self.d_global, self.n_global_layers, self.n_global_heads
        )

    def local_config(self) -> ModelConfig:
        """The :class:`TransformerConfig` / :class:`GLAConfig` the local blocks are built from."""
        return self._stack_config(self.local_backbone, self.d_local, self.n_local_layers, self.n_local_heads)

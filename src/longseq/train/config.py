"""The configuration of a training run (everything but the model's own config)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    """What ``longseq train`` resolves its flags into; saved as ``RUN_DIR/config.json``.

    ``batch_size`` is the global batch in sequences per optimizer step: each of ``world_size`` ranks
    draws ``batch_size / world_size`` of it, in ``grad_accum`` micro-batches.
    """

    out: str = "runs/default"
    model: str = "gla"
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields (``--set k=v``)
    data: list[str] | None = None  # None: the built-in corpus
    tokenizer: str | None = None  # None: bytes; else a tokenizer path (.gguf, HF folder, a model saved with one)
    val_docs: list[str] | None = None  # None: the built-in split, else val_fraction
    val_fraction: float | None = None
    within_docs: bool = False
    passkey_mix: float = 0.0  # fraction of training rows made passkey examples (``longseq.tasks.passkey_mix``)
    # loss weight of those examples' answer ids (the other targets weigh 1); the logged train loss is then weighted
    passkey_answer_weight: float = 1.0
    cache_dir: str | None = None
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_every: int = 200
    eval_tokens: int | None = 262_144
    save_every: int | None = None  # None: at every evaluation
    keep: int = 2
    log_every: int = 10
    parallel: str = "none"
    device: str | None = None
    compile: bool = False
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        """Check every numeric field's range (messages use the flag names), before any work is done."""
        for name in ("seq_len", "batch_size", "steps", "grad_accum", "keep", "log_every"):
            _check(name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        for name in ("warmup", "eval_every"):
            _check(name, getattr(self, name), getattr(self, name) >= 0, ">= 0")
        _check("lr", self.lr, math.isfinite(self.lr) and self.lr > 0, "> 0")
        _check("min_lr_ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
        _check("weight_decay", self.weight_decay, math.isfinite(self.weight_decay) and self.weight_decay >= 0, ">= 0")
        for name in ("beta1", "beta2"):
            _check(name, getattr(self, name), 0 <= getattr(self, name) < 1, "in [0, 1)")
        _check("grad_clip", self.grad_clip, math.isfinite(self.grad_clip) and self.grad_clip >= 0,
               ">= 0 (0 disables it)")
        _check("passkey_mix", self.passkey_mix, 0 <= self.passkey_mix <= 1, "in [0, 1]")
        _check("passkey_answer_weight", self.passkey_answer_weight,
               math.isfinite(self.passkey_answer_weight) and self.passkey_answer_weight > 0, "> 0")
        if self.passkey_answer_weight != 1 and not self.passkey_mix:
            raise ValueError(
                f"--passkey-answer-weight {self.passkey_answer_weight} needs --passkey-mix: without passkey "
                "examples there is no answer to weigh (a resumed run takes the weight from its config.json: pass "
                "--passkey-answer-weight 1 to drop it)"
            )
        if self.val_fraction is not None:
            _check("val_fraction", self.val_fraction, 0 <= self.val_fraction < 1, "in [0, 1)")
            if self.val_docs is not None:  # the split would use val_docs and silently ignore the fraction
                raise ValueError(
                    f"--val-docs {_names(self.val_docs)} and --val-fraction {self.val_fraction} "
                    "contradict each other: --val-docs names the validation documents, --val-fraction holds out "
                    "a share of them instead; pass one of them"
                )
        if self.eval_tokens is not None:
            _check("eval_tokens", self.eval_tokens, self.eval_tokens >= 0, ">= 0 (0: all)")
            self.eval_tokens = self.eval_tokens or None
        if self.save_every is not None:
            _check("save_every", self.save_every, self.save_every >= 1, ">= 1")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch-size {self.batch_size} is not divisible by grad-accum {self.grad_accum}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in values.items() if k in names})
        except TypeError as err:  # a value of the wrong type (a hand-edited config.json) fails a comparison
            raise ValueError(f"bad training config value: {err}") from err


def _names(value: Any) -> str:
    """A ``val_docs`` list as its flag is typed (a hand-edited config.json may hold something else)."""
    return ",".join(map(str, value)) if isinstance(value, list) else repr(value)


def _check(name: str, value: Any, ok: bool, wanted: str) -> None:
    """Raise ``ValueError`` naming the field as its flag is spelled (``seq-len``) unless ``ok``; NaN fails
    every comparison, so it is refused wherever a range is checked."""
    if not ok:
        raise ValueError(f"{name.replace('_', '-')} must be {wanted}; got {value!r}")

"""The configuration of a training run (everything but the model's own config)."""

from __future__ import annotations

import dataclasses
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
    val_docs: list[str] | None = None  # None: the built-in split, else val_fraction
    val_fraction: float | None = None
    within_docs: bool = False
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
        positive = ("seq_len", "batch_size", "steps", "grad_accum", "keep", "log_every")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        for name in ("warmup", "eval_every"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be >= 0; got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min-lr-ratio must be in [0, 1]; got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"grad-clip must be >= 0 (0 disables it); got {self.grad_clip}")
        if self.eval_tokens is not None and self.eval_tokens < 1:
            self.eval_tokens = None
        if self.save_every is not None and self.save_every < 1:
            raise ValueError(f"save-every must be >= 1; got {self.save_every}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch-size {self.batch_size} is not divisible by grad-accum {self.grad_accum}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

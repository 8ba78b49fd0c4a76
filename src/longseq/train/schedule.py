"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], device: torch.device
) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW with weight decay on matrices only (norm gains and biases are not decayed).

    ``fused=True`` on CUDA when this torch supports it. Returns the optimizer and the names of its
    parameters in optimizer order (the key for name-based optimizer checkpoints).
    """
    decay, no_decay, names_d, names_n = [], [], [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
        (names_d if p.dim() >= 2 else names_n).append(name)
    kwargs: dict[str, Any] = {}
    if device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **kwargs), names_d + names_n


class WarmupCosine:
    """Linear warmup from ~0 to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr_ratio * lr``
    at ``total`` steps. Steps count from 1; the state is just the step, which the trainer keeps."""

    def __init__(self, lr: float, warmup: int, total: int, min_lr_ratio: float = 0.1) -> None:
        self.lr, self.warmup, self.total, self.min_lr = lr, warmup, total, lr * min_lr_ratio

    def __call__(self, step: int) -> float:
        if self.warmup and step <= self.warmup:
            return self.lr * step / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "warmup": self.warmup, "total": self.total, "min_lr": self.min_lr}

"""Mixed precision used by training, evaluation and the benchmarks: one rule, one place."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def autocast(device: torch.device | str) -> Any:
    """bf16 autocast on CUDA; nothing elsewhere (CPU autocast is slow for these models and would change
    the numbers the tests check)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()

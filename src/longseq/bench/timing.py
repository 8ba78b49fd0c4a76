"""Timing and memory bookkeeping shared by the benchmarks.

CUDA runs asynchronously, so every timed region is bracketed by a synchronize; peak memory is CUDA's
allocator high-water mark (there is no cheap equivalent on CPU, where it is reported as ``None``).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import torch

#: What a measurement that ran out of memory reports instead of a number (the sweep goes on).
OOM = "OOM"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, fn())``, with the work queued before and by ``fn`` finished on both sides."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory error (some kernels raise a plain ``RuntimeError`` for it)."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def release_memory(device: torch.device) -> None:
    """Collect garbage and hand cached CUDA blocks back, so the next configuration starts from what is live."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new high-water mark for :func:`peak_memory_gib`."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """The most CUDA memory allocated since :func:`reset_peak_memory`, in GiB; ``None`` on CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

"""What the kernels' launch rules need to know about the device."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TypeVar

import torch

# A plain dict, not functools.cache: torch.compile warns on every traced call of a cache-wrapped function.
_SM_COUNTS: dict[torch.device, int] = {}


def cuda_sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA ``device`` (read once per device); None off CUDA, where each caller
    picks the count its rule assumes (the interpreter runs one program at a time)."""
    if device.type != "cuda":
        return None
    count = _SM_COUNTS.get(device)
    if count is None:
        count = _SM_COUNTS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return count


def device_of(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context that makes ``x``'s CUDA device current around a Triton launch: Triton launches on the current
    device, not on its arguments'. A no-op context off CUDA, and while ``torch.compile`` traces (the compiled graph
    launches on its inputs' device; a fullgraph decode step then holds no device switch)."""
    if not x.is_cuda or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(x.device)


F = TypeVar("F", bound=Callable)


def on_first_arg_device(fn: F) -> F:
    """Run ``fn`` (a function launching Triton kernels on the tensors it is given, its first positional argument
    a tensor) with that tensor's CUDA device current (see :func:`device_of`), so a model on ``cuda:1`` launches
    there whatever the current device is."""

    @functools.wraps(fn)
    def on_device(x, *args, **kwargs):
        with device_of(x):
            return fn(x, *args, **kwargs)

    return on_device  # type: ignore[return-value]

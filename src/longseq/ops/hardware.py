"""What the kernels' launch rules need to know about the device."""

from __future__ import annotations

import contextlib
import functools

import torch


@functools.cache
def cuda_sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA ``device`` (read once per device); None off CUDA, where each caller
    picks the count its rule assumes (the interpreter runs one program at a time)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def device_of(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context that makes ``x``'s CUDA device current around a Triton launch: Triton launches on the current
    device, not on its arguments'. A no-op context off CUDA, and while ``torch.compile`` traces (the compiled graph
    launches on its inputs' device; a fullgraph decode step then holds no device switch)."""
    if not x.is_cuda or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(x.device)

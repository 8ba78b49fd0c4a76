"""What the kernels' launch rules need to know about the device."""

from __future__ import annotations

import functools

import torch


@functools.cache
def cuda_sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA ``device`` (read once per device); None off CUDA, where each caller
    picks the count its rule assumes (the interpreter runs one program at a time)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count

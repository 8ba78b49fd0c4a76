"""What a benchmark report says about where it ran, and how its Markdown tables print a cell."""

from __future__ import annotations

import platform
from typing import Any

import torch


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU's architecture and the number of threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def library_version(name: str) -> str | None:
    """The installed version of distribution ``name``; ``None`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def fmt(value: Any, spec: str) -> str:
    """A table cell: ``value`` formatted with ``spec``, text (``"OOM"``, ``"skipped"``) as it is, ``None`` as n/a."""
    if value is None:
        return "n/a"
    return value if isinstance(value, str) else format(value, spec)

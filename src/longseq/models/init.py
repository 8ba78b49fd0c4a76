"""Weight initialisation shared by every model: one rule, written once."""

from __future__ import annotations

import math

from torch import nn


def init_weights(model: nn.Module, std: float, residual_depths: dict[str, int],
                 extra: tuple[nn.Parameter, ...] = ()) -> None:
    """Normal(0, ``std``) weights for every Linear and Embedding (zero biases), then the ``extra``
    parameters (learned pads); then GPT-2 style depth scaling: the projections that write into a
    residual stream (``*out.weight``, ``*down.weight``) under each prefix of ``residual_depths`` get
    ``std / sqrt(2 * depth)`` with that stream's depth (each stack is its own residual stream).

    The order of the draws is fixed (modules, extras, then prefixes in order), so a seed gives the same
    model every time."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    for p in extra:
        nn.init.normal_(p, mean=0.0, std=std)
    for prefix, depth in residual_depths.items():
        for name, p in model.named_parameters():
            if name.startswith(prefix) and name.endswith(("out.weight", "down.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * depth))

"""When a single-token decode step may take the fused kernels of :mod:`longseq.ops.decode_block`.

The fused path computes the same function as the modules (same rounding points, see that package), so
it is taken automatically wherever it applies: CUDA tensors (or :data:`FORCE_FUSED_STEP`, which the
tests set to run it through the Triton interpreter), one token per row and at most
:data:`FUSED_STEP_MAX_ROWS` rows, inference (no autograd, no autocast), and plain modules: an
``nn.Linear`` subclass, a bias or a forward hook (adapters, FSDP, profilers) would be bypassed, so
their presence sends the step down the module path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import decode_block
from .norm import RMSNorm

#: Rows up to which a single-token step is fused: its GEMVs read each weight once per row, so beyond a
#: few rows cuBLAS's batched product is the better kernel.
FUSED_STEP_MAX_ROWS = 8
#: Take the fused path on CPU tensors too (the tests, with ``TRITON_INTERPRET=1``).
FORCE_FUSED_STEP = False


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_rows(h: Tensor) -> bool:
    """``h`` ``[B, 1, d]`` with few rows, in a dtype the kernels compute exactly as the modules do (fp32
    sums: not float64), on CUDA (or forced), outside autocast, kernels importable."""
    if h.dim() != 3 or h.shape[1] != 1 or h.shape[0] > FUSED_STEP_MAX_ROWS or h.dtype not in _KERNEL_DTYPES:
        return False
    if not (h.is_cuda or FORCE_FUSED_STEP) or torch.is_autocast_enabled(h.device.type):
        return False
    return decode_block.kernels_available()


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` or any submodule has forward (pre-)hooks (FSDP2's unshard, profilers, adapters):
    a path that calls none of the submodules must not run then."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def plain_modules(h: Tensor, modules: tuple[nn.Module, ...], linears: tuple[nn.Module, ...]) -> bool:
    """The fused kernels may stand in for ``modules`` (the module trees a step would call) and ``linears``
    (the projections whose weights they read): no forward hook anywhere in the trees, no autograd (the
    kernels have none: with grad enabled, neither ``h`` nor any parameter may require it), and each
    projection exactly an ``nn.Linear`` (a subclass or a wrapper, such as a LoRA layer, computes more than
    its weight) without bias, with a contiguous weight in ``h``'s dtype."""
    if any(has_hooks(m) for m in modules):
        return False
    if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for m in modules for p in m.parameters())):
        return False
    for m in linears:
        if type(m) is not nn.Linear or m.bias is not None:
            return False
        if m.weight.dtype != h.dtype or not m.weight.is_contiguous():
            return False
    return True


def head_logits(norm: nn.Module, head: nn.Module, h: Tensor) -> Tensor:
    """``head(norm(h))`` for ``h`` ``[B, T, d]``; one fused kernel where the step is fusable."""
    if type(norm) is RMSNorm and fused_rows(h) and plain_modules(h, (norm, head), (head,)):
        return decode_block.norm_linear(h[:, 0], head.weight, norm.weight, norm.eps)[:, None]
    return head(norm(h))

"""Numerical comparison helper shared by the test suite and benchmarks."""

from __future__ import annotations

import torch
from torch import Tensor

# Relative-RMS tolerances by the lower-precision dtype of the two tensors compared.
RTOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 4e-3, torch.float16: 2e-3}


def relative_rms_error(actual: Tensor, expected: Tensor, atol: float = 0.0) -> float:
    """``||actual - expected|| / max(||expected||, atol)``, computed in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / max(float(e.norm()), atol, 1e-30))


def assert_close(
    actual: Tensor, expected: Tensor, *, rtol: float | None = None, atol: float = 1e-12, name: str = "tensor"
) -> None:
    """Assert equal shapes, all finite, and relative RMS error ``<= rtol``.

    The error is ``||actual - expected|| / max(||expected||, atol)``: relative for ordinary tensors,
    with an absolute floor ``atol`` so near-zero references are not judged by noise. ``rtol``
    defaults to :data:`RTOL` for the less precise of the two dtypes.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        bad = int((~torch.isfinite(actual)).sum())
        raise AssertionError(f"{name}: {bad} of {actual.numel()} elements are not finite")
    if rtol is None:
        dtypes = [actual.dtype, expected.dtype]
        rtol = max(RTOL.get(d, 1e-4) for d in dtypes)
    err = relative_rms_error(actual, expected, atol)
    if not err <= rtol:
        raise AssertionError(f"{name}: relative RMS error {err:.3e} > rtol {rtol:.1e}")


def triton_interpreter_problem(kernel) -> str | None:
    """Why Triton kernels cannot be tested here, or None.

    None on CUDA (kernels compile) or when ``TRITON_INTERPRET=1`` is active and works. Otherwise a reason
    to skip: ``kernel`` (any ``@triton.jit`` function of the module under test) was decorated before the
    variable was set, or this Triton's interpreter cannot run a loop with a runtime bound (as every
    longseq kernel has; e.g. triton < 3.7 with numpy >= 2.4).
    """
    if torch.cuda.is_available():
        return None
    import triton
    import triton.language as tl

    if not isinstance(kernel, triton.runtime.interpreter.InterpretedFunction):
        return "the kernels were imported before TRITON_INTERPRET=1 was set"

    @triton.jit
    def probe(x_ptr, n_ptr):
        acc = 0
        for i in range(0, tl.load(n_ptr)):
            acc += i
        tl.store(x_ptr, acc)

    x, n = torch.zeros(1, dtype=torch.int32), torch.tensor([3], dtype=torch.int32)
    try:
        probe[(1,)](x, n)
    except Exception as e:  # any interpreter failure means: skip, with the reason
        return f"Triton {triton.__version__}'s interpreter fails here: {e!r}"
    return None

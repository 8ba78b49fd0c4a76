"""Time the fused single-token GEMV kernels (:mod:`longseq.ops.decode_block`) under several tilings.

    python benchmarks/tune_decode_block.py            # CUDA: MEGABYTE paper95m's nine projection shapes

Each (rows per program, warps) rule is applied to every weight size, and the kernels' own rule (2 rows /
1 warp up to ``SMALL_WEIGHT`` elements, 8 rows / 4 warps above) is timed beside them, with cuBLAS's GEMV
(``F.linear`` alone, no norm or epilogue) and the module path (norm + linear + epilogue as separate ops)
as anchors. Timing: a CUDA graph of 20 calls per replay (``do_bench_cudagraph``), so the per-call figure
is what a captured decode step pays; the median of 3 repeats. ``weighted_us_per_byte`` weights each
shape by how often a paper95m byte runs it (4 local layers every byte, 12 global layers every 8 bytes).
Prints one JSON line per rule.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from longseq.ops import decode_block
from longseq.ops.decode_block import kernels

# (name, D in, N out, kind, launches per byte)
SHAPES = [("qkv512", 512, 1536, "norm", 4), ("out512", 512, 512, "res", 4), ("gate_up512", 512, 1376, "swiglu", 4),
          ("down512", 1376, 512, "res", 4), ("head512", 512, 256, "norm", 1), ("qkv768", 768, 2304, "norm", 1.5),
          ("out768", 768, 768, "res", 1.5), ("gate_up768", 768, 2048, "swiglu", 1.5),
          ("down768", 2048, 768, "res", 1.5)]
RULES = [(8, 4), (8, 2), (4, 2), (2, 1), (16, 4)]  # (rows per program, warps), for every weight size
CALLS = 20


def per_call_us(fn) -> float:
    from triton.testing import do_bench_cudagraph

    times = [do_bench_cudagraph(lambda: [fn() for _ in range(CALLS)], rep=40) * 1e3 / CALLS for _ in range(3)]
    return sorted(times)[1]


def calls(device: torch.device) -> list[tuple[str, float, object, object, object]]:
    """(name, launches per byte, fused call, module-path call, cuBLAS-only call) per shape."""
    out = []
    for name, D, N, kind, per_byte in SHAPES:
        x = torch.randn(1, D, device=device, dtype=torch.bfloat16)
        nw = torch.randn(D, device=device, dtype=torch.bfloat16)
        w = torch.randn(2 * N if kind == "swiglu" else N, D, device=device, dtype=torch.bfloat16) * D**-0.5
        res = torch.randn(1, N, device=device, dtype=torch.bfloat16)
        if kind == "norm":
            fused, module = (lambda x=x, w=w, nw=nw: decode_block.norm_linear(x, w, nw),
                             lambda x=x, w=w, nw=nw: decode_block.norm_linear_reference(x, w, nw, 1e-5))
        elif kind == "res":
            fused, module = (lambda x=x, w=w, r=res: decode_block.linear_residual(x, w, r),
                             lambda x=x, w=w, r=res: decode_block.linear_residual_reference(x, w, r))
        else:
            fused, module = (lambda x=x, w=w, nw=nw: decode_block.norm_swiglu(x, nw, 1e-5, w),
                             lambda x=x, w=w, nw=nw: decode_block.norm_swiglu_reference(x, nw, 1e-5, w))
        out.append((name, per_byte, fused, module, lambda x=x, w=w: F.linear(x, w)))
    return out


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("tune_decode_block.py needs a CUDA GPU")
    cases = calls(torch.device("cuda"))
    anchors = {"module path": 3, "cuBLAS GEMV only": 4}
    for label, i in anchors.items():
        times = {c[0]: per_call_us(c[i]) for c in cases}
        print(json.dumps(dict(rule=label, **{k: round(v, 2) for k, v in times.items()})), flush=True)
    saved = kernels.SMALL, kernels.LARGE
    try:
        for rule in [None, *RULES]:
            if rule is not None:
                kernels.SMALL = kernels.LARGE = rule
            else:
                kernels.SMALL, kernels.LARGE = saved
            times = {name: per_call_us(fused) for name, _, fused, _, _ in cases}
            weighted = sum(times[name] * per_byte for name, per_byte, *_ in cases)
            label = "default (SMALL / LARGE by weight size)" if rule is None else f"{rule[0]} rows, {rule[1]} warps"
            print(json.dumps(dict(rule=label, weighted_us_per_byte=round(weighted, 2),
                                  **{k: round(v, 2) for k, v in times.items()})), flush=True)
    finally:
        kernels.SMALL, kernels.LARGE = saved


if __name__ == "__main__":
    main()

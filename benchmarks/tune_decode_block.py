"""Time the fused single-token GEMV kernels (:mod:`longseq.ops.decode_block`) under several tilings.

    python benchmarks/tune_decode_block.py                      # CUDA: MEGABYTE paper95m's nine projection shapes
    python benchmarks/tune_decode_block.py --shapes wide        # the tiling rules on wider models (d 576 ... 4096)
    python benchmarks/tune_decode_block.py --shapes wide --rows 1,2,4,8,12,16,32   # FUSED_STEP_MAX_ROWS

Each (rows per program, warps) rule is applied to every weight size, and the kernels' own rule (2 rows /
1 warp up to ``SMALL_WEIGHT`` elements, 8 rows / 4 warps above) is timed beside them, with cuBLAS's GEMV
(``F.linear`` alone, no norm or epilogue) and the module path (norm + linear + epilogue as separate ops)
as anchors. Timing: a CUDA graph of 20 calls per replay (``do_bench_cudagraph``), so the per-call figure
is what a captured decode step pays; the median of 3 repeats. ``weighted_us_per_byte`` weights each
shape by how often a paper95m byte runs it (4 local layers every byte, 12 global layers every 8 bytes).
Prints one JSON line per rule.

``--rows`` times instead the choice :data:`longseq.nn.fused.FUSED_STEP_MAX_ROWS` makes: for each row count,
every shape's fused kernel (default tiling) against the module path (norm, ``F.linear``, epilogue as separate
ops), which is what a step with more rows than the constant runs. The crossover is the smallest row count
where the module path's ``layer_us`` (one layer's four projections) is the lower.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from longseq.ops import decode_block
from longseq.ops.decode_block import kernels

# (name, D in, N out, kind, launches per byte)
PAPER95M = [("qkv512", 512, 1536, "norm", 4), ("out512", 512, 512, "res", 4), ("gate_up512", 512, 1376, "swiglu", 4),
            ("down512", 1376, 512, "res", 4), ("head512", 512, 256, "norm", 1), ("qkv768", 768, 2304, "norm", 1.5),
            ("out768", 768, 768, "res", 1.5), ("gate_up768", 768, 2048, "swiglu", 1.5),
            ("down768", 2048, 768, "res", 1.5)]


def _layer(name: str, d: int, qkv: int, hidden: int) -> list[tuple[str, int, int, str, float]]:
    """One Transformer++ layer's four projections (width ``d``, ``qkv`` fused q/k/v outputs, SwiGLU ``hidden``),
    each run once per token."""
    return [(f"qkv_{name}", d, qkv, "norm", 1), (f"out_{name}", d, d, "res", 1),
            (f"gate_up_{name}", d, hidden, "swiglu", 1), (f"down_{name}", hidden, d, "res", 1)]


# Models wider than the presets the tiling was chosen on: SmolLM2-135M (GQA 9/3 heads), the 85M and 1.3B
# Transformer presets, and a Llama-7B-shaped layer.
WIDE = [*_layer("576", 576, 576 + 2 * 192, 1536), *_layer("768", 768, 3 * 768, 2048),
        *_layer("2048", 2048, 3 * 2048, 5472), *_layer("4096", 4096, 3 * 4096, 11008)]
SHAPE_SETS = {"paper95m": PAPER95M, "wide": WIDE}
RULES = [(8, 4), (8, 2), (4, 2), (2, 1), (16, 4)]  # (rows per program, warps), for every weight size
CALLS = 20


def per_call_us(fn) -> float:
    from triton.testing import do_bench_cudagraph

    times = [do_bench_cudagraph(lambda: [fn() for _ in range(CALLS)], rep=40) * 1e3 / CALLS for _ in range(3)]
    return sorted(times)[1]


def calls(device: torch.device, shapes, rows: int = 1) -> list[tuple[str, float, object, object, object]]:
    """(name, launches per byte, fused call, module-path call, cuBLAS-only call) per shape, on ``rows`` rows."""
    out = []
    for name, D, N, kind, per_byte in shapes:
        x = torch.randn(rows, D, device=device, dtype=torch.bfloat16)
        nw = torch.randn(D, device=device, dtype=torch.bfloat16)
        w = torch.randn(2 * N if kind == "swiglu" else N, D, device=device, dtype=torch.bfloat16) * D**-0.5
        res = torch.randn(rows, N, device=device, dtype=torch.bfloat16)
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


def rows_sweep(shapes, rows: list[int], device: torch.device) -> None:
    """One JSON line per row count: each shape's fused and module-path microseconds, and per model width the
    sum over its layer's projections (``layer_us``) both ways."""
    for n in rows:
        cases = calls(device, shapes, n)
        fused = {c[0]: per_call_us(c[2]) for c in cases}
        module = {c[0]: per_call_us(c[3]) for c in cases}
        widths = sorted({name.rsplit("_", 1)[1] for name in fused}, key=int)
        layer = {w: {"fused": round(sum(t for k, t in fused.items() if k.endswith("_" + w)), 2),
                     "module": round(sum(t for k, t in module.items() if k.endswith("_" + w)), 2)} for w in widths}
        print(json.dumps({"rows": n, "layer_us": layer, "fused": {k: round(v, 2) for k, v in fused.items()},
                          "module": {k: round(v, 2) for k, v in module.items()}}), flush=True)
        del cases
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="paper95m")
    p.add_argument("--rows", default=None, help="comma-separated row counts: time fused vs module path instead")
    args = p.parse_args()
    try:
        rows = None if args.rows is None else [int(r) for r in args.rows.split(",")]
    except ValueError:
        p.error(f"--rows must be comma-separated integers; got {args.rows!r}")
    if rows is not None and (not rows or min(rows) < 1):
        p.error(f"--rows must be >= 1; got {args.rows!r}")
    if not torch.cuda.is_available():
        sys.exit("tune_decode_block.py needs a CUDA GPU")
    shapes = SHAPE_SETS[args.shapes]
    if rows is not None:
        rows_sweep(shapes, rows, torch.device("cuda"))
        return
    cases = calls(torch.device("cuda"), shapes)
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

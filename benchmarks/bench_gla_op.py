"""Time the GLA op's PyTorch backends, forward and forward+backward, side by side.

    python benchmarks/bench_gla_op.py                       # CPU, B=1 T=8192 H=4 K=V=64, fp32
    python benchmarks/bench_gla_op.py --device cuda --T 2048 8192 --dtype bfloat16
    python benchmarks/bench_gla_op.py --backends chunk chunk@64x16 recurrent   # the chunk path at other sizes

``chunk@CxS`` runs the PyTorch chunk function with chunks of ``C`` and sub-chunks of ``S`` tokens (the ``chunk``
backend runs it at its defaults), so chunk sizes are compared in one run.

Prints a Markdown table and one JSON line per row (append them to benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from longseq.bench.timing import sync
from longseq.ops.gla import gated_linear_attention, gla_chunk


def time_call(fn, device: torch.device, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call, in seconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def gla_op(backend: str):
    """``(q, k, v, g) -> o`` of a backend name: the public op, or ``chunk@CxS`` (the chunk function at chunk sizes
    ``C`` and ``S``)."""
    if backend.startswith("chunk@"):
        try:
            C, c = (int(x) for x in backend.removeprefix("chunk@").split("x"))
        except ValueError:
            raise SystemExit(f"--backends: {backend!r} is not chunk@CxS (e.g. chunk@64x16)") from None
        return lambda q, k, v, g: gla_chunk(q, k, v, g, q.shape[-1] ** -0.5, None, C, c)[0]
    return lambda q, k, v, g: gated_linear_attention(q, k, v, g, backend=backend)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="input dtype")
    parser.add_argument("--B", type=int, default=1, help="batch size")
    parser.add_argument("--T", type=int, nargs="+", default=[8192], help="sequence lengths")
    parser.add_argument("--H", type=int, default=4, help="heads")
    parser.add_argument("--K", type=int, default=64, help="key head dim")
    parser.add_argument("--V", type=int, default=64, help="value head dim")
    parser.add_argument("--backends", nargs="+", default=["chunk", "recurrent"], help="backends to time")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best is reported)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows = []
    for T in args.T:
        shape = (args.B, T, args.H, args.K)
        q, k = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        v = torch.randn(args.B, T, args.H, args.V, device=device, dtype=dtype, requires_grad=True)
        g_logit = torch.randn(shape, device=device, dtype=torch.float32, requires_grad=True)
        for backend in args.backends:
            op = gla_op(backend)

            def fwd(q=q, k=k, v=v, g_logit=g_logit, op=op):
                with torch.no_grad():
                    op(q, k, v, F.logsigmoid(g_logit) / 16)

            def fwd_bwd(q=q, k=k, v=v, g_logit=g_logit, op=op):
                op(q, k, v, F.logsigmoid(g_logit) / 16).float().sum().backward()

            row = dict(
                backend=backend, B=args.B, T=T, H=args.H, K=args.K, V=args.V, dtype=args.dtype,
                fwd_s=time_call(fwd, device, args.repeats), fwd_bwd_s=time_call(fwd_bwd, device, args.repeats),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                threads=torch.get_num_threads(), torch=torch.__version__,
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| backend | B | T | H | K | V | dtype | fwd (s) | fwd+bwd (s) |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['B']} | {r['T']} | {r['H']} | {r['K']} | {r['V']} | {r['dtype']} "
              f"| {r['fwd_s']:.3f} | {r['fwd_bwd_s']:.3f} |")


if __name__ == "__main__":
    main()

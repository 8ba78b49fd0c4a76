"""Session 25 (H100): the public one-step GLA op before (``recurrent_gla`` on ``[B, 1, H, *]`` views, as
``gla_decode_step`` called it up to 4900ab9) and after (``recurrent_step``), next to the kernel replayed from a
CUDA graph, in one process. Output: ``2026-12-07_h100_gla_decode_op_ab_s25.log``.

    PYTHONPATH=src python benchmarks/results/2026-12-07_h100_gla_decode_op_ab_s25.py

(The run used the same calls written with lambdas and loop-bound closures; rewritten here as functions.)
Since the commit after debeb59, ``_triton_unusable`` remembers its answers for CUDA tensors, so the
"before" column of a rerun no longer pays all of what 4900ab9's op paid.
"""

import torch
import triton

from longseq.ops.gla import _triton_unusable, gla_decode_step
from longseq.ops.gla.step import _check_shapes
from longseq.ops.gla.triton import recurrent_gla


def compare(H: int, K: int, V: int, B: int) -> str:
    q, k = (torch.randn(B, H, K, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, H, V, device="cuda", dtype=torch.bfloat16)
    g = torch.nn.functional.logsigmoid(torch.randn(B, H, K, device="cuda")).to(torch.bfloat16)
    s = torch.randn(B, H, K, V, device="cuda")

    def kernel():
        return recurrent_gla(q[:, None], k[:, None], v[:, None], g[:, None], K**-0.5, s, out_state=s)

    def old():
        _check_shapes(q, k, v, g, s)
        _triton_unusable(q, k, v, g, s)
        return kernel()[0][:, 0]

    def new():
        return gla_decode_step(q, k, v, g, s, backend="triton")

    old(), old()  # warm-up of the old call form
    kernel()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernel()
    t_graph = triton.testing.do_bench(graph.replay, rep=200)
    t_old = triton.testing.do_bench(old, rep=200)
    t_new = triton.testing.do_bench(new, rep=200)
    t_old2 = triton.testing.do_bench(old, rep=200)
    return (f"H{H} K{K} V{V} B{B}: kernel(graph) {t_graph * 1e3:.1f} us, op before {t_old * 1e3:.1f}/"
            f"{t_old2 * 1e3:.1f} us, op now {t_new * 1e3:.1f} us, now/kernel {t_new / t_graph:.2f}")


if __name__ == "__main__":
    for H, K, V in [(16, 128, 128), (4, 256, 512)]:
        for B in (1, 8, 64):
            print(compare(H, K, V, B), flush=True)

"""The small-tile check of 2026-12-07 (H100, session 23), as it ran: one (K, V[, T]) configuration of the bf16
Triton GLA forward+backward (B = 1, H = 2, an initial state and a final-state gradient) against the fp32
``chunk`` backend, in this process. Each configuration ran in its own process, all at once:

    export PYTHONPATH=$PWD/src CUDA_LAUNCH_BLOCKING=1
    for kv in "32 16" "32 32" "64 32" "32 16 700"; do
      python benchmarks/results/2026-12-07_h100_gla_bf16_small_tiles_s23.py $kv & done; wait

Log: 2026-12-07_h100_gla_bf16_small_tiles_s23.log (after the fix; the failing run is described in RESULTS.md).
"""
import sys
import traceback

import torch

from longseq.ops.gla import gated_linear_attention

K, V = int(sys.argv[1]), int(sys.argv[2])
B, T, H = 1, int(sys.argv[3]) if len(sys.argv) > 3 else 80, 2
torch.manual_seed(0)
q, k = (torch.randn(B, T, H, K, device="cuda").bfloat16() for _ in range(2))
v = torch.randn(B, T, H, V, device="cuda").bfloat16()
g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device="cuda"))
s0 = torch.randn(B, H, K, V, device="cuda")


def run(backend, *xs):
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    o, s = gated_linear_attention(*leaves[:4], initial_state=leaves[4], output_final_state=True, backend=backend)
    (o.float().square().sum() + s.square().sum()).backward()
    return [o, s] + [x.grad for x in leaves]


try:
    got = run("triton", q, k, v, g, s0)
    ref = run("chunk", *(x.float() for x in (q, k, v, g, s0)))
    errs = [float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(got, ref, strict=True)]
    print(f"K{K} V{V} T{T}: OK max rel err {max(errs):.2e}")
except Exception:
    tb = traceback.format_exc().splitlines()
    where = [line.strip() for line in tb if "ops/gla/triton" in line]
    print(f"K{K} V{V} T{T}: FAIL at {where[-2:] if where else tb[-3:]} {tb[-1][:120]}")

# ruff: noqa: B023  (a record of the script as it ran: each closure is called within its own iteration)
"""The A/B of 2026-12-07 (H100), as it ran: the Triton GLA kernels of commit 00373ab ("old": cumsum, states,
intra-chunk A and output kernels) against those of commit 4195368 ("new": gate cumsums in-kernel, A formed in
the output kernel), in one process. Setup: from the repository root,
    mkdir -p benchmarks/tmp_diag/old_triton
    for f in __init__ autograd chunk_bwd chunk_fwd common recurrent; do
      git show 00373ab:src/longseq/ops/gla/triton/$f.py > benchmarks/tmp_diag/old_triton/$f.py; done
    git checkout 4195368 -- src/longseq/ops/gla   # the "new" kernels
    PYTHONPATH=src python benchmarks/results/2026-12-07_h100_gla_fwd_ab.py
Log: 2026-12-07_h100_gla_fwd_ab.log. The "new" kernels were reverted after it (commit message of the revert).
"""
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, "benchmarks/tmp_diag")
import old_triton  # noqa: E402

from longseq.ops.gla.triton import chunk_gla as new_gla  # noqa: E402

for H, K, V, B, T in [(16, 128, 128, 16, 2048), (16, 128, 128, 1, 32768), (4, 256, 512, 16, 2048),
                      (4, 256, 512, 1, 32768)]:
    q, k = (torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = (F.logsigmoid(torch.randn(B, T, H, K, device="cuda")) / 16).requires_grad_(True)
    do = torch.randn_like(v)
    for name, fn in (("old", lambda ng: old_triton.chunk_gla(q, k, v, g, K**-0.5)),
                     ("new", lambda ng: new_gla(q, k, v, g, K**-0.5, needs_grad=ng))):
        def fwd():
            with torch.no_grad():
                fn(False)

        def fb():
            fn(True)[0].backward(do)

        fwd()
        fb()
        torch.cuda.synchronize()
        print(f"H{H} K{K} V{V} B{B} T{T} {name}: fwd {do_bench(fwd, warmup=10, rep=60):.3f} ms, "
              f"fwd+bwd {do_bench(fb, warmup=10, rep=60):.3f} ms", flush=True)

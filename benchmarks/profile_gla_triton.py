"""Per-kernel CUDA time of one GLA forward+backward: longseq's Triton kernels next to fla's chunk_gla.

    python benchmarks/profile_gla_triton.py [--B 8 --T 4096 --H 16 --K 128 --V 128]

Prints a torch.profiler table (self CUDA time per kernel, 5 iterations after warmup) for each
implementation, so a slow kernel shows up by name.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from longseq.ops.gla import gated_linear_attention


def inputs(B, T, H, K, V, dtype=torch.bfloat16):
    torch.manual_seed(0)
    q = torch.randn(B, T, H, K, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, H, K, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, T, H, V, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device="cuda")) / 16
    g = g.to(dtype).requires_grad_()
    return q, k, v, g


def run_profile(name, fn, args, iters=5):
    do = torch.randn_like(args[2])

    def fwd_bwd():  # gradients returned, not accumulated into .grad: no elementwise pass a model's step never pays
        torch.autograd.grad(fn(*args), args, do)

    for _ in range(3):
        fwd_bwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fwd_bwd()
        torch.cuda.synchronize()
    print(f"\n##### {name} (per-kernel totals over {iters} fwd+bwd)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--V", type=int, default=128)
    p.add_argument("--no-fla", action="store_true", help="profile longseq only")
    a = p.parse_args()
    args = inputs(a.B, a.T, a.H, a.K, a.V)
    scale = a.K**-0.5
    run_profile(
        "longseq triton",
        # As the models call it: without the public op's input value checks (fla has none either).
        lambda q, k, v, g: gated_linear_attention(q, k, v, g, scale=scale, backend="triton", check_values=False)[0],
        args,
    )
    if a.no_fla:
        return
    try:
        from fla.ops.gla import chunk_gla
    except Exception as e:  # fla is an optional anchor
        print(f"fla not importable: {type(e).__name__}: {e}")
        return
    run_profile("fla chunk_gla", lambda q, k, v, g: chunk_gla(q, k, v, g, scale=scale)[0], args)


if __name__ == "__main__":
    main()

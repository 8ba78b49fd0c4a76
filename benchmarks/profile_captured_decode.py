"""Where a captured decode step goes: per-key step times and the kernels of a few captured steps.

    python benchmarks/profile_captured_decode.py                          # MEGABYTE paper95m, fused
    python benchmarks/profile_captured_decode.py --mode graph --model transformer --preset 85m
    python benchmarks/profile_captured_decode.py --no-fused-kernels       # the module path, for comparison

Batch 1, bf16, greedy, after a ``--context``-token prompt: the step is captured as in
``generate(..., compile=True)`` (``--mode graph``) or ``compile="fused"`` (``--mode fused``). Prints the
median time of each decode key's step (MEGABYTE: the step that runs the global model once per patch, and
the others) from CUDA events, ms per token over ``--steps`` steps, and a torch.profiler table of the
kernels of ``--profile-steps`` steps (launches and GPU time per token, by kernel name).
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from longseq import build_model, capabilities
from longseq.bench.decode import decode_warmup
from longseq.generate import Decoder, prefill_rows
from longseq.nn import fused as fused_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="megabyte", help="model kind")
    p.add_argument("--preset", default="paper95m", help="model preset")
    p.add_argument("--global-backbone", default=None, help="MEGABYTE: transformer or gla")
    p.add_argument("--mode", choices=["graph", "fused"], default="fused", help="captured step, or torch.compile'd too")
    p.add_argument("--no-fused-kernels", action="store_true", help="the blocks' module path (decode_block kernels off)")
    p.add_argument("--context", type=int, default=4096, help="prompt length")
    p.add_argument("--steps", type=int, default=256, help="timed steps")
    p.add_argument("--profile-steps", type=int, default=16, help="profiled steps (MEGABYTE: a multiple of P)")
    p.add_argument("--rows", type=int, default=40, help="kernel rows to print")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_captured_decode.py needs a CUDA GPU")
    if args.no_fused_kernels:
        fused_step.FUSED_STEP_MAX_ROWS = 0
    torch.manual_seed(0)
    device = torch.device("cuda")
    overrides = {"global_backbone": args.global_backbone} if args.global_backbone else {}
    model = build_model(args.model, args.preset, **overrides).to(device, torch.bfloat16).eval()
    P = capabilities(model).seq_multiple
    prompt = torch.randint(0, model.config.vocab_size, (1, args.context), device=device)
    warmup = decode_warmup(2, P, fused=args.mode == "fused")
    with torch.no_grad():
        state = model.init_state(1, max_len=args.context + warmup + 64 + args.steps + args.profile_steps + 1)
        logits = prefill_rows(model, state, [prompt], None)
        dec = Decoder(model, state, 0.0, None, None, capture=True, fuse=args.mode == "fused")
        dec.tokens.copy_(logits.argmax(-1)[:, None])
        t0 = time.perf_counter()
        for _ in range(warmup):
            dec.step()
        torch.cuda.synchronize()
        print(f"warm-up (compiles, captures: {dec.captures}): {time.perf_counter() - t0:.1f} s")
        per_key = collections.defaultdict(list)
        for _ in range(64):
            key = model.decode_key(state)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dec.step()
            end.record()
            torch.cuda.synchronize()
            per_key[key].append(start.elapsed_time(end) * 1e3)
        for key, us in per_key.items():
            print(f"decode key {key}: {len(us)} steps, median {sorted(us)[len(us) // 2]:.1f} us")
        t0 = time.perf_counter()
        for _ in range(args.steps):
            dec.step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        print(f"{seconds / args.steps * 1e3:.4f} ms per token, {args.steps / seconds:,.0f} tokens/s")

        from torch.profiler import ProfilerActivity, profile

        n = args.profile_steps
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                dec.step()
            torch.cuda.synchronize()
    kernels: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name[:100]][0] += 1
            kernels[e.name[:100]][1] += e.device_time
    launches = sum(c for c, _ in kernels.values())
    total = sum(us for _, us in kernels.values())
    print(f"\n{launches / n:.1f} kernels and {total / n:.1f} us of GPU time per token\n")
    print("| launches / token | us / token | us / launch | kernel |\n|---:|---:|---:|---|")
    for name, (count, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[: args.rows]:
        print(f"| {count / n:.2f} | {us / n:.2f} | {us / count:.2f} | `{name}` |")


if __name__ == "__main__":
    main()

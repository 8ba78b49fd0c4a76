"""Where a model's training step goes: CUDA time per kernel class (GLA kernels, GEMMs, attention, optimizer, the
rest), per step, for the step ``longseq bench`` times.

    python benchmarks/profile_train.py [--model gla] [--preset medium] [--seq-len 2048] [--batch-tokens 16384]
                                       [--compile] [--steps 3] [--json out.json]

Prints the per-class totals (ms per step and share of the step's kernel time), the wall time per step (the
difference from the kernel time is launch gaps and host work) and the slowest kernels by name. The issue's
model-level target (a ~350M GLA LM at 120K tok/s at T = 2K) is judged with ``longseq bench``; this says what to
work on.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from longseq.bench.train import train_step
from longseq.models import build_model

#: Kernel classes, first match wins (patterns on the CUDA kernel's name).
CLASSES = [
    ("gla chunk kernels", r"chunk_states|intra_attention|output_kernel|prepare_kernel|qkg_grad|state_grads|value_grad"),
    # inductor's fused kernels (triton_poi_/triton_red_/triton_per_...), whatever op names they carry
    ("triton (compiled)", r"^triton_"),
    ("attention (SDPA)", r"flash|fmha|attention|cudnn"),
    ("GEMM", r"gemm|xmma|cutlass|nvjet|cublas|splitK|sm90_|sm80_"),
    ("optimizer", r"multi_tensor|adam"),
    ("reductions / norms", r"reduce|norm|softmax|cross_entropy|nll_loss"),
    ("elementwise / copies", r"elementwise|vectorized|copy|fill|\bcat|index|memcpy|memset"),
]


def classify(name: str) -> str:
    for label, pattern in CLASSES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return label
    return "other"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gla")
    p.add_argument("--preset", default="medium")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-tokens", type=int, default=16384, help="tokens per step; batch = this // seq-len")
    p.add_argument("--steps", type=int, default=3, help="profiled steps, after 3 warmup steps")
    p.add_argument("--compile", action="store_true",
                   help="the blocks through torch.compile, as longseq train --compile")
    p.add_argument("--top", type=int, default=25, help="slowest kernels listed")
    p.add_argument("--json", default=None, help="also write the per-class and per-kernel totals here")
    args = p.parse_args(argv)
    if args.seq_len < 1 or args.batch_tokens < args.seq_len or args.steps < 1:
        p.error(f"need --seq-len >= 1, --batch-tokens >= --seq-len and --steps >= 1; got {args.seq_len}, "
                f"{args.batch_tokens}, {args.steps}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_train.py profiles CUDA kernels: it needs a GPU")
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(args.model, args.preset).to(device)
    batch = args.batch_tokens // args.seq_len
    step = train_step(model, batch, args.seq_len, device, args.compile)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    per_kernel: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.self_device_time_total > 0:
            per_kernel[event.key] += event.self_device_time_total / 1e3 / args.steps  # ms per step
    per_class: dict[str, float] = defaultdict(float)
    for name, t in per_kernel.items():
        per_class[classify(name)] += t
    kernel_ms = sum(per_class.values())
    tokens = batch * args.seq_len
    print(f"{args.model} {args.preset}, {model.num_params() / 1e6:.1f}M params, batch {batch} x {args.seq_len}"
          f"{', compiled' if args.compile else ''} on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"wall {wall_ms:.2f} ms/step ({tokens / wall_ms * 1e3:,.0f} tok/s, with the profiler on); "
          f"kernels {kernel_ms:.2f} ms/step; gaps {wall_ms - kernel_ms:.2f} ms/step\n")
    print("| kernel class | ms/step | share |\n|---|---:|---:|")
    for label, t in sorted(per_class.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {t:.2f} | {t / kernel_ms:.1%} |")
    print(f"\n| kernel (top {args.top}) | class | ms/step |\n|---|---|---:|")
    for name, t in sorted(per_kernel.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {name[:90]} | {classify(name)} | {t:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "wall_ms": wall_ms, "kernel_ms": kernel_ms, "classes": per_class,
                       "kernels": per_kernel, "device": torch.cuda.get_device_name(), "torch": torch.__version__},
                      f, indent=1)


if __name__ == "__main__":
    main()

"""Profile single-token decode steps (where per-step latency goes) for each model kind / cache policy.

    python benchmarks/profile_decode.py --device cuda --context 4096 --steps 32

Prints ms per step and the torch.profiler table (top ops by self CPU time) for each case.
"""

from __future__ import annotations

import argparse
import time

import torch

from longseq import build_model, parse_policy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--preset", default="base", help="model preset")
    p.add_argument("--context", type=int, default=4096, help="prompt length before decoding")
    p.add_argument("--steps", type=int, default=32, help="profiled decode steps")
    p.add_argument("--cases", default="gla,transformer:full,transformer:tova:512,megabyte", help="kind[:policy]")
    p.add_argument("--rows", type=int, default=15, help="profiler rows to print")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for case in args.cases.split(","):
        kind, _, spec = case.partition(":")
        preset = "paper95m" if kind == "megabyte" and args.preset == "base" else args.preset
        model = build_model(kind, preset).to(device=device, dtype=dtype).eval()
        policy = parse_policy(spec) if spec else None
        prompt = torch.randint(0, 256, (1, args.context), device=device)
        with torch.no_grad():
            state = model.init_state(1, cache=policy)
            logits, state = model.step(prompt, state)
            tok = logits[:, -1:].argmax(-1)
            for _ in range(4):
                logits, state = model.step(tok, state)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.profiler.profile() as prof:
                for _ in range(args.steps):
                    logits, state = model.step(tok, state)
                    tok = logits[:, -1:].argmax(-1)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / args.steps * 1e3
        print(f"\n### {case} ({preset}), context {args.context}: {ms:.2f} ms/step (under the profiler)", flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows), flush=True)


if __name__ == "__main__":
    main()

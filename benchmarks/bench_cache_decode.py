"""Decode throughput and memory of a bounded (TOVA) KV cache versus the full cache.

For a byte-level Transformer (default: the ~125M ``base`` preset) at ``--context`` bytes of context:

1. for ``Full()`` and ``TOVA(budget=context/8)``, the largest batch whose decode fits the memory budget
   (batch sizes doubled, then bisected; OOM is caught), with decode tokens/s and peak memory there;
2. the per-step overhead of TOVA's attention-based eviction over ``Window`` (same budget, same batch):
   both keep ``budget`` tokens, so the difference is the cost of scoring and choosing the victim.

Prefill: the full cache is prefilled with the whole context (buffers reserved up front, so decoding never
reallocates). A bounded cache's decode cost depends only on how many tokens it keeps, not on which, so by
default it is prefilled with the last ``budget`` tokens of the context at their true positions (a full
cache of ``budget`` tokens, as after a long prompt); ``--exact-prefill`` instead runs the whole context
through the policy token by token (exact, much slower to set up, same decode numbers).

GPU (the lead runs this):   python benchmarks/bench_cache_decode.py --json results/cache_decode.json
CPU smoke test:             python benchmarks/bench_cache_decode.py --device cpu --preset tiny --context 256
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch

import longseq
from longseq.bench.timing import is_oom, release_memory, sync
from longseq.cache import TOVA, CachePolicy, Full, KVCache, Window


@dataclass
class Run:
    policy: str
    batch: int
    tokens_per_s: float
    ms_per_step: float
    peak_bytes: int
    state_bytes: int
    measured_peak: bool  # False on CPU: peak is weights + allocated cache buffers (an estimate)


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


@torch.inference_mode()
def run_decode(model, policy: CachePolicy, batch: int, args, device: torch.device) -> Run:
    """Prefill ``batch`` rows, then time ``args.steps`` single-token decode steps."""
    g = torch.Generator(device="cpu").manual_seed(0)
    total = args.context + args.warmup + args.steps
    state = model.init_state(batch, cache=policy, device=device)
    if policy.budget is None:
        for cache in state.layers:
            assert isinstance(cache, KVCache)
            cache.reserve(total)
        start = 0
    elif args.exact_prefill:
        start = 0
    else:
        start = max(0, args.context - policy.budget)
        state.position = start  # the kept tokens sit at their true positions, as after a long prompt
    for a in range(start, args.context, args.prefill_chunk):
        b = min(args.context, a + args.prefill_chunk)
        ids = torch.randint(0, model.config.vocab_size, (batch, b - a), generator=g).to(device)
        model.step(ids, state)
    tokens = torch.randint(0, model.config.vocab_size, (args.warmup + args.steps, batch, 1), generator=g).to(
        device
    )
    for i in range(args.warmup):
        model.step(tokens[i], state)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        model.step(tokens[i], state)
    sync(device)
    elapsed = time.perf_counter() - t0
    allocated = sum(c.allocated_nbytes() for c in state.layers if isinstance(c, KVCache))
    if device.type == "cuda":
        peak, measured = torch.cuda.max_memory_allocated(device), True
    else:
        peak, measured = model_bytes(model) + allocated, False
    del state
    return Run(
        policy.spec,
        batch,
        batch * args.steps / elapsed,
        1e3 * elapsed / args.steps,
        peak,
        allocated,
        measured,
    )


def try_batch(model, policy, batch, args, device) -> Run | None:
    """The run at ``batch``, or None if it ran out of memory or exceeded the memory budget."""
    try:
        run = run_decode(model, policy, batch, args, device)
    except (RuntimeError, MemoryError) as err:
        if not is_oom(err) and not isinstance(err, MemoryError):
            raise
        run = None
    release_memory(device)
    if run is not None and run.peak_bytes > args.memory_budget:
        return None
    return run


def largest_batch(model, policy, args, device, log) -> Run | None:
    """Double the batch until it no longer fits, then bisect between the last fit and the first failure."""
    best, batch, failed = None, 1, None
    while batch <= args.max_batch:
        run = try_batch(model, policy, batch, args, device)
        log(
            f"  {policy.spec:>12s} batch {batch:5d}: "
            + (
                "does not fit"
                if run is None
                else f"{run.tokens_per_s:10.1f} tok/s, peak {run.peak_bytes / 2**30:.2f} GiB"
            )
        )
        if run is None:
            failed = batch
            break
        best, batch = run, batch * 2
    if best is None or failed is None:
        return best
    lo, hi = best.batch, failed
    for _ in range(args.bisect_steps):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        run = try_batch(model, policy, mid, args, device)
        log(
            f"  {policy.spec:>12s} batch {mid:5d}: "
            + (
                "does not fit"
                if run is None
                else f"{run.tokens_per_s:10.1f} tok/s, peak {run.peak_bytes / 2**30:.2f} GiB"
            )
        )
        if run is None:
            hi = mid
        else:
            lo, best = mid, run
    return best


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--preset", default="base", help="Transformer preset (base is ~125M parameters)")
    p.add_argument("--context", type=int, default=16384, help="context length in bytes before decoding")
    p.add_argument("--budget", type=int, default=0, help="TOVA/Window budget (default: context / 8)")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=8, help="untimed decode steps before timing")
    p.add_argument("--prefill-chunk", type=int, default=1024, help="tokens per step() call while prefilling")
    p.add_argument(
        "--exact-prefill",
        action="store_true",
        help="prefill bounded caches with the whole context through the policy (slow; same decode cost)",
    )
    p.add_argument(
        "--memory-gb",
        type=float,
        default=0.0,
        help="memory budget for the batch search (default: 90%% of the GPU, 2 GiB on CPU)",
    )
    p.add_argument(
        "--max-batch", type=int, default=0, help="largest batch tried (default: 4096 on GPU, 8 on CPU)"
    )
    p.add_argument("--bisect-steps", type=int, default=4, help="bisection steps after doubling the batch")
    p.add_argument(
        "--dtype", default="", help="bfloat16 / float32 (default: bfloat16 on GPU, float32 on CPU)"
    )
    p.add_argument("--json", default="", help="also write the results as JSON to this path")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    args.budget = args.budget or max(1, args.context // 8)
    args.max_batch = args.max_batch or (4096 if device.type == "cuda" else 8)
    if args.memory_gb:
        args.memory_budget = int(args.memory_gb * 2**30)
    elif device.type == "cuda":
        args.memory_budget = int(0.9 * torch.cuda.get_device_properties(device).total_memory)
    else:
        args.memory_budget = 2 * 2**30

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    torch.manual_seed(0)
    model = longseq.build_model("transformer", args.preset).to(device=device, dtype=dtype).eval()
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    )
    log(
        f"{args.preset}: {model.num_params() / 1e6:.1f}M parameters, {dtype}, {device_name}; "
        f"context {args.context}, "
        f"budget {args.budget}, memory budget {args.memory_budget / 2**30:.1f} GiB"
    )

    full = largest_batch(model, Full(), args, device, log)
    tova = largest_batch(model, TOVA(args.budget), args, device, log)
    overhead = []
    for batch in sorted({1, tova.batch if tova is not None else 1}):
        pair = {}
        for policy in (Window(args.budget), TOVA(args.budget)):
            run = try_batch(model, policy, batch, args, device)
            if run is not None:
                pair[policy.name] = run
        if len(pair) == 2:
            w, t = pair["window"], pair["tova"]
            overhead.append(
                {
                    "batch": batch,
                    "window_ms": w.ms_per_step,
                    "tova_ms": t.ms_per_step,
                    "overhead_pct": 100 * (t.ms_per_step / w.ms_per_step - 1),
                }
            )

    unit = "GiB (measured peak)" if device.type == "cuda" else "GiB (estimate: weights + cache buffers)"
    lines = [
        f"Decode at {args.context} bytes of context, `{args.preset}` Transformer "
        f"({model.num_params() / 1e6:.0f}M), "
        f"{str(dtype).replace('torch.', '')}, {device_name}, torch {torch.__version__}, memory budget "
        f"{args.memory_budget / 2**30:.1f} GiB",
        "",
        f"| cache | largest batch | decode tokens/s | ms / step | peak memory {unit} | cache buffers GiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run in (full, tova):
        if run is not None:
            lines.append(
                f"| {run.policy} | {run.batch} | {run.tokens_per_s:.1f} | {run.ms_per_step:.2f} | "
                f"{run.peak_bytes / 2**30:.2f} | {run.state_bytes / 2**30:.3f} |"
            )
    if full is not None and tova is not None:
        lines.append("")
        lines.append(
            "TOVA / Full decode throughput at their largest batches: "
            f"{tova.tokens_per_s / full.tokens_per_s:.2f}x"
        )
    lines += ["", "| batch | window ms / step | tova ms / step | TOVA overhead |", "|---:|---:|---:|---:|"]
    for o in overhead:
        lines.append(
            f"| {o['batch']} | {o['window_ms']:.2f} | {o['tova_ms']:.2f} | {o['overhead_pct']:+.1f}% |"
        )
    print("\n".join(lines))

    result = {
        "device": device_name,
        "torch": torch.__version__,
        "longseq": longseq.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "config": {k: v for k, v in vars(args).items() if k != "json"} | {"dtype": str(dtype)},
        "full": asdict(full) if full is not None else None,
        "tova": asdict(tova) if tova is not None else None,
        "tova_vs_window": overhead,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

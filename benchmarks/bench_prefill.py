"""Prefill time of a bounded cache against a plain window at the same budget (issue 22, part 4).

Exact TOVA/H2O prefill decides token by token which entry leaves; longseq replays those decisions from one
score product per sub-chunk (``longseq/ops/eviction_replay``). A window's decisions depend on positions
only, so its prefill is one banded attention. This script times ``longseq.generate.prefill`` (the prompt
in one ``model.step`` call, as ``longseq eval`` and the sweep run it) under every policy at ``ctx/K``, a
plain forward without a cache policy (the full cache) beside them, and reports each policy's time over
Window's.

    python benchmarks/bench_prefill.py                                   # SmolLM2-135M shape, CPU or GPU
    python benchmarks/bench_prefill.py --contexts 2048 4096 16384 --batch-sizes 1 16 --out prefill.jsonl

Weights are random (speed does not depend on them); bf16 on CUDA, fp32 on CPU. Each configuration runs
once untimed, then ``--repeats`` timed runs; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from longseq.bench.report import describe_device, library_version
from longseq.bench.timing import is_oom, release_memory, timed
from longseq.cache.policies import parse_policy, resolve_budget
from longseq.generate import prefill
from longseq.models import build_model
from longseq.train.distributed import pick_device


def time_prefill(model, ids: torch.Tensor, spec: str | None, repeats: int, device: torch.device) -> float:
    """Median seconds of ``prefill(model, ids, policy)`` over ``repeats`` runs after one untimed run."""
    policy = None if spec is None else parse_policy(spec)
    times = []
    for i in range(repeats + 1):
        t, _ = timed(device, lambda: prefill(model, ids, policy, None))
        if i:
            times.append(t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", default="transformer")
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--policies", nargs="+", default=["window", "sink", "tova", "h2o"])
    p.add_argument("--fraction", type=int, default=8, help="budget = context / FRACTION (default 8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="append one JSON line per measurement here")
    args = p.parse_args(argv)
    if args.fraction < 1 or args.repeats < 1:
        p.error("--fraction and --repeats must be >= 1")
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build_model(args.kind, args.preset).to(device=device, dtype=dtype).eval()
    head = {"device": describe_device(device), "torch": torch.__version__, "triton": library_version("triton"),
            "kind": args.kind, "preset": args.preset, "dtype": str(dtype).replace("torch.", "")}
    print(json.dumps(head), flush=True)
    rows = []
    with torch.no_grad():
        for context in args.contexts:
            budget = resolve_budget(f"ctx/{args.fraction}", context)
            for batch in args.batch_sizes:
                ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
                times: dict[str, float | str] = {}
                for name in ["full", *args.policies]:
                    spec = None if name == "full" else f"{name}:{budget}"
                    try:
                        times[name] = time_prefill(model, ids, spec, args.repeats, device)
                    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
                        if not is_oom(err):
                            raise
                        times[name] = "OOM"
                    release_memory(device)
                    row = dict(head, context=context, batch=batch, budget=budget, policy=name,
                               seconds=times[name], tok_s=batch * context / times[name]
                               if isinstance(times[name], float) else None)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(row) + "\n")
    print("\n| context | batch | budget | policy | prefill s | tok/s | / Window |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        base = next(x["seconds"] for x in rows if (x["context"], x["batch"], x["policy"]) ==
                    (r["context"], r["batch"], "window"))
        ok = isinstance(r["seconds"], float) and isinstance(base, float)
        print(f"| {r['context']} | {r['batch']} | {r['budget']} | {r['policy']} | "
              f"{r['seconds'] if not ok else round(r['seconds'], 3)} | "
              f"{'-' if r['tok_s'] is None else round(r['tok_s'])} | {round(r['seconds'] / base, 2) if ok else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

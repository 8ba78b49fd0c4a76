"""Prefill time of a bounded cache against a plain window at the same budget (issue 22, part 4).

Exact TOVA/H2O prefill decides token by token which entry leaves; longseq replays those decisions from one
score product per sub-chunk (``longseq/ops/eviction_replay``). A window's decisions depend on positions
only, so its prefill is one banded attention. This script times ``longseq.generate.prefill`` (the prompt
in one ``model.step`` call, as ``longseq eval`` and the sweep run it) under every policy at ``ctx/K``, a
plain forward without a cache policy (the full cache) beside them, and reports each policy's time over
Window's.

    python benchmarks/bench_prefill.py                                   # SmolLM2-135M shape, CPU or GPU
    python benchmarks/bench_prefill.py --contexts 2048 4096 16384 --batch-sizes 1 16 --out prefill.jsonl
    python benchmarks/bench_prefill.py --model SmolLM2-135M-Instruct.Q4_1.gguf --text ../shared/data/hamlet.txt

Weights are random unless ``--model`` names one (speed does not depend on them, except that scores spanning
a very wide range make the CPU replay compute in float64); ids are random unless ``--text`` gives a file for
the model's tokenizer. bf16 on CUDA, fp32 on CPU. Each configuration runs
once untimed, then ``--repeats`` timed runs, the policies taking turns; the fastest is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from longseq.bench.report import describe_device, library_version
from longseq.bench.timing import is_oom, release_memory, timed
from longseq.cache.policies import parse_policy, resolve_budget
from longseq.generate import prefill
from longseq.models import build_model
from longseq.sources import open_model
from longseq.train.distributed import pick_device


def time_policies(model, ids: torch.Tensor, specs: dict[str, str | None], repeats: int,
                  device: torch.device) -> dict[str, float | str]:
    """Fastest of ``repeats`` timed runs of ``prefill(model, ids, policy)`` per policy, after one untimed
    run each; the policies take turns within every round, so a slow spell of a shared machine hits all."""
    best: dict[str, float | str] = {}
    for i in range(repeats + 1):
        for name, spec in specs.items():
            if best.get(name) == "OOM":
                continue
            policy = None if spec is None else parse_policy(spec)
            try:
                t, _ = timed(device, lambda policy=policy: prefill(model, ids, policy, None))
            except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
                if not is_oom(err):
                    raise
                best[name] = "OOM"
            else:
                if i:
                    best[name] = min(t, best.get(name, float("inf")))  # type: ignore[type-var]
            release_memory(device)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", default=None, help="model kind built with random weights (default transformer)")
    p.add_argument("--preset", default=None, help="its preset (default smollm2-135m)")
    p.add_argument("--model", default=None, help="a model path (.gguf, HF folder, run) instead of --kind/--preset")
    p.add_argument("--text", default=None, help="a UTF-8 file whose first tokens make the prompts")
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
    if args.model is not None and (args.kind is not None or args.preset is not None):
        p.error("--kind/--preset build a random model; --model opens one: give one or the other")
    args.kind, args.preset = args.kind or "transformer", args.preset or "smollm2-135m"
    for flag, path in (("--model", args.model), ("--text", args.text)):
        if path is not None and not Path(path).exists():
            p.error(f"{flag}: no such file: {path}")
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    if args.model:
        model = open_model(args.model, device=device).to(dtype=dtype)
    else:
        model = build_model(args.kind, args.preset).to(device=device, dtype=dtype).eval()
    text_ids = None
    if args.text:
        text_ids = torch.tensor(model.tokenizer.encode(Path(args.text).read_text(encoding="utf-8")), device=device)
        if len(text_ids) < max(args.contexts):
            p.error(f"--text {args.text} has {len(text_ids)} tokens, fewer than the longest context")
    head = {"device": describe_device(device), "torch": torch.__version__, "triton": library_version("triton"),
            "model": args.model or f"{args.kind}:{args.preset}", "text": args.text,
            "dtype": str(dtype).replace("torch.", "")}
    print(json.dumps(head), flush=True)
    rows = []
    with torch.no_grad():
        for context in args.contexts:
            budget = resolve_budget(f"ctx/{args.fraction}", context)
            for batch in args.batch_sizes:
                if text_ids is None:
                    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
                else:
                    ids = text_ids[:context].expand(batch, context)
                specs = {name: None if name == "full" else f"{name}:{budget}" for name in ["full", *args.policies]}
                times = time_policies(model, ids, specs, args.repeats, device)
                for name in specs:
                    secs = times[name]
                    row = dict(head, context=context, batch=batch, budget=budget, policy=name, seconds=secs,
                               tok_s=batch * context / secs if isinstance(secs, float) else None)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(row) + "\n")
    print("\n| context | batch | budget | policy | prefill s | tok/s | / Window |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        base = next((x["seconds"] for x in rows if (x["context"], x["batch"], x["policy"]) ==
                     (r["context"], r["batch"], "window")), None)
        ok = isinstance(r["seconds"], float) and isinstance(base, float)
        print(f"| {r['context']} | {r['batch']} | {r['budget']} | {r['policy']} | "
              f"{r['seconds'] if not ok else round(r['seconds'], 3)} | "
              f"{'-' if r['tok_s'] is None else round(r['tok_s'])} | {round(r['seconds'] / base, 2) if ok else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile time and step time of a training step, the whole model through ``torch.compile`` against each block compiled
in place (``longseq.models.compile_blocks``, what ``longseq train --compile`` does), in one process.

    python benchmarks/compile_time.py [--model transformer] [--preset tiny] [--set n_layers=12] [--device cpu]
                                      [--batch 2] [--seq-len 256] [--steps 3]

For each mode, from a fresh dynamo cache and a fresh inductor cache folder (so the second mode cannot reuse the first's
compiled kernels): the first step's wall time (tracing and compiling included), the mean of ``--steps`` further
steps, and how many graphs dynamo compiled. A step is forward, a mean log-sum-exp loss and backward (no optimizer).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from longseq.bench.timing import timed
from longseq.cli.common import add_overrides_flag, parse_sets
from longseq.models import build_model, compile_blocks, config_class
from longseq.precision import autocast


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="transformer")
    p.add_argument("--preset", default="tiny")
    add_overrides_flag(p, "model config override, e.g. n_layers=12 (repeatable)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    try:
        args.overrides = parse_sets(args.overrides) or {}
        config = config_class(args.model)  # a bad kind, preset or field: refused before any work
        config.check_overrides(args.overrides)
        config.from_preset(args.preset, **args.overrides)
    except ValueError as err:
        p.error(str(err))
    if min(args.batch, args.seq_len, args.steps) < 1:
        p.error("--batch, --seq-len and --steps must be >= 1")
    return args


def one_mode(args, mode: str) -> dict:
    from torch._dynamo.utils import counters

    device = torch.device(args.device)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_time_")
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = build_model(args.model, args.preset, **args.overrides).to(device)
    x = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device=device)
    forward = torch.compile(model) if mode == "whole model" else model
    if mode == "per block":
        compile_blocks(model)

    def step() -> None:
        with autocast(device):
            loss = forward(x).float().logsumexp(-1).mean()
        loss.backward()

    first, _ = timed(device, step)
    steps, _ = timed(device, lambda: [step() for _ in range(args.steps)])
    return dict(mode=mode, model=args.model, preset=args.preset, overrides=args.overrides, device=str(device),
                first_step_s=first, step_ms=steps / args.steps * 1e3,
                graphs=counters["stats"]["unique_graphs"], torch=torch.__version__)


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = [one_mode(args, mode) for mode in ("eager", "whole model", "per block")]
    print("| mode | first step (s) | step (ms) | graphs |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['first_step_s']:.1f} | {r['step_ms']:.1f} | {r['graphs']} |")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()

"""How many steps each training run gets: fixed once per output folder from a throughput probe."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from .common import DEFAULT_MINUTES, EVAL_TOKENS, environment, free_gpu_memory, read_json, say, write_json
from .config import Ctx, RunSpec, pick_device
from .data import train_bytes


def probe_throughput(ctx: Ctx, specs: list[RunSpec]) -> dict[str, dict[str, Any]]:
    """Exclusive training throughput of each run (``longseq.bench.train.bench_train``: forward, backward
    and AdamW on its real shapes, bf16 autocast on CUDA), one model at a time so they do not share the GPU."""
    import torch

    from longseq.bench.train import bench_train
    from longseq.models import build_model

    dev = pick_device(ctx)
    out = {}
    for spec in specs:
        torch.manual_seed(0)
        model = build_model(spec.kind, spec.preset, **spec.overrides).to(dev)
        t0 = time.perf_counter()
        r = bench_train(model, spec.batch_size, spec.seq_len, ctx.setup.probe_steps, ctx.setup.probe_warmup, dev)
        out[spec.name] = {"params": model.num_params(), "probe_tok_s": r["train_tok_s"],
                          "probe_peak_gib": r["train_peak_gib"], "probe_wall_s": time.perf_counter() - t0}
        say(f"probe {spec.name}: {model.num_params() / 1e6:.2f}M params, {r['train_tok_s']:,.0f} tok/s exclusive")
        del model
        free_gpu_memory(dev)
    return out


def _tokens_per_run(ctx: Ctx, group: str, specs: list[RunSpec], probes: dict, minutes: float,
                    cap_tokens: float) -> tuple[str, dict[str, float]]:
    """The group's rule in words, and the training bytes it gives each run (before rounding to steps)."""
    max_epochs = ctx.args.max_epochs
    if group == "2k":
        rate = min(probes[s.name]["probe_tok_s"] for s in specs)
        tokens = min(minutes * 60 * rate, cap_tokens)
        rule = (f"equal steps: the number the slower model trains in {minutes:g} GPU minutes, capped at "
                f"{max_epochs:g} epochs")
        return rule, {s.name: tokens for s in specs}
    fastest = max(probes[s.name]["probe_tok_s"] for s in specs)
    shared = min(minutes, cap_tokens / fastest / 60)
    rule = (f"equal GPU minutes: {shared:.2f} min each at exclusive throughput ({minutes:g} asked, "
            f"capped so the fastest model sees at most {max_epochs:g} epochs)")
    return rule, {s.name: shared * 60 * probes[s.name]["probe_tok_s"] for s in specs}


def make_plan(ctx: Ctx, group: str) -> dict[str, Any]:
    """Steps per run, fixed once per output directory (``results/plan-<group>.json``).

    Group 2k (experiments 1 and 3): equal steps, as many as the slower model does in ``--minutes``.
    Group 8k (experiment 2): equal GPU minutes at exclusive throughput. Both are capped at
    ``--max-epochs`` passes over the training bytes: these models overfit 4.7 MB of Shakespeare, so more
    minutes would not mean a better model; for group 8k the cap shortens the shared time budget (the
    fastest model reaches the cap), so the minutes stay equal.
    """
    path = ctx.result(f"plan-{group}")
    plan = read_json(path)
    if plan is not None and not ctx.args.force:
        return plan
    args, setup = ctx.args, ctx.setup
    minutes = args.minutes if args.minutes is not None else DEFAULT_MINUTES[group]
    specs = [s for s in setup.runs.values() if s.group == group]
    probes = probe_throughput(ctx, specs)
    n_train = train_bytes(ctx)
    rule, per_run_tokens = _tokens_per_run(ctx, group, specs, probes, minutes, args.max_epochs * n_train)
    runs = {}
    for s in specs:
        tps = s.batch_size * s.seq_len
        steps = args.steps if args.steps else max(1, int(per_run_tokens[s.name] // tps))
        p = probes[s.name]
        runs[s.name] = {
            "spec": asdict(s), **p, "steps": steps, "tokens_per_step": tps, "tokens": steps * tps,
            "epochs": steps * tps / n_train, "gpu_minutes": steps * tps / p["probe_tok_s"] / 60,
        }
    plan = {"group": group, "rule": rule if not args.steps else f"fixed --steps {args.steps}",
            "minutes": minutes, "max_epochs": args.max_epochs, "train_bytes": n_train,
            "eval_tokens": 8192 if setup.quick else EVAL_TOKENS,
            # Where the results came from, so a report built elsewhere (from copied JSON) names them right.
            "data_source": ctx.data_source, "out": str(ctx.out),
            "env": environment(pick_device(ctx)), "runs": runs}
    write_json(path, plan)
    return plan

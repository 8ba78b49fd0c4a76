"""Experiment 2 (``eval-megabyte``): MEGABYTE, a byte Transformer and a byte GLA at context 8192.

bpb with plain and strided windows, and batch-1 generation speed, of the models trained for equal GPU
minutes by the ``train-8k`` stage.
"""

from __future__ import annotations

import time
from typing import Any

from .common import environment, free_gpu_memory, say, write_json
from .config import Ctx, pick_device
from .data import val_documents
from .train import load_trained


def _measure(ctx: Ctx, model, rec: dict[str, Any], docs, dev) -> dict[str, Any]:
    """One model's row: its training facts, bpb (plain and strided, overall and per work) and speed."""
    from longseq.bench.train import bench_generate
    from longseq.evaluate import evaluate_bpb

    setup = ctx.setup
    row: dict[str, Any] = {
        "params": rec["params"], "steps": rec["steps"], "gpu_minutes": rec["gpu_minutes"],
        "epochs": rec["epochs"], "probe_tok_s": rec["probe_tok_s"], "label": rec["spec"]["label"],
    }
    T = setup.long_ctx
    for tag, stride in (("plain", T), ("strided", setup.stride)):
        t0 = time.perf_counter()
        r = evaluate_bpb(model, docs, T, stride, batch_size=2 if setup.quick else 4, device=dev)
        row[f"bpb_{tag}"] = r.bpb
        row[f"eval_{tag}_s"] = time.perf_counter() - t0
        row[f"per_doc_{tag}"] = {d.name: d.bpb for d in r.docs}
    g = bench_generate(model, 1, setup.gen_prompt, setup.gen_tokens, dev)
    row.update(gen_bytes_s=g["gen_tok_s"], prefill_bytes_s=g["prefill_tok_s"])
    return row


def stage_eval_megabyte(ctx: Ctx) -> dict[str, Any]:
    """Evaluate the three 8k models one after another; write ``results/megabyte.json``."""
    setup, dev = ctx.setup, pick_device(ctx)
    docs = val_documents(ctx)
    rows = {}
    for name in ("megabyte-8k", "transformer-8k", "gla-8k"):
        model, rec = load_trained(ctx, name, dev)
        row = rows[name] = _measure(ctx, model, rec, docs, dev)
        say(f"{name}: plain {row['bpb_plain']:.4f}, strided {row['bpb_strided']:.4f} bpb, "
            f"generation {row['gen_bytes_s']:.1f} bytes/s")
        del model
        free_gpu_memory(dev)
    write_json(ctx.result("megabyte"), {
        "ctx": setup.long_ctx, "stride": setup.stride,
        "gen": {"batch": 1, "prompt": setup.gen_prompt, "new_tokens": setup.gen_tokens},
        "models": rows, "env": environment(dev),
    })
    say(f"wrote {ctx.result('megabyte')}")
    return {}

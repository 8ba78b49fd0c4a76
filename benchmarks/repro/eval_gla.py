"""Experiment 3 (``eval-gla``): GLA vs Transformer++ trained at 2048 (``train-2k``).

bpb at the training context and at 2x and 4x it (extrapolation), and the size of the generation state
after streaming ever longer text.
"""

from __future__ import annotations

from typing import Any

from .common import environment, free_gpu_memory, say, write_json
from .config import Ctx, pick_device
from .data import val_documents
from .train import load_trained


def _state_bytes(ctx: Ctx, model, stream, dev) -> dict[str, int]:
    """``state.nbytes()`` after each of ``state_lens`` bytes of real text, fed through ``model.step`` at
    batch 1 (the Transformer keeps a Full cache)."""
    import numpy as np
    import torch

    setup = ctx.setup
    out = {}
    # The text repeats if it is shorter than the longest length: only the state's size matters here.
    ids = torch.from_numpy(np.resize(stream, max(setup.state_lens)).astype(np.int64))[None].to(dev)
    with torch.inference_mode():
        state = model.init_state(1)
        pos = 0
        for L in setup.state_lens:
            while pos < L:
                n = min(setup.ctx, L - pos)
                model.step(ids[:, pos:pos + n], state)
                pos += n
            out[str(L)] = int(state.nbytes())
    return out


def stage_eval_gla(ctx: Ctx) -> dict[str, Any]:
    """Evaluate the two 2k models at every context of ``extrap`` and measure their state; write
    ``results/gla.json``."""
    import numpy as np

    from longseq.evaluate import evaluate_bpb

    setup, dev = ctx.setup, pick_device(ctx)
    docs = val_documents(ctx)
    stream = np.concatenate([a for _, a in docs])
    rows = {}
    for name in ("transformer-2k", "gla-2k"):
        model, rec = load_trained(ctx, name, dev)
        row: dict[str, Any] = {"params": rec["params"], "steps": rec["steps"], "label": rec["spec"]["label"],
                               "epochs": rec["epochs"], "bpb": {}, "state_bytes": {}}
        for T in setup.extrap:
            r = evaluate_bpb(model, docs, T, T, batch_size=setup.eval_batch.get(T, 2), device=dev)
            row["bpb"][str(T)] = r.bpb
        row["state_bytes"] = _state_bytes(ctx, model, stream, dev)
        rows[name] = row
        say(f"{name}: bpb {row['bpb']}, state bytes {row['state_bytes']}")
        del model
        free_gpu_memory(dev)
    write_json(ctx.result("gla"), {"ctx": setup.ctx, "extrap": setup.extrap, "state_lens": setup.state_lens,
                                   "models": rows, "env": environment(dev)})
    say(f"wrote {ctx.result('gla')}")
    return {}

"""Experiment 1 (``eval-tova``): cache policies x budgets on 2048-byte validation windows, and what TOVA keeps.

Every window is decoded through ``model.step`` with the policy active from its first byte. The windows go
as one batch (each row evicts on its own): a token step into a bounded cache is launch-bound, so a step
over many rows costs little more than over one, and the sweep fits a GPU call that one window at a time
(``longseq.sweep.run_sweep``) would not.
"""

from __future__ import annotations

import math
import time
from typing import Any

from .common import LN2, POLICIES, environment, say, sync, write_json
from .config import Ctx, Setup, pick_device
from .data import val_documents
from .train import load_trained


def windows_of(docs, ctx_len: int):
    """Every whole ``ctx_len``-byte window of every document, in order: ``(doc, index, bytes)``."""
    return [(name, i, arr[i * ctx_len:(i + 1) * ctx_len]) for name, arr in docs for i in range(len(arr) // ctx_len)]


def score_windows(model, ids, policy, chunk: int = 512):
    """Summed next-byte loss (nats) per row of ``ids`` ``[N, T]``, the policy active from the first byte.

    The batched form of ``longseq.sweep.score_document``: one state for all rows (each row evicts on its
    own) fed through ``model.step`` in chunks; eviction is exact per token, so the chunk size changes the
    speed only. Returns a float64 ``[N]`` tensor; each row scores ``T - 1`` predictions.
    """
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        state = model.init_state(ids.shape[0], cache=policy)
        nats = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device)
        prev = None
        for a in range(0, ids.shape[1], chunk):
            x = ids[:, a:a + chunk]
            logits, state = model.step(x, state)
            logits = logits.float()
            preds = logits[:, :-1] if prev is None else torch.cat([prev, logits[:, :-1]], 1)
            targets = x[:, 1:] if prev is None else x
            nats += F.cross_entropy(preds.transpose(1, 2), targets, reduction="none").double().sum(1)
            prev = logits[:, -1:]
        return nats


def _time_evict(model, ids, budget: int, n: int, device) -> float:
    """Seconds per token step (all layers) of TOVA(budget) over a full cache, for ``ids.shape[0]`` rows."""
    import torch

    from longseq.cache import TOVA

    with torch.inference_mode():
        state = model.init_state(ids.shape[0], cache=TOVA(budget))
        model.step(ids[:, :budget + 8], state)  # fill, plus a few evictions as warmup
        sync(device)
        t0 = time.perf_counter()
        model.step(ids[:, budget + 8:budget + 8 + n], state)
        sync(device)
    return (time.perf_counter() - t0) / n


def _token_steps(setup: Setup) -> int:
    # H2O, TOVA-head and TOVA go token by token once the cache is full, at every budget.
    return sum(setup.ctx - b for b in setup.budgets) * 3


def _sweep_estimate(setup: Setup, timing: dict[str, Any], n: int) -> float:
    """Estimated seconds of the batched sweep over ``n`` windows, from the measured token-step times."""
    rows, tb = timing["rows"], timing["s_per_token_step_batched"]
    # What one more row adds to a step, from the small and the full batch.
    per_row = max(0.0, (tb - timing["s_per_token_step_small"]) / max(1, rows - timing["small_rows"]))
    per_batch = _token_steps(setup) * (tb - per_row * (rows - min(n, rows)))
    # Window / Sink / full are processed a chunk at a time; count them as 10% extra.
    return 1.1 * per_batch * math.ceil(n / rows)


def _time_token_steps(ctx: Ctx, model, all_ids, dev) -> dict[str, Any]:
    """How long a token step takes, at batch 1 (what run_sweep / score_document do), at a small batch and
    over ``--tova-rows`` windows at once, with the sweep times these predict."""
    setup = ctx.setup
    n_wins, budget = all_ids.shape[0], setup.budgets[0]
    probe_n = 32 if setup.quick else 128
    b_small = min(8, n_wins)
    t1 = _time_evict(model, all_ids[:1], budget, probe_n, dev)
    ts = _time_evict(model, all_ids[:b_small], budget, probe_n, dev)
    rows = min(n_wins, ctx.args.tova_rows)
    tb = _time_evict(model, all_ids[:rows], budget, probe_n, dev)
    timing = {
        "probe_tokens": probe_n, "budget": budget, "n_layers": model.config.n_layers,
        "s_per_token_step_batch1": t1, "small_rows": b_small, "s_per_token_step_small": ts,
        "rows": rows, "s_per_token_step_batched": tb,
        "run_sweep_estimate_s": 1.1 * _token_steps(setup) * t1 * n_wins,  # batch 1: one window at a time
    }
    timing["batched_estimate_s"] = _sweep_estimate(setup, timing, n_wins)
    timing["time_budget_s"] = ctx.args.tova_minutes * 60
    return timing


def _pick_windows(ctx: Ctx, timing: dict[str, Any], n_wins: int) -> list[int]:
    """Indices of the windows to score: all, or an evenly spaced subset that fits ``--tova-minutes``."""
    import numpy as np

    n_eval = n_wins if ctx.args.max_windows is None else min(n_wins, ctx.args.max_windows)
    # A token step is mostly launch overhead, so fewer rows save little: never go below 24 windows (8 per
    # work on average) for a time estimate; --max-windows is the explicit way to go lower.
    floor = min(n_eval, 24)
    while n_eval > floor and _sweep_estimate(ctx.setup, timing, n_eval) > timing["time_budget_s"]:
        n_eval -= 1
    return np.unique(np.linspace(0, n_wins - 1, n_eval).round().astype(int)).tolist()


def _sweep(ctx: Ctx, model, ids, names: list[str], rows: int, dev) -> tuple[dict, dict]:
    """bpb of every policy x budget (and the full cache) over the windows ``ids``, overall and per work."""
    import torch

    from longseq.cache import Full, parse_policy

    T = ctx.setup.ctx
    configs = [(spec, b) for spec, _ in POLICIES for b in ctx.setup.budgets] + [("full", None)]
    scores: dict[str, dict[str, Any]] = {}
    per_doc: dict[str, dict[str, float]] = {}
    for spec, b in configs:
        policy = Full() if spec == "full" else parse_policy(spec, budget=b)
        t0 = time.perf_counter()
        nats = torch.cat([score_windows(model, ids[a:a + rows], policy) for a in range(0, len(ids), rows)]).cpu()
        sync(dev)
        dt = time.perf_counter() - t0
        n_pred = len(ids) * (T - 1)
        key = spec if b is None else f"{spec}@{b}"
        scores[key] = {"policy": spec, "budget": b, "bpb": float(nats.sum()) / LN2 / n_pred,
                       "bytes": n_pred, "seconds": dt}
        for doc in dict.fromkeys(names):
            mask = torch.tensor([n == doc for n in names])
            per_doc.setdefault(doc, {})[key] = float(nats[mask].sum()) / LN2 / (int(mask.sum()) * (T - 1))
        say(f"{policy.spec:>16s}: {scores[key]['bpb']:.4f} bpb ({dt:.1f} s)")
    return scores, per_doc


def _add_sample(acc: dict[int, dict[str, Any]], st) -> None:
    """Fold one work's ``KeptStats`` of a layer into the running, sample-weighted mean of that layer."""
    a = acc.setdefault(st.layer, {"layer": st.layer, "samples": 0, "first_token": 0.0,
                                  "mean_age": 0.0, "recent": {str(r): 0.0 for r in st.recent}})
    n, m = a["samples"], st.samples
    a["first_token"] = (a["first_token"] * n + st.first_token * m) / (n + m)
    a["mean_age"] = (a["mean_age"] * n + st.mean_age * m) / (n + m)
    a["recent"] = {str(r): (a["recent"][str(r)] * n + v * m) / (n + m) for r, v in st.recent.items()}
    a["samples"] = n + m


def _kept_positions(ctx: Ctx, model, wins) -> tuple[dict[str, Any], list[str]]:
    """Kept positions (TOVA paper, Sec. 6) per budget and layer: the first window of each work, batch 1."""
    from longseq.cache import TOVA
    from longseq.sweep import kept_position_stats

    first = {}
    for name, _, w in wins:
        first.setdefault(name, w)
    kept: dict[str, Any] = {}
    for b in ctx.setup.kept_budgets:
        acc: dict[int, dict[str, Any]] = {}
        for w in first.values():
            for st in kept_position_stats(model, bytes(w.tobytes()), TOVA(b), every=64):
                _add_sample(acc, st)
        kept[str(b)] = [acc[k] for k in sorted(acc)]
    return kept, list(first)


def stage_eval_tova(ctx: Ctx) -> dict[str, Any]:
    """Score the validation windows under every policy and budget; write ``results/tova.json``."""
    import numpy as np
    import torch

    setup, dev = ctx.setup, pick_device(ctx)
    model, rec = load_trained(ctx, "transformer-2k", dev)
    T = setup.ctx
    wins = windows_of(val_documents(ctx), T)
    all_ids = torch.from_numpy(np.stack([w for _, _, w in wins]).astype(np.int64)).to(dev)
    timing = _time_token_steps(ctx, model, all_ids, dev)
    sel = _pick_windows(ctx, timing, len(wins))
    rows = timing["rows"]
    say(f"token step (TOVA {setup.budgets[0]}, {timing['n_layers']} layers): "
        f"{timing['s_per_token_step_batch1'] * 1e3:.2f} ms at batch 1, "
        f"{timing['s_per_token_step_batched'] * 1e3:.2f} ms at batch {rows}; run_sweep over {len(wins)} windows "
        f"would take ~{timing['run_sweep_estimate_s'] / 60:.1f} min, batched "
        f"~{timing['batched_estimate_s'] / 60:.1f} min; evaluating {len(sel)} of {len(wins)} windows")

    names = [wins[i][0] for i in sel]
    t_sweep = time.perf_counter()
    scores, per_doc = _sweep(ctx, model, all_ids[sel], names, rows, dev)
    sweep_s = time.perf_counter() - t_sweep
    kept, kept_docs = _kept_positions(ctx, model, wins)
    result = {
        "model": "transformer-2k", "params": rec["params"], "ctx": T, "budgets": setup.budgets,
        "policies": [p for p, _ in POLICIES], "windows_total": len(wins), "windows_evaluated": len(sel),
        "subset": len(sel) < len(wins), "window_docs": {d: names.count(d) for d in dict.fromkeys(names)},
        "bytes_scored": len(sel) * (T - 1), "scores": scores, "per_document": per_doc,
        "kept": kept, "kept_docs": kept_docs, "timing": {**timing, "sweep_s": sweep_s},
        "dtype": "fp32 (state API)", "env": environment(dev),
    }
    write_json(ctx.result("tova"), result)
    say(f"wrote {ctx.result('tova')}")
    return {}

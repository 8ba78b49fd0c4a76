"""Stage ``eval-recall`` (issue 20): multi-query associative recall for every model kind at equal size.

Each kind is trained from scratch on MQAR (``longseq.tasks.mqar``: key-value pairs, then each key asked again,
on bytes) at one sequence length with a range of pair counts, then scored on a grid of pair counts and
lengths -- the attention models also with bounded caches at 1/8 of the length -- and its state size at
16K tokens is read from a static state of that length. Writes ``results/recall.json``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .common import environment, free_gpu_memory, say, write_json
from .config import Ctx, pick_device

STATE_LEN = 16384  # the context at which the state bytes are compared


@dataclass(frozen=True)
class RecallSetup:
    """What the stage trains and scores (full run, or the --quick smoke run on a CPU)."""

    preset: str
    train_len: int
    train_pairs: tuple[int, ...]
    eval_lens: tuple[int, ...]
    eval_pairs: tuple[int, ...]
    steps: int
    batch_size: int
    lr: float
    eval_rows: int


FULL = RecallSetup("small", 512, (8, 16, 32, 64), (256, 512), (8, 16, 32, 64), 3000, 64, 1e-3, 512)
QUICK = RecallSetup("tiny", 64, (2, 4), (64,), (2, 4), 30, 16, 3e-3, 32)
# (kind, config overrides, cache policies scored; "-": the model's own state / the plain forward)
KINDS = [
    ("gla", {}, ["-"]),
    ("transformer", {}, ["-", "tova:ctx/8", "window:ctx/8"]),
    ("hybrid", {}, ["-", "tova:ctx/8"]),
    ("megabyte", {"max_seq_len": STATE_LEN}, ["-"]),  # its byte positions must reach the 16K state
]


def _policy(spec: str, length: int):
    from longseq.cache.policies import parse_policy, resolve_budget

    if spec == "-":
        return None
    name, budget = spec.split(":")
    return parse_policy(name, budget=resolve_budget(budget, length))


def _state_bytes(model, spec: str, dev) -> int:
    """Bytes of a static state holding ``STATE_LEN`` tokens (a bounded cache holds its budget + 1 slots)."""
    return int(model.init_state(1, cache=_policy(spec, STATE_LEN), device=dev, max_len=STATE_LEN).nbytes())


def stage_eval_recall(ctx: Ctx) -> dict[str, Any]:
    """Train and score every kind (see the module docstring); write ``results/recall.json``."""
    import torch

    from longseq.models import build_model
    from longseq.tasks.mqar import mqar_accuracy, train_mqar

    rs = QUICK if ctx.setup.quick else FULL
    dev = pick_device(ctx)
    models: dict[str, Any] = {}
    for kind, overrides, policies in KINDS:
        torch.manual_seed(0)
        model = build_model(kind, rs.preset, **overrides).to(dev)
        t0 = time.perf_counter()
        losses = train_mqar(model, rs.train_len, rs.train_pairs, rs.steps, batch_size=rs.batch_size, lr=rs.lr,
                            warmup=max(1, rs.steps // 20), device=dev)
        train_s = time.perf_counter() - t0
        acc: dict[str, Any] = {}
        for spec in policies:
            acc[spec] = {str(L): {str(n): mqar_accuracy(model, L, n, n_rows=rs.eval_rows, cache=_policy(spec, L),
                                                       device=dev)
                                  for n in rs.eval_pairs if 4 * n <= L}
                         for L in rs.eval_lens}
        models[kind] = {"params": model.num_params(), "train_s": train_s, "final_loss": sum(losses[-20:]) / len(
            losses[-20:]), "accuracy": acc, "state_bytes": {s: _state_bytes(model, s, dev) for s in policies}}
        say(f"recall {kind}: {model.num_params() / 1e6:.2f}M params, trained in {train_s:.0f} s, "
            + ", ".join(f"{s}: {acc[s]}" for s in policies))
        del model
        free_gpu_memory(dev)
    write_json(ctx.result("recall"), {"setup": rs.__dict__, "state_len": STATE_LEN, "models": models,
                                      "env": environment(dev)})
    return {}

"""What the reproduction trains and measures (full and ``--quick`` sizes), and the paths of one output folder."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import DEFAULT_DATA, REPO


@dataclass
class RunSpec:
    """One training run: what ``longseq train`` is called with."""

    name: str
    group: str  # "2k" (experiments 1 and 3) or "8k" (experiment 2)
    label: str
    kind: str
    preset: str
    overrides: dict[str, Any]
    seq_len: int
    batch_size: int
    lr: float = 1e-3


@dataclass
class Setup:
    """The runs and the evaluation sizes of one mode (full or quick)."""

    quick: bool
    ctx: int  # context of experiments 1 and 3
    long_ctx: int  # context of experiment 2
    runs: dict[str, RunSpec]
    budgets: list[int]
    extrap: list[int]
    state_lens: list[int]
    stride: int
    gen_prompt: int
    gen_tokens: int
    kept_budgets: list[int]
    probe_warmup: int
    probe_steps: int
    eval_batch: dict[int, int] = field(default_factory=dict)


def make_setup(quick: bool) -> Setup:
    """The full-size setup, or with ``quick`` the tiny one that runs on a CPU."""
    if quick:
        # Tiny models, short contexts: exercises every code path on a CPU in well under a minute.
        ctx, long_ctx = 512, 1024
        tiny = {}
        runs = [
            RunSpec("transformer-2k", "2k", "Transformer++", "transformer", "tiny", tiny, ctx, 4),
            RunSpec("gla-2k", "2k", "GLA", "gla", "tiny", tiny, ctx, 4),
            RunSpec("megabyte-8k", "8k", "MEGABYTE", "megabyte", "tiny", {"max_seq_len": long_ctx}, long_ctx, 2),
            RunSpec("transformer-8k", "8k", "Transformer++", "transformer", "tiny", tiny, long_ctx, 2),
            RunSpec("gla-8k", "8k", "GLA", "gla", "tiny", tiny, long_ctx, 2),
        ]
        gen_prompt, gen_tokens, probe = 128, 16, (1, 2)
    else:
        ctx, long_ctx = 2048, 8192
        # d_model 384 x 8 layers: 14.4M parameters for both, so "equal parameters" holds to 0.6%.
        tr = {"d_model": 384, "n_layers": 8, "n_heads": 6}  # head dim 64
        gla = {"d_model": 384, "n_layers": 8, "n_heads": 4}  # the GLA default of 4 heads
        # MEGABYTE at P = 8 with the paper's global:local width ratio 2:1 (22.1M parameters).
        mb = {"patch_size": 8, "d_global": 512, "n_global_layers": 6, "n_global_heads": 8, "d_local": 256,
              "n_local_layers": 3, "n_local_heads": 4, "max_seq_len": long_ctx}
        # 32,768 bytes per optimizer step everywhere.
        runs = [
            RunSpec("transformer-2k", "2k", "Transformer++", "transformer", "small", tr, ctx, 16),
            RunSpec("gla-2k", "2k", "GLA", "gla", "small", gla, ctx, 16),
            RunSpec("megabyte-8k", "8k", "MEGABYTE", "megabyte", "small", mb, long_ctx, 4),
            RunSpec("transformer-8k", "8k", "Transformer++", "transformer", "small", tr, long_ctx, 4),
            RunSpec("gla-8k", "8k", "GLA", "gla", "small", gla, long_ctx, 4),
        ]
        gen_prompt, gen_tokens, probe = 4096, 256, (3, 10)
    return Setup(
        quick=quick, ctx=ctx, long_ctx=long_ctx, runs={r.name: r for r in runs},
        budgets=[ctx // d for d in (64, 32, 16, 8, 4, 2)],
        extrap=[ctx, 2 * ctx, 4 * ctx], state_lens=[ctx, 4 * ctx, 16 * ctx], stride=long_ctx // 4,
        gen_prompt=gen_prompt, gen_tokens=gen_tokens, kept_budgets=[ctx // 32, ctx // 8],
        probe_warmup=probe[0], probe_steps=probe[1],
        eval_batch={ctx: 8, 2 * ctx: 4, 4 * ctx: 2} if not quick else {},
    )


class Ctx:
    """Paths and options shared by the stages."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t_start = time.perf_counter()
        self.out = Path(args.out).resolve()
        self.results = self.out / "results"
        self.logs = self.out / "logs"
        self.runs_dir = self.out / "runs"
        self.setup = make_setup(args.quick)
        data = Path(args.data) if args.data else DEFAULT_DATA
        if data.exists():
            self.data: list[str] | None = [str(data.resolve())]
            self.data_source = f"{data} (the files of `shared/data/shakespeare`)"
        elif args.data:
            raise SystemExit(f"reproduce: --data {args.data} does not exist")
        else:
            # Same 42 works byte for byte (checked when the built-in corpus was made); used where the
            # shared folder is not next to the checkout, e.g. on the GPU machine.
            self.data = None
            self.data_source = "the built-in corpus (`longseq.data.builtin_corpus_path()`, the same 42 works)"
        if args.report:
            self.report = Path(args.report).resolve()
        else:
            self.report = (self.out / "reproductions.md") if args.quick else (REPO / "docs" / "reproductions.md")
        self.device = args.device or ("cpu" if args.quick else None)

    def result(self, name: str) -> Path:
        """``OUT/results/<name>.json``."""
        return self.results / f"{name}.json"

    def run_dir(self, name: str) -> Path:
        """The ``longseq train --out`` folder of a run (checkpoints, metrics.jsonl)."""
        return self.runs_dir / name


def pick_device(ctx: Ctx):
    """The torch device of ``--device`` (``longseq``'s default rule when not given)."""
    from longseq.train.distributed import pick_device as pick

    return pick(ctx.device)

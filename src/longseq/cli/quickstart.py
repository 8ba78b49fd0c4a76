"""``longseq quickstart``: train, evaluate and sample a tiny GLA model on CPU in a few minutes."""

from __future__ import annotations

import argparse

from .common import log


def add_parser(sub) -> None:
    """Add ``quickstart`` to the ``longseq`` subcommands."""
    p = sub.add_parser("quickstart", help="train, evaluate and sample a tiny GLA model on CPU (a few minutes)")
    p.add_argument(
        "--out", default="runs/quickstart",
        help="run directory, replaced if it exists unless --resume (default runs/quickstart)",
    )
    p.add_argument("--steps", type=int, help="training steps (default: the tuned 1200, or on --resume the run's)")
    p.add_argument(
        "--resume", action="store_true",
        help="continue the interrupted quickstart in --out from its newest checkpoint, then evaluate and sample",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the quickstart; exit status 128 + the signal's number when a signal cut its training short."""
    from ..train.quickstart import quickstart, resume_command

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1; got {args.steps}")
    summary = quickstart(args.out, args.steps, resume=args.resume)
    if "interrupted" in summary:
        # The training loop's own message says only "--resume": name the command that takes it here.
        log(f"continue the quickstart with: {resume_command(args.out, args.steps)}")
        return 128 + int(summary["interrupted"])
    return 0

"""``longseq plot``: the loss and bits-per-byte curves of several runs on one figure."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    """Add ``plot`` to the ``longseq`` subcommands."""
    p = sub.add_parser("plot", help="loss and bits-per-byte curves of runs on one figure")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.jsonl)")
    p.add_argument(
        "-o", "--out", required=True, metavar="FILE.png",
        help="image file to write (.png, .pdf, .svg, ...; .png is added to a name without an extension)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Draw the figure and print where it was written."""
    from ..train.plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out)}")
    return 0

"""The ``longseq`` command line: ``train``, ``eval``, ``generate``, ``bench``, ``plot``, ``quickstart``.

User errors (bad paths, flags, configs, checkpoints) print ``longseq: error: <message>`` and exit with
status 2, without a traceback (set ``LONGSEQ_DEBUG=1`` to see one).

Each command is a module with ``add_parser(subparsers)``, which registers its flags and its ``run(args)``;
:mod:`.common` holds what they share. A command imports what it runs inside ``run``, so it loads only its
own part of the library, and optional dependencies (``transformers`` for ``eval --hf``) only when used.
"""

from __future__ import annotations

import argparse
import os
import sys

from .bench import add_parser as _add_bench
from .common import USER_ERRORS
from .eval import add_parser as _add_eval
from .generate import add_parser as _add_generate
from .generate import stop_bytes
from .plot import add_parser as _add_plot
from .quickstart import add_parser as _add_quickstart
from .train import add_parser as _add_train

__all__ = ["build_parser", "main", "stop_bytes"]


def build_parser() -> argparse.ArgumentParser:
    """The ``longseq`` parser, its subcommands in the order ``longseq --help`` lists them."""
    description = ("Long-sequence language modelling: GLA, MEGABYTE and Transformers with bounded (TOVA) caches, "
                   "trained here or loaded from a pretrained checkpoint.")
    parser = argparse.ArgumentParser(prog="longseq", description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_eval, _add_generate, _add_bench, _add_plot, _add_quickstart):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for user errors, 128 + signal for an interrupted run)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if os.environ.get("LONGSEQ_DEBUG"):
            raise
        print(f"longseq: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("longseq: interrupted", file=sys.stderr)
        return 130

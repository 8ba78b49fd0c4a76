"""What the command modules share: argument types, the flags several commands take, and where output goes
(results on stdout, progress on stderr, reports as JSON files)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .. import jsonio

#: Errors that mean the user asked for something impossible: ``main`` prints them as one line and exits
#: with status 2 instead of showing a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)

DEVICE_HELP = "cpu, cuda, ... (default: cuda if available)"

T = TypeVar("T")


def csv_list(kind: Callable[[str], T]) -> Callable[[str], list[T]]:
    """An argparse ``type``: a comma-separated list of ``kind`` values (empty items are skipped)."""

    def parse(text: str) -> list[T]:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind.__name__}: {text!r}"
            ) from err

    return parse


def int_or_text(text: str) -> int | str:
    """An integer, or the text as given (checked later by whoever reads it, e.g. a ``ctx/8`` budget)."""
    return int(text) if text.strip().lstrip("-").isdigit() else text.strip()


def int_or_max(text: str) -> int | str:
    """A batch size: an integer, or ``"max"`` for the largest that fits. (Its name appears in the error
    for a bad ``--batch-sizes`` list.)"""
    return text.strip() if text.strip() == "max" else int(text)


def parse_sets(items: list[str] | None) -> dict[str, str] | None:
    """``--set FIELD=VALUE`` arguments as ``{field: value}``; ``None`` when there were none. The values stay
    strings: the model config converts them to its fields' types."""
    if items is None:
        return None
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set expects FIELD=VALUE (e.g. --set n_layers=2); got {item!r}")
        out[key.strip()] = value.strip()
    return out


def add_overrides_flag(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set FIELD=VALUE`` (repeatable), collected in ``args.overrides`` for :func:`parse_sets`."""
    parser.add_argument("--set", dest="overrides", action="append", metavar="FIELD=VALUE", help=help)


def add_device_flag(parser: argparse.ArgumentParser, help: str = DEVICE_HELP) -> None:
    """``--device`` (``None``: CUDA when available)."""
    parser.add_argument("--device", help=help)


def log(line: str) -> None:
    """A progress line on stderr, at once (stdout carries the results, which may be piped)."""
    print(line, file=sys.stderr, flush=True)


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path``, creating its folder; returns the path. NaN and
    infinities become ``null``: bare ``NaN`` is not JSON, and strict readers reject the file."""
    path = Path(path)
    text = jsonio.dumps(data, indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path

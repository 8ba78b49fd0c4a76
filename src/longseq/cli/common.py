"""What the command modules share: argument types, the flags several commands take, and where output goes
(results on stdout, progress on stderr, reports as JSON files)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .. import jsonio
from ..fileio import check_creatable, check_output_folder, write_atomically

#: Errors that mean the user asked for something impossible: ``main`` prints them as one line and exits
#: with status 2 instead of showing a traceback.
USER_ERRORS = (
    ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError
)

#: The files a training run (RUN_DIR/config.json, metrics.jsonl) or a checkpoint (config, manifest, weights,
#: optimizer state) keeps: an output path never replaces one, or ``train --resume`` and loading would break.
RUN_FILES = frozenset({"config.json", "metrics.jsonl", "manifest.json", "model.safetensors", "train_state.pt"})

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


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is not one (unreadable, not JSON, another type)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _label(flag: str | None, path: Path) -> str:
    return f"{flag} {path}" if flag else str(path)


def _run_owner(path: Path) -> str | None:
    """Why ``path`` (a file or folder to write) belongs to a training run or checkpoint, or None."""
    path = path.absolute()
    if path.name in RUN_FILES and path.exists():
        return f"it is a run's or checkpoint's own {path.name}"
    for folder in (path, *path.parents):
        # A run keeps its checkpoints in RUN_DIR/checkpoints; a checkpoint folder holds a manifest of its files
        # next to its weights (a manifest.json alone is too common a name to mean one), and an extra or replaced
        # file there is one the next load or resume did not expect.
        if folder.name == "checkpoints" and (folder.parent / "config.json").is_file():
            return f"it is inside the checkpoints folder of run {folder.parent}"
        if (folder / "manifest.json").is_file() and (folder / "model.safetensors").is_file():
            return f"it is inside checkpoint {folder}"
    return None


def _refuse_unsafe_file(path: Path, what: str, kind: str) -> None:
    """Refuse a folder, a run's or checkpoint's own file, and a path whose folder cannot be made."""
    if path.is_dir():
        raise IsADirectoryError(f"{what} is a folder; give a file name for the {kind}")
    owner = _run_owner(path)
    if owner is not None:
        raise FileExistsError(f"{what}: refusing to write the {kind} there: {owner}")
    check_creatable(path, what)


def check_output_file(
    path: str | Path, flag: str | None, kind: str, is_kind: Callable[[Path], bool] | None = None
) -> Path:
    """Check, before any work, that a result file can be written at ``path`` without losing anything.

    ``flag`` names the option that gave the path (None for a default path) and ``kind`` what is written (e.g.
    "eval result"). Refused: an existing folder, a run's or checkpoint's own file, a path whose folder cannot be
    made, and an existing file that ``is_kind`` does not recognise as an earlier result of the same kind (without
    ``is_kind`` any existing file but a run's may be replaced). A file that will be replaced is announced on
    stderr now, so the user can still stop. Returns the path.
    """
    path = Path(path)
    what = _label(flag, path)
    _refuse_unsafe_file(path, what, kind)
    if path.exists():
        if is_kind is not None and not is_kind(path):
            raise FileExistsError(f"{what} already exists and is not an earlier {kind}; it would be overwritten: "
                                  "choose another path or remove it")
        log(f"note: {what} exists: the {kind} replaces it")
    return path


def check_output_dir(
    path: str | Path, flag: str | None, kind: str, files: Sequence[str], is_kind: Callable[[Path], bool]
) -> Path:
    """Check, before any work, that the ``files`` of a ``kind`` (e.g. sweep.md/.json/.png) can be written into
    the folder ``path`` without losing anything.

    Refused: an existing file at ``path``, a folder of a run's checkpoints, a folder that cannot be made or
    written, a folder where one of ``files`` would go, and a folder already holding any of ``files`` unless
    ``is_kind(path)`` says they are an earlier output of the same kind (then the files to be replaced are announced
    on stderr now). Returns the path.
    """
    path = Path(path)
    what = _label(flag, path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} is a file, not a folder for the {kind} ({', '.join(files)})")
    owner = _run_owner(path)
    if owner is not None:
        raise FileExistsError(f"{what}: refusing to write the {kind} there: {owner}")
    check_output_folder(path, what, files)  # writable, and no folder where one of the files goes
    present = [name for name in files if (path / name).exists() or (path / name).is_symlink()]
    if present:
        if not is_kind(path):
            raise FileExistsError(f"{what} already holds {', '.join(present)}, not an earlier {kind}; they would "
                                  "be overwritten: choose another folder or remove them")
        log(f"note: {what} holds an earlier {kind}: replacing {', '.join(str(path / n) for n in present)}")
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path``, creating its folder; returns the path. NaN and
    infinities become ``null``: bare ``NaN`` is not JSON, and strict readers reject the file.

    A folder, or a run's or checkpoint's own file, is refused before anything is written (callers should call
    :func:`check_output_file` before their work too); the file is written whole or not at all (a temporary file
    renamed over it), so an interrupted write never leaves half a result in place of an earlier one."""
    path = Path(path)
    _refuse_unsafe_file(path, str(path), "JSON report")
    text = jsonio.dumps(data, indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda tmp: tmp.write_text(text))

"""Files written whole or not at all: results and run files replace an earlier version in one rename. And the
checks, made before any work, that a result can be written where it was asked for."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Make the file ``path`` by ``write(temporary path)`` in the same folder, then rename it into place.

    The rename replaces an earlier file in one step, so a crash or a failed write never leaves half a file, nor
    destroys the earlier one. The temporary name keeps ``path``'s suffix (matplotlib picks a format by it), and it
    is created by ``write`` itself, with the user's usual permissions."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_creatable(path: str | Path, what: str) -> None:
    """Raise unless ``path`` can be created: the nearest existing folder above it must be a folder we may write in.
    ``what`` names the path in the message (e.g. ``"--out runs/x"``)."""
    for folder in Path(path).absolute().parents:
        if not folder.exists():
            continue
        if not folder.is_dir():
            raise NotADirectoryError(f"{what}: {folder} is a file, so no folder can be made there")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"{what}: no permission to write in {folder}")
        return


def check_output_folder(path: str | Path, what: str, files: list[str] | tuple[str, ...]) -> Path:
    """Raise unless the ``files`` can be written into the folder ``path`` (made if missing): it must not be a file,
    it (or the folder it will be made in) must be writable, and none of ``files`` may be a folder there. Whether
    existing files may be replaced is the caller's decision. Returns ``Path(path)``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} is a file, not a folder for {', '.join(files)}")
    check_creatable(path / files[0], what)  # from the folder itself: an existing read-only one is refused too
    folders = [name for name in files if (path / name).is_dir()]
    if folders:
        verb = "is a folder" if len(folders) == 1 else "are folders"
        raise IsADirectoryError(f"{what}: {', '.join(folders)} there {verb}, where a file would be written")
    return path

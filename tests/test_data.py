"""Byte corpora, splits and the window sampler, checked against the source files' bytes."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from longseq.data import (
    BUILTIN_VAL_DOCS,
    DataError,
    WindowSampler,
    builtin_corpus_path,
    load_corpus,
    split_documents,
)
from longseq.data import corpus as corpus_mod

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"


def _write_docs(root: Path, docs: dict[str, bytes]) -> None:
    for name, data in docs.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.fixture
def docs_dir(tmp_path):
    rng = np.random.default_rng(0)
    # Training documents use bytes < 200, validation documents bytes >= 200, so a window that strays
    # into a validation document is detectable from its bytes alone.
    docs = {
        "a.txt": rng.integers(0, 200, 300, dtype=np.uint8).tobytes(),
        "sub/b.bin": rng.integers(0, 200, 57, dtype=np.uint8).tobytes(),
        "sub/val1.txt": rng.integers(200, 256, 120, dtype=np.uint8).tobytes(),
        "c.txt": rng.integers(0, 200, 9, dtype=np.uint8).tobytes(),
        "z_val2.txt": rng.integers(200, 256, 80, dtype=np.uint8).tobytes(),
    }
    _write_docs(tmp_path / "docs", docs)
    (tmp_path / "docs" / ".hidden").write_bytes(b"ignored")
    return tmp_path / "docs", docs


def test_corpus_bytes_equal_files(docs_dir, tmp_path):
    root, docs = docs_dir
    corpus = load_corpus([root], tmp_path / "cache")
    expected_names = ["a.txt", "c.txt", "z_val2.txt", "sub/b.bin", "sub/val1.txt"]
    assert corpus.names == expected_names
    for i, name in enumerate(corpus.names):
        assert corpus.doc(i).tobytes() == docs[name]
        assert corpus.data[corpus.offsets[i] : corpus.offsets[i + 1]].tobytes() == (root / name).read_bytes()
    assert len(corpus) == sum(len(v) for v in docs.values())


def test_sources_files_globs_archives(docs_dir, tmp_path):
    root, docs = docs_dir
    archive = tmp_path / "pack.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("x/one.txt", "two.txt"):
            data = name.encode() * 3
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    corpus = load_corpus([root / "a.txt", str(root / "sub" / "*.txt"), archive], tmp_path / "cache")
    assert corpus.names == ["a.txt", "val1.txt", "x/one.txt", "two.txt"]
    expected = [docs["a.txt"], docs["sub/val1.txt"], b"x/one.txt" * 3, b"two.txt" * 3]
    assert [corpus.doc(i).tobytes() for i in range(4)] == expected


def test_corpus_cache_reused_and_invalidated(docs_dir, tmp_path, monkeypatch):
    root, docs = docs_dir
    first = load_corpus([root], tmp_path / "cache")
    calls = []
    real = corpus_mod._write_documents
    monkeypatch.setattr(corpus_mod, "_write_documents", lambda *a: calls.append(1) or real(*a))
    again = load_corpus([root], tmp_path / "cache")
    assert again.path == first.path and calls == []  # cache hit: nothing rebuilt
    (root / "a.txt").write_bytes(b"changed")
    changed = load_corpus([root], tmp_path / "cache")
    assert calls == [1] and changed.path != first.path
    assert changed.doc(changed.names.index("a.txt")).tobytes() == b"changed"


def test_builtin_corpus_is_the_shakespeare_files(tmp_path):
    path = builtin_corpus_path()
    assert path.stat().st_size <= 2_000_000
    corpus = load_corpus([path], tmp_path / "cache")
    assert set(BUILTIN_VAL_DOCS) <= set(corpus.names)
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present")
    files = sorted(SHARED.glob("*.txt"))
    assert corpus.names == [f.name for f in files]
    for i, f in enumerate(files):
        assert corpus.doc(i).tobytes() == f.read_bytes(), f.name


def test_split_by_names_is_disjoint_and_validated():
    names = ["plays/hamlet.txt", "tempest.txt", "a.txt", "b.txt"]
    split = split_documents(names, ["hamlet", "tempest.txt"])
    assert split.val == [0, 1] and split.train == [2, 3]
    with pytest.raises(DataError, match="'macbeth'"):
        split_documents(names, ["macbeth"])
    with pytest.raises(DataError, match="nothing is left to train"):
        split_documents(names, names)


def test_fraction_split_deterministic_and_order_independent():
    names = [f"doc{i:03d}.txt" for i in range(50)]
    split = split_documents(names, val_fraction=0.2)
    assert len(split.val) == 10 and not set(split.val) & set(split.train)
    assert sorted(split.val + split.train) == list(range(50))
    shuffled = list(reversed(names))
    split2 = split_documents(shuffled, val_fraction=0.2)
    assert {shuffled[i] for i in split2.val} == {names[i] for i in split.val}
    assert split_documents(names, val_fraction=0.0).val == []
    with pytest.raises(DataError, match="at least 2 documents"):
        split_documents(["only.txt"], val_fraction=0.1)


def _train_val(corpus):
    return split_documents(corpus.names, ["val1", "z_val2"])


def test_sampler_windows_equal_source_bytes(docs_dir, tmp_path):
    root, docs = docs_dir
    corpus = load_corpus([root], tmp_path / "cache")
    split = _train_val(corpus)
    train_names = [corpus.names[i] for i in split.train]
    for within in (False, True):
        sampler = WindowSampler(corpus, split.train, 17, seed=3, within_docs=within)
        starts = sampler.draw_starts(500)
        wins = sampler.windows(starts).numpy().astype(np.uint8)
        # Reference: the files' bytes concatenated in corpus order, read independently of the memmap.
        everything = b"".join((root / n).read_bytes() for n in corpus.names)
        for s, w in zip(starts, wins, strict=True):
            assert everything[s : s + 17] == w.tobytes()
            assert w.max() < 200  # never a validation byte
            if within:
                assert any(w.tobytes() in docs[n] for n in train_names)
        if within:  # c.txt (9 bytes) is too short to hold a window on its own
            assert not any(w.tobytes() in docs["c.txt"] for w in wins)


def test_sampler_covers_exactly_the_valid_starts(tmp_path):
    _write_docs(tmp_path / "d", {"a": b"x" * 10, "b": b"y" * 12, "c": b"v" * 5, "d": b"z" * 3})
    corpus = load_corpus([tmp_path / "d"], tmp_path / "cache")
    train = [0, 1, 3]  # a, b adjacent; c held out; d alone (3 bytes < window)
    within = WindowSampler(corpus, train, 4, seed=0, within_docs=True)
    assert set(within.draw_starts(3000).tolist()) == set(range(0, 7)) | set(range(10, 19))
    across = WindowSampler(corpus, train, 4, seed=0)
    assert set(across.draw_starts(3000).tolist()) == set(range(0, 19))


def test_sampler_reproducible_resumable_and_sharded(docs_dir, tmp_path):
    root, _ = docs_dir
    corpus = load_corpus([root], tmp_path / "cache")
    split = _train_val(corpus)
    a = WindowSampler(corpus, split.train, 9, seed=7)
    b = WindowSampler(corpus, split.train, 9, seed=7)
    first = [a.next_batch(4) for _ in range(3)]
    assert all((x == b.next_batch(4)).all() for x in first)
    state = a.state_dict()
    expected = [a.next_batch(4) for _ in range(3)]
    resumed = WindowSampler(corpus, split.train, 9, seed=7)
    resumed.load_state_dict(state)
    assert all((x == resumed.next_batch(4)).all() for x in expected)
    assert not (WindowSampler(corpus, split.train, 9, seed=8).next_batch(4) == first[0]).all()
    # Rank r of 2 takes rows [2r, 2r + 2) of the same global batch.
    ranks = [WindowSampler(corpus, split.train, 9, seed=7) for _ in range(2)]
    single = WindowSampler(corpus, split.train, 9, seed=7)
    for _ in range(2):
        full = single.next_batch(4)
        parts = [ranks[r].next_batch(4, rank=r, world_size=2) for r in range(2)]
        assert (np.concatenate(parts) == full.numpy()).all()


def test_bad_data_errors(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="nope.txt' does not exist"):
        load_corpus([tmp_path / "nope.txt"], cache)
    with pytest.raises(DataError, match="matches no files"):
        load_corpus([str(tmp_path / "*.nothing")], cache)
    _write_docs(tmp_path / "empty", {"a.txt": b"", "b.txt": b""})
    with pytest.raises(DataError, match="is empty"):
        load_corpus([tmp_path / "empty"], cache)
    assert not cache.exists()  # raised before anything was written
    _write_docs(tmp_path / "short", {"a.txt": b"abcdef"})
    corpus = load_corpus([tmp_path / "short"], cache)
    with pytest.raises(DataError, match="seq_len=8.*longest .* has 6"):
        WindowSampler(corpus, [0], 9)


def test_unreadable_path(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_bytes(b"data")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: make the permission check see what a user would
        real = os.access
        monkeypatch.setattr(
            corpus_mod.os, "access", lambda p, mode: False if Path(p) == path else real(p, mode)
        )
    with pytest.raises(DataError, match="not readable"):
        load_corpus([path], tmp_path / "cache")


def test_concurrent_builders_of_one_cache_build_it_once(tmp_path):
    """Two builders at once (the ranks of a torchrun job): the second waits for the first and reuses its cache
    instead of writing its own; a failed build leaves nothing behind and the next one builds."""
    import threading
    import time

    target = tmp_path / "cache" / "thing"
    writes: list[str] = []
    inside = threading.Event()

    def write(folder: Path) -> None:
        writes.append(threading.current_thread().name)
        inside.set()
        time.sleep(0.3)  # long enough for the other builder to reach the lock
        (folder / "index.json").write_text("{}")

    first = threading.Thread(target=corpus_mod.build_cache_dir, args=(target, write), name="first")
    first.start()
    assert inside.wait(10)
    second = threading.Thread(target=corpus_mod.build_cache_dir, args=(target, write), name="second")
    second.start()
    first.join(10)
    second.join(10)
    assert writes == ["first"] and (target / "index.json").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == [".lock-thing", "thing"]  # no leftover temp folder

    def fail(folder: Path) -> None:
        raise DataError("broken document")

    other = tmp_path / "cache" / "other"
    with pytest.raises(DataError, match="broken document"):
        corpus_mod.build_cache_dir(other, fail)
    assert not other.exists()
    corpus_mod.build_cache_dir(other, write)
    assert (other / "index.json").is_file()


def test_run_holdout_is_how_train_and_eval_split_a_run():
    """Named documents win (an empty list holds out nothing); the built-in corpus without a fraction holds out its
    fixed works; otherwise a hash split of the fraction, 0.1 by default."""
    from longseq.data import BUILTIN_VAL_DOCS, DEFAULT_VAL_FRACTION, run_holdout

    assert DEFAULT_VAL_FRACTION == 0.1
    assert run_holdout(True, ["hamlet"], None) == (["hamlet"], 0.1)
    assert run_holdout(False, [], 0.2) == ([], 0.2)
    assert run_holdout(True, None, None) == (list(BUILTIN_VAL_DOCS), 0.1)
    assert run_holdout(True, None, 0.25) == (None, 0.25)
    assert run_holdout(False, None, None) == (None, 0.1)
    assert run_holdout(False, None, 0.0) == (None, 0.0)

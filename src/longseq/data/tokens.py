"""Token corpora: a byte corpus tokenized once into a memory-mapped ``uint16`` / ``uint32`` array.

``longseq train --tokenizer PATH`` trains on token ids instead of bytes. Tokenizing a corpus of megabytes
takes seconds to minutes, so it is done once per (corpus, tokenizer) and cached beside the byte corpus:
``tokens.bin`` holds every document's ids back to back (``uint16`` when the vocabulary fits, else
``uint32``) and ``index.json`` the document names, token offsets and the tokenizer's fingerprint. A
:class:`TokenCorpus` has the attributes of a :class:`~longseq.data.corpus.ByteCorpus` that the window
sampler reads (``data``, ``offsets``, ``names``), so training draws windows of tokens exactly as it draws
windows of bytes. Validation keeps scoring the documents' text (bits per UTF-8 byte, tokenized by the model).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from ..tokenizer import Tokenizer
from .corpus import ByteCorpus
from .errors import DataError

FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a ``vocab_size`` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class TokenCorpus:
    """A byte corpus's documents as token ids, memory-mapped.

    Attributes:
        data: ``[N]`` uint16/uint32 memmap of all documents' ids back to back.
        offsets: ``[D + 1]`` int64; document ``i`` is ``data[offsets[i]:offsets[i + 1]]``.
        names: the ``D`` document names (those of the byte corpus, in its order).
        fingerprint: the tokenizer's :meth:`~longseq.tokenizer.Tokenizer.fingerprint`.
        path: the cache directory holding ``tokens.bin`` and ``index.json``.
    """

    unit = "tokens"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        index = json.loads((self.path / "index.json").read_text())
        self.names: list[str] = list(index["names"])
        self.offsets = np.asarray(index["offsets"], dtype=np.int64)
        self.fingerprint: str = index["fingerprint"]
        self.vocab_size = int(index["vocab_size"])
        dtype = np.dtype(index["dtype"])
        total = int(self.offsets[-1])
        if (self.path / "tokens.bin").stat().st_size != total * dtype.itemsize:
            raise DataError(f"token cache {self.path} is inconsistent (tokens.bin size != index); delete it")
        self.data = np.memmap(self.path / "tokens.bin", dtype=dtype, mode="r", shape=(total,))

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
        return f"TokenCorpus({self.num_docs} documents, {len(self):,} tokens, cache={str(self.path)!r})"


def tokenize_corpus(corpus: ByteCorpus, tokenizer: Tokenizer, progress: bool = False) -> TokenCorpus:
    """``corpus`` tokenized with ``tokenizer`` (each document as a prompt would be: with the special tokens
    the tokenizer adds by default, e.g. a BOS), built once and cached in ``corpus.path/tokens-<fingerprint>``.

    Raises :class:`DataError` if a document tokenizes to nothing; checked before the cache is committed.
    """
    fingerprint = tokenizer.fingerprint()
    target = corpus.path / f"tokens-{fingerprint[:24]}"
    if (target / "index.json").is_file():
        return TokenCorpus(target)
    dtype = token_dtype(tokenizer.vocab_size)
    # Built in a private directory and renamed into place, as the byte corpus is.
    tmp = corpus.path / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        offsets = [0]
        docs = range(corpus.num_docs)
        if progress:
            from tqdm.auto import tqdm

            docs = tqdm(docs, desc="tokenizing", unit="doc")
        with open(tmp / "tokens.bin", "wb") as out:
            for i in docs:
                ids = np.asarray(tokenizer.encode(bytes(corpus.doc(i))), dtype=np.int64)
                if len(ids) == 0 and corpus.doc_len(i):
                    raise DataError(f"document {corpus.names[i]!r} tokenizes to no ids")
                if len(ids) and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                    raise DataError(f"the tokenizer gave ids outside [0, {tokenizer.vocab_size}) for "
                                    f"{corpus.names[i]!r}")
                out.write(ids.astype(dtype).tobytes())
                offsets.append(offsets[-1] + len(ids))
        index = {"format": FORMAT_VERSION, "names": corpus.names, "offsets": offsets, "fingerprint": fingerprint,
                 "vocab_size": tokenizer.vocab_size, "dtype": dtype.name}
        (tmp / "index.json").write_text(json.dumps(index))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "index.json").is_file():  # not a lost race with another builder
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return TokenCorpus(target)

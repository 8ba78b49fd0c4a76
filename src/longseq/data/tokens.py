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
from pathlib import Path

import numpy as np

from ..tokenizer import Tokenizer
from .corpus import ByteCorpus, MappedCorpus, build_cache_dir
from .errors import DataError

FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a ``vocab_size`` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class TokenCorpus(MappedCorpus):
    """A byte corpus's documents as token ids (``tokens.bin``, uint16 or uint32), memory-mapped, with the
    tokenizer's ``fingerprint`` and ``vocab_size``; the rest as :class:`~longseq.data.corpus.MappedCorpus`."""

    unit = "tokens"

    def __init__(self, path: Path) -> None:
        index = json.loads((Path(path) / "index.json").read_text())
        super().__init__(path, "tokens.bin", np.dtype(index["dtype"]))
        self.fingerprint: str = self.index["fingerprint"]
        self.vocab_size = int(self.index["vocab_size"])


def tokenize_corpus(corpus: ByteCorpus, tokenizer: Tokenizer, progress: bool = False) -> TokenCorpus:
    """``corpus`` tokenized with ``tokenizer`` (each document as a prompt would be: with the special tokens
    the tokenizer adds by default, e.g. a BOS), built once and cached in ``corpus.path/tokens-v<format>-<fingerprint>``.

    Raises :class:`DataError` if a document tokenizes to nothing; checked before the cache is committed.
    """
    fingerprint = tokenizer.fingerprint()
    target = corpus.path / f"tokens-v{FORMAT_VERSION}-{fingerprint[:24]}"
    if (target / "index.json").is_file():
        cached = TokenCorpus(target)
        if cached.index.get("format") != FORMAT_VERSION or cached.fingerprint != fingerprint:
            raise DataError(f"the token cache {target} was written by another format or tokenizer "
                            f"(format {cached.index.get('format')}, this is {FORMAT_VERSION}); delete it to rebuild")
        return cached
    dtype = token_dtype(tokenizer.vocab_size)

    def write(tmp: Path) -> None:
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

    build_cache_dir(target, write)
    return TokenCorpus(target)

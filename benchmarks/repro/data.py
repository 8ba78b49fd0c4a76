"""The Shakespeare corpus as the stages see it: the same split as ``longseq train --val-docs``."""

from __future__ import annotations

from .common import VAL_DOCS
from .config import Ctx


def corpus_and_split(ctx: Ctx):
    """The corpus (``--data`` or the built-in one) and its split, validation = ``VAL_DOCS``."""
    from longseq.data import builtin_corpus_path, load_corpus, split_documents

    corpus = load_corpus(ctx.data if ctx.data is not None else [builtin_corpus_path()])
    return corpus, split_documents(corpus.names, VAL_DOCS)


def val_documents(ctx: Ctx):
    """``(name, uint8 array)`` of the validation works, as ``longseq eval --split val`` picks them."""
    from longseq.evaluate import corpus_documents

    corpus, split = corpus_and_split(ctx)
    # Quick mode keeps the first ~8 KB of each work so the CPU smoke test stays fast.
    return corpus_documents(corpus, split.val, 3 * 8192 if ctx.setup.quick else None)


def train_bytes(ctx: Ctx) -> int:
    """Bytes in the training works (the unit of ``--max-epochs``)."""
    corpus, split = corpus_and_split(ctx)
    return int(sum(corpus.doc_len(i) for i in split.train))

"""Deterministic document-level train/validation splits."""

from __future__ import annotations

import hashlib
import math
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import DataError


@dataclass(frozen=True)
class Split:
    """Document indices of the training and validation parts (disjoint, each sorted)."""

    train: list[int]
    val: list[int]


# A run that names no validation documents and no fraction holds out this share of its own data.
DEFAULT_VAL_FRACTION = 0.1


def name_matches(name: str, wanted: str) -> bool:
    """A document answers to its full name, its base name, or its base name without extension."""
    base = posixpath.basename(name)
    return wanted in (name, base, posixpath.splitext(base)[0])


def run_holdout(
    builtin: bool, val_docs: Sequence[str] | None, val_fraction: float | None
) -> tuple[list[str] | None, float]:
    """How a training run holds out documents, as ``(val_docs, val_fraction)`` for :func:`split_documents`:
    its ``--val-docs`` when given; on the built-in corpus without ``--val-fraction``, the built-in held-out works;
    otherwise a hash split of ``val_fraction`` (default :data:`DEFAULT_VAL_FRACTION`). ``longseq train`` and
    ``longseq eval`` (which re-derives a run's split) both call this, so they cannot disagree."""
    from .builtin import BUILTIN_VAL_DOCS

    fraction = DEFAULT_VAL_FRACTION if val_fraction is None else float(val_fraction)
    if val_docs is not None:
        return list(val_docs), fraction
    if builtin and val_fraction is None:
        return list(BUILTIN_VAL_DOCS), fraction
    return None, fraction


def split_documents(
    names: Sequence[str], val_docs: Sequence[str] | None = None, val_fraction: float | None = None
) -> Split:
    """Split documents by name.

    Args:
        names: document names in corpus order.
        val_docs: names of the validation documents (full name, base name or stem, e.g. ``hamlet``).
            Every entry must match at least one document.
        val_fraction: used when ``val_docs`` is None: the fraction of documents held out, chosen by a
            hash of their names (so the split does not depend on file order or on a seed); at least
            one document when the fraction is > 0. ``0`` holds out nothing.
    Raises:
        DataError: unknown validation names, a fraction outside [0, 1), or an empty training part.
    """
    n = len(names)
    if val_docs is not None:
        val = set()
        for wanted in val_docs:
            hits = [i for i, name in enumerate(names) if name_matches(name, wanted)]
            if not hits:
                shown = ", ".join(list(names)[:8]) + (", ..." if n > 8 else "")
                raise DataError(f"validation document {wanted!r} is not in the corpus (documents: {shown})")
            val.update(hits)
    else:
        frac = 0.0 if val_fraction is None else float(val_fraction)
        if not 0.0 <= frac < 1.0:
            raise DataError(f"val_fraction must be in [0, 1); got {val_fraction}")
        k = min(n - 1, max(1, math.ceil(frac * n))) if frac > 0 else 0
        if frac > 0 and n < 2:
            raise DataError(
                f"a validation split needs at least 2 documents; the corpus has {n} "
                "(add documents, name them with --val-docs, or pass --val-fraction 0)"
            )
        order = sorted(range(n), key=lambda i: (hashlib.sha256(names[i].encode()).hexdigest(), i))
        val = set(order[:k])
    train = [i for i in range(n) if i not in val]
    if not train:
        raise DataError("every document is a validation document; nothing is left to train on")
    return Split(train=train, val=sorted(val))

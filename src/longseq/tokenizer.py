"""Tokenizers as part of a model: bytes by default, or a pretrained model's HF tokenizer.

Every model has ``model.tokenizer``. Byte-level models (everything longseq trains natively) use
:class:`ByteTokenizer`: text is its UTF-8 bytes. A converted pretrained model carries an
:class:`HFTokenizer` (``longseq.load_pretrained`` attaches it), which ``generate``, the CLI and evaluation
use to turn text into ids and back. Decoding returns bytes, so a byte model's output that is not valid
UTF-8 survives intact.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Where a model saved with a non-byte tokenizer keeps the tokenizer's own files (``save_hf`` folders and
#: training checkpoints alike).
TOKENIZER_DIR = "tokenizer"


class Tokenizer(ABC):
    """Text <-> token ids."""

    #: Short name saved with a model (``"bytes"`` or ``"hf"``).
    kind: str = ""
    #: Whether decoding ids one by one and joining the bytes equals decoding them together (bytes: yes;
    #: subword tokenizers: not in general), so a stream can print each id's bytes as it comes.
    bytewise: bool = False

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct ids the tokenizer can produce."""

    @property
    def eos_id(self) -> int | None:
        """The end-of-sequence id, if the tokenizer has one."""
        return None

    @abstractmethod
    def encode(self, text: str | bytes, special: bool = True) -> list[int]:
        """Ids of ``text`` (bytes are taken as UTF-8 text by subword tokenizers); ``special``: with the special
        tokens the tokenizer puts around a text by default (a BOS), as for a prompt."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> bytes:
        """The UTF-8 bytes of ``ids``."""

    def save(self, folder: str | Path) -> None:  # noqa: B027  (bytes need no files)
        """Write the files :func:`load_tokenizer` needs into ``folder`` (nothing for bytes)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A hex digest that changes whenever the ids of some text would (caches of tokenized data key on it)."""


class ByteTokenizer(Tokenizer):
    """Text is its UTF-8 bytes; id ``i`` is byte ``i``."""

    kind = "bytes"
    bytewise = True

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str | bytes, special: bool = True) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else bytes(text))

    def decode(self, ids: Sequence[int]) -> bytes:
        return bytes(int(i) for i in ids)

    def fingerprint(self) -> str:
        return hashlib.sha256(b"longseq-bytes").hexdigest()

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer(Tokenizer):
    """A transformers tokenizer (``AutoTokenizer``): ``encode`` adds the special tokens the tokenizer adds by
    default (a BOS, for Llama's), ``decode`` keeps special tokens out of the text."""

    kind = "hf"

    def __init__(self, tokenizer: Any) -> None:
        self.hf = tokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> HFTokenizer:
        """``AutoTokenizer.from_pretrained(path, **kwargs)`` from local files only (nothing is downloaded)."""
        from .hf._deps import require_transformers

        require_transformers()
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path), local_files_only=True, **kwargs))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eos_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str | bytes, special: bool = True) -> list[int]:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", "replace")
        return list(self.hf(text, add_special_tokens=special)["input_ids"])

    def decode(self, ids: Sequence[int]) -> bytes:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True).encode("utf-8")

    def save(self, folder: str | Path) -> None:
        self.hf.save_pretrained(str(folder))

    def fingerprint(self) -> str:
        # A fast tokenizer serialises its whole pipeline (normaliser, pre-tokenizer, model, post-processor);
        # a slow one is described by its class, vocabulary and special tokens.
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is not None:
            text = backend.to_str()
        else:
            text = json.dumps([type(self.hf).__name__, sorted(self.hf.get_vocab().items()),
                               self.hf.special_tokens_map], default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.hf).__name__}, vocab={self.vocab_size})"


BYTES = ByteTokenizer()


def load_tokenizer(kind: str, folder: str | Path) -> Tokenizer:
    """The tokenizer a model saved with it (``kind`` as saved, files in ``folder``)."""
    if kind == ByteTokenizer.kind:
        return BYTES
    if kind == HFTokenizer.kind:
        return HFTokenizer.from_pretrained(folder)
    raise ValueError(f"unknown tokenizer kind {kind!r} in {folder}; expected 'bytes' or 'hf'")

"""Tasks that probe what a model (and its cache policy) can do with a long context.

* :mod:`.passkey`: passkey retrieval -- a random key hidden at a chosen depth of filler text, asked for at
  the end (``longseq eval MODEL --task passkey``).
"""

from .passkey import (
    PasskeyPrompt,
    extract_key,
    make_prompts,
    parse_budget,
    resolve_budget,
    run_passkey,
    score_answer,
)
from .report import PasskeyResult, Row

__all__ = [
    "PasskeyPrompt", "PasskeyResult", "Row", "extract_key", "make_prompts", "parse_budget", "resolve_budget",
    "run_passkey", "score_answer",
]

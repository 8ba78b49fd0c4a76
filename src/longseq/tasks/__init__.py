"""Tasks that probe what a model (and its cache policy) can do with a long context.

* :mod:`.passkey`: passkey retrieval -- a random key hidden at a chosen depth of filler text, asked for at
  the end (``longseq eval MODEL --task passkey``).
* :mod:`.mqar`: multi-query associative recall (the Zoology setup, on bytes) -- generator, training loop and
  accuracy, with or without a cache policy.
"""

from .mqar import MQARBatch, mqar_accuracy, mqar_batch, train_mqar
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
    "MQARBatch", "PasskeyPrompt", "PasskeyResult", "Row", "extract_key", "make_prompts", "mqar_accuracy",
    "mqar_batch", "parse_budget", "resolve_budget", "run_passkey", "score_answer", "train_mqar",
]

"""Passkey examples mixed into training batches (``longseq train --passkey-mix F``; issue 20).

A model trained on documents alone has never been asked to read a number back from far away, so a passkey
test of it measures the task's novelty as much as the model's memory. With ``--passkey-mix F``, each row of
a training batch begins, with probability ``F``, with a passkey example built from that row's own window of
the corpus -- the same prompt layout as the test (:func:`longseq.tasks.passkey.make_prompts`), followed by the
answer -- and goes on with the corpus text after the example's filler::

    [prefix] instruction  filler[:cut]  key sentence  filler[cut:]  question  " 12345."  more text ...

The filler is the window's first ids (so the example's text is the corpus's, the row keeps its length), the
key is a fresh random 5-digit number, the depth is uniform over the filler, and the example's length is
uniform from the shortest that keeps :data:`MIN_FILLER` ids of filler to the whole row. Examples of one
length only (the whole row, before session 23) taught a Transformer to answer at that length alone: it
found the key in 82% of 500-byte prompts and in none of 256 bytes, since a test prompt starts at position 0
and ends where its question does. The loss is the next-token loss
over the whole row; the answer's few ids are where retrieval is learned, and with ``--passkey-answer-weight W``
their targets weigh ``W`` times the others' (:meth:`PasskeyMixSampler.next_weighted_batch`). The answer is 7 of
a row's hundreds of bytes: in a CPU pilot (2-layer Transformer, width 128, 256-byte rows, every row an
example) the plain loss had learned no retrieval after 1,000 steps, with ``W = 30`` it began to.

Which rows are mixed, and their keys and depths, come from a generator seeded by ``(seed, batch index)``
for the whole global batch, so every rank agrees, any world size sees the same global batches, and a resumed
run draws exactly the rows it would have.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
from torch import Tensor

from ..data.errors import DataError
from ..data.sampler import WindowSampler
from ..tokenizer import Tokenizer
from .passkey import KEY_DIGITS, prompt_parts

ANSWER = " {key}."  # what follows the question in a training example
MIN_FILLER = 16  # ids of corpus text an example must keep at least


def example_overhead(tokenizer: Tokenizer) -> int:
    """The most ids an example's fixed parts (prefix, instruction, key sentence, question, answer) can take
    with ``tokenizer``: measured with the key ``99999``, plus one id per digit of each of the key's three
    occurrences (a BPE may split another key into more pieces than ``99999``)."""
    head, needle, question = prompt_parts(tokenizer, "9" * KEY_DIGITS)
    answer = tokenizer.encode(ANSWER.format(key="9" * KEY_DIGITS), special=False)
    return len(head) + len(needle) + len(question) + len(answer) + 3 * KEY_DIGITS


def check_room(tokenizer: Tokenizer, window: int, unit: str = "ids") -> None:
    """``DataError`` unless windows of ``window`` ids leave :data:`MIN_FILLER` ids of text in an example (run
    before the corpus is tokenized: it needs only the tokenizer)."""
    overhead = example_overhead(tokenizer)
    if window - overhead < MIN_FILLER:
        raise DataError(
            f"seq-len {window - 1} is too short for passkey examples: the instruction, key sentence, question "
            f"and answer take up to {overhead} {unit}, leaving {window - overhead} of filler (at least "
            f"{MIN_FILLER} needed)"
        )


class PasskeyMixSampler:
    """A :class:`~longseq.data.sampler.WindowSampler` whose rows are passkey examples with probability
    ``fraction`` (see the module docstring). Same interface: ``next_batch`` returns this rank's
    ``[global_batch / world_size, window]`` int64 ids; ``state_dict`` is the wrapped sampler's (the mixing
    is a function of its batch counter)."""

    def __init__(self, sampler: WindowSampler, tokenizer: Tokenizer, fraction: float, seed: int = 0,
                 answer_weight: float = 1.0) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"passkey-mix must be in (0, 1] (the fraction of training rows); got {fraction}")
        if not (math.isfinite(answer_weight) and answer_weight > 0):
            raise ValueError(f"passkey-answer-weight must be a finite number > 0; got {answer_weight}")
        check_room(tokenizer, sampler.window, sampler.corpus.unit)
        self.sampler, self.tokenizer, self.fraction, self.seed = sampler, tokenizer, float(fraction), int(seed)
        self.answer_weight = float(answer_weight)

    @property
    def window(self) -> int:
        return self.sampler.window

    def example(self, window: Tensor, key: str, depth: float, span: float = 1.0) -> tuple[Tensor, int]:
        """One ``[window]`` row of corpus ids made to begin with a passkey example, and the example's length:
        the prompt layout of :func:`~longseq.tasks.passkey.make_prompts` with ``key`` hidden at ``depth`` (a
        fraction of the filler), then the answer, then the corpus text that follows the filler in the window.
        ``span`` places the example's length between the shortest (:data:`MIN_FILLER` ids of filler, 0) and
        the whole row (1)."""
        head, needle, question = prompt_parts(self.tokenizer, key)
        tail = question + self.tokenizer.encode(ANSWER.format(key=key), special=False)
        room = self.window - len(head) - len(needle) - len(tail)  # >= MIN_FILLER by check_room
        n_filler = MIN_FILLER + round(span * (room - MIN_FILLER))
        cut = round(depth * n_filler)
        ids = window.tolist()
        example = head + ids[:cut] + needle + ids[cut:n_filler] + tail
        rest = ids[n_filler : n_filler + self.window - len(example)]
        return torch.tensor(example + rest, dtype=window.dtype), len(example)

    def plan(self, batch_index: int, global_batch: int) -> list[tuple[str, float, float] | None]:
        """For each row of global batch ``batch_index``: ``(key, depth, span)`` if it becomes an example, else
        None (see :meth:`example`)."""
        rng = random.Random(f"passkey-mix:{self.seed}:{batch_index}")
        # The lengths come from a stream of their own, so which rows mix and their keys and depths are the
        # ones drawn before examples had lengths.
        lengths = random.Random(f"passkey-mix-length:{self.seed}:{batch_index}")
        out: list[tuple[str, float, float] | None] = []
        for _ in range(global_batch):  # the same draws per row whatever is kept: rows do not shift each other
            mixed = rng.random() < self.fraction
            key, depth = str(rng.randrange(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS)), rng.random()
            span = lengths.random()
            out.append((key, depth, span) if mixed else None)
        return out

    def next_batch(self, global_batch: int, rank: int = 0, world_size: int = 1) -> Tensor:
        """This rank's share of the next global batch, its passkey rows built in place."""
        return self.next_weighted_batch(global_batch, rank, world_size)[0]

    def next_weighted_batch(
        self, global_batch: int, rank: int = 0, world_size: int = 1
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`next_batch`, and the weight of each of its targets: ``[per, window - 1]`` float32 (targets are
        ``ids[:, 1:]``), ``answer_weight`` on the answer ids of example rows (where the example ends) and 1
        elsewhere, divided by the mean
        weight over the whole global batch. The mean of ``weights * per-target loss`` over every rank's share is
        then the weighted mean over the global batch, whatever the world size or micro-batching. None (every
        target alike) when ``answer_weight`` is 1."""
        index = self.sampler.batches_drawn
        batch = self.sampler.next_batch(global_batch, rank, world_size)
        per, window = batch.shape
        plan = self.plan(index, global_batch)
        weights = torch.ones(per, window - 1)
        extra = 0.0  # over the global batch: sum of (answer_weight - 1) per answer id
        for i, row in enumerate(plan):
            if row is None:
                continue
            n_answer = len(self.tokenizer.encode(ANSWER.format(key=row[0]), special=False))
            extra += (self.answer_weight - 1.0) * n_answer
            mine = i - rank * per
            if 0 <= mine < per:
                batch[mine], end = self.example(batch[mine], *row)
                weights[mine, end - 1 - n_answer : end - 1] = self.answer_weight  # targets are ids[1:]
        if self.answer_weight == 1:
            return batch, None
        return batch, weights / (1.0 + extra / (global_batch * (window - 1)))

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)

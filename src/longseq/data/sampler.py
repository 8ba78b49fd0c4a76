"""Seeded random windows over the training documents, with a resumable state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .corpus import MappedCorpus
from .errors import DataError


class WindowSampler:
    """Draws windows of ``window`` consecutive ids (``seq_len + 1``: inputs and shifted targets): bytes of a
    :class:`~longseq.data.corpus.ByteCorpus`, or tokens of a :class:`~longseq.data.tokens.TokenCorpus`.

    Start positions are uniform over every valid start in the training documents. By default a window
    may cross from one training document into the next one stored after it (never into a validation
    document); ``within_docs=True`` keeps each window inside one document.

    The whole global batch is drawn from one seeded generator and rank ``r`` of ``world_size`` takes
    rows ``[r * B / W, (r + 1) * B / W)``: every rank holds the same generator state, so a run on any
    number of ranks sees the same global batches, and :meth:`state_dict` is identical on all ranks.
    """

    def __init__(
        self,
        corpus: MappedCorpus,
        doc_ids: Sequence[int],
        window: int,
        seed: int = 0,
        within_docs: bool = False,
    ) -> None:
        if window < 2:
            raise DataError(f"window must be >= 2 ids (seq_len >= 1); got {window}")
        self.corpus, self.window, self.seed, self.within_docs = corpus, int(window), int(seed), within_docs
        segments = self._segments(corpus, sorted(doc_ids), within_docs)
        lengths = np.array([end - start for start, end in segments], dtype=np.int64)
        ok = lengths >= self.window
        if not ok.any():
            longest = int(lengths.max()) if len(lengths) else 0
            where = "document" if within_docs else "run of consecutive training documents"
            raise DataError(
                f"the training data is too short for seq_len={self.window - 1}: windows need "
                f"{self.window} {corpus.unit} but the longest {where} has {longest}"
            )
        self.seg_starts = np.array([s for (s, _), k in zip(segments, ok, strict=True) if k], dtype=np.int64)
        counts = lengths[ok] - self.window + 1
        self.cum = np.cumsum(counts)  # valid starts in segments [0, i]
        self.num_starts = int(self.cum[-1])
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        self.batches_drawn = 0

    @staticmethod
    def _segments(corpus: MappedCorpus, doc_ids: list[int], within_docs: bool) -> list[tuple[int, int]]:
        """[start, end) byte ranges windows may span: documents, or runs of adjacent documents."""
        segments: list[tuple[int, int]] = []
        for i in doc_ids:
            start, end = int(corpus.offsets[i]), int(corpus.offsets[i + 1])
            if not within_docs and segments and segments[-1][1] == start:
                segments[-1] = (segments[-1][0], end)
            elif end > start:
                segments.append((start, end))
        return segments

    def draw_starts(self, n: int) -> np.ndarray:
        """``[n]`` int64 corpus offsets of the next ``n`` windows (advances the generator)."""
        u = self.rng.integers(0, self.num_starts, size=n, dtype=np.int64)
        seg = np.searchsorted(self.cum, u, side="right")
        before = np.where(seg > 0, self.cum[seg - 1], 0)
        return self.seg_starts[seg] + (u - before)

    def windows(self, starts: np.ndarray) -> Tensor:
        """``[n, window]`` int64 tensor of the ids at ``starts``."""
        idx = starts[:, None] + np.arange(self.window, dtype=np.int64)[None, :]
        return torch.from_numpy(np.asarray(self.corpus.data[idx], dtype=np.int64))

    def next_batch(self, global_batch: int, rank: int = 0, world_size: int = 1) -> Tensor:
        """This rank's ``[global_batch / world_size, window]`` share of the next global batch."""
        if global_batch % world_size:
            raise DataError(f"batch size {global_batch} is not divisible by the world size {world_size}")
        per = global_batch // world_size
        starts = self.draw_starts(global_batch)[rank * per : (rank + 1) * per]
        self.batches_drawn += 1
        return self.windows(starts)

    def next_weighted_batch(self, global_batch: int, rank: int = 0, world_size: int = 1) -> tuple[Tensor, None]:
        """:meth:`next_batch` and the loss weights of its targets: None, every target weighs the same (the
        training loop asks every sampler this way; :class:`~longseq.tasks.passkey_mix.PasskeyMixSampler` may
        weigh some more)."""
        return self.next_batch(global_batch, rank, world_size), None

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state,
            "batches_drawn": self.batches_drawn,
            "window": self.window,
            "seed": self.seed,
            "within_docs": self.within_docs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.batches_drawn = int(state["batches_drawn"])

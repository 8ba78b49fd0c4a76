"""Sampling one token per row from logits: top-k / top-p filtering, ``torch.multinomial`` sampling, and the
graph-safe exponential race that :func:`~longseq.generate.generate` uses.

The race (Gumbel-max) ``argmax(logits / T - log E)`` with ``E ~ Exp(1)`` drawn into a fixed buffer *before*
each step leaves the step itself with no RNG call, no ``torch.multinomial`` and no host sync, so eager and
captured runs draw the same tokens.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from ..tokenizer import BYTES, Tokenizer


def as_token_ids(
    prompt: Tensor | str | bytes, device: torch.device | None = None, tokenizer: Tokenizer = BYTES
) -> Tensor:
    """A prompt as ``[B, T]`` ids: a tensor (``[T]`` or ``[B, T]``), or text/bytes through ``tokenizer``
    (default: UTF-8 bytes as ids)."""
    if isinstance(prompt, (str, bytes, bytearray)):
        prompt = torch.tensor(tokenizer.encode(prompt), dtype=torch.long)
    if not isinstance(prompt, Tensor):
        hint = " (token ids go in a tensor: torch.tensor([...]))" if isinstance(prompt, int) else ""
        raise TypeError(f"a prompt must be a tensor, str or bytes; got {type(prompt).__name__}{hint}")
    if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
        raise TypeError(f"a prompt tensor must hold integer token ids; got dtype {prompt.dtype}")
    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be non-empty [T] or [B, T]; got shape {tuple(prompt.shape)}")
    return prompt.to(device=device, dtype=torch.long)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise (``TypeError`` / ``ValueError`` naming the argument) unless the sampling arguments are valid."""
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise TypeError(f"{name} must be a number; got {value!r} ({type(value).__name__})")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)):
        raise TypeError(f"top_k must be an int or None; got {top_k!r} ({type(top_k).__name__})")
    if not 0 <= temperature < float("inf"):  # NaN fails the comparison too
        raise ValueError(f"temperature must be >= 0 and finite (0 is greedy); got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None; got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None; got {top_p}")


def _filter_logits(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """``[B, V]`` logits -> fp32 logits / temperature with the tokens outside top-k / top-p at ``-inf``.

    Fixed shapes throughout (``topk`` of a fixed k, a full sort for top-p), so it can be captured."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p (the first always stays).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row from ``[B, V]`` logits. ``temperature=0`` is greedy (argmax).

    ``top_k`` keeps the k most likely tokens; ``top_p`` keeps the smallest set whose probability
    reaches p (nucleus); both apply after temperature scaling. (``torch.multinomial``; :func:`generate`
    uses the graph-safe :func:`sample_race`.)
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    probs = _filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def exponential_noise(
    shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None, device: Any = None,
    out: Tensor | None = None,
) -> Tensor:
    """``Exp(1)`` draws (fp32) for :func:`sample_race`, into ``out`` when given (in place, no allocation)."""
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=device)
    return out.exponential_(generator=generator)


def sample_race(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Graph-safe sampling of one token per row from ``[B, V]`` logits; returns ``[B]`` int64.

    The exponential race: with ``E_i ~ Exp(1)`` independent, ``argmax_i p_i / E_i`` is distributed as
    ``p`` (equivalently Gumbel-max: ``argmax(log p_i - log E_i)``). ``noise`` is the ``[B, V]`` ``E``
    buffer, drawn outside the captured step (:func:`exponential_noise`); the step itself is a fixed set
    of kernels with no RNG state, no ``torch.multinomial`` and no host sync. ``temperature=0`` is argmax
    and needs no noise. top-k / top-p restrict the support as in :func:`sample_next`.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    if noise is None:
        raise ValueError("sample_race needs Exp(1) noise [B, V] for temperature > 0")
    logits = _filter_logits(logits, temperature, top_k, top_p)
    # E = 0 (probability ~2^-24 per draw in fp32) would make -log E infinite; any tiny floor keeps it finite.
    return (logits - noise.clamp_min(1e-30).log()).argmax(-1)


class Stops:
    """When a generated row ends: after an id sequence (``int`` stops, and the tokenizer's EOS id when
    ``eos``), or after a text (``str`` / ``bytes`` stops). The stop itself is kept in the output.

    With a byte-wise tokenizer a text is its id sequence. With a subword tokenizer a text is matched on the
    decoded bytes of the row's last tokens, not on the ids the text has on its own: encoded alone,
    ``"\\n"`` may carry a space token that it never has inside a text.
    """

    def __init__(self, stop: Any, tokenizer: Tokenizer = BYTES, eos: bool = False,
                 vocab_size: int | None = None) -> None:
        """``vocab_size``: the model's; an ``int`` stop outside ``[0, vocab_size)`` could never be generated."""
        self.tokenizer = tokenizer
        self.ids: list[list[int]] = []
        self.texts: list[bytes] = []
        if stop is None:
            stop = []
        elif isinstance(stop, (int, str, bytes, bytearray)):
            stop = [stop]
        elif not isinstance(stop, (list, tuple)):
            raise TypeError(f"stop must be an int token id, a str, bytes or a list of those; got {stop!r} "
                            f"({type(stop).__name__})")
        for s in stop:
            if isinstance(s, bool) or not isinstance(s, (int, str, bytes, bytearray)):
                raise TypeError(f"stop entries must be int token ids, str or bytes; got {type(s).__name__}")
            if isinstance(s, int):
                if vocab_size is not None and not 0 <= s < vocab_size:
                    raise ValueError(f"stop id {s} is outside the model's vocabulary [0, {vocab_size}): it can "
                                     "never be generated")
                self.ids.append([s])
                continue
            text = s.encode("utf-8") if isinstance(s, str) else bytes(s)
            if not text:
                raise ValueError("an empty stop string never matches")
            if tokenizer.bytewise:
                self.ids.append(tokenizer.encode(text, special=False))
            else:
                self.texts.append(text)
        if eos and tokenizer.eos_id is not None:
            self.ids.append([tokenizer.eos_id])
        # Tokens whose text can hold the longest stop (a token decodes to at least one byte, special tokens
        # aside: a few more for those).
        self._tail = max((len(t) for t in self.texts), default=0) + 4

    def __bool__(self) -> bool:
        return bool(self.ids or self.texts)

    def hit(self, row: list[int]) -> bool:
        """Whether ``row`` (a row's generated ids so far) ends with a stop."""
        if any(len(row) >= len(s) and row[-len(s) :] == s for s in self.ids):
            return True
        if not self.texts:
            return False
        tail = self.tokenizer.decode(row[-self._tail :])
        return any(tail.endswith(t) for t in self.texts)

"""Sampling from any longseq model through its recurrent state: the past is never recomputed."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .cache.policies import CachePolicy
from .models.base import LanguageModel


def as_token_ids(prompt: Tensor | str | bytes, device: torch.device | None = None) -> Tensor:
    """A prompt as ``[B, T]`` ids: a tensor (``[T]`` or ``[B, T]``), or text/bytes as UTF-8 byte ids."""
    if isinstance(prompt, str):
        prompt = prompt.encode("utf-8")
    if isinstance(prompt, (bytes, bytearray)):
        prompt = torch.tensor(list(prompt), dtype=torch.long)
    if not isinstance(prompt, Tensor):
        raise TypeError(f"prompt must be a tensor, str or bytes; got {type(prompt).__name__}")
    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be non-empty [T] or [B, T]; got shape {tuple(prompt.shape)}")
    return prompt.to(device=device, dtype=torch.long)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy); got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None; got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None; got {top_p}")


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row from ``[B, V]`` logits. ``temperature=0`` is greedy (argmax).

    ``top_k`` keeps the k most likely tokens; ``top_p`` keeps the smallest set whose probability
    reaches p (nucleus); both apply after temperature scaling.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
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
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: LanguageModel,
    prompt: Tensor | str | bytes,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    cache: CachePolicy | None = None,
    seed: int | None = None,
    on_token: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Continue ``prompt`` by ``max_new_tokens`` tokens.

    Args:
        model: any longseq language model.
        prompt: ``[T]`` / ``[B, T]`` token ids, or text / bytes (UTF-8 bytes as ids).
        max_new_tokens: number of tokens to add (``>= 0``).
        temperature, top_k, top_p: sampling controls (see :func:`sample_next`).
        cache: KV-cache policy for models with attention layers (default: keep everything).
        seed: seeds a private generator, so sampling does not touch the global RNG.
        on_token: called with each new ``[B]`` token batch as it is produced (streaming).
    Returns:
        ``[B, T + max_new_tokens]`` ids: the prompt followed by the continuation.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    ids = as_token_ids(prompt, model.device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=ids.device)
        generator.manual_seed(seed)
    state = model.init_state(ids.shape[0], cache=cache)
    out = [ids]
    if max_new_tokens == 0:
        return ids
    logits, state = model.step(ids, state)
    for i in range(max_new_tokens):
        token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        out.append(token[:, None])
        if on_token is not None:
            on_token(token)
        if i + 1 < max_new_tokens:
            logits, state = model.step(token[:, None], state)
    return torch.cat(out, dim=1)

"""``generate``: continue prompts through any longseq model's recurrent state."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..cache.policies import CachePolicy, fit_budget, parse_policy
from ..models.base import LanguageModel
from ..tokenizer import Tokenizer
from .decoder import Decoder, compile_mode, decode_cache
from .prefill import prefill, prefill_rows
from .sampling import Stops, as_token_ids, check_sampling

_warned_cpu_compile = False


def _warn_cpu_compile(device: torch.device) -> None:
    global _warned_cpu_compile
    if not _warned_cpu_compile:
        _warned_cpu_compile = True
        warnings.warn(
            f"generate(compile=True): CUDA graphs need a CUDA device; the model is on {device}, so the "
            f"static decode step runs eagerly",
            RuntimeWarning,
            stacklevel=4,
        )


@torch.no_grad()
def generate(
    model: LanguageModel,
    prompt: Tensor | str | bytes | Sequence[Tensor | str | bytes],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    cache: CachePolicy | str | None = None,
    seed: int | None = None,
    on_token: Callable[[Tensor], None] | None = None,
    stop: int | str | bytes | Sequence[int | str | bytes] | None = None,
    compile: bool | str = False,
    static: bool | None = None,
    prefill_chunk: int | None = None,
    pad_id: int = 0,
    stop_at_eos: bool = True,
) -> Tensor | list[Tensor]:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens.

    Args:
        model: any longseq language model.
        prompt: ``[T]`` / ``[B, T]`` token ids, or text / bytes (through ``model.tokenizer``); or a list of such
            prompts (each one row, ``[T_i]`` ids / text / bytes), which may differ in length: each is
            prefilled on its own into its row of a static batched state, so padding never enters a
            state or a cache policy, and all rows then decode together at their own positions.
        max_new_tokens: number of tokens to add (``>= 0``); the longest prompt plus these must fit the
            model's ``max_seq_len`` where it has one (MEGABYTE), checked before any work.
        temperature, top_k, top_p: sampling controls (see :func:`sample_race`; ``temperature=0``: greedy).
        cache: KV-cache policy (or a spec such as ``"tova:512"``) for models with attention layers (default:
            keep everything). A budget above the longest prompt plus ``max_new_tokens`` never evicts and is
            lowered to that length (same output, a smaller static state).
        seed: seeds a private generator, so sampling does not touch the global RNG.
        on_token: called with each new ``[B]`` token batch (on the CPU) as it is produced (streaming);
            rows that have stopped carry ``pad_id``.
        stop: a token id, a str / bytes (matched on the decoded UTF-8 text), or a list of those; a row
            ends after the first generated token that completes one (the stop is kept in the output),
            and generation ends when every row has (see :class:`~longseq.generate.sampling.Stops`).
        compile: capture the decode step (model step + sampling) as a CUDA graph, once per batch size,
            and replay it; prefill stays eager and chunked. ``"fused"``: compile the step with
            ``torch.compile`` before capturing it (fewer, fused kernels per step; the first call per
            batch size compiles for a while). ``True`` is ``"graph"``. On a CPU model either runs the
            static eager path and warns once.
        static: force (True) or forbid (False) the static state; default: static when ``compile`` or
            the prompts differ in length.
        prefill_chunk: prefill in chunks of this many tokens (default: the whole prompt in one step; either
            way the model computes the logits of each prompt's last token only).
        pad_id: fills the places of a tensor result after a row's stop.
        stop_at_eos: also end a row at the tokenizer's end-of-sequence id (pretrained models; byte
            models have none), as HF ``generate`` does.
    Returns:
        For a tensor / str / bytes prompt: ``[B, T + max_new_tokens]`` ids, the prompt followed by the
        continuation (``pad_id`` after a row stopped). For a list of prompts: a list of ``[T_i + n_i]``
        tensors, each row's prompt and its continuation up to and including its stop.
    """
    mode = _check_args(max_new_tokens, compile, temperature, top_k, top_p, prefill_chunk)
    if isinstance(cache, str):
        cache = parse_policy(cache)
    if cache is not None and not isinstance(cache, CachePolicy):
        raise TypeError(f"cache must be a CachePolicy such as TOVA(512), or a spec such as 'tova:512'; got {cache!r}")
    stops = Stops(stop, model.tokenizer, eos=stop_at_eos, vocab_size=model.config.vocab_size)
    device = model.device
    as_list = isinstance(prompt, (list, tuple))
    rows = _prompt_rows(prompt, device, model.tokenizer)
    lengths = [r.shape[1] for r in rows]
    if max_new_tokens == 0:
        return [r[0] for r in rows] if as_list else torch.cat(rows, 0)
    ragged = len(set(lengths)) > 1
    max_len = max(lengths) + max_new_tokens
    caps = model.capabilities
    if caps.max_seq_len is not None and max_len > caps.max_seq_len:
        raise ValueError(f"a prompt of {max(lengths)} tokens and max_new_tokens={max_new_tokens} make {max_len} "
                         f"tokens, more than this model's max_seq_len={caps.max_seq_len}")
    if cache is not None:
        # A budget the sequence never fills never evicts: a static state then needs max_len + 1 slots, not
        # budget + 1 (which a budget far above the sequence could not allocate).
        cache = fit_budget(cache, max_len)
    if static is False and ragged:
        raise ValueError("prompts of different lengths need the static state (static=None or True)")
    use_static = bool(mode or ragged) if static is None else static
    capture = mode is not None and device.type == "cuda"
    if mode is not None and not capture:
        _warn_cpu_compile(device)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    sampling = (temperature, top_k, top_p)
    if use_static:
        fuse = capture and mode == "fused"
        decoder, first = _static_decoder(model, rows, max_len, cache, sampling, capture, fuse, prefill_chunk)
    else:
        first, state = prefill(model, torch.cat(rows, 0), cache, prefill_chunk)
        decoder = Decoder(model, state, *sampling, capture=False)
    host_rows = _decode(decoder, first, max_new_tokens, generator, stops, on_token, pad_id)
    return _outputs(rows, host_rows, as_list, lengths[0] + max_new_tokens, pad_id)


def _outputs(rows: list[Tensor], new: list[list[int]], as_list: bool, width: int, pad_id: int) -> Tensor | list[Tensor]:
    """Each row's prompt and continuation: a list of ``[T_i + n_i]`` tensors, or one ``[B, width]`` tensor
    padded with ``pad_id`` after the rows that stopped early."""
    device = rows[0].device
    conts = [torch.tensor(n, dtype=torch.long, device=device) for n in new]
    outs = [torch.cat([row[0], cont]) for row, cont in zip(rows, conts, strict=True)]
    if as_list:
        return outs
    result = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    for b, out in enumerate(outs):
        result[b, : out.shape[0]] = out
    return result


def _check_args(max_new_tokens: int, compile: bool | str, temperature: float, top_k: int | None,
                top_p: float | None, prefill_chunk: int | None) -> str | None:
    """``generate``'s argument checks, before any work; returns the compile mode."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int; got {max_new_tokens!r} ({type(max_new_tokens).__name__})")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    mode = compile_mode(compile)
    check_sampling(temperature, top_k, top_p)
    integral = isinstance(prefill_chunk, numbers.Integral) and not isinstance(prefill_chunk, bool)
    if prefill_chunk is not None and not integral:
        raise TypeError(f"prefill_chunk must be an int or None; got {prefill_chunk!r} ({type(prefill_chunk).__name__})")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1; got {prefill_chunk}")
    return mode


def _prompt_rows(prompt: Any, device: torch.device, tokenizer: Tokenizer) -> list[Tensor]:
    """``generate``'s prompt argument as a list of ``[1, T_i]`` id rows on ``device``."""
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError("prompt list is empty")
        rows = [as_token_ids(p, device, tokenizer) for p in prompt]
        if any(r.shape[0] != 1 for r in rows):
            raise ValueError("each prompt of a list must be one sequence ([T] ids, str or bytes)")
        return rows
    ids = as_token_ids(prompt, device, tokenizer)
    return [ids[i : i + 1] for i in range(ids.shape[0])]


def _static_decoder(
    model: LanguageModel, rows: list[Tensor], max_len: int, cache: CachePolicy | None,
    sampling: tuple[float, int | None, float | None], capture: bool, fuse: bool, prefill_chunk: int | None,
) -> tuple[Decoder, Tensor]:
    """A decoder over a static state of ``len(rows)`` rows with every prompt prefilled into its row, and the
    ``[B, V]`` logits after each prompt. Captured decoders (and their states) are kept on the model and
    reused by later calls of the same shape."""
    key = (len(rows), str(cache) if cache is not None else None, max_len, *sampling, capture, fuse)
    kept = decode_cache(model).get(key) if capture else None
    if kept is None:
        state = model.init_state(len(rows), cache=cache, max_len=max_len)
        decoder = Decoder(model, state, *sampling, capture=capture, fuse=fuse)
        if capture:
            decode_cache(model)[key] = (state, decoder)
    else:
        state, decoder = kept
    return decoder, prefill_rows(model, state, rows, cache, prefill_chunk)


def _decode(
    decoder: Decoder, first_logits: Tensor, max_new_tokens: int, generator: torch.Generator | None,
    stops: Stops, on_token: Callable[[Tensor], None] | None, pad_id: int,
) -> list[list[int]]:
    """The decode loop: each row's new tokens (up to and including its stop), ``on_token`` called per step.

    On CUDA the tokens go to pinned host memory asynchronously and are read one step late, so the device
    is already busy with the next step while the host checks the stops."""
    B = first_logits.shape[0]
    device = first_logits.device
    decoder.draw_noise(generator)
    decoder.tokens.copy_(decoder.sample(first_logits)[:, None])
    host_rows: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    pinned = torch.empty(max_new_tokens, B, dtype=torch.long, pin_memory=True) if device.type == "cuda" else None
    pending: list[tuple[Tensor, Any]] = []  # (host copy, event) of steps not read yet

    def consume(host: Tensor, event: Any) -> None:
        if event is not None:
            event.synchronize()
        if stops and all(done):  # the step computed while the last row's stop was being read
            return
        emitted = []
        for b, value in enumerate(host.tolist()):
            if done[b]:
                emitted.append(pad_id)
                continue
            host_rows[b].append(value)
            emitted.append(value)
            done[b] = stops.hit(host_rows[b])
        if on_token is not None:
            on_token(torch.tensor(emitted, dtype=torch.long))

    for i in range(max_new_tokens):
        if i > 0:
            decoder.draw_noise(generator)
            decoder.step()
        if pinned is not None:
            pinned[i].copy_(decoder.tokens[:, 0], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            pending.append((pinned[i], event))
        else:
            pending.append((decoder.tokens[:, 0].clone(), None))
        # The token of the previous step is read only now, so the device is already busy with this one.
        while len(pending) > 1 or (pending and i == max_new_tokens - 1):
            consume(*pending.pop(0))
        if stops and all(done):
            break
    while pending:
        consume(*pending.pop(0))
    return host_rows

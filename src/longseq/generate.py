"""Sampling from any longseq model through its recurrent state: the past is never recomputed.

:func:`generate` prefills each prompt (chunked, uncaptured), then decodes all rows together one token per
step. Three paths share one loop:

* dynamic (default for one prompt or equal-length prompts): the state grows as before;
* static (prompts of different lengths, or ``compile=True``): ``init_state(B, max_len=N)`` buffers, each
  prompt prefilled on its own into a dynamic state and loaded into its row, per-row positions;
* captured (``compile=True`` on CUDA): the static decode step -- model step + sampling + feeding the
  token back -- is captured once as a ``torch.cuda.CUDAGraph`` per batch size (and per
  :meth:`~longseq.models.base.LanguageModel.decode_key`: MEGABYTE has a second graph for the steps in
  which its global model runs) and replayed; graphs and static buffers are kept on the model and reused by
  later calls of the same shape.
* fused (``compile="fused"`` on CUDA): as captured, but the step is first compiled with ``torch.compile``
  (Inductor), so the graph replays a few fused kernels per layer instead of one launch per elementwise
  op -- at batch 1 a decode step is a chain of tiny kernels, and their number is its cost.

Sampling is graph-safe everywhere: the exponential race (Gumbel-max) ``argmax(logits / T - log E)``
with ``E ~ Exp(1)`` drawn into a fixed buffer *before* each step, so the step itself has no RNG call,
no ``torch.multinomial`` and no host sync, and eager and captured runs draw the same tokens.
"""

from __future__ import annotations

import logging
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .cache.kv import KVCache
from .cache.policies import CachePolicy
from .models.base import LanguageModel
from .models.state import ModelState

_log = logging.getLogger("longseq.generate")
_warned_cpu_compile = False
COMPILE_MODES = ("graph", "fused")
MAX_CAPTURE_RECOMPILES = 8  # then a fused decoder captures its step unfused


def compile_mode(compile: bool | str) -> str | None:
    """``generate``'s ``compile`` argument -> None (eager), ``"graph"`` (True) or ``"fused"``."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "graph"
    if compile in COMPILE_MODES:
        return compile
    raise ValueError(f"compile must be True, False or one of {COMPILE_MODES}; got {compile!r}")


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


def _normalise_stop(stop: Any) -> list[list[int]]:
    """``stop``: a byte id, bytes, str, or a sequence of those -> list of id sequences."""
    if stop is None:
        return []
    if isinstance(stop, (int, str, bytes, bytearray)):
        stop = [stop]
    out = []
    for s in stop:
        if isinstance(s, bool) or not isinstance(s, (int, str, bytes, bytearray)):
            raise TypeError(f"stop entries must be int token ids, str or bytes; got {type(s).__name__}")
        ids = [s] if isinstance(s, int) else list(s.encode("utf-8") if isinstance(s, str) else s)
        if not ids:
            raise ValueError("an empty stop string never matches")
        out.append(ids)
    return out


# ------------------------------------------------------------------------------------------- decoding
class Decoder:
    """Single-token decode steps on one state: ``tokens`` ``[B, 1]`` -> model step -> sample -> ``tokens``.

    ``capture=True`` (CUDA, static state) records the whole step as a CUDA graph per
    :meth:`LanguageModel.decode_key` -- the first step of a key runs eagerly on a side stream (warm-up:
    Triton compilation, cuBLAS workspaces), the next is captured, every later one replays. ``captures``
    counts graphs recorded. The input/output buffers (``tokens``, ``noise``) and the state's buffers
    are what the graph reads and writes, so they never change identity.

    ``fuse=True`` runs the step through ``torch.compile`` (before capturing it, with ``capture``). Its
    first call per key compiles with the host integers of the step (positions, fill counts) as
    constants and its second recompiles them as symbols (automatic dynamic shapes), so a key is warmed
    up twice before its capture and the capture itself compiles nothing. If Inductor cannot compile
    (no C compiler, an unsupported op), the step warns once and is captured unfused.
    """

    def __init__(
        self,
        model: LanguageModel,
        state: ModelState,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        capture: bool,
        fuse: bool = False,
    ) -> None:
        self.model, self.state = model, state
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.capture = capture
        if capture and not (state.static and model.device.type == "cuda"):
            raise ValueError("CUDA-graph capture needs a static state on a CUDA device")
        self.fuse = fuse
        self._run = _compiled_step(self) if fuse else self._body
        B, V = state.batch_size, model.config.vocab_size
        device = model.device
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.noise = torch.ones(B, V, dtype=torch.float32, device=device) if temperature > 0 else None
        self.graphs: dict[Any, torch.cuda.CUDAGraph] = {}
        self._warm: dict[Any, int] = {}  # eager (warm-up) steps run per key
        self._recompiles = 0  # fused captures refused because the step would have compiled
        self._pool = None
        self.captures = 0

    def sample(self, logits: Tensor) -> Tensor:
        """``[B, V]`` -> ``[B]`` with the current noise buffer."""
        return sample_race(logits, self.temperature, self.top_k, self.top_p, self.noise)

    def draw_noise(self, generator: torch.Generator | None) -> None:
        if self.noise is not None:
            exponential_noise(self.noise.shape, generator, out=self.noise)

    def _body(self) -> None:
        logits, _ = self.model.step(self.tokens, self.state)
        self.tokens.copy_(self.sample(logits[:, -1])[:, None])

    def step(self) -> None:
        """Advance every row by the token in ``tokens``; ``tokens`` then holds the next one."""
        if not self.capture:
            self._run()
            return
        key = self.model.decode_key(self.state)
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            self.state.advance_(1)  # a replay runs no Python: keep the host mirror in step
            return
        if self._warm.get(key, 0) < (2 if self.fuse else 1):
            side = torch.cuda.Stream(device=self.tokens.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._warm_step()
            torch.cuda.current_stream().wait_stream(side)
            self._warm[key] = self._warm.get(key, 0) + 1
            return
        # Capturing records the kernels without running them; the replay right after runs this step.
        host = list(self.state.host_positions or [])
        n_host = [c._n for c in self.state.layers if isinstance(c, KVCache)]
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        if self.fuse:
            from torch._dynamo.exc import RecompileError

            try:
                # A guard that fails now would compile inside the capture: refuse, before the step runs.
                with torch.compiler.set_stance("fail_on_recompile"), torch.cuda.graph(graph, pool=self._pool):
                    self._run()
            except (RecompileError, RuntimeError) as err:
                # torch 2.11 raises a RuntimeError ("Detected recompile ..."), later ones RecompileError.
                if not isinstance(err, RecompileError) and "recompile" not in str(err).lower():
                    raise
                self._recompiles += 1
                if self._recompiles > MAX_CAPTURE_RECOMPILES:
                    warnings.warn("the fused decode step kept recompiling at its capture; capturing it unfused",
                                  RuntimeWarning, stacklevel=2)
                    self._unfuse()  # every key then gets its eager warm-up before its (unfused) capture
                else:
                    self._warm[key] -= 1  # one more warm-up step of this key (it compiles), then capture again
                self.step()
                return
        else:
            with torch.cuda.graph(graph, pool=self._pool):
                self._run()
        # The Python side of the step ran once during capture: undo its host bookkeeping.
        self.state.host_positions = host
        self.state.position = max(host)
        for c, n in zip((c for c in self.state.layers if isinstance(c, KVCache)), n_host, strict=True):
            c._n = n
        self.graphs[key] = graph
        self.captures += 1
        graph.replay()
        self.state.advance_(1)

    def _warm_step(self) -> None:
        if not self.fuse:
            self._body()
            return
        from torch._dynamo.exc import BackendCompilerFailed, Unsupported

        try:
            self._run()
        except (BackendCompilerFailed, Unsupported) as err:
            # Raised while compiling the one whole-step graph (fullgraph), so before any of the step ran:
            # fall back to the unfused step, once.
            cause = getattr(err, "inner_exception", None) or err
            warnings.warn(f"torch.compile could not fuse the decode step ({type(cause).__name__}: {cause}); "
                          "capturing it unfused", RuntimeWarning, stacklevel=3)
            self._unfuse()
            self._body()

    def _unfuse(self) -> None:
        self.fuse, self._run = False, self._body
        self._warm.clear()  # keys warmed only through the compiled step still need their eager warm-up


def _decode_step(decoder: Decoder) -> None:
    decoder._body()


def _compiled_step(decoder: Decoder) -> Callable[[], None]:
    """``torch.compile`` of one decoder's step with a compile cache of its own.

    Dynamo keys its cache on the code object and guards on the decoder it sees, so decoders that
    shared one function would pile their variants onto one cache until its recompile limit silently
    sent later ones back to eager; a copy of the code per decoder keeps each to its own few variants.
    """
    code = _decode_step.__code__.replace(co_name=f"decode_step_{id(decoder):x}")
    # fullgraph: one graph for the whole step, so a failure to compile is raised before any of it runs
    # (with graph breaks, frames before the failing one would already have advanced the state).
    fn = torch.compile(types.FunctionType(code, _decode_step.__globals__, code.co_name), fullgraph=True)
    return lambda: fn(decoder)


def _decode_cache(model: LanguageModel) -> dict[Any, tuple[ModelState, Decoder]]:
    cache = model.__dict__.get("_longseq_decoders")
    if cache is None:
        cache = {}
        model.__dict__["_longseq_decoders"] = cache  # plain attribute: not a parameter, buffer or submodule
    return cache


def capture_count(model: LanguageModel) -> int:
    """CUDA graphs captured so far by ``generate(model, ..., compile=True)`` (all batch sizes)."""
    return sum(dec.captures for _, dec in _decode_cache(model).values())


def clear_decode_cache(model: LanguageModel) -> None:
    """Drop the captured graphs and static states ``generate(..., compile=True)`` keeps on ``model``."""
    _decode_cache(model).clear()


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


def _prefill(
    model: LanguageModel, ids: Tensor, cache: CachePolicy | None, chunk: int | None
) -> tuple[Tensor, ModelState]:
    """Dynamic state after ``ids`` ``[b, T]`` (in chunks of ``chunk`` tokens) and the last logits ``[b, V]``."""
    state = model.init_state(ids.shape[0], cache=cache)
    for layer in state.layers:
        if isinstance(layer, KVCache):
            layer.reserve(ids.shape[1])  # Full: one allocation, no regrowth while the prompt streams in
    T = ids.shape[1]
    step = T if chunk is None else chunk
    logits = None
    for a in range(0, T, step):
        logits, state = model.step(ids[:, a : a + step], state)
    assert logits is not None
    return logits[:, -1], state


# Tokens per model call when several prompts are prefilled together (see prefill_rows).
GROUP_PREFILL_TOKENS = 32768
# Bytes of temporary (dynamic) state one prefill group may hold beside the static state (see prefill_rows).
GROUP_STATE_BYTES = 2 * 2**30


def prefill_rows(
    model: LanguageModel,
    state: ModelState,
    rows: Sequence[Tensor],
    cache: CachePolicy | None = None,
    chunk: int | None = None,
    max_group: int | None = None,
) -> Tensor:
    """Prefill the ``[1, T_i]`` prompts into dynamic states and load them into rows ``i`` of the static
    ``state``; returns the ``[B, V]`` logits after each prompt's last token.

    Consecutive prompts of equal length are prefilled together, up to ``max_group`` rows at a time, so
    padding never enters a state. Default: runs of equal length when the temporary dynamic state has a
    bounded size per row (recurrent states, bounded KV policies such as TOVA, whose exact
    token-by-token prefill is launch bound and gains the most from batching), as many rows as fit
    :data:`GROUP_STATE_BYTES` of it -- a group of the whole batch would hold a second copy of the
    batch's state beside the static one and halve the batch that fits; one row at a time for unbounded
    (``Full``) KV caches.
    """
    if max_group is None:
        probe = model.init_state(1, cache=cache)
        # MEGABYTE's local caches hold at most one patch (they restart at every patch): only the layers
        # that persist along the sequence decide.
        persistent = getattr(probe, "global_layers", probe.layers)
        unbounded = any(isinstance(layer, KVCache) and layer.budget is None for layer in persistent)
        # The static state's size per row is the bounded dynamic state's (both hold budget + 1 slots).
        per_row = max(1, state.nbytes() // max(1, state.batch_size))
        max_group = 1 if unbounded else max(1, min(len(rows), GROUP_STATE_BYTES // per_row))
    if max_group < 1:
        raise ValueError(f"max_group must be >= 1, got {max_group}")
    out: list[Tensor] = []
    start = 0
    while start < len(rows):
        end = start + 1
        while end < len(rows) and end - start < max_group and rows[end].shape[-1] == rows[start].shape[-1]:
            end += 1
        n_rows = end - start
        # A group goes through the model in chunks of at most GROUP_PREFILL_TOKENS tokens in all, so
        # batching rows never multiplies the prefill's activation memory (chunked prefill is exact).
        group_chunk = chunk if chunk is not None or n_rows == 1 else max(1, GROUP_PREFILL_TOKENS // n_rows)
        logits, dyn = _prefill(model, torch.cat(list(rows[start:end]), 0), cache, group_chunk)
        state.load_(dyn, slice(start, end))
        out.extend(logits)
        del dyn
        start = end
    return torch.stack(out, 0)


@torch.no_grad()
def generate(
    model: LanguageModel,
    prompt: Tensor | str | bytes | Sequence[Tensor | str | bytes],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    cache: CachePolicy | None = None,
    seed: int | None = None,
    on_token: Callable[[Tensor], None] | None = None,
    stop: int | str | bytes | Sequence[int | str | bytes] | None = None,
    compile: bool | str = False,
    static: bool | None = None,
    prefill_chunk: int | None = None,
    pad_id: int = 0,
) -> Tensor | list[Tensor]:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens.

    Args:
        model: any longseq language model.
        prompt: ``[T]`` / ``[B, T]`` token ids, or text / bytes (UTF-8 bytes as ids); or a list of such
            prompts (each one row, ``[T_i]`` ids / text / bytes), which may differ in length: each is
            prefilled on its own into its row of a static batched state, so padding never enters a
            state or a cache policy, and all rows then decode together at their own positions.
        max_new_tokens: number of tokens to add (``>= 0``).
        temperature, top_k, top_p: sampling controls (see :func:`sample_race`; ``temperature=0``: greedy).
        cache: KV-cache policy for models with attention layers (default: keep everything).
        seed: seeds a private generator, so sampling does not touch the global RNG.
        on_token: called with each new ``[B]`` token batch (on the CPU) as it is produced (streaming);
            rows that have stopped carry ``pad_id``.
        stop: a token id, a str / bytes (matched as UTF-8 bytes), or a list of those; a row ends after
            the first generated token that completes one (the stop sequence is kept in the output), and
            generation ends when every row has.
        compile: capture the decode step (model step + sampling) as a CUDA graph, once per batch size,
            and replay it; prefill stays eager and chunked. ``"fused"``: compile the step with
            ``torch.compile`` before capturing it (fewer, fused kernels per step; the first call per
            batch size compiles for a while). ``True`` is ``"graph"``. On a CPU model either runs the
            static eager path and warns once.
        static: force (True) or forbid (False) the static state; default: static when ``compile`` or
            the prompts differ in length.
        prefill_chunk: prefill in chunks of this many tokens (default: the whole prompt in one step).
        pad_id: fills the places of a tensor result after a row's stop.
    Returns:
        For a tensor / str / bytes prompt: ``[B, T + max_new_tokens]`` ids, the prompt followed by the
        continuation (``pad_id`` after a row stopped). For a list of prompts: a list of ``[T_i + n_i]``
        tensors, each row's prompt and its continuation up to and including its stop.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    mode = compile_mode(compile)
    check_sampling(temperature, top_k, top_p)
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1; got {prefill_chunk}")
    stops = _normalise_stop(stop)
    device = model.device
    as_list = isinstance(prompt, (list, tuple))
    if as_list:
        if not prompt:
            raise ValueError("prompt list is empty")
        rows = [as_token_ids(p, device) for p in prompt]
        if any(r.shape[0] != 1 for r in rows):
            raise ValueError("each prompt of a list must be one sequence ([T] ids, str or bytes)")
    else:
        ids = as_token_ids(prompt, device)
        rows = [ids[i : i + 1] for i in range(ids.shape[0])]
    B = len(rows)
    lengths = [r.shape[1] for r in rows]
    if max_new_tokens == 0:
        return [r[0] for r in rows] if as_list else torch.cat(rows, 0)
    ragged = len(set(lengths)) > 1
    if static is False and ragged:
        raise ValueError("prompts of different lengths need the static state (static=None or True)")
    use_static = bool(mode or ragged) if static is None else static
    capture = mode is not None and device.type == "cuda"
    if mode is not None and not capture:
        _warn_cpu_compile(device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    # -- prefill (eager, chunked) and the decode state -----------------------------------------------
    max_len = max(lengths) + max_new_tokens
    first_logits: list[Tensor] = []
    if not use_static:
        logits, state = _prefill(model, torch.cat(rows, 0), cache, prefill_chunk)
        first_logits.append(logits)
        decoder = Decoder(model, state, temperature, top_k, top_p, capture=False)
    else:
        fuse = capture and mode == "fused"
        key = (B, str(cache) if cache is not None else None, max_len, temperature, top_k, top_p, capture, fuse)
        kept = _decode_cache(model).get(key) if capture else None
        if kept is None:
            state = model.init_state(B, cache=cache, max_len=max_len)
            decoder = Decoder(model, state, temperature, top_k, top_p, capture=capture, fuse=fuse)
            if capture:
                _decode_cache(model)[key] = (state, decoder)
        else:
            state, decoder = kept
        first_logits.append(prefill_rows(model, state, rows, cache, prefill_chunk))

    # -- decode ------------------------------------------------------------------------------------
    decoder.draw_noise(generator)
    decoder.tokens.copy_(decoder.sample(first_logits[0])[:, None])
    host_rows: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    # CUDA: tokens go to pinned host memory asynchronously and are read one step late (below).
    pinned = torch.empty(max_new_tokens, B, dtype=torch.long, pin_memory=True) if device.type == "cuda" else None
    pending: list[tuple[int, Tensor, Any]] = []  # (step, host copy, event): read one step late

    def consume(i: int, host: Tensor, event: Any) -> None:
        if event is not None:
            event.synchronize()
        if stops and all(done):  # the step computed while the last row's stop was being read
            return
        values = host.tolist()
        emitted = []
        for b in range(B):
            if done[b]:
                emitted.append(pad_id)
                continue
            host_rows[b].append(values[b])
            emitted.append(values[b])
            if any(len(host_rows[b]) >= len(s) and host_rows[b][-len(s) :] == s for s in stops):
                done[b] = True
        if on_token is not None:
            on_token(torch.tensor(emitted, dtype=torch.long))

    for i in range(max_new_tokens):
        if i > 0:
            decoder.draw_noise(generator)
            decoder.step()
        if pinned is not None:
            host = pinned[i]
            host.copy_(decoder.tokens[:, 0], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = decoder.tokens[:, 0].clone(), None
        pending.append((i, host, event))
        # The token of the previous step is read only now, so the device is already busy with this one.
        while len(pending) > 1 or (pending and i == max_new_tokens - 1):
            consume(*pending.pop(0))
        if stops and all(done):
            break
    while pending:
        consume(*pending.pop(0))

    outs = []
    for b in range(B):
        cont = torch.tensor(host_rows[b], dtype=torch.long, device=device)
        outs.append(torch.cat([rows[b][0], cont]))
    if as_list:
        return outs
    width = lengths[0] + max_new_tokens
    result = torch.full((B, width), pad_id, dtype=torch.long, device=device)
    for b in range(B):
        result[b, : outs[b].shape[0]] = outs[b]
    return result

"""The decode loop's step, eager or captured: model step + sampling + feeding the token back, recorded as
one CUDA graph per :meth:`~longseq.models.LanguageModel.decode_key` and replayed (``compile=True``), or first
compiled with ``torch.compile`` (``compile="fused"``).
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..models.base import LanguageModel
from ..models.state import ModelState
from .sampling import exponential_noise, sample_race

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
        host = self.state.host_snapshot()
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
        self.state.restore_host(host)
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


def decode_cache(model: LanguageModel) -> dict[Any, tuple[ModelState, Decoder]]:
    cache = model.__dict__.get("_longseq_decoders")
    if cache is None:
        cache = {}
        model.__dict__["_longseq_decoders"] = cache  # plain attribute: not a parameter, buffer or submodule
    return cache


def capture_count(model: LanguageModel) -> int:
    """CUDA graphs captured so far by ``generate(model, ..., compile=True)`` (all batch sizes)."""
    return sum(dec.captures for _, dec in decode_cache(model).values())


def clear_decode_cache(model: LanguageModel) -> None:
    """Drop the captured graphs and static states ``generate(..., compile=True)`` keeps on ``model``."""
    decode_cache(model).clear()

"""``longseq bench decode``: prefill time, ms per decode step, tokens/s and peak memory per model x cache
policy x context x batch size, optionally next to HF / fla references (:mod:`longseq.bench.baselines`).

Each configuration's rows are measured one batch size at a time; a batch size ``"max"`` searches for the
largest batch that fits (:func:`batch_estimate` guesses, :func:`largest_batch` shrinks on out-of-memory).
"""

from __future__ import annotations

import gc
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from ..models import ModelConfig, build_model, capabilities, config_class
from ..train.distributed import pick_device
from .baselines import BASELINES, bench_baseline
from .report import describe_device, fmt, library_version
from .timing import OOM, is_oom, peak_memory_gib, release_memory, reset_peak_memory, timed

MAX_BATCH = "max"  # a ``batch_sizes`` entry: the largest batch that fits the memory limit
# Kept free beside the static state when estimating the largest batch: a prefill group's temporary state
# (generate.GROUP_STATE_BYTES) and the activations of a prefill chunk or a decode step.
BATCH_RESERVE_BYTES = 4 * 2**30


def resolve_policy(spec: str, context: int):
    """A cache policy spec whose budget may be written relative to the context: ``tova:ctx/8``."""
    from ..cache.policies import parse_policy, resolve_budget

    parts = spec.split(":")
    if len(parts) > 1 and parts[1].startswith("ctx/"):
        parts[1] = str(resolve_budget(parts[1], context))
    return parse_policy(":".join(parts))


def decode_warmup(warmup: int, patch_size: int = 1, fused: bool = False) -> int:
    """Untimed decode steps before the timing: at least ``warmup``, and enough for every decode key to get
    its warm-up step(s) (two when fused) and its capture -- MEGABYTE's key with the global step recurs
    once per patch of ``patch_size`` bytes."""
    return max(warmup, (3 if fused else 2) * patch_size + 1)


@torch.no_grad()
def bench_decode_longseq(
    model, policy, context: int, batch: int, steps: int, warmup: int, compile: bool | str, device: torch.device
) -> dict[str, Any]:
    """Prefill ``batch`` random prompts of ``context`` bytes, then time ``steps`` greedy decode steps.

    ``compile`` (True / ``"graph"`` / ``"fused"``, as :func:`~longseq.generate.generate`'s): static state
    + the decode step captured as a CUDA graph (the first ``warmup`` steps,
    untimed, include the eager warm-up step(s) and the capture of every decode key: at least ``2 P + 1``
    steps for MEGABYTE (``3 P + 1`` fused), whose step with the global model comes once per patch of
    ``P`` bytes); otherwise the default dynamic state, eager. Prefill time includes loading the rows into
    the static state.
    """
    from ..generate import Decoder, compile_mode, prefill_rows
    from ..generate import prefill as prefill_dynamic

    mode = compile_mode(compile)

    model.eval()
    warmup = decode_warmup(warmup, capabilities(model).seq_multiple, fused=mode == "fused")
    prompt = torch.randint(0, 256, (batch, context), device=device)
    reset_peak_memory(device)
    total = context + warmup + steps + 1
    if mode:
        def run_prefill():
            state = model.init_state(batch, cache=policy, max_len=total)
            return state, prefill_rows(model, state, [prompt[i : i + 1] for i in range(batch)], policy)
    else:
        def run_prefill():
            logits, state = prefill_dynamic(model, prompt, policy, None)
            return state, logits
    prefill_s, (state, logits) = timed(device, run_prefill)
    capture = mode is not None and device.type == "cuda"
    dec = Decoder(model, state, 0.0, None, None, capture=capture, fuse=capture and mode == "fused")
    dec.tokens.copy_(logits.argmax(-1)[:, None])
    for _ in range(warmup):
        dec.step()
    decode_s, _ = timed(device, lambda: [dec.step() for _ in range(steps)])
    return {
        "prefill_s": prefill_s,
        "ms_per_step": decode_s / steps * 1e3,
        "tok_s": batch * steps / decode_s,
        "peak_gib": peak_memory_gib(device),
        "captures": dec.captures,
    }


def largest_batch(
    run, start: int, device: torch.device, shrink: float = 0.8, fine_tries: int = 4, log=None
) -> dict[str, Any]:
    """``run(batch)`` from ``start`` down until one fits: the batch shrinks by ``shrink`` after each of the
    first ``fine_tries`` out-of-memory errors (the estimate is usually close), then halves (it was not).

    Returns that run's result with its ``batch``; re-raises the out-of-memory once ``batch`` 1 fails, and
    any other error at once.
    """
    batch = max(1, start)
    for attempt in itertools.count():
        try:
            return {**run(batch), "batch": batch}
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err) or batch == 1:
                raise
            if log is not None:
                log(f"batch {batch}: out of memory ({str(err).splitlines()[0][:160]}); trying a smaller one")
        release_memory(device)
        batch = max(1, int(batch * (shrink if attempt < fine_tries else 0.5)))
    raise AssertionError("unreachable")


def batch_estimate(model, policy, max_len: int, limit_bytes: float | None, cap: int, device: torch.device) -> int:
    """How many rows of ``model``'s static state fit in ``limit_bytes`` beside what is already allocated,
    :data:`BATCH_RESERVE_BYTES` for prefill and decode activations and 5% for fragmentation; ``cap`` at
    most, and ``cap`` itself without a limit (CPU)."""
    if limit_bytes is None or device.type != "cuda":
        return cap
    probe = model.init_state(1, cache=policy, max_len=max_len)
    per_row = max(probe.nbytes(), 1)
    del probe
    room = 0.95 * limit_bytes - torch.cuda.memory_allocated(device) - BATCH_RESERVE_BYTES
    return max(1, min(cap, int(room // per_row)))


def _check_batch_sizes(batch_sizes: list, max_batch: int, memory_limit_gib: float | None) -> None:
    for b in batch_sizes:
        if b != MAX_BATCH and (not isinstance(b, int) or b < 1):
            raise ValueError(f"batch sizes must be positive integers or {MAX_BATCH!r}; got {b!r}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1; got {max_batch}")
    # A cap of 0 or less would make every batch "out of memory" (or, off CUDA, be silently ignored).
    if memory_limit_gib is not None and not (math.isfinite(memory_limit_gib) and memory_limit_gib > 0):
        raise ValueError(f"memory_limit_gib (--memory-limit-gib) must be a positive number; got {memory_limit_gib}")


def _memory_notes(device: torch.device, batch_sizes: list, max_batch: int, memory_limit_gib: float | None) -> list:
    """What the memory settings mean off CUDA, where nothing measures memory: said in the report (and the
    log) so a row's "max" batch is not read as the largest that fits."""
    if device.type == "cuda":
        return []
    notes = []
    if MAX_BATCH in batch_sizes:
        notes.append(f"on {device.type}, batch size 'max' is --max-batch ({max_batch}) itself: the search for the "
                     "largest batch that fits probes memory on CUDA only")
    if memory_limit_gib is not None:
        notes.append(f"--memory-limit-gib {memory_limit_gib} caps CUDA memory only; it is ignored on {device.type}")
    return notes


def _cap_memory(device: torch.device, memory_limit_gib: float | None) -> float | None:
    """Cap this process's CUDA memory at ``memory_limit_gib`` (so a batch too large for that much memory
    fails here as it would there); returns the cap in bytes, ``None`` without one or off CUDA."""
    if memory_limit_gib is None or device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, memory_limit_gib / total), device)
    return min(memory_limit_gib, total) * 2**30


def _decode_cases(
    models: list[str], presets: list[str], policies: list[str], overrides: dict[str, Any]
) -> list[tuple[str, str, str]]:
    """``(kind, preset, policy)`` for every ``models`` entry (``kind`` or ``kind:preset``, which overrides
    ``presets``); a model without KV caches has one case, policy ``"-"``. Every config is built here, so a
    typo fails before any timing."""
    cases = []
    for spec in models:
        kind, _, preset_override = spec.partition(":")
        config_class(kind).check_overrides(overrides)
        for preset in [preset_override] if preset_override else presets:
            cfg = config_class(kind).from_preset(preset, **overrides)
            cases += [(kind, preset, pol) for pol in (policies if capabilities(cfg).cache_policies else ["-"])]
    return cases


def _covering_overrides(
    kind: str, preset: str, overrides: dict[str, Any], context: int, steps: int, warmup: int
) -> dict[str, Any]:
    """``overrides``, with ``max_seq_len`` raised where the model has a position table that must cover the
    context, the warm-up and the new tokens (MEGABYTE's byte positions), in whole patches."""
    caps = capabilities(config_class(kind).from_preset(preset, **overrides))
    if caps.max_seq_len is None:
        return dict(overrides)
    P = caps.seq_multiple
    need = -(-(context + steps + decode_warmup(warmup, P, fused=True) + 2) // P) * P
    return {**overrides, "max_seq_len": max(need, overrides.get("max_seq_len", 0) or 0)}


@dataclass
class _DecodeSweep:
    """One decode benchmark's settings, and the rows and notes it has gathered so far."""

    batch_sizes: list[int | str]
    steps: int
    warmup: int
    compile: bool | str
    device: torch.device
    dtype: torch.dtype
    limit_bytes: float | None
    max_batch: int
    log: Callable[[str], Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # (kind, preset, context) -> the batch longseq's "max" search reached with a full cache: where
    # the baselines' search of the same shape starts.
    fitted: dict[tuple[str, str, int], int] = field(default_factory=dict)

    def longseq_rows(self, kind: str, preset: str, pol: str, context: int, overrides: dict[str, Any]) -> ModelConfig:
        """Measure the longseq model at every batch size; returns its config (the baselines copy its shape)."""
        torch.manual_seed(0)
        ov = _covering_overrides(kind, preset, overrides, context, self.steps, self.warmup)
        model = build_model(kind, preset, **ov).to(device=self.device, dtype=self.dtype)
        policy = None if pol in ("-", "full") else resolve_policy(pol, context)
        head = {"impl": "longseq", "model": kind, "preset": preset, "params_m": model.num_params() / 1e6,
                "policy": "-" if pol == "-" else (policy.spec if policy else "full"), "context": context,
                "batch": None, "compile": self.compile}
        run = partial(bench_decode_longseq, model, policy, context, steps=self.steps, warmup=self.warmup,
                      compile=self.compile, device=self.device)
        first_max = partial(batch_estimate, model, policy, context + self.warmup + self.steps + 1,
                            self.limit_bytes, self.max_batch, self.device)
        found = self._batch_rows(head, run, first_max)
        if found is not None and pol in ("full", "-"):
            self.fitted[(kind, preset, context)] = found
        return model.config

    def baseline_rows(self, kind: str, preset: str, cfg: ModelConfig, context: int) -> None:
        """Measure ``kind``'s reference implementation (if it has one) at every batch size, or note why not."""
        baseline = BASELINES.get(kind)
        if baseline is None:
            return
        note = baseline.unavailable()
        if note is not None:
            if note not in self.notes:
                self.notes.append(note)
            return
        head = {"impl": baseline.impl, "model": kind, "preset": preset, "policy": baseline.policy,
                "context": context, "batch": None, "compile": False}
        run = partial(bench_baseline, baseline, cfg, context, steps=self.steps, dtype=self.dtype, device=self.device)
        self._batch_rows(head, run, lambda: self.fitted.get((kind, preset, context), self.max_batch))

    def _batch_rows(self, head: dict[str, Any], run: Callable[[int], dict[str, Any]],
                    first_max: Callable[[], int]) -> int | None:
        """One row per batch size (``head`` with its ``"batch"`` filled in): ``run(batch)``, or for ``"max"``
        the largest batch that fits, searched down from ``first_max()``. Returns the batch the last ``"max"``
        search settled on (``None``: no such entry, or it failed)."""
        found = None
        for batch in self.batch_sizes:
            row = dict(head, batch=batch)  # the key keeps its place: rows print their fields in one order
            if batch == MAX_BATCH:
                self._measure(row, partial(largest_batch, run, first_max(), self.device, log=self.log))
                if isinstance(row["batch"], int):
                    found = row["batch"]
            else:
                self._measure(row, partial(run, batch))
        return found

    def _measure(self, row: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
        """Add ``fn()``'s numbers to ``row`` and record it: ``"OOM"`` for out of memory, an ``"error"`` when
        a library does not import."""
        try:
            row.update(fn())
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err):
                raise
            row["ms_per_step"] = OOM
        except ImportError as err:
            row["error"] = f"{type(err).__name__}: {err}"
        finally:
            release_memory(self.device)
        self.rows.append(row)
        self.log(json.dumps(row))


def run_decode_bench(
    models: list[str],
    presets: list[str],
    contexts: list[int],
    batch_sizes: list[int],
    policies: list[str],
    steps: int = 128,
    warmup: int = 4,
    compile: bool | str = False,
    against: str | None = None,
    device: str | None = None,
    overrides: dict[str, Any] | None = None,
    memory_limit_gib: float | None = None,
    max_batch: int = 512,
    log=print,
) -> dict[str, Any]:
    """Decode benchmark (``longseq bench decode``): every model x policy x context x batch size.

    ``models`` entries are ``kind`` or ``kind:preset`` (overriding ``presets``). ``policies`` apply to
    models with attention (Transformer, MEGABYTE with a Transformer global model); budgets may be written
    ``ctx/8``. ``against="hf"`` adds HF ``LlamaForCausalLM`` of each Transformer's shape (and fla's GLA
    model for GLA rows when ``fla`` imports) through their ``generate()``. bf16 weights on CUDA. A
    configuration that runs out of memory is reported as ``"OOM"``.

    A ``batch_sizes`` entry ``"max"`` finds the largest batch that fits (at most ``max_batch``): longseq
    rows start from the rows of static state that fit ``memory_limit_gib`` (:func:`batch_estimate`), HF
    and fla rows from the batch longseq's row of the same shape reached, and each shrinks on
    out-of-memory (:func:`largest_batch`). Off CUDA nothing measures memory: ``"max"`` is ``max_batch`` itself,
    and the report's notes say so.
    """
    from ..generate import compile_mode

    compile_mode(compile)  # a bad value fails before any model is built
    _check_batch_sizes(batch_sizes, max_batch, memory_limit_gib)
    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    limit_bytes = _cap_memory(dev, memory_limit_gib)
    overrides = overrides or {}
    cases = _decode_cases(models, presets, policies, overrides)
    sweep = _DecodeSweep(batch_sizes, steps, warmup, compile, dev, dtype, limit_bytes, max_batch, log)
    for note in _memory_notes(dev, batch_sizes, max_batch, memory_limit_gib):
        sweep.notes.append(note)
        log(f"note: {note}")
    for kind, preset, pol in cases:
        for context in contexts:
            cfg = sweep.longseq_rows(kind, preset, pol, context, overrides)
            gc.collect()  # the longseq model is unreferenced now: free it before a baseline is built
            if against == "hf" and pol in ("full", "-"):
                sweep.baseline_rows(kind, preset, cfg, context)
    return {
        "device": describe_device(dev),
        "torch": torch.__version__,
        "transformers": library_version("transformers"),
        "triton": library_version("triton"),
        "fla": library_version("fla") or library_version("flash-linear-attention"),
        "dtype": str(dtype).replace("torch.", ""),
        "steps": steps,
        "compile": (compile_mode(compile) or False) if dev.type == "cuda" else False,
        "notes": sweep.notes,
        "results": sweep.rows,
    }


_DECODE_PATHS = {
    False: "eager (dynamic state)",
    True: "captured (CUDA graph, static state)",  # reports written before the fused mode
    "graph": "captured (CUDA graph, static state)",
    "fused": "torch.compile'd and captured (CUDA graph, static state)",
}


def decode_markdown(report: dict[str, Any]) -> str:
    """The decode results as a Markdown table headed by the device and library versions."""
    lines = [
        f"Device: {report['device']}; torch {report['torch']}; triton {report['triton']}; "
        f"transformers {report['transformers']}; fla {report['fla']}; {report['dtype']} weights; "
        f"{report['steps']} timed greedy decode steps; longseq decode step "
        f"{_DECODE_PATHS[report['compile']]}.",
        "",
        "| impl | model | preset | params (M) | policy | context | batch | prefill (s) | ms/step | tok/s "
        "| peak mem (GiB) |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        ms = r.get("ms_per_step", r.get("error", "n/a"))
        lines.append(
            f"| {r['impl']} | {r['model']} | {r['preset']} | {fmt(r.get('params_m'), '.1f')} | {r['policy']} | "
            f"{r['context']} | {r['batch']} | {fmt(r.get('prefill_s'), '.3f')} | {fmt(ms, '.2f')} | "
            f"{fmt(r.get('tok_s'), ',.0f')} | {fmt(r.get('peak_gib'), '.2f')} |"
        )
    lines += [f"\nNote: {n}" for n in report["notes"]]
    return "\n".join(lines)

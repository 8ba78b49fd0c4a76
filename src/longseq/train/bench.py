"""Model-level throughput: training tokens/s and peak memory, generation tokens/s (``longseq bench``).

On CUDA: bf16 autocast, warmup iterations, ``torch.cuda.synchronize`` around the timed region,
``torch.cuda.max_memory_allocated`` for peak memory, and an out-of-memory configuration is reported as
``"OOM"`` rather than ending the sweep.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import itertools
import json
import platform
import time
from typing import Any

import torch
import torch.nn.functional as F

from ..models import build_model, config_class
from .distributed import pick_device
from .schedule import build_optimizer

OOM = "OOM"
MAX_BATCH = "max"  # a ``batch_sizes`` entry: the largest batch that fits the memory limit
# Kept free beside the static state when estimating the largest batch: a prefill group's temporary state
# (generate.GROUP_STATE_BYTES) and the activations of a prefill chunk or a decode step.
BATCH_RESERVE_BYTES = 4 * 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def bench_train(
    model, batch: int, seq_len: int, steps: int, warmup: int, device: torch.device
) -> dict[str, Any]:
    """Training tokens/s (forward, backward, AdamW step) on random ``[batch, seq_len + 1]`` bytes."""
    optimizer, _ = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95), device)
    x = torch.randint(0, 256, (batch, seq_len + 1), device=device)
    model.train()

    def one_step() -> None:
        with _autocast(device):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one_step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    _sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"train_tok_s": batch * seq_len * steps / dt, "train_peak_gib": peak, "train_batch": batch}


@torch.no_grad()
def bench_generate(
    model, batch: int, prompt_len: int, new_tokens: int, device: torch.device
) -> dict[str, Any]:
    """Decoding tokens/s through the state API: prefill ``prompt_len`` bytes, then one token per step."""
    model.eval()
    prompt = torch.randint(0, 256, (batch, prompt_len), device=device)

    def run(n: int) -> None:
        state = model.init_state(batch)
        with _autocast(device):
            logits, state = model.step(prompt, state)
            token = logits[:, -1:].argmax(-1)
            for _ in range(n):
                logits, state = model.step(token, state)
                token = logits[:, -1:].argmax(-1)

    run(min(4, new_tokens))  # warmup
    _sync(device)
    t0 = time.perf_counter()
    run(0)
    _sync(device)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(new_tokens)
    _sync(device)
    decode = max(time.perf_counter() - t0 - prefill, 1e-9)
    return {
        "gen_tok_s": batch * new_tokens / decode,
        "gen_batch": batch,
        "prefill_tok_s": batch * prompt_len / max(prefill, 1e-9),
    }


def _bench_one(
    kind: str,
    preset: str,
    seq_len: int,
    batch_tokens: int,
    steps: int,
    warmup: int,
    gen_batch: int,
    gen_prompt: int,
    gen_tokens: int,
    dev: torch.device,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    """One configuration; an out-of-memory phase is reported as ``"OOM"`` and the sweep goes on."""
    row: dict[str, Any] = {"model": kind, "preset": preset, "seq_len": seq_len}
    model = None
    try:
        torch.manual_seed(0)
        model = build_model(kind, preset, **overrides).to(dev)
        row["params_m"] = model.num_params() / 1e6
        patch = getattr(model.config, "patch_size", None)
        if patch and seq_len % patch:  # skip this configuration, not the whole sweep
            row["train_tok_s"] = row["gen_tok_s"] = "skipped"
            row["error"] = f"seq_len {seq_len} is not a multiple of patch_size {patch}"
            return row
        phases = (
            (
                "train",
                lambda: bench_train(model, max(1, batch_tokens // seq_len), seq_len, steps, warmup, dev),
            ),
            ("gen", lambda: bench_generate(model, gen_batch, gen_prompt, gen_tokens, dev)),
        )
        for name, fn in phases:
            try:
                row.update(fn())
            except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
                if not _is_oom(err):
                    raise
                row[f"{name}_tok_s"] = OOM
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:  # e.g. the model itself does not fit
        if not _is_oom(err):
            raise
        row["train_tok_s"] = row["gen_tok_s"] = OOM
    finally:
        model = None  # drop the weights before the next configuration is built
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


def run_bench(
    models: list[str],
    presets: list[str],
    seq_lens: list[int],
    batch_tokens: int,
    steps: int = 10,
    warmup: int = 3,
    gen_batch: int = 1,
    gen_prompt: int = 512,
    gen_tokens: int = 128,
    device: str | None = None,
    overrides: dict[str, Any] | None = None,
    log=print,
) -> dict[str, Any]:
    """Every (model, preset, seq_len) combination; training batch = ``max(1, batch_tokens // seq_len)``."""
    dev = pick_device(device)
    # Check every configuration up front so a typo fails before minutes of benchmarking.
    for kind in models:
        for preset in presets:
            config_class(kind).from_preset(preset, **(overrides or {}))
    results = []
    for kind in models:
        for preset in presets:
            for seq_len in seq_lens:
                row = _bench_one(
                    kind,
                    preset,
                    seq_len,
                    batch_tokens,
                    steps,
                    warmup,
                    gen_batch,
                    gen_prompt,
                    gen_tokens,
                    dev,
                    overrides or {},
                )
                results.append(row)
                log(format_row(row))
    return {
        "device": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "dtype": "bf16 autocast" if dev.type == "cuda" else "fp32",
        "batch_tokens": batch_tokens,
        "steps": steps,
        "warmup": warmup,
        "gen": {"batch": gen_batch, "prompt": gen_prompt, "new_tokens": gen_tokens},
        "results": results,
    }


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "n/a"
    return v if isinstance(v, str) else format(v, spec)


def format_row(row: dict[str, Any]) -> str:
    return (
        f"{row['model']:<12} {row['preset']:<8} T={row['seq_len']:<6} "
        f"train {_fmt(row.get('train_tok_s'), ',.0f')} tok/s, "
        f"peak {_fmt(row.get('train_peak_gib'), '.2f')} GiB, "
        f"generate {_fmt(row.get('gen_tok_s'), ',.1f')} tok/s"
    )


def markdown_table(report: dict[str, Any]) -> str:
    """The results as a Markdown table headed by the device and library versions."""
    lines = [
        f"Device: {report['device']}; torch {report['torch']}; {report['dtype']}; "
        f"training batch = {report['batch_tokens']} tokens; generation batch {report['gen']['batch']}, "
        f"prompt {report['gen']['prompt']}, {report['gen']['new_tokens']} new tokens.",
        "",
        "| model | preset | params (M) | seq_len | batch | train tok/s | peak mem (GiB) | generate tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['model']} | {r['preset']} | {_fmt(r.get('params_m'), '.1f')} | {r['seq_len']} | "
            f"{_fmt(r.get('train_batch'), 'd')} | {_fmt(r.get('train_tok_s'), ',.0f')} | "
            f"{_fmt(r.get('train_peak_gib'), '.2f')} | {_fmt(r.get('gen_tok_s'), ',.1f')} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ decode benchmark
def resolve_policy(spec: str, context: int):
    """A cache policy spec whose budget may be written relative to the context: ``tova:ctx/8``."""
    from ..cache import parse_policy

    parts = spec.split(":")
    if len(parts) > 1 and parts[1].startswith("ctx/"):
        parts[1] = str(max(1, context // int(parts[1][4:])))
    return parse_policy(":".join(parts))


def _time(device: torch.device, fn) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


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
    from ..generate import Decoder, compile_mode, prefill, prefill_rows

    mode = compile_mode(compile)

    model.eval()
    warmup = decode_warmup(warmup, getattr(model.config, "patch_size", 1), fused=mode == "fused")
    prompt = torch.randint(0, 256, (batch, context), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    total = context + warmup + steps + 1
    if mode:
        def prefill():
            state = model.init_state(batch, cache=policy, max_len=total)
            return state, prefill_rows(model, state, [prompt[i : i + 1] for i in range(batch)], policy)
    else:
        def prefill():
            logits, state = prefill(model, prompt, policy, None)
            return state, logits
    prefill_s, (state, logits) = _time(device, prefill)
    capture = mode is not None and device.type == "cuda"
    dec = Decoder(model, state, 0.0, None, None, capture=capture, fuse=capture and mode == "fused")
    dec.tokens.copy_(logits.argmax(-1)[:, None])
    for _ in range(warmup):
        dec.step()
    decode_s, _ = _time(device, lambda: [dec.step() for _ in range(steps)])
    return {
        "prefill_s": prefill_s,
        "ms_per_step": decode_s / steps * 1e3,
        "tok_s": batch * steps / decode_s,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "captures": dec.captures,
    }


def _hf_generate_timing(hf_model, context: int, batch: int, steps: int, device: torch.device,
                        extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """HF ``generate()`` timing: prefill = a 1-token generate; ms/step from an N-token one."""
    prompt = torch.randint(0, 256, (batch, context), device=device)
    mask = torch.ones_like(prompt)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, **(extra or {}))

    def run(n: int):
        return hf_model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kw)

    run(2)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t1 = min(_time(device, lambda: run(1))[0] for _ in range(3))  # the prefill; the best of 3 (noise)
    tn, out = _time(device, lambda: run(steps + 1))
    assert out.shape[1] == context + steps + 1
    return {
        "prefill_s": t1,
        "ms_per_step": (tn - t1) / steps * 1e3,
        "tok_s": batch * steps / max(tn - t1, 1e-9),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
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
            if not _is_oom(err) or batch == 1:
                raise
            if log is not None:
                log(f"batch {batch}: out of memory ({str(err).splitlines()[0][:160]}); trying a smaller one")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
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


def build_hf_llama(cfg, dtype: torch.dtype, device: torch.device, max_positions: int):
    """HF ``LlamaForCausalLM`` with a longseq ``TransformerConfig``'s shape (random weights, SDPA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=max_positions, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=False, attn_implementation="sdpa", pad_token_id=0, bos_token_id=None,
        eos_token_id=None,
    )
    return LlamaForCausalLM(hf_cfg).to(device=device, dtype=dtype).eval()


def build_fla_gla(cfg, dtype: torch.dtype, device: torch.device):
    """fla's ``GLAForCausalLM`` with a longseq ``GLAConfig``'s shape (random weights)."""
    from fla.models import GLAConfig as FlaGLAConfig
    from fla.models import GLAForCausalLM

    fla_cfg = FlaGLAConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_heads=cfg.n_heads, expand_k=cfg.expand_k, expand_v=cfg.expand_v, intermediate_size=cfg.mlp_hidden,
        pad_token_id=0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
    )
    return GLAForCausalLM(fla_cfg).to(device=device, dtype=dtype).eval()


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
    out-of-memory (:func:`largest_batch`).
    """
    from ..generate import compile_mode

    compile_mode(compile)  # a bad value fails before any model is built
    for b in batch_sizes:
        if b != MAX_BATCH and (not isinstance(b, int) or b < 1):
            raise ValueError(f"batch sizes must be positive integers or {MAX_BATCH!r}; got {b!r}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1; got {max_batch}")
    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    limit_bytes = None
    if memory_limit_gib is not None and dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_limit_gib / total), dev)
        limit_bytes = min(memory_limit_gib, total) * 2**30
    fitted: dict[tuple[str, str, int], int] = {}  # (kind, preset, context) -> longseq's "max" batch (full cache)
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    cases = []
    for spec in models:
        kind, _, preset_override = spec.partition(":")
        for preset in [preset_override] if preset_override else presets:
            cfg_cls = config_class(kind)
            cfg = cfg_cls.from_preset(preset, **(overrides or {}))  # typos fail before any timing
            attn = kind == "transformer" or (kind == "megabyte" and cfg.global_backbone == "transformer")
            for pol in policies if attn else ["-"]:
                cases.append((kind, preset, pol))

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        log(json.dumps(row))

    def guarded(row: dict[str, Any], fn) -> None:
        try:
            row.update(fn())
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err):
                raise
            row["ms_per_step"] = OOM
        except ImportError as err:
            row["error"] = f"{type(err).__name__}: {err}"
        finally:
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        record(row)

    for kind, preset, pol in cases:
        for context in contexts:
            ov = dict(overrides or {})
            if kind == "megabyte":  # the byte-position table must cover the context and the new bytes
                P = config_class(kind).from_preset(preset, **ov).patch_size
                need = -(-(context + steps + decode_warmup(warmup, P, fused=True) + 2) // P) * P
                ov["max_seq_len"] = max(need, ov.get("max_seq_len", 0) or 0)
            torch.manual_seed(0)
            model = build_model(kind, preset, **ov).to(device=dev, dtype=dtype)
            policy = None if pol in ("-", "full") else resolve_policy(pol, context)
            for batch in batch_sizes:
                row = {"impl": "longseq", "model": kind, "preset": preset, "params_m": model.num_params() / 1e6,
                       "policy": "-" if pol == "-" else (policy.spec if policy else "full"), "context": context,
                       "batch": batch, "compile": compile}

                def run_ours(b, m=model, p=policy, c=context):
                    return bench_decode_longseq(m, p, c, b, steps, warmup, compile, dev)

                if batch == MAX_BATCH:
                    start = batch_estimate(model, policy, context + warmup + steps + 1, limit_bytes, max_batch, dev)
                    guarded(row, lambda run=run_ours, start=start: largest_batch(run, start, dev, log=log))
                    if pol in ("full", "-") and isinstance(row["batch"], int):
                        fitted[(kind, preset, context)] = row["batch"]
                else:
                    guarded(row, lambda run=run_ours, b=batch: run(b))
            cfg = model.config
            model = None
            gc.collect()
            if against == "hf" and kind == "gla" and importlib.util.find_spec("fla") is None:
                note = "fla is not importable: no fla GLA rows (pip install flash-linear-attention)"
                if note not in notes:
                    notes.append(note)
            elif against == "hf" and kind in ("transformer", "gla") and pol in ("full", "-"):
                for batch in batch_sizes:
                    impl = "hf-llama" if kind == "transformer" else "fla-gla"
                    row = {"impl": impl, "model": kind, "preset": preset,
                           "policy": "full" if kind == "transformer" else "-",
                           "context": context, "batch": batch, "compile": False}

                    def run_ref(b, kind=kind, cfg=cfg, context=context):
                        if kind == "transformer":
                            ref = build_hf_llama(cfg, dtype, dev, context + steps + 8)
                        else:
                            ref = build_fla_gla(cfg, dtype, dev)
                        try:
                            return {"params_m": ref.num_parameters() / 1e6,
                                    **_hf_generate_timing(ref, context, b, steps, dev)}
                        finally:
                            del ref  # before a smaller retry of largest_batch allocates again

                    if batch == MAX_BATCH:
                        start = fitted.get((kind, preset, context), max_batch)
                        guarded(row, lambda run=run_ref, start=start: largest_batch(run, start, dev, log=log))
                    else:
                        guarded(row, lambda run=run_ref, b=batch: run(b))
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "fla": _version("fla") or _version("flash-linear-attention"),
        "dtype": str(dtype).replace("torch.", ""),
        "steps": steps,
        "compile": (compile_mode(compile) or False) if dev.type == "cuda" else False,
        "notes": notes,
        "results": rows,
    }


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001  (not installed)
        return None


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
            f"| {r['impl']} | {r['model']} | {r['preset']} | {_fmt(r.get('params_m'), '.1f')} | {r['policy']} | "
            f"{r['context']} | {r['batch']} | {_fmt(r.get('prefill_s'), '.3f')} | {_fmt(ms, '.2f')} | "
            f"{_fmt(r.get('tok_s'), ',.0f')} | {_fmt(r.get('peak_gib'), '.2f')} |"
        )
    lines += [f"\nNote: {n}" for n in report["notes"]]
    return "\n".join(lines)

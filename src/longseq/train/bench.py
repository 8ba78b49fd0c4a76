"""Model-level throughput: training tokens/s and peak memory, generation tokens/s (``longseq bench``).

On CUDA: bf16 autocast, warmup iterations, ``torch.cuda.synchronize`` around the timed region,
``torch.cuda.max_memory_allocated`` for peak memory, and an out-of-memory configuration is reported as
``"OOM"`` rather than ending the sweep.
"""

from __future__ import annotations

import contextlib
import platform
import time
from typing import Any

import torch
import torch.nn.functional as F

from ..models import build_model, config_class
from .distributed import pick_device
from .schedule import build_optimizer

OOM = "OOM"


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

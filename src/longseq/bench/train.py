"""``longseq bench [train]``: training tokens/s and peak memory, and generation tokens/s, per model.

On CUDA: bf16 autocast, warmup iterations, a synchronize around the timed region, CUDA's peak allocation
for memory, and an out-of-memory phase reported as ``"OOM"`` rather than ending the sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..models import build_model, capabilities, compile_blocks, config_class, eager_if_compiled
from ..precision import autocast
from ..train.distributed import pick_device
from ..train.schedule import build_optimizer
from .report import describe_device, fmt
from .timing import OOM, is_oom, peak_memory_gib, release_memory, reset_peak_memory, sync, timed


def train_step(
    model, batch: int, seq_len: int, device: torch.device, compile: bool = False
) -> Callable[[], None]:
    """One training step on random ``[batch, seq_len + 1]`` bytes as a closure: forward under autocast, the
    fp32 cross-entropy, backward, AdamW step. ``compile``: the model's blocks are compiled in place
    (:func:`~longseq.models.compile_blocks` with static shapes, as ``longseq train --compile`` compiles them); its
    first call compiles."""
    optimizer, _ = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95), device)
    x = torch.randint(0, 256, (batch, seq_len + 1), device=device)
    model.train()
    if compile:
        # Dynamo keeps compiled code per model class, not per model: a sweep's next configuration would recompile it
        # with T marked dynamic (and past the recompile limit, silently run eager). Each configuration gets a fresh
        # cache and a graph for its own static shapes, as `longseq train --compile` compiles its one shape.
        torch._dynamo.reset()
        compile_blocks(model, dynamic=False)

    def one_step() -> None:
        with autocast(device):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return one_step


def bench_train(
    model, batch: int, seq_len: int, steps: int, warmup: int, device: torch.device, compile: bool = False
) -> dict[str, Any]:
    """Training tokens/s of :func:`train_step`: ``warmup`` untimed steps, then ``steps`` timed ones. With
    ``compile`` the first warmup step compiles, so give at least one."""
    if compile and warmup < 1:
        raise ValueError(f"compile=True needs warmup >= 1 (the first step compiles); got warmup={warmup}")
    one_step = train_step(model, batch, seq_len, device, compile)
    for _ in range(warmup):
        one_step()
    sync(device)
    reset_peak_memory(device)
    dt, _ = timed(device, lambda: [one_step() for _ in range(steps)])
    tok_s = batch * seq_len * steps / dt
    return {"train_tok_s": tok_s, "train_peak_gib": peak_memory_gib(device), "train_batch": batch}


@torch.no_grad()
def bench_generate(
    model, batch: int, prompt_len: int, new_tokens: int, device: torch.device
) -> dict[str, Any]:
    """Decoding tokens/s through the state API: prefill ``prompt_len`` bytes, then one token per step
    (eager, dynamic state; :mod:`longseq.bench.decode` times the captured decode path)."""
    model.eval()
    prompt = torch.randint(0, 256, (batch, prompt_len), device=device)

    def run(n: int) -> None:
        state = model.init_state(batch)
        with autocast(device):
            logits, state = model.step(prompt, state)
            token = logits[:, -1:].argmax(-1)
            for _ in range(n):
                logits, state = model.step(token, state)
                token = logits[:, -1:].argmax(-1)

    run(min(4, new_tokens))  # warmup
    prefill, _ = timed(device, lambda: run(0))
    total, _ = timed(device, lambda: run(new_tokens))
    decode = max(total - prefill, 1e-9)  # the decode steps alone: the same prefill ran inside ``total``
    return {
        "gen_tok_s": batch * new_tokens / decode,
        "gen_batch": batch,
        "prefill_tok_s": batch * prompt_len / max(prefill, 1e-9),
    }


def _run_phase(row: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]], device: torch.device) -> None:
    """Add ``fn()``'s numbers to ``row``; out of memory marks ``<name>_tok_s`` as ``"OOM"`` instead."""
    try:
        row.update(fn())
        return
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
        if not is_oom(err):
            raise
    row[f"{name}_tok_s"] = OOM
    release_memory(device)  # once the except block is left: its traceback kept the failed phase's tensors alive


def _bench_one(
    kind: str, preset: str, seq_len: int, batch_tokens: int, steps: int, warmup: int,
    gen_batch: int, gen_prompt: int, gen_tokens: int, dev: torch.device, overrides: dict[str, Any],
    compile: bool = False,
) -> dict[str, Any]:
    """One configuration; an out-of-memory phase is reported as ``"OOM"`` and the sweep goes on."""
    row: dict[str, Any] = {"model": kind, "preset": preset, "seq_len": seq_len}
    model = None
    try:
        torch.manual_seed(0)
        model = build_model(kind, preset, **overrides).to(dev)
        row["params_m"] = model.num_params() / 1e6
        multiple = capabilities(model).seq_multiple
        if seq_len % multiple:  # skip this configuration, not the whole sweep
            row["train_tok_s"] = row["gen_tok_s"] = "skipped"
            row["error"] = f"seq_len {seq_len} is not a multiple of patch_size {multiple}"
            return row
        batch = max(1, batch_tokens // seq_len)
        # ``bench_train`` is looked up here, at call time, so a test can replace it with a fake OOM.
        _run_phase(row, "train", lambda: bench_train(model, batch, seq_len, steps, warmup, dev, compile), dev)
        # the blocks compiled for training would compile again for each decode step's shapes: generate eager
        with eager_if_compiled(compile):
            _run_phase(row, "gen", lambda: bench_generate(model, gen_batch, gen_prompt, gen_tokens, dev), dev)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:  # e.g. the model itself does not fit
        if not is_oom(err):
            raise
        row["train_tok_s"] = row["gen_tok_s"] = OOM
    finally:
        model = None  # drop the weights before the next configuration is built
        release_memory(dev)
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
    compile: bool = False,
    log=print,
) -> dict[str, Any]:
    """Every (model, preset, seq_len) combination; training batch = ``max(1, batch_tokens // seq_len)``;
    ``compile``: the training steps run the model's blocks through ``torch.compile`` (see :func:`bench_train`;
    generation stays eager).

    Returns the report :func:`markdown_table` prints: the device, versions and settings, and one row per
    configuration under ``"results"`` (each also passed to ``log`` as a line as soon as it is measured).
    """
    dev = pick_device(device)
    overrides = overrides or {}
    # Check every configuration up front so a typo fails before minutes of benchmarking.
    for kind in models:
        config_class(kind).check_overrides(overrides)  # --set fields that contradict each other
        for preset in presets:
            config_class(kind).from_preset(preset, **overrides)
    results = []
    for kind in models:
        for preset in presets:
            for seq_len in seq_lens:
                row = _bench_one(kind, preset, seq_len, batch_tokens, steps, warmup, gen_batch, gen_prompt,
                                 gen_tokens, dev, overrides, compile)
                results.append(row)
                log(format_row(row))
    return {
        "device": describe_device(dev),
        "torch": torch.__version__,
        "dtype": "bf16 autocast" if dev.type == "cuda" else "fp32",
        "batch_tokens": batch_tokens,
        "steps": steps,
        "warmup": warmup,
        "compile": compile,
        "gen": {"batch": gen_batch, "prompt": gen_prompt, "new_tokens": gen_tokens},
        "results": results,
    }


def format_row(row: dict[str, Any]) -> str:
    """One result as the progress line ``run_bench`` logs."""
    return (
        f"{row['model']:<12} {row['preset']:<8} T={row['seq_len']:<6} "
        f"train {fmt(row.get('train_tok_s'), ',.0f')} tok/s, "
        f"peak {fmt(row.get('train_peak_gib'), '.2f')} GiB, "
        f"generate {fmt(row.get('gen_tok_s'), ',.1f')} tok/s"
    )


def markdown_table(report: dict[str, Any]) -> str:
    """The results as a Markdown table headed by the device and library versions."""
    lines = [
        f"Device: {report['device']}; torch {report['torch']}; {report['dtype']}"
        f"{'; training compiled (torch.compile)' if report.get('compile') else ''}; "
        f"training batch = {report['batch_tokens']} tokens; generation batch {report['gen']['batch']}, "
        f"prompt {report['gen']['prompt']}, {report['gen']['new_tokens']} new tokens.",
        "",
        "| model | preset | params (M) | seq_len | batch | train tok/s | peak mem (GiB) | generate tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['model']} | {r['preset']} | {fmt(r.get('params_m'), '.1f')} | {r['seq_len']} | "
            f"{fmt(r.get('train_batch'), 'd')} | {fmt(r.get('train_tok_s'), ',.0f')} | "
            f"{fmt(r.get('train_peak_gib'), '.2f')} | {fmt(r.get('gen_tok_s'), ',.1f')} |"
        )
    return "\n".join(lines)

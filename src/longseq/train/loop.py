"""The training loop: data, model, AdamW + warmup/cosine, validation, checkpoints, resume, signals.

Single process: ``longseq train ...``. Several: ``torchrun --nproc-per-node N -m longseq train ...
--parallel ddp|fsdp`` (see :mod:`.distributed`). All user errors are raised before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data import (
    BUILTIN_VAL_DOCS,
    DataError,
    WindowSampler,
    builtin_corpus_path,
    load_corpus,
    split_documents,
)
from ..evaluate import check_seq_len, corpus_documents, evaluate_bpb
from ..models import config_class, model_from_config
from . import checkpoint as ckpt_io
from .checkpoint import CheckpointError
from .config import TrainConfig
from .distributed import (
    DistInfo,
    all_reduce_mean,
    any_rank,
    barrier,
    check_parallel,
    full_model_state,
    full_optimizer_state,
    init_distributed,
    load_full_optimizer_state,
    set_grad_sync,
    shutdown,
    wrap_model,
)
from .schedule import WarmupCosine, build_optimizer

RUN_FORMAT = "longseq-run"


class RunDirError(ValueError):
    """The run directory cannot be used as asked (exists without --resume/--overwrite, nothing to
    resume, ...)."""


@dataclass
class TrainResult:
    """What :func:`train` did: per-step training losses, validation results, where it stopped."""

    run_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    interrupted: int | None = None  # the signal number that stopped the run early
    checkpoint: Path | None = None


def resolve_model_config(cfg: TrainConfig):
    """The model config of a run: ``cfg.preset`` of ``cfg.model`` with ``cfg.overrides``.

    Raises ``ValueError`` for an unknown kind, preset or field, or a wrongly typed value."""
    return config_class(cfg.model).from_preset(cfg.preset, **cfg.overrides)


def run_config(cfg: TrainConfig, model_cfg) -> dict[str, Any]:
    return {
        "format": RUN_FORMAT,
        "model": {"kind": cfg.model, "preset": cfg.preset, "config": model_cfg.to_dict()},
        "train": cfg.to_dict(),
    }


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``RUN_DIR/config.json`` if it is a longseq run's, else None."""
    path = Path(run_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and config.get("format") == RUN_FORMAT else None


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Validate the run directory without touching it; returns the checkpoint to resume from, if any."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; pass one of them")
    if resume:
        if not run_dir.is_dir():
            raise RunDirError(f"nothing to resume: run directory {str(run_dir)!r} does not exist")
        ckpts = ckpt_io.list_checkpoints(run_dir)
        if not ckpts:
            raise RunDirError(f"nothing to resume: {str(run_dir)!r} has no checkpoint")
        ckpt_io.verify_checkpoint(ckpts[-1])
        return ckpts[-1]
    if run_dir.exists():
        if not run_dir.is_dir():
            raise RunDirError(f"run directory {str(run_dir)!r} exists and is not a directory")
        if any(run_dir.iterdir()):
            if not overwrite:
                raise RunDirError(
                    f"run directory {str(run_dir)!r} already exists; pass --resume to continue it "
                    "or --overwrite to replace it"
                )
            if read_run_config(run_dir) is None:
                raise RunDirError(
                    f"refusing to --overwrite {str(run_dir)!r}: it is not a longseq run directory"
                )
    return None


def check_compatible(model_cfg, saved: dict[str, Any], where: Path) -> None:
    """Raise when the requested model config differs from the checkpoint's."""
    theirs = saved["model"]
    ours = model_cfg.to_dict()
    if theirs["kind"] != model_cfg.kind:
        raise CheckpointError(
            f"cannot resume: {where} holds a {theirs['kind']!r} model but a {model_cfg.kind!r} model "
            "was asked for"
        )
    diff = {k: (theirs["config"].get(k), v) for k, v in ours.items() if theirs["config"].get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"cannot resume {where}: incompatible model config ({shown})")


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state()[1].tolist(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], np.asarray(state["numpy"], dtype=np.uint32), *np_state[2:]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class _SignalCatcher:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (then saves and stops)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalCatcher:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` into ``cfg.out``; see :class:`TrainConfig`.

    Args:
        resume: continue from the newest checkpoint of ``cfg.out`` (exactly: same batches, same RNG).
        overwrite: replace an existing run directory (refused for directories that are not longseq runs).
        on_step: called as ``on_step(step, loss)`` after every optimizer step (tests, notebooks).
    Raises:
        ValueError (``DataError``, ``CheckpointError``, ``RunDirError``) for bad input, before any write.
    """
    check_parallel(cfg.parallel)
    model_cfg = resolve_model_config(cfg)
    run_dir = Path(cfg.out)
    resume_from = check_run_dir(run_dir, resume, overwrite)
    if resume_from is not None:
        check_compatible(model_cfg, ckpt_io.verify_checkpoint(resume_from), resume_from)
    patch = getattr(model_cfg, "patch_size", None)
    if patch and cfg.seq_len % patch:
        raise ValueError(
            f"seq-len {cfg.seq_len} must be a multiple of the {cfg.model} model's patch_size={patch}"
        )
    world = int(os.environ.get("WORLD_SIZE", "1")) if cfg.parallel != "none" else 1
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(
            f"batch-size {cfg.batch_size} must be divisible by world size {world} x "
            f"grad-accum {cfg.grad_accum}"
        )

    builtin = cfg.data is None
    corpus = load_corpus([builtin_corpus_path()] if builtin else cfg.data, cfg.cache_dir)
    val_docs = (
        cfg.val_docs
        if cfg.val_docs is not None
        else (list(BUILTIN_VAL_DOCS) if builtin and cfg.val_fraction is None else None)
    )
    val_fraction = cfg.val_fraction if cfg.val_fraction is not None else 0.1
    split = split_documents(corpus.names, val_docs, val_fraction)
    sampler = WindowSampler(corpus, split.train, cfg.seq_len + 1, seed=cfg.seed, within_docs=cfg.within_docs)
    val_set = corpus_documents(corpus, split.val, cfg.eval_tokens) if split.val else []
    if split.val and sum(len(t) for _, t in val_set) - len(val_set) < 1:
        raise DataError("the validation documents hold no byte to score (each needs at least 2 bytes)")

    info = init_distributed(cfg.parallel, cfg.device)
    try:
        return _run(
            cfg, model_cfg, run_dir, resume_from, overwrite, corpus, split, sampler, val_set, info, on_step
        )
    finally:
        shutdown()


def _prepare_run_dir(run_dir: Path, config: dict[str, Any], resume_step: int | None, overwrite: bool) -> None:
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_io.clean_partial_saves(run_dir)
    tmp = run_dir / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp, run_dir / "config.json")
    metrics = run_dir / "metrics.jsonl"
    if resume_step is not None and metrics.exists():
        # Steps logged after the checkpoint will be redone: drop them so each step appears once.
        kept = [
            line
            for line in metrics.read_text().splitlines()
            if line and json.loads(line)["step"] <= resume_step
        ]
        metrics.write_text("".join(line + "\n" for line in kept))
    elif resume_step is None:
        metrics.write_text("")


def _run(
    cfg, model_cfg, run_dir, resume_from, overwrite, corpus, split, sampler, val_set, info: DistInfo, on_step
):
    device = info.device
    config = run_config(cfg, model_cfg)
    # Both read (and so checked) before the run directory is touched.
    saved_state = ckpt_io.load_train_state(resume_from) if resume_from is not None else None
    saved_model = ckpt_io.load_model_state(resume_from) if resume_from is not None else None
    start_step = int(saved_state["step"]) if saved_state is not None else 0
    if info.is_main:
        _prepare_run_dir(run_dir, config, start_step if resume_from is not None else None, overwrite)
    barrier(info)

    torch.manual_seed(cfg.seed)
    model = model_from_config(model_cfg)
    if saved_model is not None:
        model.load_state_dict(saved_model, strict=True)  # before sharding: FSDP shards what is loaded
    model.to(device)
    check_seq_len(model, cfg.seq_len)
    wrapped = wrap_model(model, info)
    optimizer, names = build_optimizer(
        wrapped if info.parallel == "fsdp" else model,
        cfg.lr,
        cfg.weight_decay,
        (cfg.beta1, cfg.beta2),
        device,
    )
    schedule = WarmupCosine(cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
    if saved_state is not None:
        load_full_optimizer_state(wrapped, optimizer, saved_state["optimizer"], info, names)
        sampler.load_state_dict(saved_state["sampler"])
        _set_rng_state(saved_state["rng"], device)
    forward = torch.compile(wrapped) if cfg.compile else wrapped
    eval_model = wrapped.module if info.parallel == "ddp" else wrapped

    result = TrainResult(run_dir=run_dir, step=start_step)
    metrics = open(run_dir / "metrics.jsonl", "a") if info.is_main else None  # noqa: SIM115
    bar = None
    if info.is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
    micro = cfg.batch_size // info.world_size // cfg.grad_accum
    tokens_per_step = cfg.batch_size * cfg.seq_len
    save_every = cfg.save_every or cfg.eval_every or cfg.steps
    last_bpb = float("nan")
    window_t0, window_steps = time.perf_counter(), 0

    def say(message: str) -> None:
        if bar is not None:
            bar.write(message, file=sys.stderr)
        elif info.is_main:
            print(message, file=sys.stderr, flush=True)

    def log(record: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def save(step: int) -> Path:
        state_model = full_model_state(wrapped, info)
        state_optim = full_optimizer_state(wrapped, optimizer, info, names)
        path = ckpt_io.checkpoint_dir(run_dir, step)
        if info.is_main:
            train_state = {
                "step": step,
                "optimizer": state_optim,
                "schedule": schedule.state_dict(),
                "sampler": sampler.state_dict(),
                "rng": _rng_state(device),
            }
            ckpt_cfg = {"model": config["model"], "train": config["train"]}
            path = ckpt_io.save_checkpoint(run_dir, step, state_model, train_state, ckpt_cfg, keep=cfg.keep)
        barrier(info)
        return path

    def validate(step: int) -> None:
        # Every rank scores the same (small) validation set: FSDP needs all ranks in each forward, and
        # the ranks then agree on the numbers without a reduction.
        nonlocal last_bpb
        if not val_set:
            return
        res = evaluate_bpb(eval_model, val_set, cfg.seq_len, batch_size=max(1, micro), device=device)
        last_bpb = res.bpb
        result.evals[step] = {"val_loss": res.loss, "val_bpb": res.bpb}
        log({"step": step, "val_loss": res.loss, "val_bpb": res.bpb, "val_bytes": res.bytes})
        say(f"step {step}: val loss {res.loss:.4f}, val bpb {res.bpb:.4f}")

    wrapped.train()
    step = start_step
    try:
        with _SignalCatcher() as signals:
            while step < cfg.steps:
                step += 1
                lr = schedule(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = sampler.next_batch(cfg.batch_size, info.rank, info.world_size).to(
                    device, non_blocking=True
                )
                loss_sum = torch.zeros((), device=device)
                for i in range(cfg.grad_accum):
                    x = batch[i * micro : (i + 1) * micro]
                    with set_grad_sync(wrapped, info, sync=i == cfg.grad_accum - 1), _autocast(device):
                        logits = forward(x[:, :-1])
                        loss = (
                            F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()) / cfg.grad_accum
                        )
                        loss.backward()
                    loss_sum += loss.detach()
                grad_norm = _clip(wrapped, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_val = float(all_reduce_mean(loss_sum, info))
                result.losses[step] = loss_val
                result.step = step
                window_steps += 1
                if not math.isfinite(loss_val):
                    raise FloatingPointError(
                        f"training loss is {loss_val} at step {step}; lower --lr or check the data"
                    )
                if step % cfg.log_every == 0 or step == cfg.steps:
                    elapsed = time.perf_counter() - window_t0
                    tok_s = tokens_per_step * window_steps / max(elapsed, 1e-9)
                    record = {
                        "step": step,
                        "loss": loss_val,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens": step * tokens_per_step,
                        "tok_s": tok_s,
                    }
                    if device.type == "cuda":  # rank 0's peak since the start, for scaling/memory reports
                        record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    log(record)
                    if bar is not None:
                        bpb_text = "-" if math.isnan(last_bpb) else f"{last_bpb:.3f}"  # no validation yet
                        bar.set_postfix(loss=f"{loss_val:.3f}", bpb=bpb_text, tok_s=f"{tok_s:,.0f}")
                    window_t0, window_steps = time.perf_counter(), 0
                if bar is not None:
                    bar.update(1)
                if on_step is not None:
                    on_step(step, loss_val)
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                    validate(step)
                stop = any_rank(signals.signum is not None, info)
                if stop or step % save_every == 0 or step == cfg.steps:
                    result.checkpoint = save(step)
                if stop:
                    result.interrupted = signals.signum or signal.SIGTERM
                    say(
                        f"interrupted at step {step}; checkpoint saved to {result.checkpoint}; "
                        "continue with --resume"
                    )
                    break
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
    return result


def _clip(model, max_norm: float) -> float:
    """Clip the global gradient norm (0 disables clipping but still reports the norm)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)

"""The training loop: data, model, AdamW + warmup/cosine, validation, checkpoints, resume, signals.

Single process: ``longseq train ...``. Several: ``torchrun --nproc-per-node N -m longseq train ...
--parallel ddp|fsdp`` (see :mod:`.distributed`). All user errors are raised before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data import DataError, WindowSampler, builtin_corpus_path, load_corpus, run_holdout, split_documents
from ..data.tokens import tokenize_corpus
from ..evaluate import EvaluationStopped, check_seq_len, corpus_documents, evaluate_bpb, model_tokenizer
from ..models import compile_blocks, config_class, eager_if_compiled, model_from_config
from ..models.registry import capabilities
from ..precision import autocast
from ..sources import open_tokenizer
from ..tasks.passkey_mix import PasskeyMixSampler, check_room
from ..tokenizer import BYTES, TOKENIZER_DIR, Tokenizer
from . import checkpoint as ckpt_io
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
    pick_device,
    set_grad_sync,
    shutdown,
    wrap_model,
)

# The `as` aliases re-export: longseq.train imports RunDirError from here, the CLI read_run_config.
from .rundir import RunDirError as RunDirError
from .rundir import check_compatible, check_resume_steps, check_run_dir, prepare_run_dir, run_config
from .rundir import read_run_config as read_run_config
from .runtime import SignalCatcher, rng_state, set_rng_state
from .schedule import WarmupCosine, build_optimizer

#: The vocabulary a byte-level training run needs: every byte value is an input id.
BYTE_VOCAB = 256


class TrainingDiverged(ValueError, FloatingPointError):
    """The training loss became NaN or infinite (a user error -- the learning rate or the data -- so the
    CLI shows its message and exits with status 2; also a ``FloatingPointError``, as it was before)."""


@dataclass
class TrainResult:
    """What :func:`train` did: per-step training losses, validation results, where it stopped."""

    run_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    interrupted: int | None = None  # the signal that stopped the run before its last step (None: finished)
    checkpoint: Path | None = None
    signal: int | None = None  # the signal caught, if any (after the last step it cuts only validation short)


def resolve_model_config(cfg: TrainConfig, tokenizer: Tokenizer | None = None):
    """The model config of a run: ``cfg.preset`` of ``cfg.model`` with ``cfg.overrides``; with a
    ``tokenizer`` (``--tokenizer``), its vocabulary unless ``vocab_size`` is overridden.

    Raises ``ValueError`` for an unknown kind, preset or field, or a wrongly typed value."""
    overrides = dict(cfg.overrides)
    if tokenizer is not None:
        overrides.setdefault("vocab_size", tokenizer.vocab_size)
    return config_class(cfg.model).from_preset(cfg.preset, **overrides)


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
        ValueError (``DataError``, ``CheckpointError``, ``RunDirError``) for bad input, before any write;
        :class:`TrainingDiverged` (a ``ValueError`` too) when the loss becomes NaN or infinite.
    """
    check_parallel(cfg.parallel)
    pick_device(cfg.device)  # a bad --device fails here, not after the corpus is read (it is picked again later)
    run_dir = Path(cfg.out)
    resume_from, damaged = check_run_dir(run_dir, resume, overwrite)
    if resume_from is None:
        # A new run's overrides are the user's --set flags. A resumed run's may come from its config.json,
        # saved before contradictions were refused: they stay resumable (the CLI checks the flags typed now).
        config_class(cfg.model).check_overrides(cfg.overrides)
    tokenizer = _open_run_tokenizer(cfg.tokenizer, resume_from)
    model_cfg = resolve_model_config(cfg, tokenizer)
    _check_model_fits(cfg, model_cfg, tokenizer)
    if cfg.passkey_mix:  # before the corpus is read or tokenized: it needs only the tokenizer
        check_room(tokenizer or BYTES, cfg.seq_len + 1, "bytes" if tokenizer is None else "tokens")
    if resume_from is not None:
        saved = ckpt_io.verify_checkpoint(resume_from)
        check_compatible(model_cfg, saved, resume_from, tokenizer)
        check_resume_steps(cfg.steps, saved, resume_from)  # after: a model mismatch is the deeper problem
    world = int(os.environ.get("WORLD_SIZE", "1")) if cfg.parallel != "none" else 1
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(
            f"batch-size {cfg.batch_size} must be divisible by world size {world} x "
            f"grad-accum {cfg.grad_accum}"
        )

    builtin = cfg.data is None
    corpus = load_corpus([builtin_corpus_path()] if builtin else cfg.data, cfg.cache_dir)
    split = split_documents(corpus.names, *run_holdout(builtin, cfg.val_docs, cfg.val_fraction))
    # Training windows are drawn from the ids (bytes, or the corpus tokenized once and cached); validation
    # scores the documents' text, which the model's tokenizer turns into ids (bits per UTF-8 byte either way).
    # Under torchrun every rank gets here before the process group exists: the first builds the token cache
    # (the others wait on its lock and reuse it), and only rank 0 draws a progress bar.
    first_rank = os.environ.get("RANK", "0") == "0"
    ids = corpus if tokenizer is None else tokenize_corpus(corpus, tokenizer, progress=cfg.progress and first_rank)
    sampler = WindowSampler(ids, split.train, cfg.seq_len + 1, seed=cfg.seed, within_docs=cfg.within_docs)
    if cfg.passkey_mix:
        sampler = PasskeyMixSampler(sampler, tokenizer or BYTES, cfg.passkey_mix, seed=cfg.seed,
                                    answer_weight=cfg.passkey_answer_weight)
    val_set = corpus_documents(corpus, split.val, cfg.eval_tokens) if split.val else []
    if split.val and sum(len(t) for _, t in val_set) - len(val_set) < 1:
        raise DataError("the validation documents hold no byte to score (each needs at least 2 bytes)")

    info = init_distributed(cfg.parallel, cfg.device)
    try:
        return _run(
            cfg, model_cfg, run_dir, resume_from, damaged, overwrite, sampler, val_set, info, on_step, tokenizer
        )
    finally:
        shutdown()


def _open_run_tokenizer(path: str | None, resume_from: Path | None) -> Tokenizer | None:
    """The ``--tokenizer`` of a run (None: bytes). A resumed run whose tokenizer path no longer exists as saved
    (typed relative to another directory, or moved since) takes the copy its checkpoint carries instead."""
    if path is None:
        return None
    if resume_from is not None and not Path(path).exists() and (resume_from / TOKENIZER_DIR).is_dir():
        warnings.warn(f"--tokenizer {path} does not exist here; resuming with the copy saved in {resume_from}",
                      stacklevel=3)
        return open_tokenizer(resume_from / TOKENIZER_DIR)  # find_intact verified it
    return open_tokenizer(path)


def _check_model_fits(cfg: TrainConfig, model_cfg, tokenizer: Tokenizer | None) -> None:
    """What the model config must allow of a run with ``cfg.seq_len``-id windows of bytes or ``tokenizer``'s ids."""
    caps = capabilities(model_cfg)
    if tokenizer is not None and caps.byte_level:
        raise ValueError(f"a {cfg.model} model is byte-level by design: train it without --tokenizer")
    needed, what = (BYTE_VOCAB, "byte-level training: every byte value is an input id") if tokenizer is None else (
        tokenizer.vocab_size, f"the tokenizer {cfg.tokenizer}, which has {tokenizer.vocab_size} ids")
    if model_cfg.vocab_size < needed:
        raise ValueError(f"vocab_size={model_cfg.vocab_size} is too small for {what}, so it must be >= {needed}")
    if cfg.seq_len % caps.seq_multiple:
        raise ValueError(
            f"seq-len {cfg.seq_len} must be a multiple of the {cfg.model} model's patch_size={caps.seq_multiple}"
        )
    if caps.max_seq_len is not None and cfg.seq_len > caps.max_seq_len:
        raise ValueError(f"seq-len {cfg.seq_len} exceeds the {cfg.model} model's max_seq_len={caps.max_seq_len}")


def _run(
    cfg, model_cfg, run_dir, resume_from, damaged, overwrite, sampler, val_set, info: DistInfo, on_step, tokenizer
):
    """Everything after the checks of :func:`train`, on every rank: build or restore the model and optimizer,
    set up the run directory (main rank; the damaged checkpoints newer than ``resume_from`` set aside), and
    run the steps."""
    config = run_config(cfg, model_cfg, tokenizer)
    # Read (and so checked), and the model built, before the run directory is touched: a failure here
    # leaves no partial run directory behind.
    saved_state = ckpt_io.load_train_state(resume_from) if resume_from is not None else None
    saved_model = ckpt_io.load_model_state(resume_from) if resume_from is not None else None
    start_step = int(saved_state["step"]) if saved_state is not None else 0
    setup = _build_training(cfg, model_cfg, saved_state, saved_model, sampler, info, tokenizer)
    if info.is_main:
        moved = prepare_run_dir(
            run_dir, config, start_step if resume_from is not None else None, overwrite, [c for c, _ in damaged]
        )
        for (_, err), where in zip(damaged, moved, strict=True):
            print(f"longseq: note: {err}; resuming from the newest intact checkpoint, {resume_from} "
                  f"(the damaged one is kept as {where})", file=sys.stderr, flush=True)
    barrier(info)

    session = _Session(cfg, info, run_dir, config, sampler, val_set, setup, start_step)
    try:
        session.run(on_step)
    finally:
        session.close()
    return session.result


@dataclass
class _Setup:
    """The model as trained (``wrapped``: DDP, FSDP or the model itself; with ``--compile`` its blocks are
    compiled in place), the module validation runs, and the optimizer with its schedule."""

    wrapped: torch.nn.Module
    eval_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    names: list[str]
    schedule: WarmupCosine


def _build_training(cfg, model_cfg, saved_state, saved_model, sampler, info: DistInfo, tokenizer) -> _Setup:
    """Build (or restore) the model, its parallel wrapper and the optimizer; when resuming, also restore the
    sampler's position and the RNGs, so the run continues exactly."""
    device = info.device
    torch.manual_seed(cfg.seed)
    model = model_from_config(model_cfg)
    if tokenizer is not None:
        model.tokenizer = tokenizer  # validation and checkpoints take it from the model
    if saved_model is not None:
        model.load_state_dict(saved_model, strict=True)  # before sharding: FSDP shards what is loaded
    model.to(device)
    check_seq_len(model, cfg.seq_len)
    if cfg.compile:
        # before the parallel wrapper (FSDP shards the compiled blocks); training shapes are fixed
        compile_blocks(model, dynamic=False)
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
        set_rng_state(saved_state["rng"], device)
    eval_model = wrapped.module if info.parallel == "ddp" else wrapped
    return _Setup(wrapped, eval_model, optimizer, names, schedule)


def _progress_bar(cfg: TrainConfig, start_step: int):
    """A tqdm bar over the run's steps, on stderr so stdout stays for results."""
    from tqdm.auto import tqdm

    return tqdm(
        total=cfg.steps,
        initial=start_step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )


class _Session:
    """One run of the loop: the steps, and around them the metrics log, the progress bar, validation and
    checkpoints. Only the main rank writes files and messages; every rank steps, validates and saves."""

    def __init__(
        self,
        cfg: TrainConfig,
        info: DistInfo,
        run_dir: Path,
        config: dict[str, Any],
        sampler: WindowSampler | PasskeyMixSampler,
        val_set: list,
        setup: _Setup,
        start_step: int,
    ) -> None:
        self.cfg, self.info, self.run_dir, self.config = cfg, info, run_dir, config
        self.sampler, self.val_set, self.setup = sampler, val_set, setup
        self.start_step = start_step
        self.result = TrainResult(run_dir=run_dir, step=start_step)
        self.metrics = open(run_dir / "metrics.jsonl", "a") if info.is_main else None  # noqa: SIM115
        self.bar = _progress_bar(cfg, start_step) if info.is_main and cfg.progress else None
        self.micro = cfg.batch_size // info.world_size // cfg.grad_accum
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        self.save_every = cfg.save_every or cfg.eval_every or cfg.steps
        self.last_bpb = float("nan")
        self.skipped_validation: set[int] = set()  # steps whose validation a signal cut short
        self.window_t0, self.window_steps = time.perf_counter(), 0

    def run(self, on_step: Callable[[int, float], None] | None) -> None:
        cfg = self.cfg
        self.setup.wrapped.train()
        step = self.start_step
        with SignalCatcher() as signals:
            while step < cfg.steps:
                step += 1
                lr, loss_val, grad_norm = self.train_step(step)
                self.result.losses[step] = loss_val
                self.result.step = step
                self.window_steps += 1
                if not math.isfinite(loss_val):
                    raise TrainingDiverged(
                        f"training loss is {loss_val} at step {step}; lower --lr or check the data"
                    )
                if step % cfg.log_every == 0 or step == cfg.steps:
                    self.report(step, lr, loss_val, grad_norm)
                if self.bar is not None:
                    self.bar.update(1)
                if on_step is not None:
                    on_step(step, loss_val)
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                    self.validate(step, signals)
                if self.checkpoint(step, signals):
                    break

    def train_step(self, step: int) -> tuple[float, float, float]:
        """One optimizer step over ``cfg.grad_accum`` micro-batches; returns ``(lr, mean loss, grad norm)``."""
        cfg, info, setup = self.cfg, self.info, self.setup
        device = info.device
        lr = setup.schedule(step)
        for group in setup.optimizer.param_groups:
            group["lr"] = lr
        batch, weights = self._draw()
        loss_sum = torch.zeros((), device=device)
        for i in range(cfg.grad_accum):
            x = batch[i * self.micro : (i + 1) * self.micro]
            with set_grad_sync(setup.wrapped, info, sync=i == cfg.grad_accum - 1), autocast(device):
                logits = setup.wrapped(x[:, :-1])
                if weights is None:
                    loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
                else:
                    per_target = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="none")
                    loss = (per_target * weights[i * self.micro : (i + 1) * self.micro].flatten()).mean()
                loss = loss / cfg.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = _clip(setup.wrapped, cfg.grad_clip)
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)
        return lr, float(all_reduce_mean(loss_sum, self.info)), grad_norm

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's share of the next global batch on the device, and its targets' loss weights (None: all 1)."""
        batch, weights = self.sampler.next_weighted_batch(self.cfg.batch_size, self.info.rank, self.info.world_size)
        device = self.info.device
        return batch.to(device, non_blocking=True), None if weights is None else weights.to(device, non_blocking=True)

    def report(self, step: int, lr: float, loss_val: float, grad_norm: float) -> None:
        """Log the step (throughput over the steps since the last report) and refresh the progress bar."""
        elapsed = time.perf_counter() - self.window_t0
        tok_s = self.tokens_per_step * self.window_steps / max(elapsed, 1e-9)
        record = {
            "step": step,
            "loss": loss_val,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": step * self.tokens_per_step,
            "tok_s": tok_s,
        }
        device = self.info.device
        if device.type == "cuda":  # rank 0's peak since the start, for scaling/memory reports
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        self.log(record)
        if self.bar is not None:
            bpb_text = "-" if math.isnan(self.last_bpb) else f"{self.last_bpb:.3f}"  # no validation yet
            self.bar.set_postfix(loss=f"{loss_val:.3f}", bpb=bpb_text, tok_s=f"{tok_s:,.0f}")
        self.window_t0, self.window_steps = time.perf_counter(), 0

    def checkpoint(self, step: int, signals: SignalCatcher) -> bool:
        """Save when due or when any rank caught a signal; returns whether to stop."""
        stop = any_rank(signals.signum is not None, self.info)
        if stop or step % self.save_every == 0 or step == self.cfg.steps:
            self.result.checkpoint = self.save(step)
        if stop:
            self.result.signal = signals.signum or signal.SIGTERM
            skipped = "; its validation was skipped" if step in self.skipped_validation else ""
            if step == self.cfg.steps:  # every step ran: the run is finished, not interrupted
                self.say(
                    f"training finished at step {step}; checkpoint saved to {self.result.checkpoint}{skipped}"
                    + (f" (run `longseq eval {self.run_dir}` for it)" if skipped else "")
                )
            else:
                self.result.interrupted = self.result.signal
                self.say(
                    f"interrupted at step {step}{skipped}; checkpoint saved to {self.result.checkpoint}; "
                    "continue with --resume"
                )
        return stop

    def say(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        elif self.info.is_main:
            print(message, file=sys.stderr, flush=True)

    def log(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def save(self, step: int) -> Path:
        info, setup = self.info, self.setup
        state_model = full_model_state(setup.wrapped, info)
        state_optim = full_optimizer_state(setup.wrapped, setup.optimizer, info, setup.names)
        path = ckpt_io.checkpoint_dir(self.run_dir, step)
        if info.is_main:
            train_state = {
                "step": step,
                "optimizer": state_optim,
                "schedule": setup.schedule.state_dict(),
                "sampler": self.sampler.state_dict(),
                "rng": rng_state(info.device),
            }
            ckpt_cfg = {"model": self.config["model"], "train": self.config["train"]}
            path = ckpt_io.save_checkpoint(
                self.run_dir, step, state_model, train_state, ckpt_cfg, keep=self.cfg.keep,
                tokenizer=model_tokenizer(setup.eval_model),
            )
        barrier(info)
        return path

    def validate(self, step: int, signals: SignalCatcher) -> None:
        """Score the validation set; a signal (on any rank) stops it between two batches, and the step's
        validation is then skipped, not logged."""
        # Every rank scores the same (small) validation set: FSDP needs all ranks in each forward, and
        # the ranks then agree on the numbers (and on stopping) without a reduction of the results.
        if not self.val_set:
            return
        try:
            # eager: compiled blocks would compile again for validation's grad mode and batch shapes
            with eager_if_compiled(self.cfg.compile):
                res = evaluate_bpb(
                    self.setup.eval_model,
                    self.val_set,
                    self.cfg.seq_len,
                    batch_size=max(1, self.micro),
                    device=self.info.device,
                    should_stop=lambda: any_rank(signals.signum is not None, self.info),
                )
        except EvaluationStopped:
            self.skipped_validation.add(step)
            return
        self.last_bpb = res.bpb
        self.result.evals[step] = {"val_loss": res.loss, "val_bpb": res.bpb}
        self.log({"step": step, "val_loss": res.loss, "val_bpb": res.bpb, "val_bytes": res.bytes})
        self.say(f"step {step}: val loss {res.loss:.4f}, val bpb {res.bpb:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()


def _clip(model, max_norm: float) -> float:
    """Clip the global gradient norm (0 disables clipping but still reports the norm)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)

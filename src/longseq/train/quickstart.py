"""``longseq quickstart``: a tiny GLA model trained on the built-in corpus on a CPU in a few minutes.

The settings were tuned on 2 CPU cores to reach a validation bits-per-byte well under 3.0 (an untrained
model scores ~8) in two to three minutes.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import torch

from ..data import BUILTIN_VAL_DOCS, builtin_corpus_path, load_corpus, split_documents
from ..evaluate import corpus_documents, evaluate_bpb
from ..generate import generate
from .checkpoint import find_intact, load_model, verify_checkpoint
from .config import TrainConfig
from .loop import resolve_model_config, train
from .rundir import check_compatible, read_run_config

QUICKSTART = dict(
    model="gla",
    preset="tiny",
    overrides={},
    seq_len=128,
    batch_size=16,
    steps=1200,
    lr=4e-3,
    warmup=50,
    min_lr_ratio=0.1,
    eval_every=400,
    eval_tokens=65_536,
    log_every=20,
    keep=1,
    device="cpu",
    seed=0,
)


def quickstart(
    out: str = "runs/quickstart", steps: int | None = None, sample_bytes: int = 400, resume: bool = False
) -> dict:
    """Train, evaluate on the held-out works and print a sample; returns ``{"bpb", "seconds", ...}``.

    ``resume`` continues the run in ``out`` (one a signal stopped) from its newest checkpoint instead of
    replacing it, to the ``steps`` it was started with unless ``steps`` is given; a run already trained that
    far (a signal cut only its final validation short) goes straight to the evaluation and the sample."""
    if resume and not steps:
        steps = _saved_steps(out)
    cfg = TrainConfig(out=out, **{**QUICKSTART, **({"steps": steps} if steps else {})})
    # Leave one core free. A model this small gains little from intra-op threads, and when its threads
    # outnumber the free cores (anything else running) OpenMP's spin-waits make each step ~50x slower:
    # measured on 2 cores, 1 thread 0.1 s/step vs 2 threads 5 s/step next to one other busy process.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - 1)))
    try:
        return _quickstart(cfg, out, sample_bytes, resume)
    finally:
        torch.set_num_threads(threads)


def resume_command(out: str, steps: int | None = None) -> str:
    """The command that continues an interrupted quickstart (the training loop only says "--resume")."""
    return shlex.join(["longseq", "quickstart", "--out", out, *(["--steps", str(steps)] if steps else []),
                       "--resume"])


def _saved_steps(out: str) -> int | None:
    """The steps the quickstart run in ``out`` was started with (None: no readable config.json, so the
    default; ``train`` then says what is wrong with the directory, if anything)."""
    saved = read_run_config(out)
    steps = (saved or {}).get("train", {}).get("steps")
    return steps if isinstance(steps, int) else None


def _trained_already(cfg: TrainConfig) -> bool:
    """Whether the newest intact checkpoint of ``cfg.out`` has all ``cfg.steps`` (and holds the quickstart's
    model), so a resumed quickstart has only its evaluation and sample left."""
    intact, _ = find_intact(cfg.out)
    if intact is None:
        return False
    saved = verify_checkpoint(intact)
    check_compatible(resolve_model_config(cfg), saved, intact)
    return saved.get("step") == cfg.steps


def _quickstart(cfg: TrainConfig, out: str, sample_bytes: int, resume: bool) -> dict:
    print(
        f"longseq quickstart: {'continuing' if resume else 'training'} a tiny GLA model on the built-in "
        f"Shakespeare corpus {'in' if resume else 'into'} {out}\n"
        f"(validation: {', '.join(BUILTIN_VAL_DOCS)}; "
        f"{cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} bytes)",
        flush=True,
    )
    t0 = time.perf_counter()
    if resume and _trained_already(cfg):
        print(f"{out} is already trained to step {cfg.steps}: evaluating and sampling it", flush=True)
    else:
        run = train(cfg, resume=resume, overwrite=not resume and Path(out).exists())
        if run.signal is not None:  # stopped by a signal (even if only during the final validation): no more work
            return {"interrupted": run.signal, "seconds": time.perf_counter() - t0}
    train_s = time.perf_counter() - t0
    model = load_model(out)
    corpus = load_corpus([builtin_corpus_path()])
    split = split_documents(corpus.names, BUILTIN_VAL_DOCS)
    docs = corpus_documents(corpus, split.val, max_bytes=3 * 65_536)
    result = evaluate_bpb(model, docs, cfg.seq_len, batch_size=32)
    print(f"\nvalidation (first {result.bytes:,} bytes of the held-out works):\n{result.table()}")
    prompt = "ROMEO:\n"
    torch.manual_seed(0)
    ids = generate(model, prompt, sample_bytes, temperature=0.8, top_k=40, seed=0)
    text = bytes(ids[0].tolist()).decode("utf-8", errors="replace")
    print(f"\nsample (temperature 0.8, top-k 40):\n{text}\n")
    seconds = time.perf_counter() - t0
    print(
        f"done in {seconds:.0f} s (training {train_s:.0f} s); validation bits per byte {result.bpb:.3f}; "
        f"try: longseq generate {out} --prompt 'KING:' --max-new-tokens 300",
        file=sys.stderr,
    )
    return {"bpb": result.bpb, "seconds": seconds, "train_seconds": train_s, "sample": text}

"""``longseq quickstart``: a tiny GLA model trained on the built-in corpus on a CPU in a few minutes.

The settings were tuned on 2 CPU cores to reach a validation bits-per-byte well under 3.0 (an untrained
model scores ~8) in about two to three minutes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from ..data import BUILTIN_VAL_DOCS, builtin_corpus_path, load_corpus, split_documents
from ..evaluate import corpus_documents, evaluate_bpb
from ..generate import generate
from .checkpoint import load_model
from .config import TrainConfig
from .loop import train

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


def quickstart(out: str = "runs/quickstart", steps: int | None = None, sample_bytes: int = 400) -> dict:
    """Train, evaluate on the held-out works and print a sample; returns ``{"bpb", "seconds", ...}``."""
    cfg = TrainConfig(out=out, **{**QUICKSTART, **({"steps": steps} if steps else {})})
    # Leave one core free. A model this small gains little from intra-op threads, and when its threads
    # outnumber the free cores (anything else running) OpenMP's spin-waits make each step ~50x slower:
    # measured on 2 cores, 1 thread 0.1 s/step vs 2 threads 5 s/step next to one other busy process.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - 1)))
    try:
        return _quickstart(cfg, out, sample_bytes)
    finally:
        torch.set_num_threads(threads)


def _quickstart(cfg: TrainConfig, out: str, sample_bytes: int) -> dict:
    print(
        f"longseq quickstart: training a tiny GLA model on the built-in Shakespeare corpus into {out}\n"
        f"(validation: {', '.join(BUILTIN_VAL_DOCS)}; "
        f"{cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} bytes)",
        flush=True,
    )
    t0 = time.perf_counter()
    run = train(cfg, overwrite=Path(out).exists())
    train_s = time.perf_counter() - t0
    if run.signal is not None:  # stopped by a signal (even if only during the final validation): no more work
        return {"interrupted": run.signal, "seconds": train_s}
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

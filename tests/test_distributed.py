"""DDP and FSDP2 on CPU (gloo, two processes under torchrun) vs one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longseq.train import TrainConfig, load_model, train
from longseq.train.checkpoint import list_checkpoints, load_model_state
from test_train import make_corpus  # tests/ is on sys.path (pytest rootdir-relative imports)

STEPS = 6
COMMON = dict(
    model="gla",
    preset="tiny",
    seq_len=32,
    batch_size=8,
    grad_accum=2,
    steps=STEPS,
    lr=3e-3,
    warmup=2,
    eval_every=3,
    eval_tokens=256,
    log_every=1,
    save_every=2,
    keep=3,
    seed=3,
)
# Two ranks sum the gradients of two half-batches instead of one full batch: the same numbers up to
# float32 reassociation, which a few Adam steps amplify only slightly.
RTOL = 1e-5


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _torchrun(tmp_path: Path, parallel: str, data: Path) -> Path:
    out = tmp_path / parallel
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "longseq",
        "train",
        "--out",
        str(out),
        "--parallel",
        parallel,
        "--device",
        "cpu",
        "--data",
        str(data),
        "--val-docs",
        "doc3",
        "--set",
        "n_layers=1",
        "--no-progress",
    ]
    for key, value in COMMON.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    data = make_corpus(tmp / "corpus")
    cfg = TrainConfig(
        out=str(tmp / "single"),
        data=[str(data)],
        val_docs=["doc3"],
        overrides={"n_layers": 1},
        progress=False,
        device="cpu",
        **COMMON,
    )
    return tmp, data, train(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(reference, parallel):
    tmp, data, single = reference
    out = _torchrun(tmp, parallel, data)
    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in single.losses.items():
        assert losses[step] == pytest.approx(loss, rel=RTOL), step
    # The checkpoint holds full weights: it loads in one process and matches the one-process run.
    a, b = load_model_state(out), load_model_state(single.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        err = float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12))
        assert err < RTOL, (k, err)
    assert load_model(out) is not None

    # Resume the two-rank run's step-4 checkpoint in one process: optimizer and sampler state carry over.
    shutil.rmtree(list_checkpoints(out)[-1])
    cfg = TrainConfig(
        out=str(out),
        data=[str(data)],
        val_docs=["doc3"],
        overrides={"n_layers": 1},
        progress=False,
        device="cpu",
        **COMMON,
    )
    resumed = train(cfg, resume=True)
    assert sorted(resumed.losses) == [5, 6]
    for step in (5, 6):
        assert resumed.losses[step] == pytest.approx(single.losses[step], rel=RTOL)


def test_lone_process_ddp_equals_plain(reference, tmp_path):
    """``--parallel ddp`` in a single process (world of one) takes the distributed code path exactly."""
    _, data, single = reference
    cfg = TrainConfig(
        out=str(tmp_path / "ddp1"),
        data=[str(data)],
        val_docs=["doc3"],
        overrides={"n_layers": 1},
        progress=False,
        device="cpu",
        parallel="ddp",
        **{**COMMON, "steps": 3, "eval_every": 0},
    )
    plain = TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / "plain"), "parallel": "none"})
    a, b = train(cfg), train(plain)
    assert a.losses == pytest.approx(b.losses, rel=1e-6)
    assert not torch.distributed.is_initialized()

"""Training loop, schedule, exact resume, evaluation (bits per byte) and bad-input errors."""

from __future__ import annotations

import json
import math
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longseq.data import DataError
from longseq.evaluate import evaluate_bpb, plan_windows
from longseq.models import GLALM, MODELS, Capabilities, GLAConfig, ModelSpec, build_model
from longseq.train import CheckpointError, RunDirError, TrainConfig, train
from longseq.train.checkpoint import list_checkpoints, load_model_state
from longseq.train.schedule import WarmupCosine

WORDS = b"the quick brown fox jumps over a lazy dog while seven wizards hex bold jumping zebras ".split()


# CLI flags of a tiny run on a make_corpus corpus, and the same run through the API (finished_run).
SMALL_ARGS = ["--set", "n_layers=1", "--seq-len", "32", "--batch-size", "4", "--eval-tokens", "256", "--no-progress",
              "--device", "cpu", "--val-docs", "doc3"]


def finished_run(out: Path, corpus: Path, steps: int, eval_every: int = 0) -> Path:
    """A finished tiny run of ``steps`` steps in ``out`` (the settings of :data:`SMALL_ARGS`)."""
    train(TrainConfig(out=str(out), data=[str(corpus)], val_docs=["doc3"], overrides={"n_layers": 1}, seq_len=32,
                      batch_size=4, steps=steps, eval_every=eval_every, eval_tokens=256, progress=False, device="cpu"))
    return out


def make_corpus(root: Path, n_docs: int = 4, size: int = 3000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), size // 5)]
        (root / f"doc{i}.txt").write_bytes(b" ".join(words)[:size])
    return root


def cfg_for(tmp_path: Path, name: str, **kw) -> TrainConfig:
    data = make_corpus(tmp_path / "corpus")
    base = dict(
        out=str(tmp_path / name),
        model="gla",
        preset="tiny",
        overrides={"n_layers": 1},
        data=[str(data)],
        val_docs=["doc3"],
        seq_len=32,
        batch_size=4,
        grad_accum=2,
        steps=8,
        lr=3e-3,
        warmup=2,
        eval_every=4,
        eval_tokens=256,
        log_every=1,
        keep=2,
        progress=False,
        device="cpu",
        seed=1,
    )
    return TrainConfig(**{**base, **kw})


def test_warmup_cosine_schedule():
    s = WarmupCosine(lr=1.0, warmup=10, total=110, min_lr_ratio=0.1)
    assert s(1) == pytest.approx(0.1) and s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)


def test_resume_is_exact(tmp_path):
    straight = train(cfg_for(tmp_path, "straight"))

    def interrupt(step: int, loss: float) -> None:
        if step == 4:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does: the handler asks the loop to save and stop

    cfg = cfg_for(tmp_path, "interrupted")
    first = train(cfg, on_step=interrupt)
    assert first.interrupted == signal.SIGINT and first.step == 4
    assert [p.name for p in list_checkpoints(cfg.out)] == ["step_00000004"]
    second = train(cfg, resume=True)
    assert second.step == 8 and sorted(second.losses) == [5, 6, 7, 8]
    assert {**first.losses, **second.losses} == straight.losses  # bit for bit
    assert second.evals[8] == straight.evals[8]
    a, b = load_model_state(straight.run_dir), load_model_state(second.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl holds every step once, with the same losses
    records = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert logged == straight.losses


def test_first_loss_is_uniform_and_training_learns(tmp_path):
    result = train(cfg_for(tmp_path, "run", steps=40, lr=1e-2, warmup=5, eval_every=0, grad_accum=1))
    # At initialisation (std 0.02) the model predicts ~uniformly: loss ~ ln 256.
    assert result.losses[1] == pytest.approx(math.log(256), abs=0.05)
    assert result.evals[40]["val_bpb"] < 5.0  # well below the 8 bits of a uniform guess
    saved = json.loads((Path(result.run_dir) / "config.json").read_text())
    assert saved["model"]["config"]["n_layers"] == 1 and saved["train"]["steps"] == 40


def test_grad_accumulation_matches_full_batch(tmp_path):
    full = train(cfg_for(tmp_path, "full", grad_accum=1, steps=3, eval_every=0))
    accum = train(cfg_for(tmp_path, "accum", grad_accum=4, steps=3, eval_every=0))
    for step in (1, 2, 3):
        assert accum.losses[step] == pytest.approx(full.losses[step], rel=1e-5)


# ---------------------------------------------------------------------------------- evaluation
def test_corpus_documents_spread_a_byte_budget_exactly(tmp_path):
    """``max_bytes`` scored bytes in all (each document's first byte is context only), shares differing by at most
    one, documents without a share dropped; no budget: whole documents."""
    from longseq.data import load_corpus
    from longseq.evaluate import corpus_documents

    for k, size in enumerate([50, 40, 30]):
        (tmp_path / f"{'abc'[k]}.txt").write_bytes(bytes(range(60, 60 + size)))
    corpus = load_corpus([tmp_path])
    whole = corpus_documents(corpus, [0, 1, 2])
    assert [len(ids) for _, ids in whole] == [corpus.doc(i).size for i in range(3)]
    spread = corpus_documents(corpus, [0, 1, 2], max_bytes=20)
    assert [len(ids) - 1 for _, ids in spread] == [7, 7, 6]
    assert all(ids.tolist() == corpus.doc(i)[: ids.size].tolist() for i, (_, ids) in enumerate(spread))
    assert [len(ids) - 1 for _, ids in corpus_documents(corpus, [0, 1, 2], max_bytes=2)] == [1, 1]


def test_plan_windows_scores_every_byte_once():
    for n, T, S in [(1, 8, 8), (2, 8, 8), (50, 8, 8), (50, 8, 3), (9, 8, 1), (100, 16, 5)]:
        windows = plan_windows(n, T, S)
        scored = [j for _, e, f in windows for j in range(f, e + 1)]
        assert scored == list(range(1, n))
        for k, (s, e, f) in enumerate(windows):
            assert 0 < e - s <= T and s < f <= e
            if k:
                assert f - 1 - s >= T - S  # every scored byte after the first window sees >= T - S context


def _reference_bpb(model, tokens: np.ndarray, T: int, S: int) -> float:
    """Byte by byte: byte j is predicted from the context a stride-S evaluation gives it."""
    x = torch.as_tensor(tokens, dtype=torch.long)
    nll = 0.0
    for j in range(1, len(x)):
        start = 0 if j <= T else math.ceil((j - T) / S) * S
        logits = model(x[None, start:j])[0, -1]
        nll += float(F.cross_entropy(logits[None].double(), x[j : j + 1]))
    return nll / math.log(2) / (len(x) - 1)


@pytest.mark.parametrize("kind", ["transformer", "gla"])
def test_evaluate_bpb_matches_bytewise_reference(kind):
    torch.manual_seed(0)
    model = build_model(kind, "tiny", n_layers=1).eval()
    rng = np.random.default_rng(0)
    docs = [
        ("a", rng.integers(0, 256, 45).astype(np.uint8)),
        ("b", rng.integers(0, 256, 13).astype(np.uint8)),
    ]
    with torch.no_grad():
        for T, S in [(16, 16), (16, 5)]:
            result = evaluate_bpb(model, docs, T, S, batch_size=3)
            for (name, toks), score in zip(docs, result.docs, strict=True):
                assert score.name == name and score.bytes == len(toks) - 1
                assert score.bpb == pytest.approx(_reference_bpb(model, toks, T, S), rel=1e-5)
            total = sum(d.nll for d in result.docs) / math.log(2) / (45 + 13 - 2)
            assert result.bpb == pytest.approx(total, rel=1e-12)


# ----------------------------------------------------------------------------------- bad input
def test_bad_set_fields(tmp_path):
    with pytest.raises(ValueError, match="n_layerz"):
        train(cfg_for(tmp_path, "run", overrides={"n_layerz": 2}))
    with pytest.raises(ValueError, match="n_layers.*expects int"):
        train(cfg_for(tmp_path, "run", overrides={"n_layers": "two"}))
    assert not (tmp_path / "run").exists()


def test_corpus_shorter_than_window(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "a.txt").write_bytes(b"x" * 20)
    (tmp_path / "tiny" / "b.txt").write_bytes(b"y" * 20)
    with pytest.raises(DataError, match="seq_len=32"):
        train(cfg_for(tmp_path, "run", data=[str(tmp_path / "tiny")], val_docs=["b"]))
    assert not (tmp_path / "run").exists()


@dataclass
class _PatchedConfig(GLAConfig):
    kind = "patched-gla"
    patch_size: int = 8


_PATCHED_SPEC = ModelSpec(
    "patched-gla", _PatchedConfig, GLALM, "GLA declaring a patch size",
    lambda cfg: Capabilities(frozenset({"recurrent"}), seq_multiple=cfg.patch_size),
)


def test_seq_len_must_be_multiple_of_patch_size(tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS, "patched-gla", _PATCHED_SPEC)
    with pytest.raises(ValueError, match="seq-len 36 must be a multiple of .*patch_size=8"):
        train(cfg_for(tmp_path, "run", model="patched-gla", seq_len=36))
    assert not (tmp_path / "run").exists()


def test_run_dir_and_resume_errors(tmp_path):
    cfg = cfg_for(tmp_path, "run", steps=2, eval_every=0)
    with pytest.raises(RunDirError, match="nothing to resume"):
        train(cfg, resume=True)
    train(cfg)
    before = sorted(p.name for p in Path(cfg.out).rglob("*"))
    with pytest.raises(RunDirError, match="already exists; pass --resume .* or --overwrite"):
        train(cfg)
    with pytest.raises(
        CheckpointError, match=r"incompatible model config \(n_layers: checkpoint 1 vs requested 2\)"
    ):
        train(cfg_for(tmp_path, "run", steps=4, overrides={"n_layers": 2}), resume=True)
    with pytest.raises(CheckpointError, match="holds a 'gla' model"):
        train(cfg_for(tmp_path, "run", steps=4, model="transformer"), resume=True)
    assert sorted(p.name for p in Path(cfg.out).rglob("*")) == before  # nothing touched
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("years of work")
    with pytest.raises(RunDirError, match="not a longseq run directory"):
        train(cfg_for(tmp_path, "precious"), overwrite=True)
    assert (tmp_path / "precious" / "thesis.tex").exists()
    again = train(cfg_for(tmp_path, "run", steps=1, eval_every=0), overwrite=True)
    assert again.step == 1 and [p.name for p in list_checkpoints(cfg.out)] == ["step_00000001"]


def test_batch_divisibility(tmp_path):
    with pytest.raises(ValueError, match="batch-size 6 is not divisible by grad-accum 4"):
        cfg_for(tmp_path, "run", batch_size=6, grad_accum=4)

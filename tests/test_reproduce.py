"""benchmarks/reproduce.py: the batched window scorer, the report with nothing run, and a --quick run."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longseq
from longseq.cache import parse_policy
from longseq.sweep import score_document

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "reproduce.py"


def _load():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("reproduce", module)  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("spec", ["tova:12", "tova_head:12", "h2o:12", "sink:12", "window:12", "full"])
def test_batched_windows_match_score_document(spec):
    # The sweep scores all windows as one batch; each row must get what score_document gives it alone.
    rep = _load()
    torch.manual_seed(0)
    model = longseq.build_model("transformer", "tiny").eval()
    ids = torch.randint(0, 256, (3, 70))
    policy = parse_policy(spec)
    batched = rep.score_windows(model, ids, policy, chunk=32)
    for row in range(3):
        alone = score_document(model, ids[row], policy, chunk_size=16)
        assert alone.tokens == 69
        assert math.isclose(float(batched[row]), alone.nats, rel_tol=1e-4), (spec, row)


def test_report_without_results_says_not_run(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "o"), "--quick", "--stage", "report"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "o" / "reproductions.md").read_text()
    assert "Result: not run (`--stage eval-tova`)" in text
    assert "Result: not run (`--stage eval-megabyte`)" in text
    assert "Result: not run (`--stage eval-gla`)" in text
    assert "| `train-2k` | not run |" in text


def test_the_recall_verdict_needs_both_halves_of_the_claim():
    """Recall within 10% of the full Transformer's and a state nearer GLA's (log scale): both, or no claim."""
    _load()
    from repro.report_recall import GLA, HYBRID, TRANSFORMER, _judge

    acc = {HYBRID: 0.95, TRANSFORMER: 1.0, GLA: 0.1}
    small = {HYBRID: 2**19, TRANSFORMER: 2**25, GLA: 2**15}  # 16x GLA's, 1/64 of the Transformer's
    assert "the claim holds" in _judge(acc, small) and "16x GLA's and 1/64 of the Transformer's" in _judge(acc, small)
    short = _judge({**acc, HYBRID: 0.85}, small)
    assert "does not hold" in short and "not within 10%" in short
    large = {**small, HYBRID: 2**22}  # 128x GLA's, 1/8 of the Transformer's
    assert "does not hold" in _judge(acc, large) and "nearer the Transformer" in _judge(acc, large)


def test_a_recall_kind_stored_without_a_policy_is_not_complete():
    """Adding a policy to the stage (h2o:ctx/8 was) makes the stored kinds without it run again."""
    _load()
    from repro.eval_recall import KINDS, PARTS, PASSKEY_QUICK, QUICK, _has, json_form, recall_complete

    result = {"setup": json_form(QUICK.__dict__), "passkey_setup": json_form(PASSKEY_QUICK.__dict__)}
    for part in PARTS:
        result[part] = {kind: {"accuracy": {spec: {} for spec in specs}} for kind, _, specs in KINDS}
    assert recall_complete(result, quick=True)
    specs = next(s for k, _, s in KINDS if k == "transformer")
    del result["mqar"]["transformer"]["accuracy"]["h2o:ctx/8"]
    assert not _has(result, "mqar", "transformer", specs) and not recall_complete(result, quick=True)
    assert _has(result, "passkey", "transformer", specs)


def test_the_committed_report_is_what_the_committed_results_give(tmp_path):
    """docs/reproductions.md is generated: rebuilt from benchmarks/results/repro-2026-11-26 it must come out the
    same, so the page never drifts from the numbers beside it."""
    pytest.importorskip("matplotlib")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "results").symlink_to(ROOT / "benchmarks" / "results" / "repro-2026-11-26")
    report = tmp_path / "docs" / "reproductions.md"
    out = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "o"), "--stage", "report",
                          "--report", str(report)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert report.read_text() == (ROOT / "docs" / "reproductions.md").read_text()


@pytest.mark.slow
def test_quick_run_writes_the_report(tmp_path):
    out_dir = tmp_path / "repro"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out_dir), "--quick"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = out_dir / "reproductions.md"
    text = report.read_text()
    # Experiment 1: the policy x budget table (budgets 1/64 .. 1/2 of the 512-byte quick context + full).
    assert "| policy | 8 (1/64) | 16 (1/32) | 32 (1/16) | 64 (1/8) | 128 (1/4) | 256 (1/2) | full (512) |" in text
    for label in ("| Window |", "| Window+4 sinks |", "| H2O |", "| TOVA-head |", "| TOVA |"):
        assert label in text
    assert "| layer | first token kept |" in text
    # Experiment 2 and 3 tables.
    assert "| MEGABYTE (`megabyte-8k`) |" in text and "bpb strided" in text
    assert "| GLA (`gla-2k`) |" in text and "state @ 8192" in text
    # Experiment 4 (a tiny random Llama folder stands in for the pretrained model): sweeps, kept positions, passkey.
    assert "| policy | 16 (1/16) | 32 (1/8) | 64 (1/4) | 128 (1/2) | full (256) |" in text
    assert "| layer | first token kept, TOVA(16) |" in text
    assert "| policy | length | full cache | ctx/16 | ctx/8 | ctx/4 | ctx/2 |" in text and "| TOVA | 512 |" in text
    # Experiment 5: every kind trained on MQAR, scored with and without bounded caches, state bytes at 16K.
    assert "| model | cache | params | state @ 16K | L=64, 2 pairs | L=64, 4 pairs |" in text
    assert "| Hybrid (GLA + attention layers) | tova:ctx/8 |" in text and "| GLA | own state |" in text
    # ... and trained on the corpus with passkey examples mixed in: held-out bpb and passkey accuracy.
    assert "| model | cache | params | held-out bpb | state @ 16K | passkey @ 240 |" in text
    assert "longseq train --out OUT/runs/recall-hybrid --model hybrid" in text
    assert "--passkey-mix 0.5 --passkey-answer-weight 30.0" in text
    # 30 steps teach the full Transformer neither task: the verdicts say the cells do not test the claim.
    assert text.count("so this cell does not test the claim") == 2
    recall = json.loads((out_dir / "results" / "recall.json").read_text())
    assert set(recall["mqar"]) == set(recall["passkey"]) == {"gla", "transformer", "hybrid", "megabyte"}
    for kind, m in recall["passkey"].items():
        assert 0 < m["val_bpb"] < 9, kind  # bits per byte of barely trained byte models
    assert "not run" not in text
    for name in ("tova", "megabyte", "gla"):
        assert (out_dir / "img" / f"repro-quick-{name}.png").stat().st_size > 1000
    tova = json.loads((out_dir / "results" / "tova.json").read_text())
    assert set(tova["budgets"]) == {8, 16, 32, 64, 128, 256} and len(tova["scores"]) == 31
    gla = json.loads((out_dir / "results" / "gla.json").read_text())
    states = gla["models"]["gla-2k"]["state_bytes"]
    assert len(set(states.values())) == 1  # the GLA state does not grow
    # Idempotent: a second run skips every stage and only rebuilds the report.
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert again.returncode == 0
    assert again.stdout.count("skipped") == 7
    assert report.read_text() == text

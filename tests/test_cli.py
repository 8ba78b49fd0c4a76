"""The ``longseq`` command line end to end (subprocess) and its user-error handling (exit 2, no traceback)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from longseq.cli import main
from longseq.evaluate import evaluate_bpb
from longseq.generate import generate
from longseq.models import GLALM, MODELS, Capabilities, GLAConfig, ModelSpec
from longseq.train import TrainConfig, load_model, train
from longseq.train.checkpoint import list_checkpoints
from test_train import make_corpus  # tests/ is on sys.path (pytest rootdir-relative imports)

TRAIN = [
    "--set",
    "n_layers=1",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--eval-tokens",
    "256",
    "--no-progress",
    "--device",
    "cpu",
    "--val-docs",
    "doc3",
]


def longseq(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "longseq", *args], capture_output=True, text=True, env=env, timeout=300, **kw
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("cli") / "corpus")


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("cli-run") / "run"
    train(
        TrainConfig(
            out=str(out),
            data=[str(corpus)],
            val_docs=["doc3"],
            overrides={"n_layers": 1},
            seq_len=32,
            batch_size=4,
            steps=4,
            eval_every=0,
            eval_tokens=256,
            progress=False,
            device="cpu",
        )
    )
    return out


@pytest.mark.slow
def test_train_eval_generate_plot(tmp_path, corpus):
    out = tmp_path / "run"
    proc = longseq(
        "train", "--out", str(out), "--data", str(corpus), "--steps", "6", "--eval-every", "3", *TRAIN
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file() and [p.name for p in list_checkpoints(out)] == [
        "step_00000003",
        "step_00000006",
    ]
    vals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in vals if "val_bpb" in r] == [3, 6]

    report = tmp_path / "eval.json"
    proc = longseq("eval", str(out), "--stride", "8", "--json", str(report), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(report.read_text())
    doc3 = np.frombuffer((corpus / "doc3.txt").read_bytes(), dtype=np.uint8)
    assert [d["name"] for d in result["documents"]] == ["doc3.txt"]
    assert result["seq_len"] == 32 and result["stride"] == 8 and result["bytes"] == len(doc3) - 1
    expected = evaluate_bpb(load_model(out), [("doc3.txt", doc3)], 32, 8)
    assert result["bpb"] == pytest.approx(expected.bpb, rel=1e-6)
    assert "doc3.txt" in proc.stdout and "overall" in proc.stdout

    prompt = "héllo wörld "
    proc = longseq("generate", str(out), "--prompt", prompt, "--max-new-tokens", "24", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    ids = generate(load_model(out), prompt, 24, temperature=0)
    assert proc.stdout == bytes(ids[0].tolist()).decode("utf-8", errors="replace") + "\n"
    assert "tokens/s" in proc.stderr

    png = tmp_path / "curves.png"
    proc = longseq("plot", str(out), str(out), "-o", str(png))
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sigint_saves_and_resume_continues(tmp_path, corpus):
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "longseq",
        "train",
        "--out",
        str(out),
        "--data",
        str(corpus),
        "--steps",
        "100000",
        "--eval-every",
        "0",
        "--log-every",
        "1",
        *TRAIN,
    ]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr and "interrupted at step" in stderr
    (ckpt,) = list_checkpoints(out)
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert ckpt.name == f"step_{last:08d}"
    proc = longseq("train", "--out", str(out), "--resume", "--steps", str(last + 2), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert list_checkpoints(out)[-1].name == f"step_{last + 2:08d}"


def test_generate_streams_partial_utf8(run, capsys, monkeypatch):
    text = "naïve €uro 𝄞 ok"

    def fake_generate(model, prompt, n, *a, on_token=None, **kw):
        for b in text.encode("utf-8"):  # one byte at a time: multibyte characters arrive in pieces
            on_token(torch.tensor([b]))

    monkeypatch.setattr(sys.modules["longseq.generate"], "generate", fake_generate)
    assert main(["generate", str(run), "--prompt", "x", "--no-echo"]) == 0
    assert capsys.readouterr().out == text + "\n"


@pytest.mark.parametrize("flags, mode", [([], False), (["--compile"], True), (["--fused"], "fused"),
                                          (["--compile", "--fused"], "fused")])
def test_generate_compile_flags_reach_generate(run, capsys, monkeypatch, flags, mode):
    """--compile / --fused are switches: they sit before the positional run directory without taking it."""
    seen = {}

    def fake_generate(model, prompt, n, *a, compile=None, on_token=None, **kw):
        seen["compile"] = compile
        on_token(torch.tensor([ord("k")]))

    monkeypatch.setattr(sys.modules["longseq.generate"], "generate", fake_generate)
    assert main(["generate", *flags, str(run), "--prompt", "x", "--no-echo"]) == 0
    assert seen["compile"] == mode
    assert capsys.readouterr().out == "k\n"


def test_generate_compile_on_a_trained_run_matches_the_plain_path(run, capsys, monkeypatch):
    """The real thing, not a fake: `longseq generate --compile` on a trained run (on the CPU: the static
    eager path, with a note) prints the same greedy continuation as the default path."""
    argv = [str(run), "--prompt", "To be", "--prompt", "or not", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(["generate", *argv]) == 0
    plain = capsys.readouterr().out
    monkeypatch.setattr(sys.modules["longseq.generate.api"], "_warned_cpu_compile", False)  # warns once per process
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device"):
        assert main(["generate", "--compile", *argv]) == 0
    assert capsys.readouterr().out == plain and plain.count("To be") == 1


def test_bench_reports_and_catches_oom(tmp_path, capsys, monkeypatch):
    report = tmp_path / "bench.json"
    argv = [
        "bench",
        "--models",
        "gla,transformer",
        "--presets",
        "tiny",
        "--seq-lens",
        "16,32",
        "--batch-tokens",
        "64",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--gen-prompt",
        "8",
        "--gen-tokens",
        "4",
        "--device",
        "cpu",
        "--json",
        str(report),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["torch"] == torch.__version__ and "cpu" in data["device"]
    rows = {(r["model"], r["seq_len"]): r for r in data["results"]}
    assert set(rows) == {("gla", 16), ("gla", 32), ("transformer", 16), ("transformer", 32)}
    assert rows[("gla", 32)]["train_batch"] == 2 and rows[("gla", 16)]["train_batch"] == 4
    assert all(r["train_tok_s"] > 0 and r["gen_tok_s"] > 0 for r in rows.values())
    assert out.count("\n| gla |") == 2 and "| model | preset |" in out

    import longseq.bench.train as bench

    def oom(*a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    monkeypatch.setattr(bench, "bench_train", oom)
    assert main(argv[:5] + ["--seq-lens", "16"] + argv[7:]) == 0
    row = json.loads(report.read_text())["results"][0]
    assert row["train_tok_s"] == "OOM" and row["gen_tok_s"] > 0


@pytest.mark.slow
def test_quickstart_short(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--steps", "3"]) == 0
    captured = capsys.readouterr()
    assert "overall" in captured.out and "sample" in captured.out and "ROMEO:" in captured.out
    assert "validation bits per byte" in captured.err


# ---------------------------------------------------------------------------------- user errors
@dataclass
class _PatchedConfig(GLAConfig):
    kind = "patched-gla"
    patch_size: int = 8


_PATCHED_SPEC = ModelSpec(
    "patched-gla", _PatchedConfig, GLALM, "GLA declaring a patch size",
    lambda cfg: Capabilities(frozenset({"recurrent"}), seq_multiple=cfg.patch_size),
)


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("longseq: error: ") and "Traceback" not in err
    return err


def test_train_user_errors(tmp_path, corpus, run, capsys, monkeypatch):
    out = str(tmp_path / "new")
    base = ["train", "--out", out, "--data", str(corpus), *TRAIN, "--steps", "2"]
    assert "missing.txt' does not exist" in _error(
        capsys, [*base[:4], str(tmp_path / "missing.txt"), *base[5:]]
    )
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_bytes(b"")
    (tmp_path / "empty" / "doc3.txt").write_bytes(b"")
    assert "is empty" in _error(capsys, [*base[:4], str(tmp_path / "empty"), *base[5:]])
    assert "seq_len=20000" in _error(capsys, [*base, "--seq-len", "20000"])
    assert "n_layerz" in _error(capsys, [*base, "--set", "n_layerz=3"])
    assert "'n_heads' expects int; got 'many'" in _error(capsys, [*base, "--set", "n_heads=many"])
    assert "FIELD=VALUE" in _error(capsys, [*base, "--set", "n_heads"])
    monkeypatch.setitem(MODELS, "patched-gla", _PATCHED_SPEC)
    assert "patch_size=8" in _error(capsys, [*base, "--model", "patched-gla", "--seq-len", "36"])
    assert not Path(out).exists()  # none of the above wrote anything

    existing = ["train", "--out", str(run), "--data", str(corpus), *TRAIN]
    assert "already exists" in _error(capsys, existing)
    assert "incompatible model config" in _error(capsys, [*existing, "--resume", "--set", "d_model=128"])
    assert "nothing to resume" in _error(capsys, [*base, "--resume"])


def test_checkpoint_user_errors(tmp_path, run, capsys):
    assert "does not exist" in _error(capsys, ["eval", str(tmp_path / "nope")])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"junk")
    assert "not a longseq checkpoint" in _error(capsys, ["generate", str(tmp_path / "junk"), "--prompt", "a"])
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    weights = list_checkpoints(broken)[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "truncated" in _error(capsys, ["eval", str(broken)])
    assert "truncated" in _error(capsys, ["generate", str(broken), "--prompt", "a"])
    assert "--stride must be in [1, seq-len=32]" in _error(capsys, ["eval", str(run), "--stride", "64"])


def test_user_error_in_a_real_process(tmp_path):
    proc = longseq("train", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "absent"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("longseq: error: data path") and "Traceback" not in proc.stderr


def test_eval_policy_sweep_writes_table_json_and_plot(tmp_path, corpus):
    out = tmp_path / "tr"
    train(
        TrainConfig(
            out=str(out), model="transformer", data=[str(corpus)], val_docs=["doc3"], overrides={"n_layers": 1},
            seq_len=32, batch_size=4, steps=3, eval_every=0, eval_tokens=256, progress=False, device="cpu",
        )
    )
    sweep_dir = tmp_path / "sweep"
    args = ["eval", str(out), "--policies", "tova,window,sink:sinks=2", "--budgets", "8,16", "--seq-len", "60"]
    assert main([*args, "--out-dir", str(sweep_dir), "--no-progress"]) == 0
    table = (sweep_dir / "sweep.md").read_text()
    assert all(name in table for name in ("tova", "window", "sink")) and "16" in table and "full" in table
    assert (sweep_dir / "sweep.png").stat().st_size > 0
    result = json.loads((sweep_dir / "sweep.json").read_text())
    # Independent reference for the full-cache column: a plain forward over the same first 60 bytes.
    model = load_model(out, "cpu").eval()
    doc = torch.tensor(list((corpus / "doc3.txt").read_bytes()[:60]))[None]
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(doc[:, :-1])[0], doc[0, 1:]).item()
    assert result["full"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert len(result["scores"]) == 3 and all(set(row) == {"8", "16"} for row in result["scores"].values())


def test_eval_sweep_rejects_bad_specs_before_loading(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing"), "--policies", "tova,lru", "--budgets", "8"]) == 2
    assert "unknown cache policy 'lru'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing"), "--policies", "tova"]) == 2
    assert "--budgets" in capsys.readouterr().err
    assert main(["eval", "--hf", str(tmp_path / "nope"), "--policies", "tova", "--budgets", "8"]) == 2
    assert "--data" in capsys.readouterr().err


def test_generate_refuses_an_empty_stop_before_loading_or_echoing(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "ROMEO:", "--stop", ""]) == 2
    captured = capsys.readouterr()
    assert "--stop: an empty stop string never matches" in captured.err and captured.out == ""


def test_stop_arguments_keep_utf8_and_decode_escapes():
    from longseq.cli import stop_bytes

    assert stop_bytes("é\\n") == "é\n".encode()
    assert stop_bytes("→") == "→".encode()
    assert stop_bytes("END\\x00") == b"END\x00"


def test_eval_sweep_on_a_gla_run_fails_before_loading(run, capsys):
    assert main(["eval", str(run), "--policies", "tova", "--budgets", "8", "--no-progress"]) == 2
    assert "gla model without softmax-attention caches" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_train_compile_trains_through_torch_compile(tmp_path, capsys):
    """`bench train --compile` times the training steps through torch.compile: dynamo compiles one graph (the
    one block's; generation, which follows on the same model, stays eager and compiles none), the steps still
    train (tok/s > 0), and the report and its table say so."""
    from torch._dynamo.utils import counters

    counters.clear()
    report = tmp_path / "bench.json"
    argv = ["bench", "--models", "gla", "--presets", "tiny", "--set", "n_layers=1", "--seq-lens", "16",
            "--batch-tokens", "32", "--steps", "1", "--warmup", "1", "--gen-prompt", "4", "--gen-tokens", "2",
            "--device", "cpu", "--compile", "--json", str(report)]
    assert main(argv) == 0
    assert counters["stats"]["unique_graphs"] == 1
    data = json.loads(report.read_text())
    assert data["compile"] is True and data["results"][0]["train_tok_s"] > 0
    assert data["results"][0]["gen_tok_s"] > 0
    assert "training compiled (torch.compile)" in capsys.readouterr().out

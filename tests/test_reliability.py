"""No silent wrong results, no partial run folders (issue 18): run configs, config ranges, eval settings and
result files, damaged checkpoints, signals during validation, divergence."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from longseq.cli import main
from longseq.models import MODELS, ModelConfig, build_model
from longseq.train import RunDirError, TrainConfig, load_model, train
from longseq.train import checkpoint as ck
from longseq.train.checkpoint import list_checkpoints
from test_train import SMALL_ARGS as SMALL
from test_train import WORDS, finished_run, make_corpus  # tests/ is on sys.path (pytest rootdir-relative imports)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("rel") / "corpus")


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (never modified: tests copy it)."""
    return finished_run(tmp_path_factory.mktemp("rel-run") / "run", corpus, steps=4, eval_every=2)


def _copy(run: Path, where: Path) -> Path:
    return Path(shutil.copytree(run, where / "run"))


def _error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must fail with status 2 and exactly one ``longseq: error:`` line."""
    capsys.readouterr()  # what earlier calls printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("longseq: error: ") and err.count("longseq: error:") == 1 and "Traceback" not in err
    return err


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(path.rglob("*"))}


# ----------------------------------------------------------------------- item 2: the run's config.json
@pytest.mark.parametrize("text, why", [
    ('{"format": "longseq-run", "model": {', "cannot read the run config"),
    ('{"format": "something-else", "train": {}}', "is not a longseq run config"),
    ('{"format": "longseq-run", "model": {}}', "lacks its 'model' or 'train' section"),
])
def test_resume_refuses_an_unreadable_run_config(tmp_path, run, capsys, text, why):
    out = _copy(run, tmp_path)
    (out / "config.json").write_text(text)
    before = _tree(out)
    err = _error(capsys, ["train", "--out", str(out), "--resume", "--steps", "6", "--no-progress"])
    assert why in err and str(out / "config.json") in err and "fix it, or delete it" in err
    cfg = TrainConfig(out=str(out), overrides={"n_layers": 1}, seq_len=32, batch_size=4, steps=6, progress=False)
    with pytest.raises(RunDirError, match=why):  # the Python API refuses too, instead of overwriting the file
        train(cfg, resume=True)
    assert _tree(out) == before  # config.json (and everything else) as it was


def test_resume_without_run_config_takes_the_checkpoints_settings(tmp_path, run, capsys):
    out = _copy(run, tmp_path)
    (out / "config.json").unlink()
    assert main(["train", "--out", str(out), "--resume", "--steps", "6", "--no-progress"]) == 0
    note = f"config.json is missing; resuming with the settings saved in {out / 'checkpoints' / 'step_00000004'}"
    assert note in capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())["train"]
    assert (saved["batch_size"], saved["seq_len"], saved["steps"]) == (4, 32, 6)  # not the defaults 16 and 256
    assert list_checkpoints(out)[-1].name == "step_00000006"


# ----------------------------------------------------------------------- item 3: config ranges
BAD_SETS = [
    ("gla", "n_heads=0", "'n_heads' must be >= 1; got 0"),
    ("gla", "n_heads=-2", "'n_heads' must be >= 1; got -2"),
    ("gla", "expand_k=-0.5", "'expand_k' must be > 0; got -0.5"),
    ("gla", "expand_v=0", "'expand_v' must be > 0; got 0.0"),
    ("gla", "expand_k=0.001", "key dim 0"),
    ("gla", "mlp_hidden=-5", "'mlp_hidden' must be >= 0"),
    ("gla", "norm_eps=-1", "'norm_eps' must be > 0; got -1.0"),
    ("gla", "norm_eps=nan", "'norm_eps' must be > 0; got nan"),
    ("gla", "init_std=0", "'init_std' must be > 0; got 0.0"),
    ("gla", "gate_normalizer=0", "'gate_normalizer' must be > 0"),
    ("gla", "gate_rank=0", "'gate_rank' must be >= 1"),
    ("gla", "vocab_size=10", "vocab_size=10 is too small for byte-level training"),
    ("transformer", "n_kv_heads=-1", "'n_kv_heads' must be >= 0"),
    ("transformer", "mlp_hidden=-5", "'mlp_hidden' must be >= 0"),
    ("transformer", "rope_theta=0", "'rope_theta' must be > 0"),
    ("transformer", "rope_theta=inf", "'rope_theta' must be > 0; got inf"),
    ("megabyte", "rope_theta=-1", "'rope_theta' must be > 0"),
    ("megabyte", "n_local_heads=0", "'n_local_heads' must be >= 1"),
    ("megabyte", "gla_backend=fast", "unknown GLA backend 'fast'"),
]


@pytest.mark.parametrize("kind, item, message", BAD_SETS)
def test_out_of_range_set_values_fail_before_any_work(tmp_path, corpus, capsys, kind, item, message):
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--data", str(corpus), *SMALL, "--model", kind, "--steps", "2"]
    if kind == "megabyte":  # its n_layers is derived from the two stacks' depths
        argv.remove("n_layers=1")
        argv.remove("--set")
    assert message in _error(capsys, [*argv, "--set", item])
    assert not out.exists()


@pytest.mark.parametrize("flag, message", [
    ("--lr=inf", "lr must be > 0; got inf"), ("--weight-decay=-0.1", "weight-decay must be >= 0"),
    ("--grad-clip=nan", "grad-clip must be >= 0"), ("--val-fraction=1.5", "val-fraction must be in [0, 1)"),
    ("--eval-tokens=-5", "eval-tokens must be >= 0 (0: all)"), ("--min-lr-ratio=nan", "min-lr-ratio"),
])
def test_out_of_range_training_flags_fail_before_any_work(tmp_path, capsys, flag, message):
    out = tmp_path / "run"
    assert message in _error(capsys, ["train", "--out", str(out), "--steps", "2", flag])
    assert not out.exists()


def test_every_numeric_config_field_has_a_range():
    """A field added without a bound would take any value: every int/float field of every kind's config
    (and the base) names its range, and its lower edge is refused just below it."""
    for cls in [ModelConfig, *(spec.config_class for spec in MODELS.values())]:
        bounds: dict = {}
        for klass in reversed(cls.__mro__):
            bounds.update(vars(klass).get("bounds", {}))
        for f in dataclasses.fields(cls):
            if f.type in ("int", "float", "int | None", "float | None"):
                assert f.name in bounds, f"{cls.__name__}.{f.name} has no range"
                if cls.presets:
                    below = bounds[f.name].low if bounds[f.name].strict else bounds[f.name].low - 1
                    with pytest.raises(ValueError, match=f"'{f.name}' must be"):
                        cls.from_preset("tiny", **{f.name: below})


def test_a_model_that_fails_to_build_leaves_no_run_folder(tmp_path, corpus, monkeypatch):
    import longseq.train.loop as loop

    def broken(cfg):
        raise RuntimeError("cannot build")

    monkeypatch.setattr(loop, "model_from_config", broken)
    cfg = TrainConfig(out=str(tmp_path / "run"), data=[str(corpus)], val_docs=["doc3"], seq_len=32, batch_size=4,
                      steps=2, progress=False, device="cpu")
    with pytest.raises(RuntimeError, match="cannot build"):
        train(cfg)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------- item 4: eval settings and files
@pytest.mark.parametrize("flags", [["--max-bytes", "0"], ["--seq-len", "0"], ["--stride", "0"], ["--stride=-4"],
                                   ["--batch-size", "0"], ["--seq-len", "0", "--policies", "tova", "--budgets", "8"]])
def test_eval_rejects_out_of_range_values(tmp_path, run, capsys, flags):
    out = _copy(run, tmp_path)
    before = _tree(out)
    assert f"{flags[0].split('=')[0]} must be >= 1" in _error(capsys, ["eval", str(out), *flags, "--no-progress"])
    assert _tree(out) == before


def _strict_json(path: Path):
    def refuse(constant):
        raise AssertionError(f"{path} holds a bare {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_eval_names_its_result_files_by_every_setting(tmp_path, run, corpus, capsys):
    out = _copy(run, tmp_path)
    assert main(["eval", str(out), "--no-progress"]) == 0
    full = out / "eval" / "step_00000004-val-T32-S32.json"
    full_text = full.read_text()
    assert main(["eval", str(out), "--max-bytes", "100", "--no-progress"]) == 0
    capped = _strict_json(out / "eval" / "step_00000004-val-T32-S32-B100.json")
    assert full.read_text() == full_text  # the full evaluation is still there, untouched
    assert capped["max_bytes"] == 100 and capped["bytes"] < _strict_json(full)["bytes"]
    assert main(["eval", str(out), "--val-docs", "doc2", "--no-progress"]) == 0
    assert main(["eval", str(out), "--data", str(corpus), "--no-progress"]) == 0
    names = sorted(p.name for p in (out / "eval").iterdir())
    assert len(names) == 4 and sum(name.startswith("step_00000004-val-T32-S32-D") for name in names) == 2
    assert full.read_text() == full_text


def test_eval_json_has_no_bare_nan(tmp_path, run, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "one-byte.txt").write_bytes(b"x")  # no byte to score: its bits per byte are undefined
    (docs / "text.txt").write_bytes(b" ".join(WORDS) * 4)
    report = tmp_path / "eval.json"
    assert main(["eval", str(run), "--data", str(docs), "--split", "all", "--json", str(report), "--no-progress"]) == 0
    result = _strict_json(report)
    per_doc = {d["name"]: d for d in result["documents"]}
    assert per_doc["one-byte.txt"]["bpb"] is None and per_doc["one-byte.txt"]["bytes"] == 0
    assert math.isfinite(result["bpb"]) and per_doc["text.txt"]["bpb"] == pytest.approx(result["bpb"])
    (docs / "text.txt").write_bytes(b"y")
    assert "nothing to score" in _error(capsys, ["eval", str(run), "--data", str(docs), "--split", "all",
                                                 "--json", str(tmp_path / "none.json"), "--no-progress"])
    assert not (tmp_path / "none.json").exists()


def test_result_json_writes_undefined_values_as_null():
    from longseq import jsonio

    text = jsonio.dumps({"bpb": float("nan"), "rows": [float("inf"), 1.5, (float("-inf"), 2)], "n": 3})
    assert json.loads(text) == {"bpb": None, "rows": [None, 1.5, [None, 2]], "n": 3} and "NaN" not in text


def test_eval_refuses_a_model_with_non_finite_outputs(tmp_path, run, capsys):
    ckpt = list_checkpoints(run)[-1]
    state = ck.load_model_state(ckpt)
    state["embed.weight"] = torch.full_like(state["embed.weight"], float("nan"))
    config = ck.read_config(ckpt)
    nan_run = tmp_path / "nan-run"
    ck.save_checkpoint(nan_run, 4, state, ck.load_train_state(ckpt), {k: config[k] for k in ("model", "train")})
    assert "bits per byte is nan" in _error(capsys, ["eval", str(nan_run), "--no-progress"])
    assert not (nan_run / "eval").exists()


# ----------------------------------------------------------------------- item 5: damaged checkpoints
def _damage(path: Path) -> None:
    """Overwrite the last 4 KiB (tensor data, not the header) with 0xFF: same size, loads without error."""
    data = bytearray(path.read_bytes())
    data[-4096:] = b"\xff" * 4096
    path.write_bytes(bytes(data))


def test_same_size_damage_is_detected_and_resume_takes_the_newest_intact(tmp_path, run, capsys):
    out = _copy(run, tmp_path)
    newest, intact = list_checkpoints(out)[-1], list_checkpoints(out)[-2]
    _damage(newest / "model.safetensors")
    for argv in (["eval", str(out), "--no-progress"], ["generate", str(out), "--prompt", "a"]):
        err = _error(capsys, argv)
        assert f"{newest} is corrupt: model.safetensors does not match" in err
        assert f"the newest intact checkpoint is {intact}" in err
    assert main(["eval", str(intact), "--no-progress"]) == 0  # the one named works
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--steps", "6", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"resuming from the newest intact checkpoint, {intact}" in err
    assert (out / "checkpoints" / f"damaged-{newest.name}" / "model.safetensors").is_file()  # kept, set aside
    assert [p.name for p in list_checkpoints(out)] == ["step_00000004", "step_00000006"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6  # metrics cut back to step 2, then continued


# ----------------------------------------------------------------------- item 6: signals during validation
def test_signal_in_the_final_validation_stops_it_and_reports_a_finished_run(tmp_path, corpus, capsys):
    def stop(step: int, loss: float) -> None:
        if step == 3:  # the last step: its validation comes next
            signal.raise_signal(signal.SIGTERM)

    cfg = TrainConfig(out=str(tmp_path / "run"), data=[str(corpus)], val_docs=["doc3"], overrides={"n_layers": 1},
                      seq_len=32, batch_size=4, steps=3, eval_every=0, eval_tokens=256, progress=False, device="cpu")
    result = train(cfg, on_step=stop)
    assert result.interrupted is None and result.signal == signal.SIGTERM and result.step == 3
    assert result.evals == {} and result.checkpoint == list_checkpoints(cfg.out)[-1]
    err = capsys.readouterr().err
    assert "training finished at step 3" in err and "validation was skipped" in err and "interrupted" not in err


@pytest.mark.slow
def test_sigterm_during_a_long_validation_acts_within_seconds(tmp_path, corpus):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    rng = np.random.default_rng(0)  # a 3 MB validation document: scoring it all takes about a minute
    (data / "big.txt").write_bytes(b" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 600_000)))
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--data", str(data), "--val-docs", "big", "--steps", "2", "--eval-every", "0",
            "--eval-tokens", "0", "--log-every", "1", "--seq-len", "256", "--batch-size", "4", "--set", "n_layers=1",
            "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "longseq", *argv], stderr=subprocess.PIPE, text=True, env=env)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and (not metrics.exists() or '"step": 2' not in metrics.read_text()):
        time.sleep(0.1)
    time.sleep(1.0)  # validation is under way
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert time.perf_counter() - t0 < 10, stderr
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr
    assert "training finished at step 2" in stderr and "interrupted" not in stderr
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002"]
    assert not any("val_bpb" in line for line in metrics.read_text().splitlines())


# ----------------------------------------------------------------------- item 8: divergence
def test_divergence_is_a_clear_error_not_a_traceback(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    err = _error(capsys, ["train", "--out", str(out), "--data", str(corpus), *SMALL, "--steps", "20", "--lr=1e30",
                          "--warmup", "0", "--grad-clip", "0"])
    assert "training loss is" in err and "lower --lr" in err


def test_old_checkpoints_without_checksums_still_load(tmp_path):
    torch.manual_seed(0)
    model = build_model("gla", "tiny", n_layers=1)
    config = {"model": {"kind": "gla", "config": model.config.to_dict()}, "train": {"seq_len": 16}}
    path = ck.save_checkpoint(tmp_path / "run", 1, model.state_dict(), {"step": 1}, config)
    manifest = json.loads((path / "manifest.json").read_text())
    old = {"format": manifest["format"], "files": {k: v["size"] for k, v in manifest["files"].items()}}
    (path / "manifest.json").write_text(json.dumps(old))  # what checkpoints before checksums hold
    loaded = load_model(tmp_path / "run")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ck.CheckpointError, match="truncated or corrupt: model.safetensors"):  # sizes still checked
        load_model(path)

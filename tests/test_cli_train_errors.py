"""The CLI review's findings on ``train``, ``bench``, ``plot`` and ``quickstart``: contradictory or meaningless
flags are refused before any work (exit status 2, one ``longseq: error:`` line naming the flag and value, nothing
written), the paths reported are the files written, and checkpoint files get the umask's mode.

The CLI runs in-process (``longseq.cli.main``) and every run is a few steps of a one-layer tiny model."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from longseq.bench.decode import run_decode_bench
from longseq.cli import main
from longseq.models import HybridConfig, build_model
from longseq.train import RunDirError, TrainConfig, train
from longseq.train.checkpoint import list_checkpoints, save_checkpoint
from longseq.train.distributed import pick_device
from test_train import SMALL_ARGS as SMALL
from test_train import finished_run, make_corpus  # tests/ is on sys.path (pytest rootdir-relative imports)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("train-errors") / "corpus")


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus) -> Path:
    """A finished 2-step run (never modified: tests that change it work on a copy)."""
    return finished_run(tmp_path_factory.mktemp("train-errors-run") / "run", corpus, steps=2)


def _error(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit with status 2 and exactly one ``longseq: error:`` line, no traceback."""
    capsys.readouterr()  # what earlier calls printed
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("longseq: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert captured.out == ""
    return err


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(path.rglob("*"))}


# --------------------------------------------------------------------- 1: resuming to a step already reached
def test_resume_to_steps_already_reached_is_refused_and_changes_nothing(tmp_path, run, corpus, capsys):
    out = Path(shutil.copytree(run, tmp_path / "run"))
    before = _tree(out)
    for steps in (1, 2):  # below the saved step 2, and at it
        argv = ["train", "--out", str(out), "--data", str(corpus), "--resume", "--steps", str(steps), *SMALL]
        err = _error(capsys, argv)
        assert f"--steps {steps}" in err and "already at step 2" in err and "greater than 2" in err
        assert _tree(out) == before  # config.json keeps "steps": 2, so a plain --resume is not broken either
        cfg = TrainConfig(out=str(out), data=[str(corpus)], val_docs=["doc3"], overrides={"n_layers": 1},
                          seq_len=32, batch_size=4, steps=steps, progress=False, device="cpu")
        with pytest.raises(RunDirError, match="already at step 2"):  # the Python API refuses too
            train(cfg, resume=True)
        assert _tree(out) == before
    # Past the saved step, resuming trains on.
    assert main(["train", "--out", str(out), "--data", str(corpus), "--resume", "--steps", "3", *SMALL]) == 0
    assert list_checkpoints(out)[-1].name == "step_00000003"
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 3


# ------------------------------------------------------------------------------------- 2: a bad --device
@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cuda:-1", "meta", "CPU"])
def test_pick_device_names_the_flag_value_and_the_accepted_forms(device):
    with pytest.raises(ValueError, match=rf"--device '{device}' is not a device .*cpu, cuda, cuda:N"):
        pick_device(device)


def test_pick_device_refuses_a_gpu_number_the_machine_lacks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 ... cuda:1"):
        pick_device("cuda:2")


@pytest.mark.parametrize("device", ["tpu", "cuda:x"])
def test_every_command_turns_a_bad_device_into_one_error_line(tmp_path, run, corpus, capsys, device):
    new = tmp_path / "new"
    commands = [
        ["train", "--out", str(new), "--data", str(corpus), "--steps", "1", *SMALL, "--device", device],
        ["eval", str(run), "--max-bytes", "64", "--no-progress", "--device", device],
        ["generate", str(run), "--prompt", "a", "--max-new-tokens", "2", "--device", device],
        ["bench", "--models", "gla", "--seq-lens", "16", "--steps", "1", "--device", device],
        ["bench", "decode", "--models", "gla", "--contexts", "16", "--gen-tokens", "1", "--device", device],
    ]
    for argv in commands:
        err = _error(capsys, argv)
        assert f"--device '{device}'" in err and "cuda:N" in err, (argv, err)
    assert not new.exists()  # refused before the run directory was made


# ------------------------------------------------------------------------------- 3: contradictory flags
def test_hybrid_refuses_attn_every_with_attn_layers(tmp_path, corpus, capsys, monkeypatch):
    with pytest.raises(ValueError, match="attn_every=2 and attn_layers=0 contradict each other"):
        HybridConfig.check_overrides({"attn_every": "2", "attn_layers": "0"})
    HybridConfig.check_overrides({"attn_layers": "0"})  # alone: fine
    HybridConfig.check_overrides({"attn_every": "0", "attn_layers": "1"})  # attn_every=0: "only attn_layers"
    both = ["--set", "attn_every=2", "--set", "attn_layers=0"]
    new = tmp_path / "new"
    err = _error(capsys, ["train", "--out", str(new), "--data", str(corpus), "--steps", "1", "--model", "hybrid",
                          *SMALL, *both])
    assert "attn_every=2 and attn_layers=0" in err
    assert not new.exists()
    with pytest.raises(ValueError, match="attn_every=2 and attn_layers=0"):  # the Python API's new runs too
        train(TrainConfig(out=str(new), model="hybrid", overrides={"attn_every": 2, "attn_layers": "0"}))
    assert not new.exists()
    monkeypatch.chdir(tmp_path)
    for mode in (["train", "--seq-lens", "16"], ["decode", "--contexts", "16"]):
        err = _error(capsys, ["bench", *mode, "--models", "hybrid", "--device", "cpu", *both])
        assert "attn_every=2 and attn_layers=0" in err
    assert not os.listdir(tmp_path)  # nothing written, by train or bench
    with pytest.raises(ValueError, match="attn_every=2 and attn_layers=0"):  # and build_model
        build_model("hybrid", "tiny", attn_every=2, attn_layers="0")
    assert build_model("hybrid", "tiny", attn_layers="0").config.attention_layers() == [0]


def test_val_docs_with_val_fraction_is_refused(tmp_path, corpus, capsys):
    with pytest.raises(ValueError, match="--val-docs doc3 and --val-fraction 0.5 contradict each other"):
        TrainConfig(val_docs=["doc3"], val_fraction=0.5)
    new = tmp_path / "new"
    err = _error(capsys, ["train", "--out", str(new), "--data", str(corpus), "--steps", "1", *SMALL,
                          "--val-fraction", "0.5"])
    assert "--val-docs doc3 and --val-fraction 0.5" in err
    assert not new.exists()


def test_a_run_saved_with_both_val_settings_still_resumes(tmp_path, run, corpus):
    """Runs saved before the refusal may hold both (their split used the documents): they stay resumable."""
    out = Path(shutil.copytree(run, tmp_path / "run"))
    config = json.loads((out / "config.json").read_text())
    config["train"]["val_fraction"] = 0.5
    (out / "config.json").write_text(json.dumps(config))
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())["train"]
    assert saved["val_docs"] == ["doc3"] and saved["val_fraction"] is None


@pytest.mark.parametrize("argv, named", [
    (["bench", "decode", "--steps", "5"], ["--steps (here: --gen-tokens)", "of bench train only"]),
    (["bench", "decode", "--seq-lens", "64", "--gen-batch", "2"], ["--seq-lens", "--gen-batch"]),
    (["bench", "train", "--contexts", "64"], ["--contexts (here: --seq-lens", "of bench decode only"]),
    (["bench", "--policies", "full", "--fused", "--batch-sizes", "2"], ["--policies", "--fused", "--batch-sizes"]),
    (["bench", "--compile", "--warmup", "0"], ["--compile needs --warmup >= 1", "got --warmup 0"]),
    (["bench", "--memory-limit-gib", "8", "--jsonl", "x.jsonl"], ["--memory-limit-gib", "--jsonl (here: --json)"]),
])
def test_bench_refuses_the_other_modes_flags(tmp_path, capsys, monkeypatch, argv, named):
    monkeypatch.chdir(tmp_path)
    err = _error(capsys, [*argv, "--models", "gla", "--device", "cpu"])
    assert all(name in err for name in named), err
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------- 4: plot's output path
def _metrics_dir(root: Path) -> Path:
    root.mkdir()
    records = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0, "val_bpb": 6.0}]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_plot_reports_the_file_it_wrote(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    runs = _metrics_dir(tmp_path / "run")
    assert main(["plot", str(runs), "-o", str(tmp_path / "figs" / "noext")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'figs' / 'noext.png'}\n"
    assert os.listdir(tmp_path / "figs") == ["noext.png"]
    assert (tmp_path / "figs" / "noext.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_refuses_a_directory_or_an_unknown_format(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    runs = _metrics_dir(tmp_path / "run")
    (tmp_path / "figs").mkdir()
    before = sorted(os.listdir(tmp_path))
    err = _error(capsys, ["plot", str(runs), "-o", str(tmp_path / "figs")])
    assert f"-o {tmp_path / 'figs'} names a directory" in err
    assert "names a directory" in _error(capsys, ["plot", str(runs), "-o", str(tmp_path / "new") + "/"])
    assert "cannot write '.txtx' images" in _error(capsys, ["plot", str(runs), "-o", str(tmp_path / "a.txtx")])
    (tmp_path / "notes.txt").write_text("x")  # a file where the image's folder would be made
    err = _error(capsys, ["plot", str(runs), "-o", str(tmp_path / "notes.txt" / "c.png")])
    assert f"{tmp_path / 'notes.txt'} is a file, so no folder can be made there" in err
    assert sorted(os.listdir(tmp_path)) == sorted([*before, "notes.txt"]) and not os.listdir(tmp_path / "figs")


# ------------------------------------------------------------------------------- 5: quickstart --resume
@pytest.fixture
def small_quickstart(monkeypatch):
    """The quickstart at a test's size: shorter windows and batches, and a few KB evaluated."""
    import longseq.train.quickstart as qs

    for key, value in dict(seq_len=32, batch_size=4, eval_every=0, eval_tokens=512, warmup=1, log_every=1).items():
        monkeypatch.setitem(qs.QUICKSTART, key, value)
    documents = qs.corpus_documents
    monkeypatch.setattr(qs, "corpus_documents", lambda corpus, ids, max_bytes=None: documents(corpus, ids, 2048))
    return qs


def test_quickstart_resume_continues_an_interrupted_run(tmp_path, capsys, monkeypatch, small_quickstart):
    out = str(tmp_path / "qs")
    train_fn = small_quickstart.train

    def interrupted_at_2(cfg, **kw):
        def on_step(step, loss):
            if step == 2:
                signal.raise_signal(signal.SIGINT)  # Ctrl-C: the loop saves and stops
        return train_fn(cfg, on_step=on_step, **kw)

    monkeypatch.setattr(small_quickstart, "train", interrupted_at_2)
    assert main(["quickstart", "--out", out, "--steps", "4"]) == 128 + signal.SIGINT
    command = f"longseq quickstart --out {out} --steps 4 --resume"
    assert f"continue the quickstart with: {command}" in capsys.readouterr().err
    monkeypatch.setattr(small_quickstart, "train", train_fn)
    assert main(command.split()[1:]) == 0
    captured = capsys.readouterr()
    assert "overall" in captured.out and "ROMEO:" in captured.out and "validation bits per byte" in captured.err
    assert [p.name for p in list_checkpoints(out)] == ["step_00000004"]
    losses = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [1, 2, 3, 4]  # continued, not started again
    # Trained all its steps already: --resume (its steps read from the run) only evaluates and samples.
    assert main(["quickstart", "--out", out, "--resume"]) == 0
    assert "already trained to step 4" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(out)] == ["step_00000004"]


# ------------------------------------------------------------------------------------ 6: bench decode flags
@pytest.mark.parametrize("flags, named", [
    (["--memory-limit-gib", "-1"], "--memory-limit-gib must be a positive number of GiB; got -1.0"),
    (["--memory-limit-gib", "0"], "--memory-limit-gib must be a positive number of GiB; got 0.0"),
    (["--memory-limit-gib", "nan"], "--memory-limit-gib must be a positive number of GiB; got nan"),
    (["--contexts", "-64"], "--contexts must be positive integers; got -64"),
    (["--batch-sizes", "0,max"], "--batch-sizes must be positive integers or 'max'; got 0,max"),
    (["--max-batch", "0"], "--max-batch must be >= 1; got 0"),
    (["--gen-tokens", "0"], "--gen-tokens must be >= 1; got 0"),
    (["--warmup", "-1"], "--warmup must be >= 0; got -1"),
])
def test_bench_decode_names_the_bad_flag(tmp_path, capsys, monkeypatch, flags, named):
    monkeypatch.chdir(tmp_path)
    assert named in _error(capsys, ["bench", "decode", "--models", "gla", "--device", "cpu", *flags])
    assert not os.listdir(tmp_path)


def test_bench_train_names_seq_lens(capsys):
    for value in ("-64", "0,16"):
        err = _error(capsys, ["bench", "--models", "gla", "--seq-lens", value, "--device", "cpu"])
        assert "--seq-lens must be positive integers" in err and "--warmup" not in err


def test_bench_decode_says_what_max_means_off_cuda(tmp_path, capsys):
    report = tmp_path / "decode.json"
    argv = ["bench", "decode", "--models", "gla", "--contexts", "8", "--batch-sizes", "max", "--max-batch", "2",
            "--gen-tokens", "1", "--warmup", "0", "--device", "cpu", "--json", str(report)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    (note,) = json.loads(report.read_text())["notes"]
    assert note == ("on cpu, batch size 'max' is --max-batch (2) itself: the search for the largest batch that "
                    "fits probes memory on CUDA only")
    assert f"Note: {note}" in out
    with pytest.raises(ValueError, match="memory_limit_gib .* must be a positive number; got -1"):
        run_decode_bench(["gla"], ["tiny"], [8], [1], ["full"], device="cpu", memory_limit_gib=-1)


# ------------------------------------------------------------------------------ 7: checkpoint file modes
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_files_get_the_umasks_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        ckpt = save_checkpoint(tmp_path / "run", 1, {"w": torch.zeros(2)}, {"step": 1}, {"model": {}, "train": {}})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in ckpt.iterdir()}
    assert modes == dict.fromkeys(["model.safetensors", "train_state.pt", "config.json", "manifest.json"],
                                  0o666 & ~umask)


@pytest.mark.parametrize("mode", [[], ["decode"]], ids=["train", "decode"])
def test_bench_refuses_a_report_path_that_is_a_folder_before_running(tmp_path, capsys, monkeypatch, mode):
    import longseq.bench.decode as bench_decode
    import longseq.bench.train as bench_train

    def ran(*args, **kwargs):
        raise AssertionError("the benchmark ran before its output path was checked")

    monkeypatch.setattr(bench_train, "run_bench", ran)
    monkeypatch.setattr(bench_decode, "run_decode_bench", ran)
    assert main(["bench", *mode, "--json", str(tmp_path), "--device", "cpu"]) == 2
    assert f"--json {tmp_path} is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["same-file", "foreign-json", "foreign-jsonl"])
def test_bench_refuses_report_paths_that_would_lose_a_file_before_running(tmp_path, capsys, monkeypatch, case):
    import longseq.bench.decode as bench_decode

    def ran(*args, **kwargs):
        raise AssertionError("the benchmark ran before its output paths were checked")

    monkeypatch.setattr(bench_decode, "run_decode_bench", ran)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    flags, message = {
        "same-file": (["--json", str(tmp_path / "r"), "--jsonl", str(tmp_path / "r")], "name the same file"),
        "foreign-json": (["--json", str(notes)], "is not an earlier bench report"),
        "foreign-jsonl": (["--jsonl", str(notes)], "is not an earlier bench report"),
    }[case]
    assert main(["bench", "decode", *flags, "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err
    assert notes.read_text() == "my notes" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_bench_replaces_its_own_earlier_reports(tmp_path):
    from longseq.cli.bench import _is_bench_jsonl, _is_bench_report

    report = tmp_path / "r.json"
    report.write_text(json.dumps({"command": "longseq bench decode", "results": []}))
    lines = tmp_path / "r.jsonl"
    lines.write_text(json.dumps({"command": "longseq bench decode --jsonl r.jsonl", "ms_per_step": 1.0}) + "\n")
    assert _is_bench_report(report) and _is_bench_jsonl(lines)
    assert not _is_bench_report(lines) and not _is_bench_jsonl(report.with_name("missing.jsonl"))

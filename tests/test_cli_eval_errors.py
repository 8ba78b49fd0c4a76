"""``longseq eval``'s user errors and output files: every output path, flag combination and document choice is
checked before a model is opened, nothing saved is overwritten unasked, and the documents scored are the ones
named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from longseq.cli import main
from longseq.cli.common import write_json
from longseq.models import build_model
from longseq.sweep import SweepResult, run_sweep, write_atomically
from longseq.tasks.passkey import plan_rows
from longseq.train import TrainConfig, train
from longseq.train.checkpoint import list_checkpoints
from test_train import make_corpus  # tests/ is on sys.path (pytest rootdir-relative imports)


def _train(out: Path, corpus: Path, **kw) -> Path:
    settings = dict(val_docs=["doc3"]) | kw
    train(TrainConfig(out=str(out), model="transformer", data=[str(corpus)], overrides={"n_layers": 1}, seq_len=32,
                      batch_size=2, steps=1, eval_every=0, eval_tokens=64, progress=False, device="cpu", **settings))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("eval-errors") / "corpus")


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus) -> Path:
    return _train(tmp_path_factory.mktemp("eval-errors-run") / "run", corpus)


@pytest.fixture
def no_model(monkeypatch):
    """Opening a model fails the test: the errors below must come before any model is loaded."""

    def opened(*args, **kwargs):
        raise AssertionError("a model was opened before the bad input was refused")

    monkeypatch.setattr("longseq.train.checkpoint.load_model", opened)
    monkeypatch.setattr("longseq.sources.open_model", opened)


def _files(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("longseq: error: ") and "Traceback" not in err
    return err


# ----------------------------------------------------------------------- 1: output targets checked up front
@pytest.mark.parametrize("case", ["task-out-file", "task-out-dir-file", "sweep-out-file", "json-config",
                                  "json-folder", "json-in-checkpoint", "json-under-a-file", "json-foreign-file",
                                  "task-two-folders", "sweep-two-folders"])
def test_output_targets_are_refused_before_any_work(run, tmp_path, capsys, no_model, case):
    config = run / "config.json"
    ckpt = list_checkpoints(run)[-1]
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    task = ["--task", "passkey", "--lengths", "256", "--trials", "1", "--depths", "0.5"]
    sweep = ["--policies", "tova", "--budgets", "8"]
    argv, message = {
        "task-out-file": ([*task, "--out", str(config)], f"--out {config} is a file, not a folder"),
        "task-out-dir-file": ([*task, "--out-dir", str(config)], f"--out-dir {config} is a file, not a folder"),
        "sweep-out-file": ([*sweep, "--out-dir", str(config)], f"--out-dir {config} is a file, not a folder"),
        "json-config": (["--json", str(config)], "it is a run's or checkpoint's own config.json"),
        "json-folder": (["--json", str(tmp_path)], f"--json {tmp_path} is a folder"),
        "json-in-checkpoint": (["--json", str(ckpt / "eval.json")], f"it is inside checkpoint {ckpt}"),
        "json-under-a-file": (["--json", str(notes / "eval.json")], f"{notes} is a file"),
        "json-foreign-file": (["--json", str(notes)], "already exists and is not an earlier eval result"),
        "task-two-folders": ([*task, "--out", str(tmp_path / "a"), "--out-dir", str(tmp_path / "b")],
                             "name two folders"),
        "sweep-two-folders": ([*sweep, "--out", str(tmp_path / "a"), "--out-dir", str(tmp_path / "b")],
                              "name two folders"),
    }[case]
    before = _files(run, tmp_path)
    assert message in _error(capsys, ["eval", str(run), *argv, "--device", "cpu", "--no-progress"])
    assert _files(run, tmp_path) == before  # config.json and the notes intact, nothing new anywhere


def test_a_repeated_eval_replaces_its_own_result_and_says_so(run, tmp_path, capsys):
    report = tmp_path / "eval.json"
    argv = ["eval", str(run), "--max-bytes", "64", "--json", str(report), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    first = report.read_text()
    capsys.readouterr()
    assert main(argv) == 0
    assert f"note: --json {report} exists: the eval result replaces it" in capsys.readouterr().err
    assert json.loads(report.read_text()) == json.loads(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]  # no temporary file left behind


def test_write_json_never_replaces_a_run_file(run):
    """``bench --json`` writes through write_json after its work: it must still never replace a run's file."""
    config = run / "config.json"
    before = config.read_bytes()
    with pytest.raises(FileExistsError, match="own config.json"):
        write_json(config, {"results": []})
    assert config.read_bytes() == before


def test_a_failed_write_keeps_the_earlier_file(tmp_path):
    target = tmp_path / "sweep.png"
    target.write_bytes(b"earlier plot")

    def half_written(tmp: Path) -> None:
        tmp.write_bytes(b"half a plo")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(target, half_written)
    assert target.read_bytes() == b"earlier plot" and [p.name for p in tmp_path.iterdir()] == ["sweep.png"]
    write_atomically(target, lambda tmp: tmp.write_bytes(b"new plot"))
    assert target.read_bytes() == b"new plot" and [p.name for p in tmp_path.iterdir()] == ["sweep.png"]


def test_a_sweep_whose_plot_fails_keeps_the_earlier_plot(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.png").write_bytes(b"earlier plot")

    def failing_plot(self, path, metric="ppl"):
        Path(path).write_bytes(b"half a plo")
        raise RuntimeError("plot failed")

    monkeypatch.setattr(SweepResult, "plot", failing_plot)
    model = build_model("transformer", "tiny").eval()
    with pytest.raises(RuntimeError, match="plot failed"):
        run_sweep(model, [("a", b"some text to score" * 2)], ["window"], [8], out_dir=out)
    assert (out / "sweep.png").read_bytes() == b"earlier plot"
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json", "sweep.md", "sweep.png"]


# ----------------------------------------------------------------------- 2: a spec's own budget
@pytest.mark.parametrize("extra", [[], ["--task", "passkey", "--lengths", "256"]])
def test_a_policy_spec_with_its_own_budget_is_refused(tmp_path, capsys, extra):
    err = _error(capsys, ["eval", str(tmp_path / "missing"), *extra, "--policies", "window,tova:32",
                          "--budgets", "16"])
    assert "--policies: policy 'tova:32' carries its own budget (32)" in err and "put 32 in --budgets" in err


def test_the_library_grids_refuse_a_spec_with_its_own_budget():
    model = build_model("transformer", "tiny").eval()
    with pytest.raises(ValueError, match="carries its own budget"):
        run_sweep(model, [("a", b"some text to score")], ["sink:32:sinks=2"], [16])
    with pytest.raises(ValueError, match="write 'sink:sinks=2'"):
        plan_rows(["sink:32:sinks=2"], [16])


# ----------------------------------------------------------------------- 3: flags of another mode
@pytest.mark.parametrize("flags, message", [
    (["--out-dir", "o"], "--out-dir does not apply to plain evaluation"),
    (["--out", "o"], "--out does not apply to plain evaluation"),
    (["--metric", "ppl"], "--metric does not apply to plain evaluation"),
    (["--policies", "tova", "--budgets", "8", "--json", "r.json"], "--json does not apply to a policy sweep"),
    (["--policies", "tova", "--budgets", "8", "--stride", "4", "--batch-size", "2"],
     "--stride, --batch-size do not apply to a policy sweep"),
    (["--task", "passkey", "--lengths", "256", "--split", "train"], "--split does not apply to --task passkey"),
    (["--task", "passkey", "--lengths", "256", "--metric", "loss"], "--metric does not apply to --task passkey"),
    (["--task", "passkey", "--lengths", "256", "--data", "d.txt", "--seq-len", "64"],
     "--data, --seq-len do not apply to --task passkey"),
])
def test_flags_another_mode_reads_are_refused(tmp_path, capsys, flags, message):
    assert message in _error(capsys, ["eval", str(tmp_path / "missing"), *flags])


def test_hf_sweep_refuses_flags_it_ignores(tmp_path, capsys):
    err = _error(capsys, ["eval", "--hf", str(tmp_path / "hf"), "--policies", "tova", "--budgets", "8",
                          "--max-bytes", "100", "--split", "val"])
    assert "--split, --max-bytes do not apply to an --hf sweep" in err


@pytest.mark.parametrize("task", [False, True])
def test_a_folder_holding_other_files_of_the_same_names_is_refused(run, tmp_path, capsys, no_model, task):
    out = tmp_path / "out"
    out.mkdir()
    name = "passkey.md" if task else "sweep.json"
    (out / name).write_text("someone else's file")
    mode = ["--task", "passkey", "--lengths", "256"] if task else ["--policies", "tova", "--budgets", "8"]
    err = _error(capsys, ["eval", str(run), *mode, "--out", str(out), "--device", "cpu"])
    assert f"--out {out} already holds {name}, not an earlier" in err
    assert (out / name).read_text() == "someone else's file"


def test_a_sweep_into_its_earlier_folder_names_the_files_it_replaces(run, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["eval", str(run), "--policies", "window", "--budgets", "8", "--seq-len", "40", "--out-dir", str(out),
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0
    assert f"replacing {out / 'sweep.md'}, {out / 'sweep.json'}, {out / 'sweep.png'}" in capsys.readouterr().err


# ----------------------------------------------------------------------- 4: only the full cache
def test_a_sweep_of_only_the_full_cache_has_its_row():
    """The one row holds the document's loss, recomputed here from a plain forward pass."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = build_model("transformer", "tiny").double().eval()
    text = b"some text to score" * 2
    result = run_sweep(model, [("a", text)], ["full"], [16])
    ids = torch.tensor(list(text))
    with torch.no_grad():
        want = F.cross_entropy(model(ids[None])[0, :-1], ids[1:]).item()
    assert result.full.tokens == len(text) - 1 and abs(result.full.loss - want) < 1e-9
    assert f"| full | - | {want:.4f} |" in result.to_markdown("loss").splitlines()


# ----------------------------------------------------------------------- 5: eval's own flags in its errors
def test_too_few_documents_for_a_split_names_evals_flags(run, tmp_path, capsys, no_model):
    doc = tmp_path / "one.txt"
    doc.write_text("a single document")
    err = _error(capsys, ["eval", str(run), "--data", str(doc), "--device", "cpu"])
    assert "--split all" in err and "--val-docs" in err and "--val-fraction" not in err


# ----------------------------------------------------------------------- 6: the run's held-out documents
def _scored(capsys, run: Path, report: Path, *flags: str) -> tuple[list[str], str | None]:
    """The documents an eval scored and the note it printed (and wrote) about them."""
    assert main(["eval", str(run), *flags, "--json", str(report), "--device", "cpu", "--no-progress"]) == 0
    result = json.loads(report.read_text())
    out = capsys.readouterr().out
    note = result.get("split_note")
    assert note is None or f"note: {note}" in out
    return [d["name"] for d in result["documents"]], note


def test_eval_on_other_data_scores_the_runs_held_out_documents(run, corpus, tmp_path, capsys):
    copy = shutil.copytree(corpus, tmp_path / "copy")  # the same documents, from another folder
    names, note = _scored(capsys, run, tmp_path / "val.json", "--data", str(copy))
    assert names == ["doc3.txt"]
    assert "the run's held-out documents found in --data (doc3)" in note
    names, _ = _scored(capsys, run, tmp_path / "train.json", "--data", str(copy), "--split", "train")
    assert names == ["doc0.txt", "doc1.txt", "doc2.txt"]
    (copy / "doc3.txt").unlink()  # none of them left: a hash split, said to be one
    names, note = _scored(capsys, run, tmp_path / "none.json", "--data", str(copy))
    assert names == ["doc1.txt"]  # the hash split of doc0..doc2
    assert "--data holds none of the run's held-out documents (doc3)" in note and "may include documents" in note


def test_a_sweep_keeps_its_split_note_in_its_files(run, corpus, tmp_path, capsys):
    """The note that says which documents a sweep scored travels with its table, not only to the terminal."""
    copy = shutil.copytree(corpus, tmp_path / "copy")
    (copy / "doc3.txt").unlink()  # none of the run's held-out documents: a hash split, said to be one
    out = tmp_path / "sweep"
    assert main(["eval", str(run), "--data", str(copy), "--policies", "window", "--budgets", "8",
                 "--seq-len", "32", "--out-dir", str(out), "--device", "cpu", "--no-progress"]) == 0
    note = json.loads((out / "sweep.json").read_text())["note"]
    assert "--data holds none of the run's held-out documents (doc3)" in note
    assert f"note: {note}" in (out / "sweep.md").read_text() and f"note: {note}" in capsys.readouterr().err


def test_a_run_that_held_out_a_fraction_is_scored_on_that_fraction(corpus, tmp_path, capsys):
    run = _train(tmp_path / "run", corpus, val_docs=None, val_fraction=0.25)  # holds out doc1 of doc0..doc3
    more = make_corpus(tmp_path / "more", n_docs=8)  # a hash split of these 8 would hold out doc1 and doc6
    names, note = _scored(capsys, run, tmp_path / "val.json", "--data", str(more))
    assert names == ["doc1.txt"]
    assert "the run's held-out documents found in --data (doc1.txt)" in note


# ----------------------------------------------------------------------- 7: --max-bytes, --filler
def test_max_bytes_scores_at_most_that_many_bytes(run, corpus, tmp_path, capsys):
    report = tmp_path / "eval.json"
    argv = ["eval", str(run), "--split", "all", "--max-bytes", "101", "--json", str(report), "--device", "cpu",
            "--no-progress"]
    assert main(argv) == 0
    result = json.loads(report.read_text())
    assert result["bytes"] == 101 and [d["bytes"] for d in result["documents"]] == [26, 25, 25, 25]


def test_a_filler_folder_is_named_as_a_folder(run, tmp_path, capsys, no_model):
    err = _error(capsys, ["eval", str(run), "--task", "passkey", "--lengths", "256", "--filler", str(tmp_path)])
    assert f"--filler: {tmp_path} is a folder" in err

"""Checkpoints: round trip, tied weights, atomic saves under crashes, pruning, damaged files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from longseq.models import build_model
from longseq.train import CheckpointError, load_model
from longseq.train import checkpoint as ck


def _save(run: Path, step: int, model, keep=None) -> Path:
    config = {
        "model": {"kind": model.config.kind, "config": model.config.to_dict()},
        "train": {"seq_len": 16},
    }
    state = {
        "step": step,
        "optimizer": {"state": {}, "param_groups": []},
        "rng": torch.arange(7, dtype=torch.uint8),
    }
    return ck.save_checkpoint(run, step, model.state_dict(), state, config, keep=keep)


def _model(seed: int, **kw):
    torch.manual_seed(seed)
    return build_model("transformer", "tiny", n_layers=1, **kw)


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip(tmp_path, tie):
    model = _model(0, tie_embeddings=tie)
    path = _save(tmp_path / "run", 5, model)
    assert path == tmp_path / "run" / "checkpoints" / "step_00000005"
    for where in (tmp_path / "run", path, path / "model.safetensors"):
        loaded = load_model(where)
        assert loaded.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    if tie:
        assert loaded.head.weight is loaded.embed.weight
    x = torch.randint(0, 256, (2, 9))
    assert torch.equal(load_model(path)(x), model.eval()(x))
    state = ck.load_train_state(path)
    assert state["step"] == 5 and torch.equal(state["rng"], torch.arange(7, dtype=torch.uint8))


def test_keep_last_n(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3, 4):
        _save(run, step, _model(step), keep=2)
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_00000003", "step_00000004"]
    assert ck.resolve_checkpoint(run).name == "step_00000004"


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    old = _model(1)
    _save(run, 1, old)

    # A process killed after writing the new weights but before the training state: the exception
    # stands for the kill, and disabling rmtree keeps the half-written files a killed process leaves.
    def dying_save(obj, f, *a, **kw):
        f.write(b"\x80partial")  # torch.save writes through a file object (which hashes what it writes)
        f.flush()
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ck.torch, "save", dying_save)
    monkeypatch.setattr(ck.shutil, "rmtree", lambda *a, **kw: None)
    with pytest.raises(KeyboardInterrupt):
        _save(run, 2, _model(2))
    monkeypatch.undo()
    leftovers = [p.name for p in (run / "checkpoints").iterdir()]
    assert any(name.startswith(".tmp-step_00000002") for name in leftovers)  # the partial save is there...
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_00000001"]  # ...but never picked up
    loaded = load_model(run)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in old.state_dict().items())
    ck.clean_partial_saves(run)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001"]


def test_crash_while_pruning_never_exposes_partial_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _save(run, 1, _model(1))
    monkeypatch.setattr(ck.shutil, "rmtree", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _save(run, 2, _model(2), keep=1)
    monkeypatch.undo()
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_00000002"]
    assert load_model(run) is not None


def test_truncated_and_foreign_checkpoints(tmp_path):
    run = tmp_path / "run"
    path = _save(run, 3, _model(0))
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt: model.safetensors"):
        load_model(run)
    weights.write_bytes(data)
    (path / "train_state.pt").unlink()
    with pytest.raises(CheckpointError, match="train_state.pt is missing"):
        load_model(path)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a longseq checkpoint"):
        load_model(foreign)
    (foreign / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not a longseq checkpoint"):
        load_model(foreign)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="neither a longseq checkpoint nor a run directory"):
        load_model(empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing")


def test_corrupt_weights_with_matching_size(tmp_path):
    path = _save(tmp_path / "run", 1, _model(0))
    weights = path / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(b"\xff" * size)  # same size, garbage header
    with pytest.raises(CheckpointError, match="is corrupt: model.safetensors does not match the sha256 checksum"):
        load_model(path)
    # A checkpoint from before checksums (sizes only) has no checksum to compare: reading the header fails.
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {name: entry["size"] for name, entry in manifest["files"].items()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_model(path)
    shutil.rmtree(path)


def test_same_size_damage_to_the_tensor_data_is_detected(tmp_path):
    """0xFF over weight bytes past the header loads without complaint from safetensors (the values turn
    NaN); the checksum catches it, and the error for the run names the newest intact checkpoint. Damage to
    the optimizer state is caught where that state is read (resuming); loading the model does not hash it."""
    run = tmp_path / "run"
    intact = _save(run, 1, _model(0))
    newest = _save(run, 2, _model(1))
    for name, load in (("model.safetensors", load_model), ("train_state.pt", ck.load_train_state)):
        path = newest / name
        original = path.read_bytes()
        path.write_bytes(original[:-64] + b"\xff" * 64)
        with pytest.raises(CheckpointError, match=f"{newest} is corrupt: {name} does not match the sha256"):
            ck.verify_checkpoint(newest)
        with pytest.raises(CheckpointError, match=f"the newest intact checkpoint is {intact}"):
            load(run)
        assert ck.find_intact(run)[0] == intact
        if name == "train_state.pt":
            assert ck.resolve_checkpoint(run) == newest and load_model(run) is not None  # the weights are fine
        path.write_bytes(original)
    assert ck.resolve_checkpoint(run) == newest
    assert ck.find_intact(run) == (newest, [])


def test_checksums_are_computed_once_per_unchanged_file(tmp_path, monkeypatch):
    """Loading resolves a checkpoint several times; each file is hashed once, unless it changed since (or
    was written too recently for its time stamp to tell)."""
    path = _save(tmp_path / "run", 1, _model(0))
    old = path.stat().st_mtime - 60
    for p in path.iterdir():
        os.utime(p, (old, old))
    hashed = []
    real = ck._sha256_file
    monkeypatch.setattr(ck, "_sha256_file", lambda p: hashed.append(p.name) or real(p))
    load_model(tmp_path / "run")
    load_model(path)
    assert sorted(hashed) == sorted(ck.MODEL_FILES)  # the optimizer state is not needed for the model
    ck.load_train_state(path)
    ck.verify_checkpoint(path)
    assert sorted(hashed) == sorted(ck.FILES)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + b"\xff" * 64)  # changed now: hashed again, and refused
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        load_model(path)
    assert hashed.count("model.safetensors") == 2

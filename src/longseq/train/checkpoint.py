"""Checkpoints: safetensors weights + training state, written atomically, the last N kept.

Layout of a run directory::

    RUN_DIR/config.json               resolved configuration of the run
    RUN_DIR/metrics.jsonl             one JSON object per logged step / evaluation
    RUN_DIR/checkpoints/step_00000100/
        model.safetensors             full (unsharded) weights
        train_state.pt                optimizer (keyed by parameter name), schedule, sampler, RNG states
        config.json                   {"format": "longseq-checkpoint", "step", "model", "train"}
        manifest.json                 sizes of the files above; written last

A checkpoint is assembled in ``checkpoints/.tmp-*`` and renamed into place in one ``os.rename``, so a
crash at any instant leaves either the complete new checkpoint or none: readers only look at
``step_*`` directories. Old checkpoints are first renamed away (atomic), then deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "longseq-checkpoint"
VERSION = 1
CKPT_SUBDIR = "checkpoints"
FILES = ("model.safetensors", "train_state.pt", "config.json")
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A path is not a (complete) longseq checkpoint or run directory; the message says why."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied embeddings); keep one and record aliases."""
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    unique, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        unique[name] = t.detach().contiguous()
    return unique, aliases


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CKPT_SUBDIR / f"step_{step:08d}"


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    config: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write checkpoint ``step`` of ``run_dir`` atomically and keep only the newest ``keep`` (None: all).

    Args:
        model_state: full weights (CPU tensors), e.g. from ``model.state_dict()``.
        train_state: picklable with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists,
            dicts (optimizer, schedule, sampler and RNG states).
        config: ``{"model": {"kind", "config"}, "train": {...}}``; ``format`` and ``step`` are added.
    Returns the checkpoint directory. An existing checkpoint of the same step is left as it is.
    """
    final = checkpoint_dir(run_dir, step)
    if final.exists():
        return final
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors, aliases = _dedupe_shared(model_state)
        save_file(
            tensors,
            str(tmp / "model.safetensors"),
            metadata={"format": FORMAT, "aliases": json.dumps(aliases)},
        )
        torch.save(train_state, tmp / "train_state.pt")
        meta = {"format": FORMAT, "version": VERSION, "step": int(step), **config}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        for name in FILES:
            _fsync_file(tmp / name)
        manifest = {"format": FORMAT, "files": {name: (tmp / name).stat().st_size for name in FILES}}
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        _fsync_file(tmp / "manifest.json")
        os.rename(tmp, final)  # the commit point
        _fsync_dir(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep is not None:
        prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (and leftovers of interrupted saves)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1; got {keep}")
    parent = Path(run_dir) / CKPT_SUBDIR
    for old in list_checkpoints(run_dir)[:-keep]:
        # Renamed out of the step_* namespace first, so a crash mid-delete never leaves a partial step_*.
        trash = parent / f".trash-{old.name}-{uuid.uuid4().hex[:8]}"
        os.rename(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


def clean_partial_saves(run_dir: str | os.PathLike) -> None:
    """Remove ``.tmp-*`` / ``.trash-*`` leftovers of a save or prune that was interrupted."""
    parent = Path(run_dir) / CKPT_SUBDIR
    if parent.is_dir():
        for p in parent.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The ``step_*`` checkpoint directories of a run, oldest first."""
    parent = Path(run_dir) / CKPT_SUBDIR
    if not parent.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in parent.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Check that ``ckpt`` is a complete longseq checkpoint; returns its ``config.json``."""
    manifest_path = ckpt / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{ckpt} is not a longseq checkpoint (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, OSError) as err:
        raise CheckpointError(f"{ckpt} has an unreadable manifest.json: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} is not a longseq checkpoint (manifest format is not {FORMAT!r})")
    for name, size in manifest.get("files", {}).items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {name} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint {ckpt} is truncated or corrupt: {name} has {path.stat().st_size} bytes, "
                f"expected {size}"
            )
    try:
        config = json.loads((ckpt / "config.json").read_text())
    except (ValueError, OSError) as err:
        raise CheckpointError(f"checkpoint {ckpt} has an unreadable config.json: {err}") from err
    if config.get("format") != FORMAT or "model" not in config:
        raise CheckpointError(f"{ckpt} is not a longseq checkpoint (config.json format)")
    return config


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a run directory (its newest checkpoint), a checkpoint directory, or a
    file inside one. Raises :class:`CheckpointError` when there is none."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint or run directory {str(path)!r} does not exist")
    if p.is_file():
        p = p.parent
    if (p / "manifest.json").exists() or (p / "model.safetensors").exists():
        verify_checkpoint(p)
        return p
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise CheckpointError(
            f"{str(path)!r} is neither a longseq checkpoint nor a run directory with checkpoints"
        )
    verify_checkpoint(ckpts[-1])
    return ckpts[-1]


def read_config(ckpt: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint (run directories resolve to their newest checkpoint)."""
    return verify_checkpoint(resolve_checkpoint(ckpt))


def load_model_state(ckpt: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full weights of a checkpoint as CPU tensors (tied weights restored under every name)."""
    ckpt = resolve_checkpoint(ckpt)
    path = ckpt / "model.safetensors"
    try:
        state = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read weights {path}: {err}") from err
    for alias, name in aliases.items():
        state[alias] = state[name]
    return state


def load_train_state(ckpt: str | os.PathLike) -> dict[str, Any]:
    """The optimizer / schedule / sampler / RNG state of a checkpoint."""
    ckpt = resolve_checkpoint(ckpt)
    try:
        return torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types on a damaged file
        raise CheckpointError(f"cannot read training state {ckpt / 'train_state.pt'}: {err}") from err


def model_config_from(config: dict[str, Any]):
    """The :class:`~longseq.models.config.ModelConfig` a checkpoint config describes."""
    from ..models import config_class

    try:
        return config_class(config["model"]["kind"]).from_dict(config["model"]["config"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint config has no valid model section: {err}") from err


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """The model of a run directory (newest checkpoint) or a checkpoint directory, in eval mode on
    ``device``."""
    from ..models import model_from_config

    ckpt = resolve_checkpoint(path)
    model = model_from_config(model_config_from(verify_checkpoint(ckpt)))
    state = load_model_state(ckpt)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"weights in {ckpt} do not fit the model its config describes: {err}") from err
    return model.to(device).eval()

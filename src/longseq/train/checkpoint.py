"""Checkpoints: safetensors weights + training state, written atomically, the last N kept.

Layout of a run directory::

    RUN_DIR/config.json               resolved configuration of the run
    RUN_DIR/metrics.jsonl             one JSON object per logged step / evaluation
    RUN_DIR/checkpoints/step_00000100/
        model.safetensors             full (unsharded) weights
        train_state.pt                optimizer (keyed by parameter name), schedule, sampler, RNG states
        config.json                   {"format": "longseq-checkpoint", "step", "model", "train"}
        tokenizer/                    the tokenizer's files (runs trained with --tokenizer only)
        manifest.json                 size and sha256 of each file above; written last

Loading checks each file's size and checksum against the manifest, so a damaged file (truncated, or
overwritten in place) is refused instead of loaded; checkpoints from before checksums (a manifest of
sizes) are still read, their sizes checked. A file's checksum is computed once per process (until the
file changes), however often the checkpoint is resolved.

A checkpoint is assembled in ``checkpoints/.tmp-*`` and renamed into place in one ``os.rename``, so a
crash at any instant leaves either the complete new checkpoint or none: readers only look at
``step_*`` directories. Old checkpoints are first renamed away (atomic), then deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..tokenizer import BYTES, TOKENIZER_DIR, Tokenizer, load_tokenizer

FORMAT = "longseq-checkpoint"
VERSION = 1
MANIFEST_VERSION = 2  # 1: sizes only; 2: sizes and sha256 checksums
CKPT_SUBDIR = "checkpoints"
FILES = ("model.safetensors", "train_state.pt", "config.json")
#: What a model is loaded from: resolving a checkpoint to read its model checks these files' checksums (the
#: optimizer state, often twice the weights' size, is hashed only when it is read: resuming).
MODEL_FILES = ("model.safetensors", "config.json")
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A path is not a (complete) longseq checkpoint or run directory; the message says why."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class _HashingWriter:
    """A binary file that hashes what is written through it (``torch.save`` writes through it, so its
    checksum costs no second read)."""

    def __init__(self, f) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()


#: path -> ((size, mtime_ns, inode), sha256, when hashing began in ns): a file is hashed again when it changed.
_DIGESTS: dict[str, tuple[tuple[int, int, int], str, int]] = {}
#: File times can be coarse (a few ms) and a write may land while a file is hashed: a digest is trusted again
#: only for files last modified at least this long before it was computed (git's "racy clean" rule).
_RACY_NS = 1_000_000_000


def _cached_sha256(path: Path) -> str:
    st = path.stat()
    key, sig = str(path.resolve()), (st.st_size, st.st_mtime_ns, st.st_ino)
    hit = _DIGESTS.get(key)
    if hit is None or hit[0] != sig or st.st_mtime_ns + _RACY_NS >= hit[2]:
        started = time.time_ns()
        hit = (sig, _sha256_file(path), started)
        _DIGESTS[key] = hit
    return hit[1]


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
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Write checkpoint ``step`` of ``run_dir`` atomically and keep only the newest ``keep`` (None: all).

    Args:
        model_state: full weights (CPU tensors), e.g. from ``model.state_dict()``.
        train_state: picklable with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists,
            dicts (optimizer, schedule, sampler and RNG states).
        config: ``{"model": {"kind", "config"}, "train": {...}}``; ``format`` and ``step`` are added.
        tokenizer: a non-byte tokenizer's files go into ``tokenizer/`` (in the manifest too), so the
            checkpoint opens on its own with the tokenizer it was trained with.
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
        digests = _write_files(tmp, step, model_state, train_state, config)
        if tokenizer is not None and tokenizer.kind != BYTES.kind:
            tokenizer.save(tmp / TOKENIZER_DIR)
            for f in sorted((tmp / TOKENIZER_DIR).rglob("*")):
                if f.is_file():
                    digests[f.relative_to(tmp).as_posix()] = _sha256_file(f)
        for name in digests:
            _fsync_file(tmp / name)
        files = {name: {"size": (tmp / name).stat().st_size, "sha256": digest} for name, digest in digests.items()}
        manifest = {"format": FORMAT, "version": MANIFEST_VERSION, "files": files}
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


def _write_files(tmp: Path, step: int, model_state, train_state, config) -> dict[str, str]:
    """Write the checkpoint's files into ``tmp``; returns their sha256 checksums. ``save_file`` writes the
    weights itself (no stream to hash on the way), so they are read back once, from the page cache."""
    tensors, aliases = _dedupe_shared(model_state)
    with open(tmp / "train_state.pt", "wb") as f:
        writer = _HashingWriter(f)
        torch.save(train_state, writer)
    weights = tmp / "model.safetensors"
    save_file(tensors, str(weights), metadata={"format": FORMAT, "aliases": json.dumps(aliases)})
    # safetensors writes a private temporary file (mode 0600) and renames it into place; give the weights the
    # mode the umask gives every other file of the checkpoint (that of train_state.pt, just created by open()).
    # The checkpoint is still assembled in tmp and renamed into place whole, so this keeps the save atomic.
    os.chmod(weights, stat.S_IMODE((tmp / "train_state.pt").stat().st_mode))
    meta = {"format": FORMAT, "version": VERSION, "step": int(step), **config}
    config_bytes = json.dumps(meta, indent=2, sort_keys=True).encode()
    (tmp / "config.json").write_bytes(config_bytes)
    return {
        "model.safetensors": _sha256_file(tmp / "model.safetensors"),
        "train_state.pt": writer.sha.hexdigest(),
        "config.json": hashlib.sha256(config_bytes).hexdigest(),
    }


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


def verify_checkpoint(ckpt: Path, hashed: tuple[str, ...] = FILES) -> dict[str, Any]:
    """Check that ``ckpt`` is a complete, undamaged longseq checkpoint: every file of its manifest present
    with its size and, for the ``hashed`` ones (manifests since checksums), its sha256. Returns its
    ``config.json``."""
    manifest_path = ckpt / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{ckpt} is not a longseq checkpoint (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, OSError) as err:
        raise CheckpointError(f"{ckpt} has an unreadable manifest.json: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} is not a longseq checkpoint (manifest format is not {FORMAT!r})")
    for name, entry in manifest.get("files", {}).items():
        # The tokenizer's files are small and part of the model: always checksummed.
        _check_file(ckpt, name, entry, name in hashed or name.startswith(f"{TOKENIZER_DIR}/"))
    try:
        config = json.loads((ckpt / "config.json").read_text())
    except (ValueError, OSError) as err:
        raise CheckpointError(f"checkpoint {ckpt} has an unreadable config.json: {err}") from err
    if config.get("format") != FORMAT or "model" not in config:
        raise CheckpointError(f"{ckpt} is not a longseq checkpoint (config.json format)")
    return config


def _check_file(ckpt: Path, name: str, entry: Any, hashed: bool) -> None:
    """One manifest entry: ``{"size", "sha256"}``, or a bare size (checkpoints saved before checksums)."""
    if isinstance(entry, int):
        size, digest = entry, None
    elif isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str):
        size, digest = entry["size"], entry["sha256"]
    else:
        raise CheckpointError(f"{ckpt} has an unreadable manifest.json: bad entry for {name}: {entry!r}")
    path = ckpt / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {name} is missing")
    if path.stat().st_size != size:
        raise CheckpointError(
            f"checkpoint {ckpt} is truncated or corrupt: {name} has {path.stat().st_size} bytes, expected {size}"
        )
    if hashed and digest is not None and _cached_sha256(path) != digest:
        raise CheckpointError(
            f"checkpoint {ckpt} is corrupt: {name} does not match the sha256 checksum saved with it"
        )


def find_intact(
    run_dir: str | os.PathLike, hashed: tuple[str, ...] = FILES
) -> tuple[Path | None, list[tuple[Path, CheckpointError]]]:
    """The newest checkpoint of ``run_dir`` that verifies (None if none does; checksums of the ``hashed``
    files), and the newer ones that do not, newest first, each with its error. Older checkpoints are only
    checked while the newer fail."""
    damaged = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(ckpt, hashed)
        except CheckpointError as err:
            damaged.append((ckpt, err))
            continue
        return ckpt, damaged
    return None, damaged


def damaged_message(run_dir: str | os.PathLike, intact: Path | None, damaged: list[tuple[Path, Any]]) -> str:
    """What went wrong with the newest checkpoint(s) of ``run_dir``, and which one is still intact."""
    more = f" (and {len(damaged) - 1} more damaged checkpoint(s) after {intact})" if len(damaged) > 1 else ""
    if intact is None:
        return f"{damaged[0][1]}{more}; no checkpoint of {str(run_dir)!r} is intact"
    return (
        f"{damaged[0][1]}{more}; the newest intact checkpoint is {intact}: pass that directory to use it "
        "(train --resume continues from it)"
    )


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint out of the ``step_*`` namespace (kept for inspection, never picked up
    again, never pruned); returns its new path."""
    target = ckpt.with_name(f"damaged-{ckpt.name}")
    if target.exists():
        target = ckpt.with_name(f"damaged-{ckpt.name}-{uuid.uuid4().hex[:8]}")
    os.rename(ckpt, target)
    return target


def resolve_checkpoint(path: str | os.PathLike, hashed: tuple[str, ...] = MODEL_FILES) -> Path:
    """A checkpoint directory from a run directory (its newest checkpoint), a checkpoint directory, or a
    file inside one. Raises :class:`CheckpointError` when there is none, or when it is damaged: every file's
    size is checked, and the checksums of the ``hashed`` ones (for a run directory, the message names the
    newest intact checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint or run directory {str(path)!r} does not exist")
    if p.is_file():
        p = p.parent
    if (p / "manifest.json").exists() or (p / "model.safetensors").exists():
        verify_checkpoint(p, hashed)
        return p
    if not list_checkpoints(p):
        raise CheckpointError(
            f"{str(path)!r} is neither a longseq checkpoint nor a run directory with checkpoints"
        )
    intact, damaged = find_intact(p, hashed)
    if damaged:
        raise CheckpointError(damaged_message(path, intact, damaged))
    return intact


def read_config(ckpt: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint (run directories resolve to their newest checkpoint)."""
    return verify_checkpoint(resolve_checkpoint(ckpt), MODEL_FILES)


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
    ckpt = resolve_checkpoint(ckpt, FILES)
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
    config = verify_checkpoint(ckpt, MODEL_FILES)
    model = model_from_config(model_config_from(config))
    state = load_model_state(ckpt)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"weights in {ckpt} do not fit the model its config describes: {err}") from err
    tokenizer = (config["model"].get("tokenizer") or {}).get("kind", BYTES.kind)
    if tokenizer != BYTES.kind:  # trained with --tokenizer: its files are in the checkpoint
        model.tokenizer = load_tokenizer(tokenizer, ckpt / TOKENIZER_DIR)
    return model.to(device).eval()

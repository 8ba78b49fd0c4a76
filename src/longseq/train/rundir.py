"""A run directory's ``config.json``: writing it, reading it back, and the checks made before a run starts.

Every check here only reads, so a refused ``train`` call leaves the directory as it found it;
:func:`prepare_run_dir` is the one function that writes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..fileio import write_atomically
from ..tokenizer import BYTES, Tokenizer
from . import checkpoint as ckpt_io
from .checkpoint import CheckpointError
from .config import TrainConfig

RUN_FORMAT = "longseq-run"


class RunDirError(ValueError):
    """The run directory cannot be used as asked (exists without --resume/--overwrite, nothing to
    resume, ...)."""


def run_config(cfg: TrainConfig, model_cfg, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """What ``config.json`` holds: the format tag, the model (kind, preset, full config, and a non-byte
    tokenizer's kind and fingerprint) and the training config."""
    model: dict[str, Any] = {"kind": cfg.model, "preset": cfg.preset, "config": model_cfg.to_dict()}
    if tokenizer is not None and tokenizer.kind != BYTES.kind:
        model["tokenizer"] = {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint()}
    return {"format": RUN_FORMAT, "model": model, "train": cfg.to_dict()}


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``RUN_DIR/config.json`` if it is a longseq run's, else None (whatever the reason; see
    :func:`load_run_config` for the strict reading a resumed run needs)."""
    try:
        return load_run_config(run_dir)
    except RunDirError:
        return None


def load_run_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``RUN_DIR/config.json``, or None when there is no such file. A file that is there but unreadable
    (bad JSON, not a longseq run's, no training section) raises :class:`RunDirError` naming it: resuming
    must neither guess its settings nor overwrite the file."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return None
    fix = "fix it, or delete it to resume with the settings saved in the newest checkpoint"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunDirError(f"cannot read the run config {path} ({err}); {fix}") from err
    if not isinstance(config, dict) or config.get("format") != RUN_FORMAT:
        raise RunDirError(f"{path} is not a longseq run config (its format is not {RUN_FORMAT!r}); {fix}")
    if not isinstance(config.get("train"), dict) or not isinstance(config.get("model"), dict):
        raise RunDirError(f"the run config {path} lacks its 'model' or 'train' section; {fix}")
    return config


def check_run_dir(
    run_dir: Path, resume: bool, overwrite: bool
) -> tuple[Path | None, list[tuple[Path, CheckpointError]]]:
    """Validate the run directory without touching it. Returns the checkpoint to resume from (None for a
    new run) and the newer checkpoints that are damaged (resuming sets them aside)."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; pass one of them")
    if resume:
        if not run_dir.is_dir():
            raise RunDirError(f"nothing to resume: run directory {str(run_dir)!r} does not exist")
        if not ckpt_io.list_checkpoints(run_dir):
            raise RunDirError(f"nothing to resume: {str(run_dir)!r} has no checkpoint")
        load_run_config(run_dir)  # an unreadable config.json is refused, never overwritten
        intact, damaged = ckpt_io.find_intact(run_dir)
        if intact is None:
            raise CheckpointError(ckpt_io.damaged_message(run_dir, intact, damaged))
        return intact, damaged
    if run_dir.exists():
        if not run_dir.is_dir():
            raise RunDirError(f"run directory {str(run_dir)!r} exists and is not a directory")
        if any(run_dir.iterdir()):
            if not overwrite:
                raise RunDirError(
                    f"run directory {str(run_dir)!r} already exists; pass --resume to continue it "
                    "or --overwrite to replace it"
                )
            if read_run_config(run_dir) is None:
                raise RunDirError(
                    f"refusing to --overwrite {str(run_dir)!r}: it is not a longseq run directory"
                )
    return None, []


def check_resume_steps(steps: int, saved: dict[str, Any], where: Path) -> None:
    """Refuse to resume the checkpoint ``where`` (its ``config.json`` is ``saved``) towards a total of
    ``steps`` that it has already reached: the loop would train nothing, yet ``config.json`` would be
    rewritten with the smaller total, so a later plain ``--resume`` would do nothing either."""
    done = saved.get("step")
    if isinstance(done, int) and steps <= done:
        raise RunDirError(
            f"cannot resume to --steps {steps}: the run is already at step {done} (checkpoint {where}), so "
            f"nothing would be trained; pass --steps greater than {done} to train further"
        )


def check_compatible(model_cfg, saved: dict[str, Any], where: Path, tokenizer: Tokenizer | None = None) -> None:
    """Raise when the requested model config or tokenizer differs from the checkpoint's."""
    theirs = saved["model"]
    saved_tok = (theirs.get("tokenizer") or {}).get("fingerprint")
    ours_tok = tokenizer.fingerprint() if tokenizer is not None and tokenizer.kind != BYTES.kind else None
    if saved_tok != ours_tok:
        have = "was trained on bytes" if saved_tok is None else "was trained with another tokenizer"
        want = "bytes" if ours_tok is None else "this --tokenizer"
        raise CheckpointError(f"cannot resume {where}: it {have}, not {want}")
    ours = model_cfg.to_dict()
    if theirs["kind"] != model_cfg.kind:
        raise CheckpointError(
            f"cannot resume: {where} holds a {theirs['kind']!r} model but a {model_cfg.kind!r} model "
            "was asked for"
        )
    diff = {k: (theirs["config"].get(k), v) for k, v in ours.items() if theirs["config"].get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"cannot resume {where}: incompatible model config ({shown})")


def prepare_run_dir(
    run_dir: Path, config: dict[str, Any], resume_step: int | None, overwrite: bool, damaged: Sequence[Path] = ()
) -> list[Path]:
    """Create (or, with ``overwrite``, recreate) the run directory, set the ``damaged`` checkpoints aside,
    write ``config.json`` atomically and start ``metrics.jsonl`` afresh or, when resuming from
    ``resume_step``, cut back to that step. Returns where the damaged checkpoints went."""
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_io.clean_partial_saves(run_dir)
    moved = [ckpt_io.set_aside(ckpt) for ckpt in damaged]
    text = json.dumps(config, indent=2, sort_keys=True)
    write_atomically(run_dir / "config.json", lambda tmp: tmp.write_text(text))
    metrics = run_dir / "metrics.jsonl"
    if resume_step is not None and metrics.exists():
        # Steps logged after the checkpoint will be redone: drop them so each step appears once.
        kept = [
            line
            for line in metrics.read_text().splitlines()
            if line and json.loads(line)["step"] <= resume_step
        ]
        metrics.write_text("".join(line + "\n" for line in kept))
    elif resume_step is None:
        metrics.write_text("")
    return moved

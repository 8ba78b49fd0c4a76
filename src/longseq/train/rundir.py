"""A run directory's ``config.json``: writing it, reading it back, and the checks made before a run starts.

Every check here only reads, so a refused ``train`` call leaves the directory as it found it;
:func:`prepare_run_dir` is the one function that writes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt_io
from .checkpoint import CheckpointError
from .config import TrainConfig

RUN_FORMAT = "longseq-run"


class RunDirError(ValueError):
    """The run directory cannot be used as asked (exists without --resume/--overwrite, nothing to
    resume, ...)."""


def run_config(cfg: TrainConfig, model_cfg) -> dict[str, Any]:
    """What ``config.json`` holds: the format tag, the model (kind, preset, full config) and the training config."""
    return {
        "format": RUN_FORMAT,
        "model": {"kind": cfg.model, "preset": cfg.preset, "config": model_cfg.to_dict()},
        "train": cfg.to_dict(),
    }


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``RUN_DIR/config.json`` if it is a longseq run's, else None."""
    path = Path(run_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and config.get("format") == RUN_FORMAT else None


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Validate the run directory without touching it; returns the checkpoint to resume from, if any."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; pass one of them")
    if resume:
        if not run_dir.is_dir():
            raise RunDirError(f"nothing to resume: run directory {str(run_dir)!r} does not exist")
        ckpts = ckpt_io.list_checkpoints(run_dir)
        if not ckpts:
            raise RunDirError(f"nothing to resume: {str(run_dir)!r} has no checkpoint")
        ckpt_io.verify_checkpoint(ckpts[-1])
        return ckpts[-1]
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
    return None


def check_compatible(model_cfg, saved: dict[str, Any], where: Path) -> None:
    """Raise when the requested model config differs from the checkpoint's."""
    theirs = saved["model"]
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


def prepare_run_dir(run_dir: Path, config: dict[str, Any], resume_step: int | None, overwrite: bool) -> None:
    """Create (or, with ``overwrite``, recreate) the run directory, write ``config.json`` atomically and
    start ``metrics.jsonl`` afresh or, when resuming from ``resume_step``, cut back to that step."""
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_io.clean_partial_saves(run_dir)
    tmp = run_dir / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp, run_dir / "config.json")
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

"""Paths, constants and small helpers shared by every stage of the reproduction."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# The entry point: recorded in stage commands and re-run as a subprocess by the parallel eval stages.
SCRIPT = REPO / "benchmarks" / "reproduce.py"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "shakespeare"
VAL_DOCS = ["hamlet.txt", "tempest.txt", "sonnets.txt"]
LN2 = math.log(2.0)
# GPU minutes per run at exclusive throughput, per group, when --minutes is not given. The 8k group has
# three runs sharing one GPU in one stage, so it gets less to stay inside an 8-minute call.
DEFAULT_MINUTES = {"2k": 2.5, "8k": 1.75}
EVAL_TOKENS = 262_144  # validation bytes `longseq train` scores at each evaluation (its default)

# Stages in the order `--stage all` runs them. `train` and `eval` are the groups of the stages below them.
STAGES = ["train-2k", "train-8k", "eval-tova", "eval-megabyte", "eval-gla", "eval-pretrained", "eval-recall",
          "report"]
META_STAGES = {"all": STAGES, "train": ["train-2k", "train-8k"], "eval": ["eval-tova", "eval-megabyte", "eval-gla"]}
POLICIES = [  # (sweep spec, label in the report)
    ("window", "Window"),
    ("sink", "Window+4 sinks"),
    ("h2o", "H2O"),
    ("tova_head", "TOVA-head"),
    ("tova", "TOVA"),
]


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None if it is missing or unreadable (a stage not run yet)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a result (parallel eval stages)


def say(msg: str) -> None:
    """Print a timestamped progress line (flushed: stage logs are read while the stage runs)."""
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def environment(device: Any = None) -> dict[str, Any]:
    """Versions, commit and device name, stored with each result so the report can say where it came from."""
    import torch

    import longseq

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "longseq": longseq.__version__,
        "commit": _git_commit(),
        "host_cpus": os.cpu_count(),
    }
    try:
        import triton  # noqa: F401

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        env["device"] = torch.cuda.get_device_name(dev)
    else:
        env["device"] = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def _git_commit() -> str:
    # Read-only: the commit the numbers came from (the GPU machine may get a tree without .git).
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def sync(device) -> None:
    """Wait for the GPU, so that wall-clock timings cover the queued work."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_gpu_memory(device) -> None:
    """Return cached blocks after a model is dropped, so the next model of the stage starts clean."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()


def builtin_works(folder: Path) -> Path:
    """The built-in corpus's works as ``folder/<name>.txt``, extracted once (the pretrained-model stage takes
    them as ``--data`` files, the recall stage its passkey filler)."""
    from longseq.data import builtin_corpus_path

    done = folder / ".extracted"
    if not done.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(builtin_corpus_path()) as tar:
            tar.extractall(folder, filter="data")
        done.touch()
    return folder


def portable_command(argv: list[str], replace: list[tuple[str, str]]) -> str:
    """``longseq ARGV`` as the report prints it: each machine-specific string of ``replace`` (a path, a model
    file) swapped for its placeholder, in order."""
    text = shlex.join(["longseq", *argv])
    for old, new in replace:
        text = text.replace(old, new)
    return text

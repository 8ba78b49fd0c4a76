"""Loss and bits-per-byte curves of several runs on one figure (``longseq plot``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..fileio import check_creatable


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl`` (ValueError when the run has none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} is not a run directory with metrics (no {path.name})")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def image_path(out: str | os.PathLike) -> Path:
    """Where the figure for ``-o out`` goes: ``out`` itself, with ``.png`` added when it has no extension
    (matplotlib would add it anyway, and the path reported must be the file written).

    Raises ``ValueError`` for an ``out`` that is (or, ending in a slash, names) a directory: matplotlib
    would write ``DIR.png`` beside it."""
    text = os.fspath(out)
    path = Path(text)
    if path.is_dir() or text.endswith(("/", os.sep)):
        raise ValueError(f"-o {text} names a directory; give the image's file name, e.g. -o {path / 'curves.png'}")
    path = path if path.suffix else path.with_name(path.name + ".png")
    check_creatable(path, f"-o {text}")  # before the runs are read and drawn
    return path


def plot_runs(run_dirs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Training loss (nats/byte) and validation bits per byte against step, one line per run,
    saved to ``out`` (``.png`` added when it has no extension; see :func:`image_path`). Returns the path
    written."""
    path = image_path(out)
    runs = [
        (Path(r).name or str(r), read_metrics(r)) for r in run_dirs
    ]  # read all first: fail before drawing
    try:
        import matplotlib
    except ImportError as err:
        raise ValueError("longseq plot needs matplotlib: pip install 'longseq[plot]'") from err
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4))
    formats = fig.canvas.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:  # savefig would fail only after drawing, with its own wording
        plt.close(fig)
        raise ValueError(f"-o {out}: matplotlib cannot write {path.suffix!r} images; use one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")
    for label, records in runs:
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_bpb"]) for r in records if "val_bpb" in r]
        if train:
            ax_loss.plot(*zip(*train, strict=True), label=label)
        if val:
            ax_bpb.plot(*zip(*val, strict=True), marker="o", markersize=3, label=label)
    ax_loss.set(xlabel="step", ylabel="training loss (nats / byte)", title="training loss")
    ax_bpb.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    for ax in (ax_loss, ax_bpb):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Passkey results: accuracy per (policy, budget, length, depth), written as Markdown, JSON and a heatmap."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import jsonio
from ..fileio import write_atomically

#: What :meth:`PasskeyResult.write` puts into its folder (the plot only with matplotlib).
PASSKEY_FILES = ("passkey.md", "passkey.json", "passkey.png")


@dataclass(frozen=True)
class Row:
    """A row of the results: a cache policy spec at a budget (an int, ``"ctx/K"``, or None for ``full``)."""

    policy: str
    budget: int | str | None

    def label(self, length: int | None = None) -> str:
        """``"tova:256"``; with ``length``, a ``ctx/K`` budget shows its tokens too (``"tova:ctx/8=256"``)."""
        if self.budget is None:
            return self.policy
        text = f"{self.policy}@{self.budget}"
        if isinstance(self.budget, str) and length is not None:
            text += f"={_budget_tokens(self.budget, length)}"
        return text


@dataclass
class PasskeyResult:
    """What :func:`~longseq.tasks.run_passkey` measured; ``trials`` holds every answer."""

    lengths: list[int]
    depths: list[float]
    rows: list[Row]
    n_trials: int
    seed: int
    trials: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    _scores: dict[tuple[Row, int, float], list[float]] = field(default_factory=dict, repr=False)

    def add(self, row: Row, length: int, depth: float, trial: int, key: str, text: str, score: float) -> None:
        """Record one answer."""
        self._scores.setdefault((row, length, depth), []).append(score)
        self.trials.append({"policy": row.policy, "budget": row.budget, "length": length, "depth": depth,
                            "trial": trial, "key": key, "answer": text, "correct": bool(score)})

    def accuracy(self, row: Row, length: int, depth: float) -> float:
        """Fraction of the trials at (row, length, depth) answered with the key."""
        scores = self._scores.get((row, length, float(depth)))
        if not scores:
            raise KeyError(f"no passkey trials for {row.label()} at length {length}, depth {depth}")
        return sum(scores) / len(scores)

    def mean(self, row: Row, length: int) -> float:
        """Accuracy of ``row`` at ``length`` averaged over the depths."""
        return sum(self.accuracy(row, length, d) for d in self.depths) / len(self.depths)

    def to_markdown(self) -> str:
        """One table per length: a row per policy and budget, a column per depth, then the mean."""
        lines = [f"Passkey retrieval: accuracy over {self.n_trials} trial(s) (seed {self.seed})"]
        for length in self.lengths:
            lines += ["", f"### {length} tokens", "",
                      "| policy | budget | " + " | ".join(f"depth {d:g}" for d in self.depths) + " | mean |",
                      "|---|---|" + "---:|" * (len(self.depths) + 1)]
            for row in self.rows:
                budget = "-" if row.budget is None else _budget_text(row.budget, length)
                cells = [f"{self.accuracy(row, length, d):.2f}" for d in self.depths]
                lines.append(f"| {row.policy} | {budget} | " + " | ".join(cells) + f" | {self.mean(row, length):.2f} |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        """Settings, accuracy per row, length and depth, and every trial's answer."""
        table = [
            {"policy": row.policy, "budget": row.budget, "length": length,
             "budget_tokens": None if row.budget is None else _budget_tokens(row.budget, length),
             "accuracy": {f"{d:g}": self.accuracy(row, length, d) for d in self.depths},
             "mean": self.mean(row, length)}
            for length in self.lengths for row in self.rows
        ]
        return {"task": "passkey", "lengths": self.lengths, "depths": self.depths, "n_trials": self.n_trials,
                "seed": self.seed, "results": table, "trials": self.trials}

    def plot(self, path: str | Path) -> Path:
        """A heatmap per length: policy x budget rows, depth columns, accuracy from 0 (white) to 1."""
        import matplotlib

        matplotlib.use("Agg")  # files only; imported here so the library works without matplotlib
        import matplotlib.pyplot as plt

        n = len(self.lengths)
        fig, axes = plt.subplots(1, n, figsize=(1.2 + 0.9 * len(self.depths) * n + 1.6 * n,
                                               1.0 + 0.4 * len(self.rows)), squeeze=False)
        image = None
        for ax, length in zip(axes[0], self.lengths, strict=True):
            grid = [[self.accuracy(r, length, d) for d in self.depths] for r in self.rows]
            image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            for i, values in enumerate(grid):
                for j, value in enumerate(values):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center",
                            color="black" if value > 0.5 else "white", fontsize=8)
            ax.set_xticks(range(len(self.depths)), [f"{d:g}" for d in self.depths])
            ax.set_yticks(range(len(self.rows)), [r.label(length) for r in self.rows])
            ax.set_xlabel("depth of the key (fraction of the context)")
            ax.set_title(f"{length} tokens")
        fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
        path = Path(path)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return path

    def write(self, out: str | Path) -> dict[str, str]:
        """Write ``passkey.md``, ``passkey.json`` and (with matplotlib) ``passkey.png`` into ``out``; returns
        the paths by kind, and ``note`` when the plot was skipped. Each file is written whole or not at all (a
        temporary file renamed over it), so an interrupted write never leaves half a result."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        markdown, data = self.to_markdown(), jsonio.dumps(self.to_json(), indent=2) + "\n"
        write_atomically(out / "passkey.md", lambda tmp: tmp.write_text(markdown))
        write_atomically(out / "passkey.json", lambda tmp: tmp.write_text(data))
        self.files = {"markdown": str(out / "passkey.md"), "json": str(out / "passkey.json")}
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.files["note"] = "no plot: matplotlib is not installed (pip install 'longseq[plot]')"
        else:
            self.files["plot"] = str(write_atomically(out / "passkey.png", self.plot))
        return self.files


def _budget_tokens(budget: int | str, length: int) -> int:
    return budget if isinstance(budget, int) else max(1, length // int(budget.split("/")[1]))


def _budget_text(budget: int | str, length: int) -> str:
    return str(budget) if isinstance(budget, int) else f"{budget} = {_budget_tokens(budget, length)}"

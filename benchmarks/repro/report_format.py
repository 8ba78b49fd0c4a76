"""Pieces every section of the report uses: number formats, the section opening, and embedded plots."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Write = Callable[[str], None]  # appends one line to the report


def fmt_bytes(n: float) -> str:
    """``n`` bytes in B, KiB, MiB or GiB, whichever reads best."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def frac(b: int, T: int) -> str:
    """A cache budget as a fraction of the context: ``1/8`` where it divides, else a decimal."""
    return f"1/{T // b}" if T % b == 0 else f"{b / T:.3g}"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (the report is built on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def open_section(w: Write, title: str, claim: str, result, stage: str) -> bool:
    """Title and claim of an experiment's section; False (after saying so) when ``stage`` has no result."""
    w(title)
    w("")
    w(claim)
    w("")
    if result is None:
        w(f"Result: not run (`--stage {stage}`).")
        w("")
        return False
    return True


@dataclass
class Figures:
    """Where the report's plots go: the folder ``img``, referred to as ``rel`` from the report, and the
    file-name ``prefix`` (``repro-quick-`` in quick mode, so a smoke run never overwrites the real plots)."""

    img: Path
    prefix: str
    rel: str

    def embed(self, fig, w: Write, name: str, alt: str) -> None:
        """Save ``fig`` as ``img/<prefix><name>.png``, close it, and add its Markdown image line."""
        file = f"{self.prefix}{name}.png"
        fig.tight_layout()
        fig.savefig(self.img / file, dpi=120)
        pyplot().close(fig)
        w(f"![{alt}]({self.rel}/{file})")

"""Section 3 of the report: GLA vs Transformer++ (``results/gla.json``)."""

from __future__ import annotations

from typing import Any

from .report_format import Figures, Write, fmt_bytes, open_section, pyplot


def _setup_and_table(w: Write, r: dict[str, Any]) -> None:
    m = r["models"]
    tr = m.get("transformer-2k")
    w(f"Setup: both trained at context {r['ctx']} for the same number of steps ({tr['steps'] if tr else '?'}); "
      f"evaluated with `evaluate_bpb` on consecutive windows of each evaluation context (plain). State: "
      f"`state.nbytes()` after streaming that many bytes of the validation text through `model.step` at "
      f"batch 1 (Transformer: full KV cache; fp32).")
    w("")
    w("| model | params | " + " | ".join(f"bpb @ {x}" for x in r["extrap"]) + " | "
      + " | ".join(f"state @ {x}" for x in r["state_lens"]) + " |")
    w("|---|---:|" + "---:|" * (len(r["extrap"]) + len(r["state_lens"])))
    for n, row in m.items():
        w(f"| {row['label']} (`{n}`) | {row['params'] / 1e6:.2f}M | "
          + " | ".join(f"{row['bpb'][str(x)]:.4f}" for x in r["extrap"]) + " | "
          + " | ".join(fmt_bytes(row["state_bytes"][str(x)]) for x in r["state_lens"]) + " |")
    w("")


def _plot(w: Write, r: dict[str, Any], figs: Figures) -> None:
    """bpb against evaluation context, and state size against bytes consumed, side by side."""
    fig, (a1, a2) = pyplot().subplots(1, 2, figsize=(10, 4))
    for row in r["models"].values():
        a1.plot(r["extrap"], [row["bpb"][str(x)] for x in r["extrap"]], marker="o", label=row["label"])
        a2.plot(r["state_lens"], [row["state_bytes"][str(x)] / 2**20 for x in r["state_lens"]], marker="o",
                label=row["label"])
    a1.axvline(r["ctx"], color="gray", linestyle=":", label="training context")
    a1.set_xscale("log", base=2)
    a1.set_xticks(r["extrap"], [str(x) for x in r["extrap"]])
    a1.set_xlabel("evaluation context (bytes)")
    a1.set_ylabel("bits per byte")
    a1.set_title("Length extrapolation")
    a2.set_xscale("log", base=2)
    a2.set_yscale("log")
    a2.set_xticks(r["state_lens"], [str(x) for x in r["state_lens"]])
    a2.set_xlabel("bytes consumed")
    a2.set_ylabel("generation state (MiB)")
    a2.set_title("State size")
    for a in (a1, a2):
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    figs.embed(fig, w, "gla", "extrapolation and state size")
    w("")


def _verdict(w: Write, r: dict[str, Any]) -> None:
    """The three claims, checked: the gap at the training context, a constant state, extrapolation."""
    tr, gl = r["models"].get("transformer-2k"), r["models"].get("gla-2k")
    if not (tr and gl):
        return
    T = r["ctx"]
    b_t, b_g = tr["bpb"][str(T)], gl["bpb"][str(T)]
    rel_gap = 100 * (b_g - b_t) / b_t
    s_g = [gl["state_bytes"][str(x)] for x in r["state_lens"]]
    s_t = [tr["state_bytes"][str(x)] for x in r["state_lens"]]
    w("Verdict:")
    w("")
    w(f"- At the training context {T}: GLA {b_g:.4f} vs Transformer++ {b_t:.4f} bpb ({rel_gap:+.2f}%; "
      f"{'within' if abs(rel_gap) <= 5 else 'outside'} 5%).")
    w(f"- GLA state: {', '.join(fmt_bytes(x) for x in s_g)} at {', '.join(map(str, r['state_lens']))} bytes "
      f"({'constant' if len(set(s_g)) == 1 else 'NOT constant'}); Transformer KV cache: "
      f"{', '.join(fmt_bytes(x) for x in s_t)} ({s_t[-1] / s_t[0]:.0f}x from the first to the last length).")
    ext = r["extrap"][-1]
    w(f"- At {ext} bytes ({ext // T}x the training context): GLA {gl['bpb'][str(ext)]:.4f} "
      f"({gl['bpb'][str(ext)] - b_g:+.4f} vs its {T} score), Transformer++ {tr['bpb'][str(ext)]:.4f} "
      f"({tr['bpb'][str(ext)] - b_t:+.4f}).")
    w("")


def report_gla(r: dict | None, w: Write, figs: Figures) -> None:
    """Section 3: setup, the bpb / state table, the extrapolation and state plots and the verdict; or a
    "not run" line when ``r`` (``results/gla.json``) is missing."""
    if not open_section(
            w, "## 3. GLA vs Transformer++ (Yang et al. 2024, scaled down)",
            "Claims: at equal parameters and training steps a GLA language model comes within a few percent of "
            "Transformer++; its generation state does not grow with the context; it extrapolates to contexts "
            "longer than it was trained on, where the Transformer degrades.", r, "eval-gla"):
        return
    _setup_and_table(w, r)
    _plot(w, r, figs)
    _verdict(w, r)

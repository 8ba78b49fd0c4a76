"""Section 2 of the report: MEGABYTE vs byte Transformer vs byte GLA (``results/megabyte.json``)."""

from __future__ import annotations

from typing import Any

from .report_format import Figures, Write, open_section, pyplot


def _setup_and_table(w: Write, r: dict[str, Any]) -> None:
    T, S = r["ctx"], r["stride"]
    w(f"Setup: the three models are trained at context {T} for equal GPU minutes (each for the steps its "
      f"own exclusive throughput gives in the same time; the runs then trained side by side on one GPU, so "
      f"their wall time is longer than the planned minutes). Plain evaluation: consecutive {T}-byte windows; "
      f"strided: {T}-byte windows advancing by {S}, scoring the last {S} (every byte after the first window "
      f"has at least {T - S} bytes of context). Generation: `longseq.bench.train.bench_generate`, batch 1, "
      f"{r['gen']['prompt']}-byte prompt, {r['gen']['new_tokens']} greedy bytes through the state API "
      f"(eager PyTorch, bf16 autocast on CUDA; decoding is launch-bound, see benchmarks/RESULTS.md).")
    w("")
    w("| model | params | GPU min (planned) | steps | epochs | bpb plain | bpb strided | generation bytes/s "
      "| prefill bytes/s |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, m in r["models"].items():
        w(f"| {m['label']} (`{n}`) | {m['params'] / 1e6:.2f}M | {m['gpu_minutes']:.2f} | {m['steps']} | "
          f"{m['epochs']:.1f} | {m['bpb_plain']:.4f} | {m['bpb_strided']:.4f} | {m['gen_bytes_s']:.1f} | "
          f"{m['prefill_bytes_s']:,.0f} |")
    w("")


def _plot(w: Write, r: dict[str, Any], trains: dict, figs: Figures) -> None:
    """Validation curves against GPU minutes, from the runs' training records."""
    T = r["ctx"]
    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    for n in r["models"]:
        t = trains.get(n)
        if not t or not t["metrics"]["val"]:
            continue
        # Steps to minutes at exclusive throughput: the runs shared the GPU, so their wall clock would not
        # compare the models fairly.
        sec_per_step = t["tokens_per_step"] / t["probe_tok_s"]
        xs = [s * sec_per_step / 60 for s, _ in t["metrics"]["val"]]
        ax.plot(xs, [v for _, v in t["metrics"]["val"]], marker="o", label=t["spec"]["label"])
    ax.set_xlabel("GPU minutes (steps x exclusive seconds per step)")
    ax.set_ylabel(f"val bpb (training-time subset, context {T})")
    ax.set_title(f"Context {T}: validation bpb vs training compute")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    figs.embed(fig, w, "megabyte", "val bpb vs GPU minutes")
    w("")


def _verdict(w: Write, models: dict[str, Any]) -> None:
    mbm = models.get("megabyte-8k")
    if not mbm:
        return
    w("Verdict:")
    w("")
    for n, m in models.items():
        if n == "megabyte-8k":
            continue
        d = mbm["bpb_strided"] - m["bpb_strided"]
        w(f"- MEGABYTE vs {m['label']}: {mbm['bpb_strided']:.4f} vs {m['bpb_strided']:.4f} bpb strided "
          f"({'better' if d < 0 else 'worse'} by {abs(d):.4f}, {100 * d / m['bpb_strided']:+.2f}%), "
          f"{mbm['gen_bytes_s'] / m['gen_bytes_s']:.2f}x its generation speed.")
    w("")


def report_megabyte(r: dict | None, trains: dict, w: Write, figs: Figures) -> None:
    """Section 2: setup, the bpb / speed table, validation curves and the verdict; or a "not run" line when
    ``r`` (``results/megabyte.json``) is missing. ``trains`` are the ``train-<run>.json`` records."""
    if not open_section(
            w, "## 2. MEGABYTE vs byte Transformer vs byte GLA at long context (Yu et al. 2023, scaled down)",
            "Claim: at equal compute, a multiscale MEGABYTE model models long byte sequences better than a "
            "byte-level Transformer, and generates faster (the global model runs once per patch).",
            r, "eval-megabyte"):
        return
    _setup_and_table(w, r)
    _plot(w, r, trains, figs)
    _verdict(w, r["models"])

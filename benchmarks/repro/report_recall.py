"""Section 5 of the report: associative recall against state size (``results/recall.json``, issue 20)."""

from __future__ import annotations

from typing import Any

from .report_format import Figures, Write, fmt_bytes, open_section, pyplot

CLAIM = ("Claim tested (issue 20): a hybrid whose attention layers keep a TOVA cache of 1/8 of the context recalls "
         "like the Transformer and holds memory like GLA.")
LABELS = {"gla": "GLA", "transformer": "Transformer++", "hybrid": "Hybrid (GLA + 1 attention layer in 4)",
          "megabyte": "MEGABYTE"}


def _rows(r: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(kind, spec, m) for kind, m in r["models"].items() for spec in m["accuracy"]]


def report_recall(r: dict[str, Any] | None, w: Write, figs: Figures) -> None:
    """Section 5: the accuracy grid per model and cache, the state bytes at 16K, a plot, a verdict."""
    if not open_section(w, "## 5. Associative recall against state size", CLAIM, r, "eval-recall"):
        return
    assert r is not None
    s = r["setup"]
    w(f"Setup: every kind at the `{s['preset']}` preset, trained from scratch on MQAR "
      f"(`longseq.tasks.train_mqar`: {s['steps']} steps of {s['batch_size']} rows of {s['train_len']} bytes, "
      f"{', '.join(map(str, s['train_pairs']))} pairs per row drawn per batch, loss at the recalls only), then "
      f"scored on {s['eval_rows']} fresh rows per cell (`longseq.tasks.mqar_accuracy`: the arg-max at each query "
      "key must be its value). The attention models are also decoded through `model.step` with a cache of 1/8 "
      f"of the row. State: the bytes of a static state of {r['state_len']:,} tokens (`init_state(..., max_len)`).")
    w("")
    cells = [(L, n) for L, by_n in next(iter(r["models"].values()))["accuracy"]["-"].items() for n in by_n]
    w("| model | cache | params | state @ 16K | " + " | ".join(f"L={L}, {n} pairs" for L, n in cells) + " |")
    w("|---|---|---:|---:|" + "---:|" * len(cells))
    for kind, spec, m in _rows(r):
        acc = [m["accuracy"][spec][L].get(n) for L, n in cells]
        w(f"| {LABELS.get(kind, kind)} | {'own state' if spec == '-' else spec} | {m['params'] / 1e6:.2f}M | "
          f"{fmt_bytes(m['state_bytes'][spec])} | " + " | ".join("-" if a is None else f"{a:.2f}" for a in acc) + " |")
    w("")
    L, n = cells[-1]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, spec, m in _rows(r):
        ax.scatter(m["state_bytes"][spec], m["accuracy"][spec][L][n], label=f"{LABELS.get(kind, kind)} {spec}")
    ax.set_xscale("log")
    ax.set_xlabel(f"state bytes at {r['state_len']:,} tokens")
    ax.set_ylabel(f"MQAR accuracy (L={L}, {n} pairs)")
    ax.legend(fontsize=7)
    figs.embed(fig, w, "recall", "recall against state bytes")
    by = {(k, sp): m["accuracy"][sp][L][n] for k, sp, m in _rows(r)}
    size = {(k, sp): m["state_bytes"][sp] for k, sp, m in _rows(r)}
    hyb, tr, gla = ("hybrid", "tova:ctx/8"), ("transformer", "-"), ("gla", "-")
    if all(x in by for x in (hyb, tr, gla)):
        w(f"Verdict (L={L}, {n} pairs): the hybrid with TOVA at 1/8 recalls {by[hyb]:.2f} against the full "
          f"Transformer's {by[tr]:.2f} and GLA's {by[gla]:.2f}, with a state of {fmt_bytes(size[hyb])} at 16K against "
          f"{fmt_bytes(size[tr])} and {fmt_bytes(size[gla])}.")
        w("")

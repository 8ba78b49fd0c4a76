"""Section 4 of the report: TOVA on a pretrained model (``results/pretrained.json`` and ``results/pretrained/``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .common import POLICIES, read_json
from .report_format import Figures, Write, frac, open_section

LABELS = dict(POLICIES)
CLAIM = ("Claim tested (Oren et al. 2024, Table 3 and Sec. 6, on pretrained LLMs): TOVA beats the other policies "
         "at every budget and at 1/8 of the context comes close to the full cache, because it keeps what the model "
         "attends to -- the first token above all. The byte model of section 1 never learned that habit; a "
         "pretrained subword model has.")


def _sweep_table(w: Write, sweep: dict[str, Any], T: int) -> dict[int, str]:
    """Bits per UTF-8 byte per policy x budget; returns the best policy per budget."""
    budgets, scores, full = sweep["budgets"], sweep["scores"], sweep["full"]["bpb"]
    best = {b: min(sweep["policies"], key=lambda p: scores[p][str(b)]["bpb"]) for b in budgets}
    w("| policy | " + " | ".join(f"{b} ({frac(b, T)})" for b in budgets) + f" | full ({T}) |")
    w("|---|" + "---:|" * (len(budgets) + 1))
    for p in sweep["policies"]:
        cells = [f"**{scores[p][str(b)]['bpb']:.4f}**" if best[b] == p else f"{scores[p][str(b)]['bpb']:.4f}"
                 for b in budgets]
        w(f"| {LABELS.get(p, p)} | " + " | ".join(cells) + f" | {full:.4f} |")
    w("")
    return best


def _copy_plot(src: Path, figs: Figures, name: str, w: Write, alt: str) -> None:
    if src.is_file():
        dest = figs.img / f"{figs.prefix}{name}.png"
        shutil.copyfile(src, dest)
        w(f"![{alt}]({figs.rel}/{dest.name})")
        w("")


def _kept(w: Write, kept: dict[str, Any], budgets: list[int], works: list[str], T: int) -> list[int]:
    """A per-layer table of the first token kept and the mean age; returns the layers that keep the first
    token in at least 90% of the samples at the smallest budget."""
    w(f"What TOVA keeps (`longseq.sweep.kept_position_stats`, the first {T:,} tokens of {', '.join(works)}, sampled "
      "every 64 tokens once the cache is full, averaged over the works):")
    w("")
    w("| layer | " + " | ".join(f"first token kept, TOVA({b})" for b in budgets) + " | "
      + " | ".join(f"last 64 kept, TOVA({b})" for b in budgets) + " | "
      + " | ".join(f"mean age, TOVA({b})" for b in budgets) + " |")
    w("|---:|" + "---:|" * (3 * len(budgets)))
    rows = {b: kept[str(b)] for b in budgets}
    for i in range(len(rows[budgets[0]])):
        first = [f"{rows[b][i]['first_token']:.0%}" for b in budgets]
        recent = [f"{rows[b][i]['recent']['64']:.0%}" for b in budgets]
        age = [f"{rows[b][i]['mean_age']:.0f}" for b in budgets]
        w(f"| {rows[budgets[0]][i]['layer']} | " + " | ".join(first + recent + age) + " |")
    w("")
    return [r["layer"] for r in rows[budgets[0]] if r["first_token"] >= 0.9]


def _passkey(w: Write, pk: dict[str, Any]) -> dict[tuple[str, int], float]:
    """Mean accuracy per policy, budget and length; returns {(label, length): mean} for the verdict."""
    from longseq.cache.policies import resolve_budget

    lengths, out = pk["lengths"], {}
    # Smallest first, in tokens at the longest length ("ctx/16" before "ctx/8"; plain counts too).
    budgets = sorted({r["budget"] for r in pk["results"] if r["budget"]},
                     key=lambda b: resolve_budget(b, max(lengths)))
    keys, depths = pk["n_trials"], ", ".join(str(d) for d in pk["depths"])
    w(f"Greedy exact-match accuracy over {keys} key{'s' if keys > 1 else ''} x {len(pk['depths'])} depths "
      f"({depths}) per cell:")
    w("")
    w("| policy | length | full cache | " + " | ".join(f"{b}" for b in budgets) + " |")
    w("|---|---:|---:|" + "---:|" * len(budgets))
    for policy in dict.fromkeys(r["policy"] for r in pk["results"]):
        for L in lengths:
            cells = []
            for b in [None, *budgets]:
                r = next((x for x in pk["results"] if (x["policy"], x["budget"], x["length"]) == (policy, b, L)), None)
                cells.append("" if r is None else f"{r['mean']:.2f}")
                if r is not None:
                    out[(policy, L) if b is None else (f"{policy}@{b}", L)] = r["mean"]
            w(f"| {LABELS.get(policy, policy)} | {L} | " + " | ".join(cells) + " |")
    w("")
    return out


def report_pretrained(res: dict[str, Any] | None, folder: Path, w: Write, figs: Figures) -> None:
    """Section 4: the Table 3 sweeps at each context, the kept positions, the passkey test, a verdict."""
    if not open_section(w, "## 4. TOVA on a pretrained model", CLAIM, res, "eval-pretrained --pretrained MODEL"):
        return
    assert res is not None
    env, a = res["env"], res["arch"]
    w(f"Model: `{res['model']}` ({a['params'] / 1e6:.3g}M parameters: {a['n_layers']} layers, d={a['d_model']}, "
      f"{a['n_heads']} query and {a['n_kv_heads']} KV heads, vocabulary {a['vocab_size']:,}; converted with "
      "`longseq.load_pretrained`, whose logits equal HF transformers' to 1e-5, `tests/test_pretrained.py`). Device: "
      f"{env.get('device', 'cpu')}; torch {env['torch']}. Data: the first T tokens of each of {len(res['works'])} "
      f"works of the built-in corpus ({', '.join(res['works'])}), each decoded with the policy active from its "
      "first token; every token after the first is scored, in bits per UTF-8 byte. Budgets are tokens kept per "
      "layer; H2O keeps budget/2 recent tokens; Window+4 sinks is StreamingLLM. A first look on a CPU with three "
      "works is in [pretrained.md](pretrained.md).")
    w("")
    w("Commands (`MODEL` = the .gguf file, `WORKS` = the works as text files, `OUT` = the results folder):")
    w("")
    w("```bash")
    for cmd in res["commands"].values():
        w(cmd)
    w("```")
    w("")
    gaps, wins = {}, {}
    for T in res["contexts"]:
        sweep = read_json(folder / f"sweep_{T}" / "sweep.json")
        if sweep is None:
            w(f"Context {T}: not run.")
            w("")
            continue
        w(f"Context {T:,} tokens ({sweep['full']['tokens']:,} tokens, {sweep['full']['bytes']:,} bytes scored per "
          "cell); **bold** = best policy at that budget:")
        w("")
        best = _sweep_table(w, sweep, T)
        wins[T] = best
        eighth = str(T // 8)
        gaps[T] = sweep["scores"]["tova"][eighth]["bpb"] - sweep["full"]["bpb"], sweep["full"]["bpb"]
        _copy_plot(folder / f"sweep_{T}" / "sweep.png", figs, f"pretrained-sweep-{T}", w, f"bpb vs budget, {T}")
    kept = read_json(folder / "kept.json")
    sink_layers: list[int] = []
    if kept is not None:
        sink_layers = _kept(w, kept, res["kept_budgets"], res["kept_works"], res["contexts"][0])
    acc: dict[tuple[str, int], float] = {}
    tests = [(T, read_json(folder / f"passkey_{T}" / "passkey.json")) for T in res["contexts"]]
    if any(pk is not None for _, pk in tests):
        w("### Passkey retrieval")
        w("")
        w("A random 5-digit key hidden at a depth of a prompt of exactly L tokens of filler (`--filler repeat`: a "
          "few plain sentences over and over, the classic passkey setup; in Shakespeare the 135M model finds the "
          "key only near the start even with the full cache, see [pretrained.md](pretrained.md)), and the question "
          "at the end; greedy decoding, exact match.")
        w("")
        for T, pk in tests:
            if pk is None:
                w(f"{T:,} tokens: not run.")
                w("")
                continue
            w(f"{T:,} tokens:")
            w("")
            acc.update(_passkey(w, pk))
            _copy_plot(folder / f"passkey_{T}" / "passkey.png", figs, f"pretrained-passkey-{T}", w,
                       f"passkey accuracy at {T} tokens: policy x budget x depth")
    _verdict(w, wins, gaps, sink_layers, acc, a["n_layers"])


def _verdict(w: Write, wins: dict, gaps: dict, sink_layers: list[int], acc: dict, n_layers: int) -> None:
    w("Verdict:")
    w("")
    for T, best in wins.items():
        tova_wins = [b for b, p in best.items() if p == "tova"]
        others = ", ".join(f"{frac(b, T)}: {LABELS.get(p, p)}" for b, p in best.items() if p != "tova")
        gap, full = gaps[T]
        w(f"- At {T:,} tokens TOVA is the best policy at {len(tova_wins)} of {len(best)} budgets"
          + (f" ({', '.join(frac(b, T) for b in tova_wins)})" if tova_wins else "")
          + (f"; elsewhere {others}" if others else "")
          + f". At 1/8 it is {gap:+.3f} bits per byte from the full cache ({gap / full:+.1%}).")
    if sink_layers:
        w(f"- TOVA keeps the first token in {len(sink_layers)} of {n_layers} layers at the smallest budget: the "
          "attention sink a window drops, which is why the plain window is far the worst policy here while it was "
          "the best on the byte model of section 1 (which never learned a sink).")
    if acc:
        full = {L: v for (p, L), v in acc.items() if p == "full"}
        w("- Passkey: the full cache scores " + ", ".join(f"{v:.2f} at {L:,} tokens" for L, v in full.items())
          + "; a bounded policy finds a key only if it kept the key's tokens until the question. Best bounded "
          "policy per budget:")
        for L in full:
            cells = {}
            for (p, length), v in acc.items():
                if length == L and "@" in p:
                    policy, budget = p.split("@")
                    cells.setdefault(budget, []).append((v, LABELS.get(policy, policy)))
            best = [f"{b} {max(c)[0]:.2f} ({', '.join(n for v, n in c if v == max(c)[0])})" for b, c in cells.items()]
            w(f"  - {L:,} tokens: " + "; ".join(best) + ".")
    w("")

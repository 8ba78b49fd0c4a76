"""Stage ``eval-recall`` (issue 20): recall for every model kind at equal size, in two parts.

* ``mqar``: each kind is trained from scratch on multi-query associative recall (``longseq.tasks.mqar``:
  key-value pairs, then each key asked again, on bytes) at one sequence length with a range of pair counts,
  then scored on a grid of pair counts and lengths -- the attention models also with bounded caches at 1/8
  of the length.
* ``passkey``: each kind is trained on the built-in corpus with passkey examples mixed in (``longseq train
  --passkey-mix``), then scored by ``longseq eval --task passkey`` with the held-out works as filler, under
  the same caches; the run's last validation gives its bits per byte on the held-out works.

Both record the state size at 16K tokens, read from a static state of that length. Results accumulate in
``results/recall.json`` per part and kind, so ``--recall-kinds`` / ``--recall-parts`` can spread the stage
over several calls; the stage is complete when every kind has both parts.
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import (
    REPO,
    VAL_DOCS,
    builtin_works,
    environment,
    free_gpu_memory,
    portable_command,
    read_json,
    say,
    write_json,
)
from .config import Ctx, pick_device

STATE_LEN = 16384  # the context at which the state bytes are compared
PARTS = ("mqar", "passkey")


@dataclass(frozen=True)
class RecallSetup:
    """What the MQAR part trains and scores (full run, or the --quick smoke run on a CPU). ``sizes``: each
    kind's config overrides on ``preset`` (equal widths and depths; the hybrid's one GLA and one attention layer)."""

    preset: str
    sizes: dict[str, dict[str, Any]]
    train_len: int
    train_pairs: tuple[int, ...]
    eval_lens: tuple[int, ...]
    eval_pairs: tuple[int, ...]
    steps: int
    batch_size: int
    lr: float
    eval_rows: int
    dense: bool  # train on rows of queries only (train_mqar(dense=True)); Zoology's sparse rows were not learned


@dataclass(frozen=True)
class PasskeySetup:
    """What the passkey part trains (``longseq train --passkey-mix``) and scores (``longseq eval --task passkey``)."""

    preset: str
    sizes: dict[str, dict[str, Any]]  # each kind's config overrides on ``preset``
    seq_len: int
    batch_size: int
    steps: int
    mix: float
    answer_weight: float  # ``--passkey-answer-weight``
    lr: float
    lengths: tuple[int, ...]  # prompt lengths; the answer's 10 bytes stay inside the trained length
    trials: int
    eval_tokens: int  # validation bytes of the held-out works (0: all of them)


# Zoology's model size for MQAR: two layers of width 128 (~0.47M parameters; MEGABYTE's byte-position table for
# the 16K state adds 0.5M). The `small` preset (25M, 8 layers) learned no recall in 2000 steps at L = 512.
ZOOLOGY_SIZES = {
    "gla": dict(d_model=128, n_layers=2, n_heads=2),
    "transformer": dict(d_model=128, n_layers=2, n_heads=4),
    "hybrid": dict(d_model=128, n_layers=2, n_heads=2, attn_every=2, attn_heads=4),  # GLA, then attention
    "megabyte": dict(d_global=128, n_global_layers=2, n_global_heads=4, d_local=64, n_local_layers=1,
                     n_local_heads=2),
}
FULL = RecallSetup("tiny", ZOOLOGY_SIZES, 128, (4, 8, 16, 32), (64, 128), (4, 8, 16, 32), 3000, 64, 1e-3, 512, True)
QUICK = RecallSetup("tiny", {}, 64, (2, 4), (64,), (2, 4), 30, 16, 3e-3, 32, True)
# Passkey at the same sizes. The `small` preset (25M) trained 1500 steps of 32 x 1024 bytes with the plain loss
# learned no retrieval (every kind 0.00); with the answer weighted 30x a 2-layer width-128 Transformer began to
# retrieve within 1,000 CPU steps of 32 x 256 bytes (every row an example).
PASSKEY_FULL = PasskeySetup("tiny", ZOOLOGY_SIZES, 512, 64, 4000, 0.5, 30.0, 3e-3, (256, 500), 10, 0)
PASSKEY_QUICK = PasskeySetup("tiny", {}, 256, 4, 8, 0.5, 30.0, 3e-3, (240,), 1, 4096)
# (kind, config overrides, cache policies scored; "-": the model's own state / the plain forward)
KINDS = [
    ("gla", {}, ["-"]),
    ("transformer", {}, ["-", "tova:ctx/8", "h2o:ctx/8", "window:ctx/8"]),
    ("hybrid", {}, ["-", "tova:ctx/8", "h2o:ctx/8"]),
    ("megabyte", {"max_seq_len": STATE_LEN}, ["-"]),  # its byte positions must reach the 16K state
]


def _policy(spec: str, length: int):
    """The cache policy of ``spec`` at ``length`` tokens (``"-"``: None, the model's own state)."""
    from longseq.bench.decode import resolve_policy

    return None if spec == "-" else resolve_policy(spec, length)


def _state_bytes(model, spec: str, dev) -> int:
    """Bytes of a static state holding ``STATE_LEN`` tokens (a bounded cache holds its budget + 1 slots)."""
    return int(model.init_state(1, cache=_policy(spec, STATE_LEN), device=dev, max_len=STATE_LEN).nbytes())


def _mqar(ctx: Ctx, kind: str, overrides: dict[str, Any], policies: list[str], dev) -> dict[str, Any]:
    """Train one kind on MQAR and score it under each cache (see the module docstring)."""
    import torch

    from longseq.models import build_model
    from longseq.tasks.mqar import mqar_accuracy, train_mqar

    rs = QUICK if ctx.setup.quick else FULL
    torch.manual_seed(0)
    model = build_model(kind, rs.preset, **{**rs.sizes.get(kind, {}), **overrides}).to(dev)
    t0 = time.perf_counter()
    losses = train_mqar(model, rs.train_len, rs.train_pairs, rs.steps, batch_size=rs.batch_size, lr=rs.lr,
                        warmup=max(1, rs.steps // 20), device=dev, dense=rs.dense)
    train_s = time.perf_counter() - t0
    acc = {spec: {str(L): {str(n): mqar_accuracy(model, L, n, n_rows=rs.eval_rows, batch_size=min(rs.eval_rows, 256),
                                                 cache=_policy(spec, L), device=dev)
                           for n in rs.eval_pairs if 4 * n <= L}
                  for L in rs.eval_lens}
           for spec in policies}
    entry = {"params": model.num_params(), "train_s": train_s, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
             "accuracy": acc, "state_bytes": {s: _state_bytes(model, s, dev) for s in policies},
             "env": environment(dev)}
    say(f"recall mqar {kind}: {model.num_params() / 1e6:.2f}M params, trained in {train_s:.0f} s, "
        + ", ".join(f"{s}: {acc[s]}" for s in policies))
    return entry


def passkey_commands(ctx: Ctx, kind: str, overrides: dict[str, Any], policies: list[str], filler: Path,
                     out: Path) -> dict[str, list[str]]:
    """The ``longseq train`` and ``longseq eval --task passkey`` argv of one kind's passkey part."""
    ps = PASSKEY_QUICK if ctx.setup.quick else PASSKEY_FULL
    run = ctx.run_dir(f"recall-{kind}")
    train = ["train", "--out", str(run), "--model", kind, "--preset", ps.preset]
    for k, v in {**ps.sizes.get(kind, {}), **overrides}.items():
        train += ["--set", f"{k}={v}"]
    if ctx.data is not None:
        train += ["--data", *ctx.data]
    train += ["--val-docs", ",".join(VAL_DOCS), "--seq-len", str(ps.seq_len), "--batch-size", str(ps.batch_size),
              "--steps", str(ps.steps), "--lr", str(ps.lr), "--warmup", str(max(1, min(100, ps.steps // 10))),
              "--passkey-mix", str(ps.mix), "--passkey-answer-weight", str(ps.answer_weight), "--eval-every", "0",
              "--eval-tokens", str(ps.eval_tokens), "--keep", "1",
              "--log-every", str(max(1, min(10, ps.steps // 20))), "--seed", "0", "--no-progress", "--overwrite"]
    names = ["full" if p == "-" else p.split(":")[0] for p in policies]
    evaluate = ["eval", str(run), "--task", "passkey", "--lengths", ",".join(map(str, ps.lengths)),
                "--policies", ",".join(names), "--trials", str(ps.trials), "--filler", str(filler),
                "--batch-size", "50", "--out", str(out / kind)]
    budgets = sorted({p.split(":")[1] for p in policies if p != "-"})
    if budgets:
        evaluate[evaluate.index("--trials"):evaluate.index("--trials")] = ["--budgets", ",".join(budgets)]
    if ctx.device:
        train += ["--device", ctx.device]
        evaluate += ["--device", ctx.device]
    return {"train": train, "eval": evaluate}


def heldout_text(ctx: Ctx) -> Path:
    """The held-out works (the validation documents of training) as one file: the passkey filler, text none
    of the models trained on."""
    path = ctx.out / "works" / "heldout.txt"
    if not path.is_file():
        works = builtin_works(ctx.out / "works")
        missing = [d for d in VAL_DOCS if not (works / d).is_file()]
        if missing:
            raise SystemExit(f"reproduce: the built-in corpus lacks {missing}")
        # in the archive's (alphabetical) order
        path.write_text("\n".join((works / d).read_text(encoding="utf-8") for d in sorted(VAL_DOCS)), encoding="utf-8")
    return path


def _passkey(ctx: Ctx, kind: str, overrides: dict[str, Any], policies: list[str], dev) -> dict[str, Any]:
    """Train one kind on the corpus with passkey examples, then score its held-out bpb and passkey accuracy."""
    from longseq.cli import main as longseq_main
    from longseq.sources import open_model

    out = ctx.results / "recall_passkey"
    cmds = passkey_commands(ctx, kind, overrides, policies, heldout_text(ctx), out)
    t0 = time.perf_counter()
    for step in ("train", "eval"):
        if longseq_main(cmds[step]) != 0:
            raise SystemExit(f"reproduce: `longseq {shlex.join(cmds[step])}` failed")
        if step == "train":
            train_s = time.perf_counter() - t0
    run = Path(cmds["train"][cmds["train"].index("--out") + 1])
    val = [rec for rec in map(_json_line, (run / "metrics.jsonl").read_text().splitlines()) if "val_bpb" in rec]
    speed = [rec["tok_s"] for rec in map(_json_line, (run / "metrics.jsonl").read_text().splitlines())
             if rec.get("tok_s")]
    table = read_json(out / kind / "passkey.json")["results"]
    acc: dict[str, dict[str, float]] = {}
    for rec in table:
        spec = "-" if rec["budget"] is None else f"{rec['policy']}:{rec['budget']}"
        acc.setdefault(spec, {})[str(rec["length"])] = rec["mean"]
    model = open_model(str(run), dev)
    entry = {"params": model.num_params(), "train_s": train_s, "val_bpb": val[-1]["val_bpb"],
             "train_tok_s": speed[-1] if speed else None, "accuracy": acc,
             "state_bytes": {s: _state_bytes(model, s, dev) for s in policies},
             "commands": {k: _portable(v, ctx) for k, v in cmds.items()}, "env": environment(dev)}
    say(f"recall passkey {kind}: val bpb {entry['val_bpb']:.3f}, accuracy {acc}")
    return entry


def _json_line(line: str) -> dict[str, Any]:
    import json

    return json.loads(line) if line.strip() else {}


def _portable(argv: list[str], ctx: Ctx) -> str:
    """``longseq ...`` as the report prints it: paths under the output folder relative (OUT/...), the shared
    Shakespeare folder as seen from the checkout."""
    subs = [(str(ctx.out) + "/", "OUT/"), *((p, os.path.relpath(p, REPO)) for p in ctx.data or []),
            (" --device cpu", ""), (" --overwrite", "")]
    return portable_command(argv, subs)


def json_form(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so stored and current setups compare."""
    import json

    return json.loads(json.dumps(value))


def selected(value: str | None, allowed: tuple[str, ...] | list[str], flag: str) -> list[str]:
    """The comma-separated names of ``value`` (all of ``allowed`` when None); ``SystemExit`` naming the flag
    for an unknown or empty one (``reproduce.py`` checks its flags with this before any stage runs)."""
    if value is None:
        return list(allowed)
    picked = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in picked if v not in allowed]
    if bad or not picked:
        raise SystemExit(f"reproduce: {flag} {value!r}: choose from {', '.join(allowed)}")
    return picked


KIND_NAMES = [k for k, _, _ in KINDS]


def recall_complete(result: dict[str, Any] | None, quick: bool) -> bool:
    """Whether ``results/recall.json`` holds both parts for every kind, under this mode's setups."""
    if result is None:
        return False
    setups = {"setup": QUICK if quick else FULL, "passkey_setup": PASSKEY_QUICK if quick else PASSKEY_FULL}
    if any(json_form(result.get(key)) != json_form(value.__dict__) for key, value in setups.items()):
        return False
    return all(_has(result, part, kind, policies) for part in PARTS for kind, _, policies in KINDS)


def _has(result: dict[str, Any], part: str, kind: str, policies: list[str]) -> bool:
    """Whether ``result`` holds ``part`` for ``kind`` under every policy in ``policies``."""
    entry = result.get(part, {}).get(kind)
    return entry is not None and set(policies) <= set(entry.get("accuracy", {}))


def stage_eval_recall(ctx: Ctx) -> dict[str, Any]:
    """Run the parts and kinds asked for (``--recall-parts``, ``--recall-kinds``; default all) and merge them
    into ``results/recall.json``; kinds already there under every policy are kept unless ``--force``."""
    kinds = selected(ctx.args.recall_kinds, KIND_NAMES, "--recall-kinds")
    parts = selected(ctx.args.recall_parts, PARTS, "--recall-parts")
    dev = pick_device(ctx)
    result = read_json(ctx.result("recall")) or {}
    setups = {"mqar": (QUICK if ctx.setup.quick else FULL).__dict__,
              "passkey": (PASSKEY_QUICK if ctx.setup.quick else PASSKEY_FULL).__dict__}
    for part, key in (("mqar", "setup"), ("passkey", "passkey_setup")):
        # Kinds measured under another setup (--quick, or an older one) are not this setup's: redo them.
        if part in result and json_form(result.get(key)) != json_form(setups[part]):
            say(f"eval-recall: the {part} results in {ctx.result('recall')} used another setup; redoing them")
            result[part] = {}
        result[key] = setups[part]
    result["state_len"] = STATE_LEN
    run = {"mqar": _mqar, "passkey": _passkey}
    for part in parts:
        done = result.setdefault(part, {})
        for kind, overrides, policies in KINDS:
            # A kind stored with every policy asked for is kept (unless --force); one missing a policy is redone.
            if kind not in kinds or (_has(result, part, kind, policies) and not ctx.args.force):
                continue
            done[kind] = run[part](ctx, kind, overrides, policies, dev)
            write_json(ctx.result("recall"), result)  # after each kind: a cut call keeps what it finished
            free_gpu_memory(dev)
    write_json(ctx.result("recall"), result)
    missing = [f"{part} {kind}" for part in PARTS for kind, _, policies in KINDS
               if not _has(result, part, kind, policies)]
    return {"complete": False, "missing": "still to run: " + ", ".join(missing)} if missing else {}

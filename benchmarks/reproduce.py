#!/usr/bin/env python3
"""Reproduce the central claims of the three papers behind longseq at small scale (issue 9).

    python benchmarks/reproduce.py --out runs/repro                       # everything, in order
    python benchmarks/reproduce.py --out runs/repro --stage train-2k       # one stage (see STAGES)
    python benchmarks/reproduce.py --out runs/repro --stage report         # docs/reproductions.md from JSON
    python benchmarks/reproduce.py --out /tmp/q --quick                    # tiny CPU smoke run (< 2 min)

Experiments (Shakespeare, byte level; validation = hamlet, tempest, sonnets; models of 14-22M parameters):

1. TOVA (Oren et al. 2024, Table 3 / Fig. 3): a byte Transformer trained at context 2048 is scored on
   the validation documents cut into 2048-byte windows, each window decoded with the cache policy active
   from its first byte, under Window, Window+4 sinks, H2O, TOVA-head and TOVA at budgets 1/64 .. 1/2 of
   the context, plus the full cache; per-layer kept-position statistics (``kept_position_stats``).
2. MEGABYTE (Yu et al. 2023): MEGABYTE vs a byte Transformer and a byte GLA at context 8192, trained
   for equal GPU minutes; bpb plain and strided, generation bytes/s at batch 1.
3. GLA (Yang et al. 2024): GLA vs Transformer++ at equal parameters and steps, trained at 2048; bpb,
   generation-state bytes at 2K/8K/32K of context, and evaluation at 2048/4096/8192 (extrapolation).

Stages are resumable and idempotent: a stage whose result JSON exists is skipped (``--force`` redoes it);
a training run stopped by the stage deadline (SIGTERM: longseq saves a checkpoint) resumes from its
checkpoint when the same command runs again. Step counts are fixed once, from a throughput probe, in
``OUT/results/plan-<group>.json``, so a resumed or repeated stage trains the same runs. Every number the
report shows is read from ``OUT/results/*.json``; ``--stage report`` rebuilds the markdown and the plots
without touching a GPU.

On a GPU with a 10-minute limit per call, run the stages one call each (each fits in ~8 minutes on an
H100; ``--export DIR`` copies results/ and logs/, not checkpoints, out of the output folder)::

    python benchmarks/reproduce.py --out runs/repro --stage train-2k --export $OUT/repro
    python benchmarks/reproduce.py --out runs/repro --stage train-8k --export $OUT/repro
    python benchmarks/reproduce.py --out runs/repro --stage eval --export $OUT/repro   # 3 evals in parallel
    python benchmarks/reproduce.py --out runs/repro --stage report                     # anywhere, from JSON
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "shakespeare"
VAL_DOCS = ["hamlet.txt", "tempest.txt", "sonnets.txt"]
LN2 = math.log(2.0)
# GPU minutes per run at exclusive throughput, per group, when --minutes is not given. The 8k group has
# three runs sharing one GPU in one stage, so it gets less to stay inside an 8-minute call.
DEFAULT_MINUTES = {"2k": 2.5, "8k": 1.75}
EVAL_TOKENS = 262_144  # validation bytes `longseq train` scores at each evaluation (its default)

# Stages in the order `--stage all` runs them. `train` and `eval` are the groups of the stages below them.
STAGES = ["train-2k", "train-8k", "eval-tova", "eval-megabyte", "eval-gla", "report"]
META_STAGES = {"all": STAGES, "train": ["train-2k", "train-8k"], "eval": ["eval-tova", "eval-megabyte", "eval-gla"]}
POLICIES = [  # (sweep spec, label in the report)
    ("window", "Window"),
    ("sink", "Window+4 sinks"),
    ("h2o", "H2O"),
    ("tova_head", "TOVA-head"),
    ("tova", "TOVA"),
]


# --------------------------------------------------------------------------------------------- setup
@dataclass
class RunSpec:
    """One training run: what ``longseq train`` is called with."""

    name: str
    group: str  # "2k" (experiments 1 and 3) or "8k" (experiment 2)
    label: str
    kind: str
    preset: str
    overrides: dict[str, Any]
    seq_len: int
    batch_size: int
    lr: float = 1e-3


@dataclass
class Setup:
    quick: bool
    ctx: int  # context of experiments 1 and 3
    long_ctx: int  # context of experiment 2
    runs: dict[str, RunSpec]
    budgets: list[int]
    extrap: list[int]
    state_lens: list[int]
    stride: int
    gen_prompt: int
    gen_tokens: int
    kept_budgets: list[int]
    probe_warmup: int
    probe_steps: int
    eval_batch: dict[int, int] = field(default_factory=dict)


def make_setup(quick: bool) -> Setup:
    if quick:
        # Tiny models, short contexts: exercises every code path on a CPU in well under a minute.
        ctx, long_ctx = 512, 1024
        tiny = {}
        runs = [
            RunSpec("transformer-2k", "2k", "Transformer++", "transformer", "tiny", tiny, ctx, 4),
            RunSpec("gla-2k", "2k", "GLA", "gla", "tiny", tiny, ctx, 4),
            RunSpec("megabyte-8k", "8k", "MEGABYTE", "megabyte", "tiny", {"max_seq_len": long_ctx}, long_ctx, 2),
            RunSpec("transformer-8k", "8k", "Transformer++", "transformer", "tiny", tiny, long_ctx, 2),
            RunSpec("gla-8k", "8k", "GLA", "gla", "tiny", tiny, long_ctx, 2),
        ]
        gen_prompt, gen_tokens, probe = 128, 16, (1, 2)
    else:
        ctx, long_ctx = 2048, 8192
        # d_model 384 x 8 layers: 14.4M parameters for both, so "equal parameters" holds to 0.6%.
        tr = {"d_model": 384, "n_layers": 8, "n_heads": 6}  # head dim 64
        gla = {"d_model": 384, "n_layers": 8, "n_heads": 4}  # the GLA default of 4 heads
        # MEGABYTE at P = 8 with the paper's global:local width ratio 2:1 (22.1M parameters).
        mb = {"patch_size": 8, "d_global": 512, "n_global_layers": 6, "n_global_heads": 8, "d_local": 256,
              "n_local_layers": 3, "n_local_heads": 4, "max_seq_len": long_ctx}
        # 32,768 bytes per optimizer step everywhere.
        runs = [
            RunSpec("transformer-2k", "2k", "Transformer++", "transformer", "small", tr, ctx, 16),
            RunSpec("gla-2k", "2k", "GLA", "gla", "small", gla, ctx, 16),
            RunSpec("megabyte-8k", "8k", "MEGABYTE", "megabyte", "small", mb, long_ctx, 4),
            RunSpec("transformer-8k", "8k", "Transformer++", "transformer", "small", tr, long_ctx, 4),
            RunSpec("gla-8k", "8k", "GLA", "gla", "small", gla, long_ctx, 4),
        ]
        gen_prompt, gen_tokens, probe = 4096, 256, (3, 10)
    return Setup(
        quick=quick, ctx=ctx, long_ctx=long_ctx, runs={r.name: r for r in runs},
        budgets=[ctx // d for d in (64, 32, 16, 8, 4, 2)],
        extrap=[ctx, 2 * ctx, 4 * ctx], state_lens=[ctx, 4 * ctx, 16 * ctx], stride=long_ctx // 4,
        gen_prompt=gen_prompt, gen_tokens=gen_tokens, kept_budgets=[ctx // 32, ctx // 8],
        probe_warmup=probe[0], probe_steps=probe[1],
        eval_batch={ctx: 8, 2 * ctx: 4, 4 * ctx: 2} if not quick else {},
    )


class Ctx:
    """Paths and options shared by the stages."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t_start = time.perf_counter()
        self.out = Path(args.out).resolve()
        self.results = self.out / "results"
        self.logs = self.out / "logs"
        self.runs_dir = self.out / "runs"
        self.setup = make_setup(args.quick)
        data = Path(args.data) if args.data else DEFAULT_DATA
        if data.exists():
            self.data: list[str] | None = [str(data.resolve())]
            self.data_source = f"{data} (the files of `shared/data/shakespeare`)"
        elif args.data:
            raise SystemExit(f"reproduce: --data {args.data} does not exist")
        else:
            # Same 42 works byte for byte (checked when the built-in corpus was made); used where the
            # shared folder is not next to the checkout, e.g. on the GPU machine.
            self.data = None
            self.data_source = "the built-in corpus (`longseq.data.builtin_corpus_path()`, the same 42 works)"
        if args.report:
            self.report = Path(args.report).resolve()
        else:
            self.report = (self.out / "reproductions.md") if args.quick else (REPO / "docs" / "reproductions.md")
        self.device = args.device or ("cpu" if args.quick else None)

    def result(self, name: str) -> Path:
        return self.results / f"{name}.json"

    def run_dir(self, name: str) -> Path:
        return self.runs_dir / name


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a result (parallel eval stages)


def say(msg: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def environment(device: Any = None) -> dict[str, Any]:
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


def pick_device(ctx: Ctx):
    from longseq.train.distributed import pick_device as pick

    return pick(ctx.device)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- data
def corpus_and_split(ctx: Ctx):
    from longseq.data import builtin_corpus_path, load_corpus, split_documents

    corpus = load_corpus(ctx.data if ctx.data is not None else [builtin_corpus_path()])
    return corpus, split_documents(corpus.names, VAL_DOCS)


def val_documents(ctx: Ctx):
    """``(name, uint8 array)`` of the validation works, as ``longseq eval --split val`` picks them."""
    from longseq.evaluate import corpus_documents

    corpus, split = corpus_and_split(ctx)
    # Quick mode keeps the first ~8 KB of each work so the CPU smoke test stays fast.
    return corpus_documents(corpus, split.val, 3 * 8192 if ctx.setup.quick else None)


def train_bytes(ctx: Ctx) -> int:
    corpus, split = corpus_and_split(ctx)
    return int(sum(corpus.doc_len(i) for i in split.train))


# ----------------------------------------------------------------------------------------- training
def probe_throughput(ctx: Ctx, specs: list[RunSpec]) -> dict[str, dict[str, Any]]:
    """Exclusive training throughput of each run (``longseq.bench.train.bench_train``: forward, backward
    and AdamW on its real shapes, bf16 autocast on CUDA), one model at a time so they do not share the GPU."""
    import torch

    from longseq.bench.train import bench_train
    from longseq.models import build_model

    dev = pick_device(ctx)
    out = {}
    for spec in specs:
        torch.manual_seed(0)
        model = build_model(spec.kind, spec.preset, **spec.overrides).to(dev)
        t0 = time.perf_counter()
        r = bench_train(model, spec.batch_size, spec.seq_len, ctx.setup.probe_steps, ctx.setup.probe_warmup, dev)
        out[spec.name] = {"params": model.num_params(), "probe_tok_s": r["train_tok_s"],
                          "probe_peak_gib": r["train_peak_gib"], "probe_wall_s": time.perf_counter() - t0}
        say(f"probe {spec.name}: {model.num_params() / 1e6:.2f}M params, {r['train_tok_s']:,.0f} tok/s exclusive")
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def make_plan(ctx: Ctx, group: str) -> dict[str, Any]:
    """Steps per run, fixed once per output directory (``results/plan-<group>.json``).

    Group 2k (experiments 1 and 3): equal steps, as many as the slower model does in ``--minutes``.
    Group 8k (experiment 2): equal GPU minutes at exclusive throughput. Both are capped at
    ``--max-epochs`` passes over the training bytes: these models overfit 4.7 MB of Shakespeare, so more
    minutes would not mean a better model; for group 8k the cap shortens the shared time budget (the
    fastest model reaches the cap), so the minutes stay equal.
    """
    path = ctx.result(f"plan-{group}")
    plan = read_json(path)
    if plan is not None and not ctx.args.force:
        return plan
    args, setup = ctx.args, ctx.setup
    minutes = args.minutes if args.minutes is not None else DEFAULT_MINUTES[group]
    specs = [s for s in setup.runs.values() if s.group == group]
    probes = probe_throughput(ctx, specs)
    n_train = train_bytes(ctx)
    cap_tokens = args.max_epochs * n_train
    runs = {}
    if group == "2k":
        rate = min(probes[s.name]["probe_tok_s"] for s in specs)
        tokens = min(minutes * 60 * rate, cap_tokens)
        rule = (f"equal steps: the number the slower model trains in {minutes:g} GPU minutes, capped at "
                f"{args.max_epochs:g} epochs")
        per_run_tokens = {s.name: tokens for s in specs}
    else:
        fastest = max(probes[s.name]["probe_tok_s"] for s in specs)
        shared = min(minutes, cap_tokens / fastest / 60)
        rule = (f"equal GPU minutes: {shared:.2f} min each at exclusive throughput ({minutes:g} asked, "
                f"capped so the fastest model sees at most {args.max_epochs:g} epochs)")
        per_run_tokens = {s.name: shared * 60 * probes[s.name]["probe_tok_s"] for s in specs}
    for s in specs:
        tps = s.batch_size * s.seq_len
        steps = args.steps if args.steps else max(1, int(per_run_tokens[s.name] // tps))
        p = probes[s.name]
        runs[s.name] = {
            "spec": asdict(s), **p, "steps": steps, "tokens_per_step": tps, "tokens": steps * tps,
            "epochs": steps * tps / n_train, "gpu_minutes": steps * tps / p["probe_tok_s"] / 60,
        }
    plan = {"group": group, "rule": rule if not args.steps else f"fixed --steps {args.steps}",
            "minutes": minutes, "max_epochs": args.max_epochs, "train_bytes": n_train,
            "eval_tokens": 8192 if setup.quick else EVAL_TOKENS,
            # Where the results came from, so a report built elsewhere (from copied JSON) names them right.
            "data_source": ctx.data_source, "out": str(ctx.out),
            "env": environment(pick_device(ctx)), "runs": runs}
    write_json(path, plan)
    return plan


def train_command(ctx: Ctx, name: str, run: dict[str, Any], resume: bool) -> list[str]:
    s = RunSpec(**run["spec"])
    steps = run["steps"]
    every = max(1, steps // 5)
    cmd = [sys.executable, "-m", "longseq", "train", "--out", str(ctx.run_dir(name)), "--model", s.kind,
           "--preset", s.preset]
    for k, v in s.overrides.items():
        cmd += ["--set", f"{k}={v}"]
    if ctx.data is not None:
        cmd += ["--data", *ctx.data]
    cmd += ["--val-docs", ",".join(VAL_DOCS), "--seq-len", str(s.seq_len), "--batch-size", str(s.batch_size),
            "--steps", str(steps), "--lr", str(s.lr), "--warmup", str(max(1, min(100, steps // 10))),
            "--eval-every", str(every), "--save-every", str(every), "--keep", "1", "--log-every",
            str(max(1, min(10, steps // 20))), "--seed", "0", "--no-progress"]
    if ctx.setup.quick:
        cmd += ["--eval-tokens", "8192"]  # the tiny CPU runs validate often; keep that cheap
    if ctx.device:
        cmd += ["--device", ctx.device]
    if resume:
        cmd.append("--resume")
    return cmd


def checkpoint_step(run_dir: Path) -> int:
    from longseq.train.checkpoint import list_checkpoints

    ckpts = list_checkpoints(run_dir)
    return int(ckpts[-1].name.split("_")[1]) if ckpts else 0


def read_metrics(run_dir: Path) -> dict[str, list]:
    val, loss = [], []
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            if "val_bpb" in rec:
                val.append([rec["step"], rec["val_bpb"]])
            elif "loss" in rec:
                loss.append([rec["step"], rec["loss"] / LN2, rec.get("tok_s")])
    return {"val": val, "train": loss}


def stage_train(ctx: Ctx, group: str) -> dict[str, Any]:
    plan = make_plan(ctx, group)
    runs = plan["runs"]
    # Counted from the start of the command, so the probe and start-up are inside the limit.
    deadline = ctx.t_start + ctx.args.deadline_min * 60 if ctx.args.deadline_min > 0 else None
    procs: dict[str, tuple[subprocess.Popen, Any]] = {}
    launched: dict[str, str] = {}
    started: dict[str, float] = {}
    ended: dict[str, float] = {}
    ctx.logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if ctx.args.quick:
        env.setdefault("OMP_NUM_THREADS", "1")  # several tiny CPU runs at once on a few cores
    for name, run in runs.items():
        done = checkpoint_step(ctx.run_dir(name))
        if done >= run["steps"] and not ctx.args.force:
            say(f"{name}: already trained ({done} steps), skipped")
            continue
        resume = done > 0 and not ctx.args.force
        cmd = train_command(ctx, name, run, resume)
        if ctx.args.force and ctx.run_dir(name).exists():
            cmd.append("--overwrite")
        log = open(ctx.logs / f"train-{name}.log", "a")  # noqa: SIM115
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        say(f"{name}: {'resuming at step ' + str(done) if resume else 'starting'}, {run['steps']} steps, "
            f"{run['gpu_minutes']:.2f} planned GPU min; log {ctx.logs / f'train-{name}.log'}")
        started[name] = time.perf_counter()
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env), log)
        launched[name] = shlex.join(["python", *cmd[1:]])
    interrupted = False
    while len(ended) < len(procs):
        for name, (p, _) in procs.items():
            if name not in ended and p.poll() is not None:
                ended[name] = time.perf_counter()
        if deadline is not None and time.perf_counter() > deadline and not interrupted:
            # longseq train saves a checkpoint on SIGTERM; the same command resumes it later.
            say(f"stage deadline ({ctx.args.deadline_min:g} min) reached: stopping the runs (they save)")
            for name, (p, _) in procs.items():
                if name not in ended:
                    p.send_signal(signal.SIGTERM)
            interrupted = True
        time.sleep(0.5)
    failed = []
    for name, (p, log) in procs.items():
        log.close()
        if p.returncode not in (0, 128 + signal.SIGTERM):
            failed.append(name)
            say(f"{name}: FAILED with exit status {p.returncode}; see {ctx.logs / f'train-{name}.log'}")
    status = {}
    for name, run in runs.items():
        step = checkpoint_step(ctx.run_dir(name))
        metrics = read_metrics(ctx.run_dir(name))
        prev = read_json(ctx.result(f"train-{name}")) or {}
        rec = {**run, "name": name, "step": step, "complete": step >= run["steps"], "metrics": metrics,
               "commands": prev.get("commands", []) + ([launched[name]] if name in launched else []),
               # wall time of the run's own process(es), summed over resumptions; it shared the GPU
               "wall_s": prev.get("wall_s", 0.0) + (ended[name] - started[name] if name in procs else 0.0),
               "concurrent_runs": len(procs) if name in procs else prev.get("concurrent_runs")}
        write_json(ctx.result(f"train-{name}"), rec)
        status[name] = rec
        last = metrics["val"][-1][1] if metrics["val"] else float("nan")
        say(f"{name}: step {step}/{run['steps']}, val bpb (training subset) {last:.4f}, wall {rec['wall_s']:.0f} s"
            f"{'' if rec['complete'] else '  INCOMPLETE: run the same command again to resume'}")
    if failed:
        raise SystemExit(f"reproduce: training failed for {failed}")
    return {"complete": all(r["complete"] for r in status.values()), "concurrent_runs": len(procs)}


def load_trained(ctx: Ctx, name: str, device):
    from longseq.train.checkpoint import load_model

    rec = read_json(ctx.result(f"train-{name}"))
    if rec is None or not rec.get("complete"):
        raise SystemExit(f"reproduce: {name} is not trained yet; run its train stage first")
    return load_model(ctx.run_dir(name), device).eval(), rec


# ---------------------------------------------------------------------------------------- experiment 1
def windows_of(docs, ctx_len: int):
    """Every whole ``ctx_len``-byte window of every document, in order: ``(doc, index, bytes)``."""
    return [(name, i, arr[i * ctx_len:(i + 1) * ctx_len]) for name, arr in docs for i in range(len(arr) // ctx_len)]


def score_windows(model, ids, policy, chunk: int = 512):
    """Summed next-byte loss (nats) per row of ``ids`` ``[N, T]``, the policy active from the first byte.

    The batched form of ``longseq.sweep.score_document``: one state for all rows (each row evicts on its
    own) fed through ``model.step`` in chunks; eviction is exact per token, so the chunk size changes the
    speed only. Returns a float64 ``[N]`` tensor; each row scores ``T - 1`` predictions.
    """
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        state = model.init_state(ids.shape[0], cache=policy)
        nats = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device)
        prev = None
        for a in range(0, ids.shape[1], chunk):
            x = ids[:, a:a + chunk]
            logits, state = model.step(x, state)
            logits = logits.float()
            preds = logits[:, :-1] if prev is None else torch.cat([prev, logits[:, :-1]], 1)
            targets = x[:, 1:] if prev is None else x
            nats += F.cross_entropy(preds.transpose(1, 2), targets, reduction="none").double().sum(1)
            prev = logits[:, -1:]
        return nats


def _time_evict(model, ids, budget: int, n: int, device) -> float:
    """Seconds per token step (all layers) of TOVA(budget) over a full cache, for ``ids.shape[0]`` rows."""
    import torch

    from longseq.cache import TOVA

    with torch.inference_mode():
        state = model.init_state(ids.shape[0], cache=TOVA(budget))
        model.step(ids[:, :budget + 8], state)  # fill, plus a few evictions as warmup
        sync(device)
        t0 = time.perf_counter()
        model.step(ids[:, budget + 8:budget + 8 + n], state)
        sync(device)
    return (time.perf_counter() - t0) / n


def stage_eval_tova(ctx: Ctx) -> dict[str, Any]:
    import numpy as np
    import torch

    from longseq.cache import Full, parse_policy
    from longseq.sweep import kept_position_stats

    setup, dev = ctx.setup, pick_device(ctx)
    model, rec = load_trained(ctx, "transformer-2k", dev)
    T = setup.ctx
    wins = windows_of(val_documents(ctx), T)
    all_ids = torch.from_numpy(np.stack([w for _, _, w in wins]).astype(np.int64)).to(dev)
    n_layers = model.config.n_layers

    # How long a token step takes, at batch 1 (what run_sweep / score_document do) and over all windows
    # at once. Decoding into a bounded cache is launch-bound, so a step over many rows costs little more.
    probe_n = 32 if setup.quick else 128
    b_small = min(8, len(wins))
    t1 = _time_evict(model, all_ids[:1], setup.budgets[0], probe_n, dev)
    ts = _time_evict(model, all_ids[:b_small], setup.budgets[0], probe_n, dev)
    rows = min(len(wins), ctx.args.tova_rows)
    tb = _time_evict(model, all_ids[:rows], setup.budgets[0], probe_n, dev)
    per_row = max(0.0, (tb - ts) / max(1, rows - b_small))
    steps_scored = sum(T - b for b in setup.budgets) * 3  # H2O, TOVA-head and TOVA go token by token
    # Window / Sink / full are processed a chunk at a time; count them as 10% extra.
    budget_s = ctx.args.tova_minutes * 60

    def estimate(n: int) -> float:
        per_batch = steps_scored * (tb - per_row * (rows - min(n, rows)))
        return 1.1 * per_batch * math.ceil(n / rows)

    n_eval = len(wins) if ctx.args.max_windows is None else min(len(wins), ctx.args.max_windows)
    # A token step is mostly launch overhead, so fewer rows save little: never go below 24 windows (8 per
    # work on average) for a time estimate; --max-windows is the explicit way to go lower.
    floor = min(n_eval, 24)
    while n_eval > floor and estimate(n_eval) > budget_s:
        n_eval -= 1
    sel = np.unique(np.linspace(0, len(wins) - 1, n_eval).round().astype(int)).tolist()
    subset = len(sel) < len(wins)
    timing = {
        "probe_tokens": probe_n, "budget": setup.budgets[0], "n_layers": n_layers,
        "s_per_token_step_batch1": t1, "small_rows": b_small, "s_per_token_step_small": ts,
        "rows": rows, "s_per_token_step_batched": tb,
        "run_sweep_estimate_s": 1.1 * steps_scored * t1 * len(wins),  # batch 1: one window at a time
        "batched_estimate_s": estimate(len(wins)), "time_budget_s": budget_s,
    }
    say(f"token step (TOVA {setup.budgets[0]}, {n_layers} layers): {t1 * 1e3:.2f} ms at batch 1, "
        f"{tb * 1e3:.2f} ms at batch {rows}; run_sweep over {len(wins)} windows would take ~"
        f"{timing['run_sweep_estimate_s'] / 60:.1f} min, batched ~{timing['batched_estimate_s'] / 60:.1f} min; "
        f"evaluating {len(sel)} of {len(wins)} windows")

    ids = all_ids[sel]
    names = [wins[i][0] for i in sel]
    configs = [(spec, b) for spec, _ in POLICIES for b in setup.budgets] + [("full", None)]
    scores: dict[str, dict[str, Any]] = {}
    per_doc: dict[str, dict[str, float]] = {}
    t_sweep = time.perf_counter()
    for spec, b in configs:
        policy = Full() if spec == "full" else parse_policy(spec, budget=b)
        t0 = time.perf_counter()
        nats = torch.cat([score_windows(model, ids[a:a + rows], policy) for a in range(0, len(sel), rows)]).cpu()
        sync(dev)
        dt = time.perf_counter() - t0
        n_pred = len(sel) * (T - 1)
        key = spec if b is None else f"{spec}@{b}"
        scores[key] = {"policy": spec, "budget": b, "bpb": float(nats.sum()) / LN2 / n_pred,
                       "bytes": n_pred, "seconds": dt}
        for doc in dict.fromkeys(names):
            mask = torch.tensor([n == doc for n in names])
            per_doc.setdefault(doc, {})[key] = float(nats[mask].sum()) / LN2 / (int(mask.sum()) * (T - 1))
        say(f"{policy.spec:>16s}: {scores[key]['bpb']:.4f} bpb ({dt:.1f} s)")
    sweep_s = time.perf_counter() - t_sweep

    # Kept positions (TOVA paper, Sec. 6): the first window of each validation work, batch 1.
    from longseq.cache import TOVA

    kept: dict[str, Any] = {}
    first = {}
    for name, _, w in wins:
        first.setdefault(name, w)
    for b in setup.kept_budgets:
        acc: dict[int, dict[str, Any]] = {}
        for w in first.values():
            for st in kept_position_stats(model, bytes(w.tobytes()), TOVA(b), every=64):
                a = acc.setdefault(st.layer, {"layer": st.layer, "samples": 0, "first_token": 0.0,
                                              "mean_age": 0.0, "recent": {str(r): 0.0 for r in st.recent}})
                n, m = a["samples"], st.samples
                a["first_token"] = (a["first_token"] * n + st.first_token * m) / (n + m)
                a["mean_age"] = (a["mean_age"] * n + st.mean_age * m) / (n + m)
                a["recent"] = {str(r): (a["recent"][str(r)] * n + v * m) / (n + m) for r, v in st.recent.items()}
                a["samples"] = n + m
        kept[str(b)] = [acc[k] for k in sorted(acc)]
    result = {
        "model": "transformer-2k", "params": rec["params"], "ctx": T, "budgets": setup.budgets,
        "policies": [p for p, _ in POLICIES], "windows_total": len(wins), "windows_evaluated": len(sel),
        "subset": subset, "window_docs": {d: names.count(d) for d in dict.fromkeys(names)},
        "bytes_scored": len(sel) * (T - 1), "scores": scores, "per_document": per_doc,
        "kept": kept, "kept_docs": list(first), "timing": {**timing, "sweep_s": sweep_s},
        "dtype": "fp32 (state API)", "env": environment(dev),
    }
    write_json(ctx.result("tova"), result)
    say(f"wrote {ctx.result('tova')}")
    return {}


# ---------------------------------------------------------------------------------------- experiment 2
def stage_eval_megabyte(ctx: Ctx) -> dict[str, Any]:
    import torch

    from longseq.bench.train import bench_generate
    from longseq.evaluate import evaluate_bpb

    setup, dev = ctx.setup, pick_device(ctx)
    docs = val_documents(ctx)
    rows = {}
    T, S = setup.long_ctx, setup.stride
    for name in ("megabyte-8k", "transformer-8k", "gla-8k"):
        model, rec = load_trained(ctx, name, dev)
        row: dict[str, Any] = {
            "params": rec["params"], "steps": rec["steps"], "gpu_minutes": rec["gpu_minutes"],
            "epochs": rec["epochs"], "probe_tok_s": rec["probe_tok_s"], "label": rec["spec"]["label"],
        }
        for tag, stride in (("plain", T), ("strided", S)):
            t0 = time.perf_counter()
            r = evaluate_bpb(model, docs, T, stride, batch_size=2 if setup.quick else 4, device=dev)
            row[f"bpb_{tag}"] = r.bpb
            row[f"eval_{tag}_s"] = time.perf_counter() - t0
            row[f"per_doc_{tag}"] = {d.name: d.bpb for d in r.docs}
        g = bench_generate(model, 1, setup.gen_prompt, setup.gen_tokens, dev)
        row.update(gen_bytes_s=g["gen_tok_s"], prefill_bytes_s=g["prefill_tok_s"])
        rows[name] = row
        say(f"{name}: plain {row['bpb_plain']:.4f}, strided {row['bpb_strided']:.4f} bpb, "
            f"generation {row['gen_bytes_s']:.1f} bytes/s")
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    write_json(ctx.result("megabyte"), {
        "ctx": T, "stride": S, "gen": {"batch": 1, "prompt": setup.gen_prompt, "new_tokens": setup.gen_tokens},
        "models": rows, "env": environment(dev),
    })
    say(f"wrote {ctx.result('megabyte')}")
    return {}


# ---------------------------------------------------------------------------------------- experiment 3
def stage_eval_gla(ctx: Ctx) -> dict[str, Any]:
    import numpy as np
    import torch

    from longseq.evaluate import evaluate_bpb

    setup, dev = ctx.setup, pick_device(ctx)
    docs = val_documents(ctx)
    stream = np.concatenate([a for _, a in docs])
    rows = {}
    for name in ("transformer-2k", "gla-2k"):
        model, rec = load_trained(ctx, name, dev)
        row: dict[str, Any] = {"params": rec["params"], "steps": rec["steps"], "label": rec["spec"]["label"],
                               "epochs": rec["epochs"], "bpb": {}, "state_bytes": {}}
        for T in setup.extrap:
            r = evaluate_bpb(model, docs, T, T, batch_size=setup.eval_batch.get(T, 2), device=dev)
            row["bpb"][str(T)] = r.bpb
        # Generation state after L bytes of real text (Full cache for the Transformer), fed through step.
        need = max(setup.state_lens)
        ids = torch.from_numpy(np.resize(stream, need).astype(np.int64))[None].to(dev)
        with torch.inference_mode():
            state = model.init_state(1)
            pos = 0
            for L in setup.state_lens:
                while pos < L:
                    n = min(setup.ctx, L - pos)
                    model.step(ids[:, pos:pos + n], state)
                    pos += n
                row["state_bytes"][str(L)] = int(state.nbytes())
        rows[name] = row
        say(f"{name}: bpb {row['bpb']}, state bytes {row['state_bytes']}")
        del model, state
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    write_json(ctx.result("gla"), {"ctx": setup.ctx, "extrap": setup.extrap, "state_lens": setup.state_lens,
                                   "models": rows, "env": environment(dev)})
    say(f"wrote {ctx.result('gla')}")
    return {}


# -------------------------------------------------------------------------------------------- report
def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _frac(b: int, T: int) -> str:
    return f"1/{T // b}" if T % b == 0 else f"{b / T:.3g}"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _stage_line(stages: dict[str, Any], name: str) -> str:
    s = stages.get(name)
    if not s:
        return f"| `{name}` | not run | | |"
    calls = f" ({s['calls']} calls)" if s.get("calls", 1) > 1 else ""
    return (f"| `{name}` | {s['wall_s'] / 60:.2f} min{calls} | {s['env'].get('device', '?')} | "
            f"`{s['command']}` |")


def stage_report(ctx: Ctx) -> dict[str, Any]:
    setup = ctx.setup
    report = ctx.report
    img = report.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    prefix = "repro-quick-" if setup.quick else "repro-"
    rel = os.path.relpath(img, report.parent)
    stages = {n: read_json(ctx.result(f"stage-{n}")) for n in STAGES if n != "report"}
    plans = {g: read_json(ctx.result(f"plan-{g}")) for g in ("2k", "8k")}
    trains = {n: read_json(ctx.result(f"train-{n}")) for n in setup.runs}
    tova, mb, gla = (read_json(ctx.result(n)) for n in ("tova", "megabyte", "gla"))
    env = next((s["env"] for s in stages.values() if s), None)
    data_source = next((pl["data_source"] for pl in plans.values() if pl and "data_source" in pl), ctx.data_source)
    out_paths = {pl["out"] for pl in plans.values() if pl and "out" in pl} | {str(ctx.out)}
    L: list[str] = []
    w = L.append
    w("# Reproductions at small scale: TOVA, MEGABYTE, GLA")
    w("")
    if setup.quick:
        w("> **Quick mode** (`--quick`): tiny models trained for a few steps on a CPU to test the pipeline. "
          "The numbers below say nothing about the papers' claims.")
        w("")
    w("Generated by `benchmarks/reproduce.py` from the JSON results in its output folder "
      "(`python benchmarks/reproduce.py --out OUT --stage report` rebuilds this page without training). "
      f"Data: Shakespeare's works, byte level, from {data_source}; validation = "
      f"{', '.join(VAL_DOCS)} (held out from training), training = the other 39 works"
      + (f" ({plans['2k']['train_bytes']:,} bytes)." if plans["2k"] else "."))
    w("")
    if env:
        w(f"Environment: {env['device']}; Python {env['python']}, torch {env['torch']}, triton "
          f"{env.get('triton') or 'n/a'}, longseq {env['longseq']} (commit {env['commit']}). Training in "
          "bf16 autocast (CUDA), evaluation with `longseq.evaluate.evaluate_bpb` (bf16 autocast on CUDA) and the "
          "cache sweep through the fp32 state API.")
        w("")
    w("## Commands and wall time")
    w("")
    w("Each stage is one command; stages are skipped when their results exist and training resumes from "
      "its checkpoint after an interruption.")
    w("")
    w("| stage | wall time | device | command |")
    w("|---|---:|---|---|")
    for n in STAGES[:-1]:
        w(_stage_line(stages, n))
    w("")
    w("The training runs (`python -m longseq train`, launched in parallel within a stage; the step counts "
      "come from a throughput probe of each model alone, `longseq.bench.train.bench_train` on the same "
      "shapes):")
    w("")
    any_run = False
    for n, t in trains.items():
        if t:
            any_run = True
            for c in t["commands"]:
                for path in out_paths:
                    c = c.replace(path, "OUT")
                w(f"- `{n}`: `{c}`")
    if not any_run:
        w("- not run")
    w("")
    w("## Models and training")
    w("")
    for g in ("2k", "8k"):
        if plans[g]:
            w(f"- Group {g} ({'experiments 1 and 3' if g == '2k' else 'experiment 2'}): {plans[g]['rule']}.")
    w("")
    w("| run | model | config | params | seq len x batch | steps | bytes seen (epochs) | probe tok/s "
      "| planned GPU min | run wall (s) | final val bpb* | best val bpb* |")
    w("|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for n, spec in setup.runs.items():
        t = trains.get(n)
        if not t:
            w(f"| `{n}` | {spec.label} | | | | not run | | | | | | |")
            continue
        s = t["spec"]
        cfg = " ".join(f"{k}={v}" for k, v in s["overrides"].items()) or "-"
        val = t["metrics"]["val"]
        final = f"{val[-1][1]:.4f}" if val else "-"
        best = f"{min(v for _, v in val):.4f} (step {min(val, key=lambda x: x[1])[0]})" if val else "-"
        steps = f"{t['step']}/{t['steps']}" if not t["complete"] else str(t["steps"])
        w(f"| `{n}` | {s['label']} | `{s['preset']}` {cfg} | {t['params'] / 1e6:.2f}M | {s['seq_len']} x "
          f"{s['batch_size']} | {steps} | {t['tokens'] / 1e6:.1f}M ({t['epochs']:.1f}) | {t['probe_tok_s']:,.0f} | "
          f"{t['gpu_minutes']:.2f} | {t['wall_s']:.0f} | {final} | {best} |")
    w("")
    et = next((pl.get("eval_tokens", EVAL_TOKENS) for pl in plans.values() if pl), EVAL_TOKENS)
    w(f"\\* measured by `longseq train` on {et:,} validation bytes (the first bytes of each of the three works), "
      "at the training context, every fifth of the run; the evaluations below use the final checkpoint "
      f"and {'every byte of the three works' if not setup.quick else 'the first 8 KiB of each work (quick mode)'}. "
      "Run wall time is the run's own process; the runs of a group trained at the same time on one GPU.")
    w("")
    _report_tova(ctx, tova, w, img, prefix, rel)
    _report_megabyte(ctx, mb, trains, w, img, prefix, rel)
    _report_gla(ctx, gla, w, img, prefix, rel)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(L) + "\n")
    say(f"wrote {report} and plots under {img}")
    return {}


def _embed_figure(fig, plt, w, img: Path, rel: str, name: str, alt: str) -> None:
    """Save ``fig`` as ``img/name`` and add its Markdown image line to the report."""
    fig.tight_layout()
    fig.savefig(img / name, dpi=120)
    plt.close(fig)
    w(f"![{alt}]({rel}/{name})")


def _report_tova(ctx: Ctx, r: dict | None, w, img: Path, prefix: str, rel: str) -> None:
    w("## 1. TOVA: bounded KV caches (Oren et al. 2024, Table 3 / Fig. 3)")
    w("")
    w("Claim: TOVA beats the other eviction policies at every cache budget, and at 1/8 of the context it is "
      "close to the full cache.")
    w("")
    if r is None:
        w("Result: not run (`--stage eval-tova`).")
        w("")
        return
    T, budgets = r["ctx"], r["budgets"]
    labels = dict(POLICIES)
    w(f"Setup: the `transformer-2k` model ({r['params'] / 1e6:.2f}M parameters, trained at context {T}) scores "
      f"the validation works cut into {T}-byte windows ({r['windows_evaluated']} of {r['windows_total']} whole "
      f"windows{'; a deterministic, evenly spaced subset -- see the timing below' if r['subset'] else ''}; "
      f"the <{T} bytes at the end of each work are left out; "
      + ", ".join(f"{d}: {k}" for d, k in r["window_docs"].items())
      + f"). Each window is decoded through `model.step` with the policy active from its first byte "
      f"(all windows as one batch; batch rows evict independently), and every byte after the first of a "
      f"window is scored: {r['bytes_scored']:,} bytes per cell. Budgets are tokens kept per layer. H2O keeps "
      f"budget/2 recent tokens; Window+4 sinks is StreamingLLM.")
    w("")
    w("Bits per byte (lower is better; **bold** = best policy at that budget):")
    w("")
    head = [f"{b} ({_frac(b, T)})" for b in budgets]
    w("| policy | " + " | ".join(head) + f" | full ({T}) |")
    w("|---|" + "---:|" * (len(budgets) + 1))
    full = r["scores"]["full"]["bpb"]
    best = {b: min(r["scores"][f"{p}@{b}"]["bpb"] for p in r["policies"]) for b in budgets}
    for p in r["policies"]:
        cells = []
        for b in budgets:
            v = r["scores"][f"{p}@{b}"]["bpb"]
            cells.append(f"**{v:.4f}**" if v == best[b] else f"{v:.4f}")
        w(f"| {labels.get(p, p)} | " + " | ".join(cells) + f" | {full:.4f} |")
    w("")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for p in r["policies"]:
        ax.plot(budgets, [r["scores"][f"{p}@{b}"]["bpb"] for b in budgets], marker="o", label=labels.get(p, p))
    ax.axhline(full, color="black", linestyle="--", label="full cache")
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [f"{b}\n{_frac(b, T)}" for b in budgets])
    ax.set_xlabel(f"cache budget (tokens per layer; fraction of the {T}-byte context)")
    ax.set_ylabel("bits per byte")
    lo = min(full, *best.values())
    ax.set_ylim(lo - 0.05, min(max(v["bpb"] for v in r["scores"].values()), lo + 1.5) + 0.05)
    ax.set_title("Cache policies on Hamlet, Tempest, Sonnets")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _embed_figure(fig, plt, w, img, rel, f"{prefix}tova.png", "bpb vs cache budget")
    w("")
    # The verdict, from the numbers.
    tova_best = [b for b in budgets if r["scores"][f"tova@{b}"]["bpb"] == best[b]]
    not_best = [b for b in budgets if b not in tova_best]
    eighth = T // 8
    w("Verdict:")
    w("")
    if not not_best:
        w(f"- TOVA is the best policy at every budget ({', '.join(map(str, budgets))}).")
    else:
        details = "; ".join(
            f"{b}: {labels[min(r['policies'], key=lambda p, b=b: r['scores'][f'{p}@{b}']['bpb'])]} "
            f"{best[b]:.4f} vs TOVA {r['scores'][f'tova@{b}']['bpb']:.4f}" for b in not_best)
        w(f"- TOVA is the best policy at {len(tova_best)} of {len(budgets)} budgets; not at {details}.")
    if eighth in budgets:
        v = r["scores"][f"tova@{eighth}"]["bpb"]
        w(f"- At 1/8 of the context ({eighth} tokens) TOVA scores {v:.4f} bpb vs {full:.4f} with the full cache "
          f"(+{v - full:.4f} bpb, {100 * (v - full) / full:+.2f}%); Window: "
          f"{r['scores'][f'window@{eighth}']['bpb']:.4f}, H2O: {r['scores'][f'h2o@{eighth}']['bpb']:.4f}.")
    # A policy far from the full cache while keeping half the context needs an explanation. The excess loss
    # per token scored after the cache fills, (bpb - full) * (T - 1) / (T - b), is flat in the budget when
    # the policy drops something needed right away rather than long-range context.
    half = max(budgets)
    for p in [p for p in r["policies"] if r["scores"][f"{p}@{half}"]["bpb"] > 1.1 * full]:
        per_token = [(r["scores"][f"{p}@{b}"]["bpb"] - full) * (T - 1) / (T - b) for b in budgets]
        w(f"- {labels[p]} keeps {half} of {T} tokens and still scores {r['scores'][f'{p}@{half}']['bpb']:.4f} bpb "
          f"against {full:.4f} with the full cache. Its excess per token scored after the cache fills is "
          + ", ".join(f"{x:.2f}" for x in per_token) + f" bits at budgets {', '.join(map(str, budgets))}: "
          "flat in the budget, so what it loses is needed immediately. A per-head policy may evict the token it "
          "has just added, in heads whose current query hardly attends to itself (previous-token heads); "
          "averaging over the layer's heads (TOVA) almost never does. A CPU study with a trained model "
          "reproduced this ordering, and never evicting the newest token recovered most of the gap. "
          "`tests/test_cache_gpu.py` checks the CUDA path against the CPU decision by decision.")
    w("")
    if r.get("per_document"):
        w("Per work at 1/8 of the context and with the full cache (bpb):")
        w("")
        cols = [f"{p}@{eighth}" for p in r["policies"]] + ["full"]
        w("| work | " + " | ".join(labels.get(c.split("@")[0], c) for c in cols) + " |")
        w("|---|" + "---:|" * len(cols))
        for d, vals in r["per_document"].items():
            w(f"| {d} | " + " | ".join(f"{vals[c]:.4f}" for c in cols if c in vals) + " |")
        w("")
    w("What TOVA keeps (`longseq.sweep.kept_position_stats`; first window of each work, batch 1, sampled "
      f"every 64 tokens once the cache is full; averaged over {', '.join(r['kept_docs'])}): the share of "
      "samples in which the layer keeps the first token, the share of the r most recent tokens kept, and "
      "the mean age (tokens) of what is kept.")
    w("")
    for b, layers in r["kept"].items():
        rs = list(layers[0]["recent"]) if layers else []
        w(f"TOVA, budget {b} ({_frac(int(b), T)}):")
        w("")
        w("| layer | first token kept | " + " | ".join(f"last {x} kept" for x in rs) + " | mean age |")
        w("|---:|---:|" + "---:|" * len(rs) + "---:|")
        for st in layers:
            w(f"| {st['layer']} | {100 * st['first_token']:.0f}% | "
              + " | ".join(f"{100 * st['recent'][x]:.0f}%" for x in rs) + f" | {st['mean_age']:.0f} |")
        w("")
    t = r["timing"]
    w(f"Timing: one token step into a full cache (TOVA, budget {t['budget']}, all {t['n_layers']} layers) "
      f"takes {1e3 * t['s_per_token_step_batch1']:.2f} ms at batch 1, {1e3 * t['s_per_token_step_small']:.2f} ms "
      f"at batch {t['small_rows']} and {1e3 * t['s_per_token_step_batched']:.2f} ms at batch {t['rows']}. "
      f"`run_sweep`, which scores one document at a time, would need about "
      f"{t['run_sweep_estimate_s'] / 60:.1f} min for this grid over all {r['windows_total']} windows; "
      f"batching the windows estimated {t['batched_estimate_s'] / 60:.1f} min (time budget "
      f"{t['time_budget_s'] / 60:.1f} min), and the sweep took {t['sweep_s'] / 60:.2f} min.")
    w("")


def _report_megabyte(ctx: Ctx, r: dict | None, trains: dict, w, img: Path, prefix: str, rel: str) -> None:
    w("## 2. MEGABYTE vs byte Transformer vs byte GLA at long context (Yu et al. 2023, scaled down)")
    w("")
    w("Claim: at equal compute, a multiscale MEGABYTE model models long byte sequences better than a byte-level "
      "Transformer, and generates faster (the global model runs once per patch).")
    w("")
    if r is None:
        w("Result: not run (`--stage eval-megabyte`).")
        w("")
        return
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
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for n in r["models"]:
        t = trains.get(n)
        if not t or not t["metrics"]["val"]:
            continue
        sec_per_step = t["tokens_per_step"] / t["probe_tok_s"]
        xs = [s * sec_per_step / 60 for s, _ in t["metrics"]["val"]]
        ax.plot(xs, [v for _, v in t["metrics"]["val"]], marker="o", label=t["spec"]["label"])
    ax.set_xlabel("GPU minutes (steps x exclusive seconds per step)")
    ax.set_ylabel(f"val bpb (training-time subset, context {T})")
    ax.set_title(f"Context {T}: validation bpb vs training compute")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _embed_figure(fig, plt, w, img, rel, f"{prefix}megabyte.png", "val bpb vs GPU minutes")
    w("")
    models = r["models"]
    mbm = models.get("megabyte-8k")
    if mbm:
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


def _report_gla(ctx: Ctx, r: dict | None, w, img: Path, prefix: str, rel: str) -> None:
    w("## 3. GLA vs Transformer++ (Yang et al. 2024, scaled down)")
    w("")
    w("Claims: at equal parameters and training steps a GLA language model comes within a few percent of "
      "Transformer++; its generation state does not grow with the context; it extrapolates to contexts "
      "longer than it was trained on, where the Transformer degrades.")
    w("")
    if r is None:
        w("Result: not run (`--stage eval-gla`).")
        w("")
        return
    m = r["models"]
    tr, gl = m.get("transformer-2k"), m.get("gla-2k")
    T = r["ctx"]
    w(f"Setup: both trained at context {T} for the same number of steps ({tr['steps'] if tr else '?'}); "
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
          + " | ".join(_fmt_bytes(row["state_bytes"][str(x)]) for x in r["state_lens"]) + " |")
    w("")
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for row in m.values():
        a1.plot(r["extrap"], [row["bpb"][str(x)] for x in r["extrap"]], marker="o", label=row["label"])
        a2.plot(r["state_lens"], [row["state_bytes"][str(x)] / 2**20 for x in r["state_lens"]], marker="o",
                label=row["label"])
    a1.axvline(T, color="gray", linestyle=":", label="training context")
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
    _embed_figure(fig, plt, w, img, rel, f"{prefix}gla.png", "extrapolation and state size")
    w("")
    if tr and gl:
        b_t, b_g = tr["bpb"][str(T)], gl["bpb"][str(T)]
        rel_gap = 100 * (b_g - b_t) / b_t
        s_g = [gl["state_bytes"][str(x)] for x in r["state_lens"]]
        s_t = [tr["state_bytes"][str(x)] for x in r["state_lens"]]
        w("Verdict:")
        w("")
        w(f"- At the training context {T}: GLA {b_g:.4f} vs Transformer++ {b_t:.4f} bpb ({rel_gap:+.2f}%; "
          f"{'within' if abs(rel_gap) <= 5 else 'outside'} 5%).")
        w(f"- GLA state: {', '.join(_fmt_bytes(x) for x in s_g)} at {', '.join(map(str, r['state_lens']))} bytes "
          f"({'constant' if len(set(s_g)) == 1 else 'NOT constant'}); Transformer KV cache: "
          f"{', '.join(_fmt_bytes(x) for x in s_t)} ({s_t[-1] / s_t[0]:.0f}x from the first to the last length).")
        ext = r["extrap"][-1]
        w(f"- At {ext} bytes ({ext // T}x the training context): GLA {gl['bpb'][str(ext)]:.4f} "
          f"({gl['bpb'][str(ext)] - b_g:+.4f} vs its {T} score), Transformer++ {tr['bpb'][str(ext)]:.4f} "
          f"({tr['bpb'][str(ext)] - b_t:+.4f}).")
        w("")


# ---------------------------------------------------------------------------------------------- main
STAGE_FNS = {
    "train-2k": lambda c: stage_train(c, "2k"),
    "train-8k": lambda c: stage_train(c, "8k"),
    "eval-tova": stage_eval_tova,
    "eval-megabyte": stage_eval_megabyte,
    "eval-gla": stage_eval_gla,
    "report": stage_report,
}
OUTPUT = {"eval-tova": "tova", "eval-megabyte": "megabyte", "eval-gla": "gla"}


def stage_done(ctx: Ctx, name: str) -> bool:
    if name == "report":
        return False  # cheap, and it should reflect whatever results exist now
    if name.startswith("train-"):
        group = name.split("-")[1]
        recs = [read_json(ctx.result(f"train-{n}")) for n, s in ctx.setup.runs.items() if s.group == group]
        return all(r is not None and r.get("complete") for r in recs)
    return ctx.result(OUTPUT[name]).exists()


def run_stage(ctx: Ctx, name: str, argv: list[str]) -> None:
    if stage_done(ctx, name) and not ctx.args.force:
        say(f"stage {name}: results exist, skipped (--force redoes it)")
        return
    say(f"stage {name}: start")
    t0 = time.perf_counter()
    extra = STAGE_FNS[name](ctx) or {}
    wall = time.perf_counter() - t0
    complete = extra.get("complete", True)
    if name != "report":
        cmd = shlex.join(["python", "benchmarks/reproduce.py", *_portable_argv(argv, name, keep_export=False)])
        env = environment(pick_device(ctx))
        prev = read_json(ctx.result(f"stage-{name}"))
        calls = 1
        if prev and not prev.get("complete", True) and not ctx.args.force:
            wall += prev["wall_s"]  # a resumed stage: its wall time is the sum over the calls
            calls += prev.get("calls", 1)
        write_json(ctx.result(f"stage-{name}"), {"stage": name, "wall_s": wall, "calls": calls, "command": cmd,
                                                 "env": env, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                 **extra, "complete": complete})
    if complete:
        say(f"stage {name}: done in {wall / 60:.2f} min; results in {ctx.results}")
    else:
        say(f"stage {name}: INCOMPLETE after {wall / 60:.2f} min (deadline); run the same command again to resume")


def _portable_argv(argv: list[str], stage: str, keep_export: bool = True) -> list[str]:
    """The command line with this stage named (meta stages run their parts)."""
    drop = {"--stage"} | (set() if keep_export else {"--export"})
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in drop:
            skip = True
            continue
        if a.split("=", 1)[0] in drop:
            continue
        out.append(a)
    return [*out, "--stage", stage]


def parallel_stages(ctx: Ctx, names: list[str], argv: list[str]) -> None:
    """Several eval stages at once, each in its own process: they are launch-bound, so they overlap well on
    one GPU (and the CPU has the cores)."""
    todo = [n for n in names if ctx.args.force or not stage_done(ctx, n)]
    procs = []
    for n in todo:
        cmd = [sys.executable, str(Path(__file__).resolve()), *_portable_argv(argv, n)]
        log = open(ctx.logs / f"{n}.log", "a")  # noqa: SIM115
        say(f"launching {n}; log {ctx.logs / f'{n}.log'}")
        procs.append((n, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), log))
    bad = []
    for n, p, log in procs:
        p.wait()
        log.close()
        tail = (ctx.logs / f"{n}.log").read_text().splitlines()[-40:]
        print("\n".join(f"    {n} | {line}" for line in tail), flush=True)
        if p.returncode:
            bad.append(n)
            say(f"{n}: FAILED (exit {p.returncode}); see {ctx.logs / f'{n}.log'}")
        else:
            say(f"{n}: done")
    if bad:
        raise SystemExit(f"reproduce: stages failed: {bad}")


def export(ctx: Ctx, dest: Path) -> None:
    """Copy the small outputs (results JSON, logs, the report and its plots) to ``dest``; checkpoints stay."""
    dest.mkdir(parents=True, exist_ok=True)
    for sub in ("results", "logs"):
        if (ctx.out / sub).is_dir():
            shutil.copytree(ctx.out / sub, dest / sub, dirs_exist_ok=True)
    if ctx.report.exists():
        shutil.copy2(ctx.report, dest / ctx.report.name)
        if (ctx.report.parent / "img").is_dir():
            shutil.copytree(ctx.report.parent / "img", dest / "img", dirs_exist_ok=True)
    say(f"exported results and logs to {dest}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder: runs/, results/*.json, logs/")
    p.add_argument("--stage", default="all", choices=[*STAGES, *META_STAGES],
                   help="stage to run (default all: " + ", ".join(STAGES) + "); 'train' and 'eval' are groups")
    p.add_argument("--quick", action="store_true", help="tiny models, few steps, short contexts, CPU (smoke test)")
    p.add_argument("--data", help=f"Shakespeare folder (default {DEFAULT_DATA} if present, else the built-in "
                                   "corpus: the same works)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available; cpu with --quick)")
    p.add_argument("--minutes", type=float, default=None,
                   help="GPU minutes per training run at exclusive throughput (default 2.5 for the 2k group, "
                        "1.75 for the 8k group; quick 0.05)")
    p.add_argument("--max-epochs", type=float, default=10.0,
                   help="cap on passes over the training bytes per run (default 10): more overfits")
    p.add_argument("--steps", type=int, help="fixed steps for every run (overrides --minutes; quick default 12)")
    p.add_argument("--deadline-min", type=float, default=7.5,
                   help="stop a training stage after this many minutes (runs save; re-run to resume); 0: none")
    p.add_argument("--tova-minutes", type=float, default=4.5,
                   help="time budget of the cache sweep; fewer windows are scored if the estimate exceeds it")
    p.add_argument("--tova-rows", type=int, default=256, help="windows per batch in the cache sweep")
    p.add_argument("--max-windows", type=int, help="score at most this many windows in the cache sweep")
    p.add_argument("--report", help="markdown file to write (default docs/reproductions.md; OUT/reproductions.md "
                                    "with --quick); plots go to img/ beside it")
    p.add_argument("--export", metavar="DIR", help="afterwards copy results/ and logs/ (no checkpoints) to DIR")
    p.add_argument("--jobs", type=int, help="with --stage eval/all: run the three eval stages as parallel "
                                            "processes when > 1 (default 3; 1 with --quick)")
    p.add_argument("--force", action="store_true", help="redo stages whose results exist (retrains from scratch)")
    args = p.parse_args(argv)
    if args.minutes is None and args.quick:
        args.minutes = 0.05
    if args.jobs is None:
        args.jobs = 1 if args.quick else 3
    if args.quick:
        args.steps = args.steps or 12
        args.max_windows = args.max_windows or 4
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    ctx = Ctx(args)
    ctx.results.mkdir(parents=True, exist_ok=True)
    ctx.logs.mkdir(parents=True, exist_ok=True)
    say(f"output {ctx.out}; data: {ctx.data_source}; {'QUICK mode' if args.quick else 'full mode'}")
    names = META_STAGES.get(args.stage, [args.stage])
    try:
        for name in names:
            if name == "eval-tova" and args.stage in ("eval", "all") and args.jobs > 1:
                parallel_stages(ctx, META_STAGES["eval"], argv)
                continue
            if name in ("eval-megabyte", "eval-gla") and args.stage in ("eval", "all") and args.jobs > 1:
                continue  # launched with eval-tova
            run_stage(ctx, name, argv)
    finally:
        if args.export:
            with contextlib.suppress(OSError):
                export(ctx, Path(args.export))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The training stages (``train-2k``, ``train-8k``): the runs of a group as parallel ``longseq train`` processes.

A stage stopped by its deadline resumes from the runs' checkpoints when the same command runs again.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .common import LN2, REPO, VAL_DOCS, read_json, say, write_json
from .config import Ctx, RunSpec
from .plan import make_plan


@dataclass
class _Launched:
    """A training process this call of the stage started."""

    proc: subprocess.Popen
    log: IO[str]
    command: str  # as the results record it: `python -m longseq train ...`
    started: float
    ended: float | None = None


def train_command(ctx: Ctx, name: str, run: dict[str, Any], resume: bool) -> list[str]:
    """The ``python -m longseq train`` command line of one planned run."""
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
    """The step of the newest checkpoint in ``run_dir`` (0 if none)."""
    from longseq.train.checkpoint import list_checkpoints

    ckpts = list_checkpoints(run_dir)
    return int(ckpts[-1].name.split("_")[1]) if ckpts else 0


def read_metrics(run_dir: Path) -> dict[str, list]:
    """Validation ``[step, bpb]`` and training ``[step, bits per byte, tok/s]`` from ``metrics.jsonl``."""
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


def _launch(ctx: Ctx, runs: dict[str, dict[str, Any]]) -> dict[str, _Launched]:
    """Start (or resume) every run that has not reached its planned steps, all at once."""
    env = dict(os.environ)
    if ctx.args.quick:
        env.setdefault("OMP_NUM_THREADS", "1")  # several tiny CPU runs at once on a few cores
    launched = {}
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
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        launched[name] = _Launched(proc, log, shlex.join(["python", *cmd[1:]]), started)
    return launched


def _wait(ctx: Ctx, launched: dict[str, _Launched], deadline: float | None) -> None:
    """Wait for every process, noting when each ends; at the deadline ask the unfinished ones to stop."""
    interrupted = False
    while any(run.ended is None for run in launched.values()):
        for run in launched.values():
            if run.ended is None and run.proc.poll() is not None:
                run.ended = time.perf_counter()
        if deadline is not None and time.perf_counter() > deadline and not interrupted:
            # longseq train saves a checkpoint on SIGTERM; the same command resumes it later.
            say(f"stage deadline ({ctx.args.deadline_min:g} min) reached: stopping the runs (they save)")
            for run in launched.values():
                if run.ended is None:
                    run.proc.send_signal(signal.SIGTERM)
            interrupted = True
        time.sleep(0.5)


def _failures(ctx: Ctx, launched: dict[str, _Launched]) -> list[str]:
    """Close the logs; the runs that crashed (stopped by the deadline's SIGTERM is not a failure)."""
    failed = []
    for name, run in launched.items():
        run.log.close()
        if run.proc.returncode not in (0, 128 + signal.SIGTERM):
            failed.append(name)
            say(f"{name}: FAILED with exit status {run.proc.returncode}; see {ctx.logs / f'train-{name}.log'}")
    return failed


def _record(ctx: Ctx, name: str, run: dict[str, Any], launched: dict[str, _Launched]) -> dict[str, Any]:
    """Write ``results/train-<name>.json``: progress, metrics, and commands and wall time over all calls."""
    step = checkpoint_step(ctx.run_dir(name))
    metrics = read_metrics(ctx.run_dir(name))
    prev = read_json(ctx.result(f"train-{name}")) or {}
    this = launched.get(name)
    rec = {**run, "name": name, "step": step, "complete": step >= run["steps"], "metrics": metrics,
           "commands": prev.get("commands", []) + ([this.command] if this else []),
           # wall time of the run's own process(es), summed over resumptions; it shared the GPU
           "wall_s": prev.get("wall_s", 0.0) + (this.ended - this.started if this else 0.0),
           "concurrent_runs": len(launched) if this else prev.get("concurrent_runs")}
    write_json(ctx.result(f"train-{name}"), rec)
    last = metrics["val"][-1][1] if metrics["val"] else float("nan")
    say(f"{name}: step {step}/{run['steps']}, val bpb (training subset) {last:.4f}, wall {rec['wall_s']:.0f} s"
        f"{'' if rec['complete'] else '  INCOMPLETE: run the same command again to resume'}")
    return rec


def stage_train(ctx: Ctx, group: str) -> dict[str, Any]:
    """Train the runs of ``group`` ("2k" or "8k") to their planned steps, side by side on one device."""
    runs = make_plan(ctx, group)["runs"]
    # Counted from the start of the command, so the probe and start-up are inside the limit.
    deadline = ctx.t_start + ctx.args.deadline_min * 60 if ctx.args.deadline_min > 0 else None
    ctx.logs.mkdir(parents=True, exist_ok=True)
    launched = _launch(ctx, runs)
    _wait(ctx, launched, deadline)
    failed = _failures(ctx, launched)
    status = {name: _record(ctx, name, run, launched) for name, run in runs.items()}
    if failed:
        raise SystemExit(f"reproduce: training failed for {failed}")
    return {"complete": all(r["complete"] for r in status.values()), "concurrent_runs": len(launched)}


def load_trained(ctx: Ctx, name: str, device):
    """The final model of a finished run, in eval mode, and its ``train-<name>.json`` record."""
    from longseq.train.checkpoint import load_model

    rec = read_json(ctx.result(f"train-{name}"))
    if rec is None or not rec.get("complete"):
        raise SystemExit(f"reproduce: {name} is not trained yet; run its train stage first")
    return load_model(ctx.run_dir(name), device).eval(), rec

"""Running stages: skip the finished ones, record each stage's command and wall time, run the three eval
stages as parallel processes, and export the small outputs."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import REPO, SCRIPT, environment, read_json, say, write_json
from .config import Ctx, pick_device
from .eval_gla import stage_eval_gla
from .eval_megabyte import stage_eval_megabyte
from .eval_pretrained import stage_eval_pretrained
from .eval_recall import recall_complete, stage_eval_recall
from .eval_tova import stage_eval_tova
from .report import stage_report
from .train import stage_train

STAGE_FNS = {
    "train-2k": lambda c: stage_train(c, "2k"),
    "train-8k": lambda c: stage_train(c, "8k"),
    "eval-tova": stage_eval_tova,
    "eval-megabyte": stage_eval_megabyte,
    "eval-gla": stage_eval_gla,
    "eval-pretrained": stage_eval_pretrained,
    "eval-recall": stage_eval_recall,
    "report": stage_report,
}
# results/<name>.json of each evaluation stage
OUTPUT = {"eval-tova": "tova", "eval-megabyte": "megabyte", "eval-gla": "gla", "eval-pretrained": "pretrained",
          "eval-recall": "recall"}


def stage_done(ctx: Ctx, name: str) -> bool:
    """Whether the results of stage ``name`` exist (for a training stage: every run reached its steps)."""
    if name == "report":
        return False  # cheap, and it should reflect whatever results exist now
    if name.startswith("train-"):
        group = name.split("-")[1]
        recs = [read_json(ctx.result(f"train-{n}")) for n, s in ctx.setup.runs.items() if s.group == group]
        return all(r is not None and r.get("complete") for r in recs)
    if name == "eval-recall":  # filled in per part and kind, possibly over several calls
        return recall_complete(read_json(ctx.result("recall")), ctx.setup.quick)
    return ctx.result(OUTPUT[name]).exists()


def run_stage(ctx: Ctx, name: str, argv: list[str]) -> None:
    """Run one stage in this process unless it is done, and record ``results/stage-<name>.json``."""
    if stage_done(ctx, name) and not ctx.args.force:
        say(f"stage {name}: results exist, skipped (--force redoes it)")
        return
    say(f"stage {name}: start")
    t0 = time.perf_counter()
    extra = STAGE_FNS[name](ctx) or {}
    wall = time.perf_counter() - t0
    complete = extra.get("complete", True)
    if name != "report":
        _record_stage(ctx, name, argv, wall, complete, extra)
    if complete:
        say(f"stage {name}: done in {wall / 60:.2f} min; results in {ctx.results}")
    else:
        say(f"stage {name}: INCOMPLETE after {wall / 60:.2f} min; "
            + extra.get("missing", "(deadline) run the same command again to resume"))


def _record_stage(ctx: Ctx, name: str, argv: list[str], wall: float, complete: bool,
                  extra: dict[str, Any]) -> None:
    """``results/stage-<name>.json``: the command that reruns the stage alone, its device and wall time."""
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
        # A pretrained model's path is this machine's; the report calls it MODEL.
        if a.startswith("--pretrained="):
            a = "--pretrained=MODEL"
        out.append("MODEL" if out and out[-1] == "--pretrained" else a)
    return [*out, "--stage", stage]


def parallel_stages(ctx: Ctx, names: list[str], argv: list[str]) -> None:
    """Several eval stages at once, each in its own process: they are launch-bound, so they overlap well on
    one GPU (and the CPU has the cores)."""
    todo = [n for n in names if ctx.args.force or not stage_done(ctx, n)]
    procs = []
    for n in todo:
        cmd = [sys.executable, str(SCRIPT), *_portable_argv(argv, n)]
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

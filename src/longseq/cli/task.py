"""``longseq eval MODEL --task passkey``: passkey retrieval under cache policies (:mod:`longseq.tasks`).

``eval`` registers these flags through :func:`add_task_flags` and hands a run with ``--task`` to
:func:`run_task`. Every flag is read as text and checked here, before the model is opened, so a bad value
is one ``longseq: error:`` line (exit 2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from .common import log

TASKS = ("passkey",)
DEFAULT_DEPTHS = "0.1,0.3,0.5,0.7,0.9"
# Flags only a task reads.
_TASK_ONLY = ("lengths", "depths", "trials", "seed", "task_out", "filler", "max_new_tokens")


def add_task_flags(p: argparse.ArgumentParser) -> None:
    """Add ``--task`` and its flags to ``eval`` (which declares ``--budgets``, ``ctx/K`` items included)."""
    p.add_argument("--task", metavar="NAME", help=f"run a task instead of scoring text: {', '.join(TASKS)} "
                   "(passkey: a 5-digit key hidden in filler, asked for at the end, under each cache policy)")
    p.add_argument("--lengths", metavar="N,...", help="task: prompt lengths in the model's tokens, e.g. 2048,4096")
    p.add_argument("--depths", metavar="D,...", help=f"task: where the key sits, fractions of the prompt "
                   f"(default {DEFAULT_DEPTHS})")
    p.add_argument("--trials", metavar="N", help="task: keys per length and depth (default 5)")
    p.add_argument("--seed", metavar="N", help="task: seed of the keys and filler (default 0)")
    p.add_argument("--filler", metavar="FILE", help="task: text to hide the key in: a file, or a built-in: corpus "
                   "(Shakespeare, the default) or repeat (a few sentences over and over, the classic passkey setup)")
    p.add_argument("--max-new-tokens", metavar="N", help="task: tokens generated per answer (default 10)")
    p.add_argument("--out", dest="task_out", metavar="DIR",
                   help="task: folder for passkey.md/.json/.png (default ./passkey-<model>-<settings tag>)")


def uses_task(args: argparse.Namespace) -> bool:
    """True when ``eval`` runs a task; task-only flags (or ``ctx/K`` budgets) without ``--task`` are refused."""
    out, out_dir = getattr(args, "task_out", None), getattr(args, "out_dir", None)
    if out is not None and out_dir is not None and Path(out).absolute() != Path(out_dir).absolute():
        raise ValueError(f"--out {out} and --out-dir {out_dir} name two folders; give one")
    if getattr(args, "task", None) is not None:
        return True
    if getattr(args, "task_out", None) is not None and getattr(args, "out_dir", None) is None:
        args.out_dir = args.task_out  # `--out` stays the short form of a sweep's --out-dir
    given = [name for name in _TASK_ONLY if name != "task_out" and getattr(args, name, None) is not None]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} applies to --task passkey only")
    budgets = getattr(args, "budgets", None) or []
    if any(not isinstance(b, int) for b in budgets):
        raise ValueError(f"--budgets: a policy sweep takes integers; got {budgets} (ctx/K is for --task passkey)")
    return False


def _numbers(flag: str, text: str | None, default: str | None, kind: type) -> list:
    if text is None:
        if default is None:
            raise ValueError(f"--task passkey needs --{flag} (e.g. --{flag} 2048,4096)")
        text = default
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{flag}: expected a comma-separated list of {kind.__name__}; got {text!r}") from None
    if not values:
        raise ValueError(f"--{flag} is empty")
    return values


def _one_int(flag: str, text: str | None, default: int, low: int) -> int:
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--{flag}: expected an integer; got {text!r}") from None
    if value < low:
        raise ValueError(f"--{flag} must be >= {low}; got {value}")
    return value


def check_task_args(args: argparse.Namespace) -> dict[str, Any]:
    """Every task flag checked and converted, before anything is opened; returns ``run_passkey``'s settings.
    (``eval`` has already refused the flags a task does not read: ``cli.eval._MODE_FLAGS``.)"""
    from ..tasks.passkey import FILLER_NAMES, KEY_DIGITS, named_filler, parse_budget, plan_rows

    if args.task not in TASKS:
        raise ValueError(f"--task: unknown task {args.task!r}; choose one of {', '.join(TASKS)}")
    if args.hf is not None:
        raise ValueError("--task takes the model as MODEL (a run, checkpoint, HF folder or .gguf), not --hf")
    if args.checkpoint is None:
        raise ValueError(f"--task {args.task} needs MODEL: a longseq run or checkpoint, an HF folder or a .gguf file")
    lengths = _numbers("lengths", args.lengths, None, int)
    if min(lengths) < 1:
        raise ValueError(f"--lengths must be >= 1; got {lengths}")
    depths = _numbers("depths", args.depths, DEFAULT_DEPTHS, float)
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"--depths are fractions of the prompt in [0, 1]; got {depths}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    policies = args.policies or ["full"]
    budgets = [parse_budget(b) for b in args.budgets or []]
    plan_rows(policies, budgets)  # every spec and budget, and a budget for each bounded policy
    settings = dict(lengths=lengths, depths=depths, policies=policies, budgets=budgets,
                    n_trials=_one_int("trials", args.trials, 5, 1), seed=_one_int("seed", args.seed, 0, 0),
                    max_new_tokens=_one_int("max-new-tokens", args.max_new_tokens, 10, KEY_DIGITS),
                    batch_size=args.batch_size)
    if args.filler is not None:
        path = Path(args.filler)
        if path.is_file():
            settings["filler"] = path.read_text(encoding="utf-8", errors="replace")
        elif args.filler in FILLER_NAMES:
            settings["filler"] = named_filler(args.filler)
        else:
            raise FileNotFoundError(f"--filler: no such file: {path} (built-in fillers: {', '.join(FILLER_NAMES)})")
    return settings


def _out_dir(args: argparse.Namespace, settings: dict[str, Any]) -> Path:
    if args.task_out or args.out_dir:
        return Path(args.task_out or args.out_dir)
    named = {k: v for k, v in settings.items() if k != "filler"}
    named["filler"] = args.filler if args.filler is None or not Path(args.filler).is_file() \
        else str(Path(args.filler).absolute())  # a built-in filler by its name
    tag = hashlib.sha256(json.dumps(named, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return Path(f"passkey-{Path(args.checkpoint).name}-{tag}")


def run_task(args: argparse.Namespace) -> int:
    """``eval --task passkey``: check every flag, open the model, run, print the table, write the files."""
    import torch

    from ..sources import open_model
    from ..tasks import run_passkey
    from ..train.distributed import pick_device

    settings = check_task_args(args)
    out = _out_dir(args, settings)
    device = pick_device(args.device)  # a ValueError naming --device for a bad or missing device
    if not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"no such model: {args.checkpoint}")
    model = open_model(args.checkpoint, device, progress=args.progress)
    with torch.inference_mode():
        result = run_passkey(model, **settings, progress=log if args.progress else None)
    files = result.write(out)
    print(result.to_markdown(), end="")
    for name, path in files.items():
        print(f"note: {path}" if name == "note" else f"wrote {name}: {path}", file=sys.stderr)
    return 0

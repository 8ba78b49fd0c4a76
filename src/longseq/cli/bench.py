"""``longseq bench [train|decode]``: the model-level benchmarks of :mod:`longseq.bench`, a Markdown table
on stdout and each result on stderr as it is measured."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from .. import jsonio
from ..fileio import write_atomically
from .common import (
    add_device_flag,
    add_overrides_flag,
    check_output_file,
    csv_list,
    int_or_max,
    log,
    parse_sets,
    read_json_object,
    write_json,
)

#: Each mode's own flags: dest -> (default, the flag the other mode uses instead). They default to None in
#: the parser, so a flag typed for the wrong mode is seen and refused instead of silently ignored; the mode's
#: defaults are filled in after that check.
TRAIN_FLAGS = {
    "seq_lens": ([512], "--contexts"), "batch_tokens": (8192, "--batch-sizes"), "steps": (10, "--gen-tokens"),
    "gen_batch": (1, "--batch-sizes"), "gen_prompt": (512, "--contexts"),
}
DECODE_FLAGS = {
    "contexts": ([4096], "--seq-lens or --gen-prompt"), "batch_sizes": ([1], "--batch-tokens or --gen-batch"),
    "max_batch": (512, None), "policies": (["full"], None), "fused": (False, None),
    "against": (None, None), "memory_limit_gib": (None, None), "jsonl": (None, "--json"),
}


def add_parser(sub) -> None:
    """Add ``bench`` to the ``longseq`` subcommands (both modes share one parser; see the flag groups)."""
    p = sub.add_parser(
        "bench",
        help="model-level training and generation throughput; 'bench decode' for decoding",
        description=(
            "longseq bench [train]: training tokens/s and generation tokens/s per model. "
            "longseq bench decode: prefill time, ms per decode step, tokens/s and peak memory per model x "
            "cache policy x context x batch size (JSONL on stderr / --jsonl, a Markdown table on stdout), "
            "optionally against HF transformers (--against hf). A flag of one mode is refused in the other."
        ),
    )
    p.add_argument("mode", nargs="?", choices=("train", "decode"), default="train",
                   help="train (default): training + generation throughput; decode: the decode benchmark")
    p.add_argument(
        "--models", type=csv_list(str), default=["gla", "transformer"],
        help="comma-separated model kinds; decode mode also takes kind:preset (e.g. megabyte:paper95m)",
    )
    p.add_argument("--presets", type=csv_list(str), default=["tiny"], help="comma-separated presets (default tiny)")
    add_overrides_flag(p, "override a model config field for every model (repeatable)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warmup steps (default 3)")
    p.add_argument("--gen-tokens", type=int, default=128,
                   help="generated tokens timed; in decode mode, the timed decode steps (default 128)")
    add_device_flag(p)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    p.add_argument(
        "--compile", action="store_true",
        help="train mode: torch.compile each model's blocks for its training steps (compiles during the warmup "
        "steps, as `longseq train --compile` does; generation stays eager); decode mode: static state and the "
        "decode step captured as a CUDA graph (default: eager, dynamic state)",
    )
    _add_train_flags(p.add_argument_group("train mode"))
    _add_decode_flags(p.add_argument_group("decode mode"))
    p.set_defaults(func=run)


def _add_train_flags(t) -> None:
    t.add_argument("--seq-lens", type=csv_list(int), help="comma-separated training sequence lengths (default 512)")
    t.add_argument("--batch-tokens", type=int,
                   help="training tokens per step; batch = this // seq_len (default 8192)")
    t.add_argument("--steps", type=int, help="timed training steps (default 10)")
    t.add_argument("--gen-batch", type=int, help="generation batch size (default 1)")
    t.add_argument("--gen-prompt", type=int, help="generation prompt length in bytes (default 512)")


def _add_decode_flags(d) -> None:
    d.add_argument("--contexts", type=csv_list(int), help="prompt lengths (default 4096)")
    d.add_argument(
        "--batch-sizes", type=csv_list(int_or_max),
        help="decode batch sizes; 'max' = the largest that fits, up to --max-batch: on CUDA the rows of state "
        "that fit --memory-limit-gib (or the GPU), shrunk on out-of-memory; elsewhere no memory is probed and "
        "'max' is --max-batch itself (default 1)",
    )
    d.add_argument("--max-batch", type=int, help="the most rows a 'max' batch tries (default 512)")
    d.add_argument(
        "--policies", type=csv_list(str),
        help="KV-cache policies for models with attention; budgets may be relative: tova:ctx/8 (default full)",
    )
    d.add_argument("--fused", action="store_true", default=None,
                   help="--compile, with the step torch.compile'd before its capture")
    d.add_argument("--against", choices=("hf",),
                   help="also time HF LlamaForCausalLM (Transformer rows) and fla's GLA (GLA rows) generate()")
    d.add_argument("--memory-limit-gib", type=float,
                   help="cap this process's CUDA memory (e.g. 40) so larger batches report OOM (CUDA only)")
    d.add_argument("--jsonl", metavar="FILE", help="also write one JSON line per result here")


def check_mode_flags(args: argparse.Namespace) -> None:
    """Refuse the other mode's flags (naming each, and what this mode takes instead), then fill in this
    mode's defaults."""
    own, other = (DECODE_FLAGS, TRAIN_FLAGS) if args.mode == "decode" else (TRAIN_FLAGS, DECODE_FLAGS)
    wrong = [name for name in other if getattr(args, name) is not None]
    if wrong:
        other_mode = "train" if args.mode == "decode" else "decode"
        shown = ", ".join(_flag(name) + (f" (here: {other[name][1]})" if other[name][1] else "") for name in wrong)
        raise ValueError(f"bench {args.mode} does not take {shown}: "
                         f"{'a flag' if len(wrong) == 1 else 'flags'} of bench {other_mode} only")
    for name, (default, _) in own.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def run(args: argparse.Namespace) -> int:
    """``longseq bench``: the mode's flags checked, its benchmark run, the table printed, the files written."""
    check_mode_flags(args)
    jsonl = getattr(args, "jsonl", None)
    if args.json and jsonl and Path(args.json).absolute() == Path(jsonl).absolute():
        raise ValueError(f"--json and --jsonl name the same file ({args.json}); the second write would replace "
                         "the first: give two paths")
    for flag, path, is_kind in (("--json", args.json, _is_bench_report), ("--jsonl", jsonl, _is_bench_jsonl)):
        if path:  # before the benchmark runs, not after
            check_output_file(path, flag, "bench report", is_kind)
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0; got {args.warmup}")
    if args.gen_tokens < 1:
        raise ValueError(f"--gen-tokens must be >= 1; got {args.gen_tokens}")
    if args.mode == "decode":
        return _run_decode(args)
    from ..bench.train import markdown_table, run_bench

    for name in ("batch_tokens", "steps", "gen_batch", "gen_prompt"):
        if getattr(args, name) < 1:
            raise ValueError(f"{_flag(name)} must be >= 1; got {getattr(args, name)}")
    _check_positive_list("--seq-lens", args.seq_lens)
    if args.compile and args.warmup < 1:
        raise ValueError("bench train --compile needs --warmup >= 1: the first step compiles, and a timed one "
                         f"would count the compile as training time; got --warmup {args.warmup}")
    report = run_bench(
        args.models, args.presets, args.seq_lens, args.batch_tokens, args.steps, args.warmup, args.gen_batch,
        args.gen_prompt, args.gen_tokens, args.device, parse_sets(args.overrides), compile=args.compile, log=log,
    )
    report["command"] = _command_line(args)
    print(markdown_table(report))
    if args.json:
        write_json(args.json, report)
    return 0


def _check_positive_list(flag: str, values: list[int]) -> None:
    if not values or min(values) < 1:
        raise ValueError(f"{flag} must be positive integers; got {','.join(map(str, values)) or 'none'}")


def _run_decode(args: argparse.Namespace) -> int:
    import math

    from ..bench.decode import decode_markdown, run_decode_bench

    _check_positive_list("--contexts", args.contexts)
    if not args.batch_sizes or any(b != "max" and b < 1 for b in args.batch_sizes):
        raise ValueError(f"--batch-sizes must be positive integers or 'max'; got "
                         f"{','.join(map(str, args.batch_sizes)) or 'none'}")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1; got {args.max_batch}")
    limit = args.memory_limit_gib
    if limit is not None and not (math.isfinite(limit) and limit > 0):
        raise ValueError(f"--memory-limit-gib must be a positive number of GiB; got {limit}")
    report = run_decode_bench(
        args.models, args.presets, args.contexts, args.batch_sizes, args.policies,
        steps=args.gen_tokens, warmup=max(args.warmup, 2), compile="fused" if args.fused else args.compile,
        against=args.against, device=args.device, overrides=parse_sets(args.overrides),
        memory_limit_gib=limit, max_batch=args.max_batch, log=log,
    )
    report["command"] = _command_line(args)
    print(decode_markdown(report))
    if args.jsonl:
        _write_jsonl(args.jsonl, report)
    if args.json:
        write_json(args.json, report)
    return 0


def _write_jsonl(path: str, report: dict) -> None:
    """One JSON line per result, each carrying the report's settings (device, versions, command) too; written
    whole or not at all, non-finite numbers as ``null`` (as :func:`write_json` does)."""
    meta = {k: v for k, v in report.items() if k != "results"}
    text = "".join(jsonio.dumps({**meta, **row}) + "\n" for row in report["results"])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(Path(path), lambda tmp: tmp.write_text(text))


def _from_bench(record: dict | None) -> bool:
    return record is not None and str(record.get("command", "")).startswith("longseq bench")


def _is_bench_report(path: Path) -> bool:
    """An earlier ``bench --json`` report (replaced without asking); any other file is refused."""
    data = read_json_object(path)
    return _from_bench(data) and "results" in data


def _is_bench_jsonl(path: Path) -> bool:
    """An earlier ``bench --jsonl`` file: every line a result of ``longseq bench``."""
    try:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return all(isinstance(r, dict) and _from_bench(r) for r in lines)


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed, kept in the report so its numbers can be reproduced."""
    return "longseq " + shlex.join(args.argv)

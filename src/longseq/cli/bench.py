"""``longseq bench [train|decode]``: the model-level benchmarks of :mod:`longseq.bench`, a Markdown table
on stdout and each result on stderr as it is measured."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from .common import add_device_flag, add_overrides_flag, csv_list, int_or_max, log, parse_sets, write_json


def add_parser(sub) -> None:
    """Add ``bench`` to the ``longseq`` subcommands (both modes share one parser; see the flag groups)."""
    p = sub.add_parser(
        "bench",
        help="model-level training and generation throughput; 'bench decode' for decoding",
        description=(
            "longseq bench [train]: training tokens/s and generation tokens/s per model. "
            "longseq bench decode: prefill time, ms per decode step, tokens/s and peak memory per model x "
            "cache policy x context x batch size (JSONL on stderr / --jsonl, a Markdown table on stdout), "
            "optionally against HF transformers (--against hf)."
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
    p.add_argument("--seq-lens", type=csv_list(int), default=[512], help="comma-separated training sequence lengths")
    p.add_argument("--batch-tokens", type=int, default=8192, help="training tokens per step; batch = this // seq_len")
    p.add_argument("--steps", type=int, default=10, help="timed training steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warmup steps (default 3)")
    p.add_argument("--gen-batch", type=int, default=1, help="generation batch size (default 1)")
    p.add_argument("--gen-prompt", type=int, default=512, help="generation prompt length in bytes (default 512)")
    p.add_argument("--gen-tokens", type=int, default=128, help="generated tokens timed (default 128)")
    add_device_flag(p)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    _add_decode_flags(p.add_argument_group("decode mode"))
    p.set_defaults(func=run)


def _add_decode_flags(d) -> None:
    d.add_argument("--contexts", type=csv_list(int), default=[4096], help="prompt lengths (default 4096)")
    d.add_argument(
        "--batch-sizes", type=csv_list(int_or_max), default=[1],
        help="decode batch sizes; 'max' = the largest that fits --memory-limit-gib, up to --max-batch (default 1)",
    )
    d.add_argument("--max-batch", type=int, default=512, help="the most rows a 'max' batch tries (default 512)")
    d.add_argument(
        "--policies", type=csv_list(str), default=["full"],
        help="KV-cache policies for models with attention; budgets may be relative: tova:ctx/8 (default full)",
    )
    d.add_argument("--compile", action="store_true",
                   help="static state + decode step captured as a CUDA graph (default: eager, dynamic state)")
    d.add_argument("--fused", action="store_true", help="--compile, with the step torch.compile'd before its capture")
    d.add_argument("--against", choices=("hf",),
                   help="also time HF LlamaForCausalLM (Transformer rows) and fla's GLA (GLA rows) generate()")
    d.add_argument("--memory-limit-gib", type=float,
                   help="cap this process's CUDA memory (e.g. 40) so larger batches report OOM")
    d.add_argument("--jsonl", metavar="FILE", help="also write one JSON line per result here")


def run(args: argparse.Namespace) -> int:
    """``longseq bench``: the mode's flags checked, its benchmark run, the table printed, the files written."""
    if args.mode == "decode":
        return _run_decode(args)
    from ..bench.train import markdown_table, run_bench

    for name in ("batch_tokens", "steps", "gen_batch", "gen_prompt", "gen_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.warmup < 0 or not args.seq_lens or min(args.seq_lens) < 1:
        raise ValueError("--warmup must be >= 0 and --seq-lens positive integers")
    report = run_bench(
        args.models, args.presets, args.seq_lens, args.batch_tokens, args.steps, args.warmup, args.gen_batch,
        args.gen_prompt, args.gen_tokens, args.device, parse_sets(args.overrides), log=log,
    )
    report["command"] = _command_line(args)
    print(markdown_table(report))
    if args.json:
        write_json(args.json, report)
    return 0


def _run_decode(args: argparse.Namespace) -> int:
    from ..bench.decode import decode_markdown, run_decode_bench

    if args.gen_tokens < 1 or args.warmup < 0:
        raise ValueError("--gen-tokens must be >= 1 and --warmup >= 0")
    if not args.contexts or min(args.contexts) < 1:
        raise ValueError("--contexts must be positive integers")
    if not args.batch_sizes or any(b != "max" and b < 1 for b in args.batch_sizes) or args.max_batch < 1:
        raise ValueError("--batch-sizes must be positive integers or 'max', and --max-batch positive")
    report = run_decode_bench(
        args.models, args.presets, args.contexts, args.batch_sizes, args.policies,
        steps=args.gen_tokens, warmup=max(args.warmup, 2), compile="fused" if args.fused else args.compile,
        against=args.against, device=args.device, overrides=parse_sets(args.overrides),
        memory_limit_gib=args.memory_limit_gib, max_batch=args.max_batch, log=log,
    )
    report["command"] = _command_line(args)
    print(decode_markdown(report))
    if args.jsonl:
        _write_jsonl(args.jsonl, report)
    if args.json:
        write_json(args.json, report)
    return 0


def _write_jsonl(path: str, report: dict) -> None:
    """One JSON line per result, each carrying the report's settings (device, versions, command) too."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in report.items() if k != "results"}
    with open(path, "w") as f:
        for row in report["results"]:
            f.write(json.dumps({**meta, **row}) + "\n")


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed, kept in the report so its numbers can be reproduced."""
    return "longseq " + shlex.join(args.argv)

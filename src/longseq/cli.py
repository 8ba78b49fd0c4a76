"""The ``longseq`` command line: ``train``, ``eval``, ``generate``, ``bench``, ``plot``, ``quickstart``.

User errors (bad paths, flags, configs, checkpoints) print ``longseq: error: <message>`` and exit with
status 2, without a traceback (set ``LONGSEQ_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind.__name__}: {text!r}"
            ) from err

    return parse


def int_or_max(text: str) -> int | str:
    return text.strip() if text.strip() == "max" else int(text)


def _parse_sets(items: list[str] | None) -> dict[str, str] | None:
    if items is None:
        return None
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set expects FIELD=VALUE (e.g. --set n_layers=2); got {item!r}")
        out[key.strip()] = value.strip()
    return out


# --------------------------------------------------------------------------------------------- train
def _add_train(sub) -> None:
    from .models import MODELS

    p = sub.add_parser(
        "train",
        help="train a model (torchrun-compatible)",
        description=(
            "Train a byte-level language model. Flags left out take their defaults, or on --resume the "
            "values "
            "saved in RUN_DIR/config.json."
        ),
    )
    p.add_argument(
        "--out", required=True, metavar="RUN_DIR", help="run directory (config, metrics, checkpoints)"
    )
    p.add_argument("--model", choices=sorted(MODELS), help="model kind (default: gla)")
    p.add_argument("--preset", help="model size preset, e.g. tiny, small, base (default: tiny)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="FIELD=VALUE",
        help="override a model config field, e.g. --set n_layers=2 (repeatable)",
    )
    p.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="files, directories, globs or tar archives of documents (default: built-in Shakespeare)",
    )
    p.add_argument(
        "--val-docs",
        type=_csv(str),
        metavar="NAMES",
        help="comma-separated validation documents (name, base name or stem); default for the "
        "built-in corpus: hamlet.txt,tempest.txt,sonnets.txt",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help="fraction of documents held out for validation when --val-docs is not given (default 0.1)",
    )
    p.add_argument(
        "--within-docs",
        action="store_true",
        default=None,
        help="keep training windows inside single documents",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where corpora are cached (default: $LONGSEQ_CACHE or ~/.cache/longseq)",
    )
    p.add_argument("--seq-len", type=int, help="bytes per training sequence (default 256)")
    p.add_argument("--batch-size", type=int, help="global batch in sequences per optimizer step (default 16)")
    p.add_argument("--steps", type=int, help="total optimizer steps (default 1000)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    p.add_argument(
        "--min-lr-ratio", type=float, help="final learning rate as a fraction of --lr (default 0.1)"
    )
    p.add_argument("--warmup", type=int, help="linear warmup steps (default 100)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.1)")
    p.add_argument(
        "--grad-clip", type=float, help="clip the global gradient norm to this (0: off; default 1.0)"
    )
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--eval-every", type=int, help="validate every N steps (0: only at the end; default 200)")
    p.add_argument(
        "--eval-tokens",
        type=int,
        help="validation bytes per evaluation, spread over the documents (0: all; default 262144)",
    )
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default: at every validation)")
    p.add_argument("--keep", type=int, help="number of checkpoints kept (default 2)")
    p.add_argument("--log-every", type=int, help="append training metrics every N steps (default 10)")
    p.add_argument(
        "--parallel", choices=["none", "ddp", "fsdp"], help="data parallelism under torchrun (default none)"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--seed", type=int, help="seed for initialisation and data order (default 0)")
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no progress bar"
    )
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(func=cmd_train)


def train_config_from_args(args: argparse.Namespace):
    """Defaults <- (on --resume) the saved config <- the flags actually given."""
    from .train import TrainConfig
    from .train.loop import read_run_config

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if "overrides" in given:
        given["overrides"] = _parse_sets(given["overrides"])
    base: dict[str, Any] = {}
    if args.resume:
        saved = read_run_config(args.out)
        if saved is not None:
            base = dict(saved["train"])
    return TrainConfig.from_dict({**base, **given})


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = train_config_from_args(args)
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if result.interrupted is not None:
        return 128 + int(result.interrupted)
    return 0


# ---------------------------------------------------------------------------------------------- eval
def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="bits per byte of a trained model, or a cache policy x budget sweep",
        description=(
            "Bits per byte of a trained model, overall and per document (plain or strided). With --policies "
            "and --budgets: the bounded-cache sweep (TOVA paper, Table 3), each document decoded with the "
            "policy active from its first byte; with --hf PATH the same sweep for a local HF model folder."
        ),
    )
    p.add_argument(
        "checkpoint",
        metavar="RUN_DIR_OR_CKPT",
        nargs="?",
        help="run directory (newest checkpoint) or checkpoint directory (omit with --hf)",
    )
    p.add_argument(
        "--policies",
        type=_csv(str),
        metavar="SPECS",
        help="sweep these cache policies, e.g. tova,tova_head,h2o,window,sink (options: sink:sinks=8); "
        "the full cache is always the last column",
    )
    p.add_argument("--budgets", type=_csv(int), metavar="N,...", help="sweep budgets (tokens kept per layer)")
    p.add_argument(
        "--metric", choices=["ppl", "bpb", "loss"], default="bpb", help="sweep table/plot metric (default bpb)"
    )
    p.add_argument(
        "--out-dir", metavar="DIR", help="sweep output folder for sweep.md/.json/.png (default: RUN_DIR/eval/...)"
    )
    p.add_argument(
        "--hf",
        metavar="PATH",
        help="sweep a local HuggingFace causal LM folder instead of a longseq run (needs longseq[hf] and "
        "--data text files; metrics are per token of its tokenizer)",
    )
    p.add_argument(
        "--data", nargs="+", metavar="PATH", help="documents to evaluate (default: the run's training data)"
    )
    p.add_argument(
        "--split",
        choices=["val", "train", "all"],
        default="val",
        help="which documents: the run's validation split, its training split, or all (default val)",
    )
    p.add_argument("--val-docs", type=_csv(str), metavar="NAMES", help="override the validation documents")
    p.add_argument(
        "--seq-len",
        type=int,
        help="context length in bytes (default: the run's training seq-len); in a sweep, score each "
        "document's first SEQ_LEN bytes (default: whole documents)",
    )
    p.add_argument(
        "--stride",
        type=int,
        help="strided evaluation: advance windows by S bytes, score only the last S "
        "(default: seq-len, i.e. non-overlapping windows)",
    )
    p.add_argument(
        "--max-bytes", type=int, help="evaluate at most this many bytes, spread over the documents"
    )
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument(
        "--json",
        metavar="FILE",
        help="write the results here (default: RUN_DIR/eval/<checkpoint>-<split>-T<seq>-S<stride>.json)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    sweep = _check_sweep_args(args)
    if args.hf:
        if args.checkpoint is not None:
            raise ValueError("give either RUN_DIR_OR_CKPT or --hf PATH, not both")
        if not sweep:
            raise ValueError("--hf evaluates a policy sweep: give --policies and --budgets")
        return _eval_hf(args)
    if args.checkpoint is None:
        raise ValueError("eval needs RUN_DIR_OR_CKPT (or --hf PATH)")
    return _eval_sweep(args) if sweep else _eval_bpb(args)


def _check_sweep_args(args: argparse.Namespace) -> bool:
    """True for sweep mode; every spec and budget is checked before any model is loaded."""
    from .cache import parse_policy

    if args.policies is None and args.budgets is None:
        return False
    if not args.policies or not args.budgets:
        raise ValueError("a policy sweep needs both --policies and --budgets (e.g. --policies tova,window "
                         "--budgets 64,128,256)")
    if min(args.budgets) < 1:
        raise ValueError(f"--budgets must be >= 1; got {args.budgets}")
    for spec in args.policies:
        if spec.strip().lower() != "full":
            parse_policy(spec, budget=min(args.budgets))
    return True


def _print_sweep(result, metric: str) -> None:
    print(result.to_markdown(metric))
    for name, path in result.files.items():
        print(f"wrote {name}: {path}", file=sys.stderr)


def _eval_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep
    from .train.checkpoint import load_model, read_config, resolve_checkpoint
    from .train.distributed import pick_device

    ckpt = resolve_checkpoint(args.checkpoint)
    config = read_config(ckpt)
    model_cfg = config.get("model", {})
    kind, fields = model_cfg.get("kind"), model_cfg.get("config", {})
    if kind == "gla" or (kind == "megabyte" and fields.get("global_backbone") == "gla"):
        raise ValueError(
            f"{ckpt} is a {kind} model without softmax-attention caches to bound: a policy sweep needs a "
            "transformer (or a megabyte model with global_backbone=transformer)"
        )
    train_cfg = config.get("train", {})
    docs = [(name, bytes(ids)) for name, ids in _eval_documents(args, train_cfg)]
    model = load_model(ckpt, pick_device(args.device)).eval()
    out_dir = Path(args.out_dir) if args.out_dir else ckpt.parent.parent / "eval" / f"sweep-{ckpt.name}-{args.split}"
    result = run_sweep(
        model, docs, args.policies, args.budgets, max_tokens=args.seq_len, out_dir=out_dir, metric=args.metric,
        progress=(lambda line: print(line, file=sys.stderr)) if args.progress else None,
    )
    _print_sweep(result, args.metric)
    return 0


def _eval_hf(args: argparse.Namespace) -> int:
    if not args.data:
        raise ValueError("--hf needs --data: text files to evaluate on")
    paths = [Path(p) for p in args.data]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"--data: no such file: {path}")
    from .hf import evaluate_hf

    docs = [(path.name, path.read_text(encoding="utf-8", errors="replace")) for path in paths]
    result = evaluate_hf(
        args.hf, docs, args.policies, args.budgets, device=args.device, max_tokens=args.seq_len,
        out_dir=Path(args.out_dir or "eval-hf"), metric=args.metric,
        progress=(lambda line: print(line, file=sys.stderr)) if args.progress else None,
    )
    _print_sweep(result, args.metric)
    return 0


def _eval_documents(args: argparse.Namespace, train_cfg: dict[str, Any]):
    """The (name, bytes) documents ``longseq eval`` scores, chosen as the run chose its split."""
    from .data import BUILTIN_VAL_DOCS, builtin_corpus_path, load_corpus, split_documents
    from .evaluate import corpus_documents

    data = args.data if args.data is not None else train_cfg.get("data")
    builtin = data is None
    corpus = load_corpus([builtin_corpus_path()] if builtin else data, train_cfg.get("cache_dir"))
    if args.split == "all":
        ids = list(range(corpus.num_docs))
    else:
        val_docs = (
            args.val_docs
            if args.val_docs is not None
            else (train_cfg.get("val_docs") if args.data is None else None)
        )
        val_fraction = train_cfg.get("val_fraction")
        if val_docs is None and builtin and val_fraction is None:
            val_docs = list(BUILTIN_VAL_DOCS)
        split = split_documents(corpus.names, val_docs, 0.1 if val_fraction is None else val_fraction)
        ids = split.val if args.split == "val" else split.train
    return corpus_documents(corpus, ids, args.max_bytes)


def _eval_bpb(args: argparse.Namespace) -> int:
    from .evaluate import check_seq_len, evaluate_bpb
    from .train.checkpoint import load_model, read_config, resolve_checkpoint
    from .train.distributed import pick_device

    ckpt = resolve_checkpoint(args.checkpoint)
    config = read_config(ckpt)
    train_cfg = config.get("train", {})
    seq_len = args.seq_len or int(train_cfg.get("seq_len", 256))
    stride = args.stride or seq_len
    if not 1 <= stride <= seq_len:
        raise ValueError(f"--stride must be in [1, seq-len={seq_len}]; got {stride}")
    device = pick_device(args.device)
    model = load_model(ckpt, device)
    check_seq_len(model, seq_len)
    docs = _eval_documents(args, train_cfg)
    result = evaluate_bpb(
        model, docs, seq_len, stride, batch_size=args.batch_size, device=device, progress=args.progress
    )
    print(
        f"checkpoint {ckpt} (step {config.get('step')}), split {args.split}, "
        f"seq_len {seq_len}, stride {stride}"
    )
    print(result.table())
    out = (
        Path(args.json)
        if args.json
        else ckpt.parent.parent / "eval" / f"{ckpt.name}-{args.split}-T{seq_len}-S{stride}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"checkpoint": str(ckpt), "step": config.get("step"), "split": args.split, **result.to_dict()},
            indent=2,
        )
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ generate
def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a trained model, streamed to stdout")
    p.add_argument(
        "checkpoint",
        metavar="RUN_DIR_OR_CKPT",
        help="run directory (newest checkpoint) or checkpoint directory",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--prompt", action="append",
        help="prompt text (UTF-8); repeat for a batch of prompts (any lengths), decoded together",
    )
    src.add_argument(
        "--prompt-file", metavar="FILE", action="append",
        help="read a prompt from this file (bytes); repeatable like --prompt",
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="bytes to generate (default 256)")
    p.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy (default 0.8)"
    )
    p.add_argument("--top-k", type=int, help="sample among the k most likely bytes")
    p.add_argument(
        "--top-p", type=float, help="nucleus sampling: smallest set of bytes with probability >= p"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--stop", action="append", metavar="TEXT",
        help="end a row after it generates TEXT (backslash escapes such as \\n allowed; repeatable)",
    )
    p.add_argument(
        "--compile", action="store_true",
        help="capture the decode step as a CUDA graph and replay it (CUDA only; eager with a note on CPU)",
    )
    p.add_argument(
        "--fused", action="store_true",
        help="--compile, with the step torch.compile'd before its capture (fewer kernels per step; the first "
             "step compiles for a while)",
    )
    p.add_argument("--cache", metavar="POLICY", help="KV-cache policy, e.g. tova:512 (default: full)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument(
        "--no-echo", dest="echo", action="store_false", help="do not print the prompt before the continuation"
    )
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import check_sampling, generate
    from .train.checkpoint import load_model
    from .train.distributed import pick_device

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0; got {args.max_new_tokens}")
    check_sampling(args.temperature, args.top_k, args.top_p)
    if args.prompt_file is not None:
        prompts = [Path(f).read_bytes() for f in args.prompt_file]
    else:
        prompts = [p.encode("utf-8") for p in args.prompt]
    if not all(prompts):
        raise ValueError("the prompt is empty; give at least one byte")
    stops = [stop_bytes(s) for s in args.stop or []]
    cache = None
    if args.cache:
        from .cache import parse_policy

        cache = parse_policy(args.cache)
    model = load_model(args.checkpoint, pick_device(args.device))
    out = sys.stdout
    batch = len(prompts) > 1
    # Bytes arrive one at a time; an incremental decoder holds back a partial UTF-8 sequence until
    # it is complete (or replaces it with U+FFFD when it turns out invalid).
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    if args.echo and not batch:
        out.write(decoder.decode(prompts[0]))
        out.flush()
    counted = [0]

    def on_token(token) -> None:
        counted[0] += 1
        if not batch:  # a batch is printed row by row at the end
            out.write(decoder.decode(bytes([int(token[0])])))
            out.flush()

    t0 = time.perf_counter()
    rows = generate(
        model,
        prompts if batch else prompts[0],
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        cache=cache,
        seed=args.seed,
        on_token=on_token,
        stop=stops or None,
        compile="fused" if args.fused else args.compile,
    )
    dt = time.perf_counter() - t0
    if batch:
        for i, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
            text = bytes(row.tolist() if args.echo else row[len(prompt) :].tolist())
            out.write(f"--- [{i}]\n{text.decode('utf-8', errors='replace')}\n")
    else:
        out.write(decoder.decode(b"", final=True) + "\n")
    out.flush()
    n_new = sum(len(r) - len(p) for p, r in zip(prompts, rows, strict=True)) if batch else counted[0]
    print(
        f"{n_new} tokens in {counted[0]} steps, {dt:.2f} s ({n_new / max(dt, 1e-9):.1f} tokens/s, "
        f"prefill of {sum(map(len, prompts))} bytes included)",
        file=sys.stderr,
    )
    return 0


def stop_bytes(text: str) -> bytes:
    """A ``--stop`` argument as bytes: UTF-8, with backslash escapes (``\\n``, ``\\x00``) decoded.

    The escapes are decoded on the UTF-8 bytes, so non-ASCII text (``é``, ``→``) keeps its encoding.
    """
    return codecs.escape_decode(text.encode("utf-8"))[0]


# --------------------------------------------------------------------------------------------- bench
def _add_bench(sub) -> None:
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
        "--models", type=_csv(str), default=["gla", "transformer"],
        help="comma-separated model kinds; decode mode also takes kind:preset (e.g. megabyte:paper95m)",
    )
    p.add_argument(
        "--presets", type=_csv(str), default=["tiny"], help="comma-separated presets (default tiny)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="FIELD=VALUE",
        help="override a model config field for every model (repeatable)",
    )
    p.add_argument(
        "--seq-lens", type=_csv(int), default=[512], help="comma-separated training sequence lengths"
    )
    p.add_argument(
        "--batch-tokens", type=int, default=8192, help="training tokens per step; batch = this // seq_len"
    )
    p.add_argument("--steps", type=int, default=10, help="timed training steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warmup steps (default 3)")
    p.add_argument("--gen-batch", type=int, default=1, help="generation batch size (default 1)")
    p.add_argument(
        "--gen-prompt", type=int, default=512, help="generation prompt length in bytes (default 512)"
    )
    p.add_argument("--gen-tokens", type=int, default=128, help="generated tokens timed (default 128)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    d = p.add_argument_group("decode mode")
    d.add_argument("--contexts", type=_csv(int), default=[4096], help="prompt lengths (default 4096)")
    d.add_argument(
        "--batch-sizes", type=_csv(int_or_max), default=[1],
        help="decode batch sizes; 'max' = the largest that fits --memory-limit-gib, up to --max-batch (default 1)",
    )
    d.add_argument("--max-batch", type=int, default=512, help="the most rows a 'max' batch tries (default 512)")
    d.add_argument(
        "--policies", type=_csv(str), default=["full"],
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
    p.set_defaults(func=cmd_bench)


def cmd_bench_decode(args: argparse.Namespace) -> int:
    from .train.bench import decode_markdown, run_decode_bench

    if args.gen_tokens < 1 or args.warmup < 0:
        raise ValueError("--gen-tokens must be >= 1 and --warmup >= 0")
    if not args.contexts or min(args.contexts) < 1:
        raise ValueError("--contexts must be positive integers")
    if not args.batch_sizes or any(b != "max" and b < 1 for b in args.batch_sizes) or args.max_batch < 1:
        raise ValueError("--batch-sizes must be positive integers or 'max', and --max-batch positive")
    report = run_decode_bench(
        args.models, args.presets, args.contexts, args.batch_sizes, args.policies,
        steps=args.gen_tokens, warmup=max(args.warmup, 2), compile="fused" if args.fused else args.compile,
        against=args.against,
        device=args.device, overrides=_parse_sets(args.overrides), memory_limit_gib=args.memory_limit_gib,
        max_batch=args.max_batch, log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    report["command"] = "longseq " + shlex.join(args.argv)
    print(decode_markdown(report))
    if args.jsonl:
        Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in report.items() if k != "results"}
        with open(args.jsonl, "w") as f:
            for row in report["results"]:
                f.write(json.dumps({**meta, **row}) + "\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .train.bench import markdown_table, run_bench

    if args.mode == "decode":
        return cmd_bench_decode(args)

    for name in ("batch_tokens", "steps", "gen_batch", "gen_prompt", "gen_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.warmup < 0 or not args.seq_lens or min(args.seq_lens) < 1:
        raise ValueError("--warmup must be >= 0 and --seq-lens positive integers")
    report = run_bench(
        args.models,
        args.presets,
        args.seq_lens,
        args.batch_tokens,
        args.steps,
        args.warmup,
        args.gen_batch,
        args.gen_prompt,
        args.gen_tokens,
        args.device,
        _parse_sets(args.overrides),
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    report["command"] = "longseq " + shlex.join(args.argv)
    print(markdown_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------- plot
def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="loss and bits-per-byte curves of runs on one figure")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.jsonl)")
    p.add_argument("-o", "--out", required=True, metavar="FILE.png", help="image file to write")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from .train.plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out)}")
    return 0


# ---------------------------------------------------------------------------------------- quickstart
def _add_quickstart(sub) -> None:
    p = sub.add_parser(
        "quickstart", help="train, evaluate and sample a tiny GLA model on CPU (a few minutes)"
    )
    p.add_argument(
        "--out",
        default="runs/quickstart",
        help="run directory, replaced if it exists (default runs/quickstart)",
    )
    p.add_argument("--steps", type=int, help="training steps (default: the tuned 1200)")
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .train.quickstart import quickstart

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1; got {args.steps}")
    summary = quickstart(args.out, args.steps)
    return 128 + int(summary["interrupted"]) if "interrupted" in summary else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longseq", description="Long-sequence byte-level language modelling."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_eval, _add_generate, _add_bench, _add_plot, _add_quickstart):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for user errors, 128 + signal for an interrupted run)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if os.environ.get("LONGSEQ_DEBUG"):
            raise
        print(f"longseq: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("longseq: interrupted", file=sys.stderr)
        return 130

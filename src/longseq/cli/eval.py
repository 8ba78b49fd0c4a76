"""``longseq eval``: bits per byte of a trained model (plain or strided windows), or a cache policy x budget
sweep of a longseq run or of a local HF model folder. A pretrained source (``.gguf`` file or HF folder of a
family :func:`longseq.load_pretrained` converts) is evaluated natively wherever a run is, on ``--data``."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from .common import add_device_flag, csv_list, int_or_text, log, write_json
from .task import add_task_flags, run_task, uses_task

#: Default context (tokens) of a pretrained model, which has no training seq-len to reuse.
PRETRAINED_SEQ_LEN = 2048


def add_parser(sub) -> None:
    """Add ``eval`` to the ``longseq`` subcommands."""
    p = sub.add_parser(
        "eval",
        help="bits per byte of a trained or pretrained model, or a cache policy x budget sweep",
        description=(
            "Bits per byte of a trained model, overall and per document (plain or strided); a pretrained "
            "model (.gguf file or HF folder) is converted and scored through its tokenizer on --data, with "
            "loss and perplexity per token next to bits per UTF-8 byte. With --policies "
            "and --budgets: the bounded-cache sweep (TOVA paper, Table 3), each document decoded with the "
            "policy active from its first byte; with --hf PATH the same sweep for a local HF model folder."
        ),
    )
    p.add_argument(
        "checkpoint", metavar="RUN_DIR_OR_CKPT", nargs="?",
        help="run directory (newest checkpoint), checkpoint directory, or a pretrained model: .gguf file or HF "
        "folder (needs --data) (omit with --hf)",
    )
    _add_sweep_flags(p)
    p.add_argument(
        "--data", nargs="+", metavar="PATH",
        help="documents to evaluate (default: the run's training data; required for a pretrained model)"
    )
    p.add_argument(
        "--split", choices=["val", "train", "all"],
        help="which documents: the run's validation split, its training split, or all (default val; all for "
        "a pretrained model)",
    )
    p.add_argument("--val-docs", type=csv_list(str), metavar="NAMES", help="override the validation documents")
    p.add_argument(
        "--seq-len", type=int,
        help="context length in tokens, bytes for byte-level models (default: the run's training seq-len; "
        f"{PRETRAINED_SEQ_LEN} for a pretrained model); in a sweep, score each document's first SEQ_LEN tokens "
        "(default: whole documents)",
    )
    p.add_argument(
        "--stride", type=int,
        help="strided evaluation: advance windows by S bytes, score only the last S "
        "(default: seq-len, i.e. non-overlapping windows)",
    )
    p.add_argument("--max-bytes", type=int, help="evaluate at most this many bytes, spread over the documents")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    add_device_flag(p)
    p.add_argument(
        "--json", metavar="FILE",
        help="write the results here (default: RUN_DIR/eval/<checkpoint>-<split>-T<seq>-S<stride>.json, with "
        "-B<max-bytes> and -D<tag of --data/--val-docs> added when those are given; for a pretrained model "
        "./eval/<model file name>-<split>-T<seq>-S<stride>[-B..]-D<tag of --data/--val-docs and the model "
        "path>.json)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_task_flags(p)  # --task passkey (longseq.cli.task)
    p.set_defaults(func=run)


def _add_sweep_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--policies", type=csv_list(str), metavar="SPECS",
        help="sweep these cache policies, e.g. tova,tova_head,h2o,window,sink (options: sink:sinks=8); "
        "the full cache is always the last column",
    )
    p.add_argument("--budgets", type=csv_list(int_or_text), metavar="N,...",
                   help="sweep budgets (tokens kept per layer); with --task also ctx/K (the prompt length / K)")
    p.add_argument(
        "--metric", choices=["ppl", "bpb", "loss"], default="bpb", help="sweep table/plot metric (default bpb)"
    )
    p.add_argument(
        "--out-dir", metavar="DIR",
        help="sweep output folder for sweep.md/.json/.png (default: RUN_DIR/eval/sweep-<checkpoint>-<split>-<tag "
        "of the other settings>)"
    )
    p.add_argument(
        "--hf", metavar="PATH",
        help="sweep a local HuggingFace causal LM folder instead of a longseq run (needs longseq[hf] and "
        "--data text files; metrics are per token of its tokenizer)",
    )


def run(args: argparse.Namespace) -> int:
    """Dispatch to bits per byte, the policy sweep of a run, or the policy sweep of an HF folder."""
    if uses_task(args):  # --task passkey: longseq.cli.task
        return run_task(args)
    _check_ranges(args)
    sweep = _check_sweep_args(args)
    if args.hf:
        if args.checkpoint is not None:
            raise ValueError("give either RUN_DIR_OR_CKPT or --hf PATH, not both")
        if not sweep:
            raise ValueError("--hf evaluates a policy sweep: give --policies and --budgets")
        return _eval_hf(args)
    if args.checkpoint is None:
        raise ValueError("eval needs RUN_DIR_OR_CKPT (or --hf PATH)")
    _check_pretrained(args)
    return _eval_sweep(args) if sweep else _eval_bpb(args)


def _check_pretrained(args: argparse.Namespace) -> None:
    """Mark a pretrained source (``args.pretrained``) and resolve ``--split``; a pretrained model has no
    training corpus, so it needs ``--data`` (checked before anything is loaded)."""
    from ..sources import is_pretrained_source, is_saved_longseq_folder

    # A pretrained source or a save_hf folder: opened by open_model, and without a training corpus.
    args.pretrained = is_pretrained_source(args.checkpoint) or is_saved_longseq_folder(args.checkpoint)
    if args.pretrained and not args.data:
        raise ValueError(f"{args.checkpoint} is a model folder or file without a training corpus: give --data "
                         "FILE_OR_DIR with the documents to evaluate")
    if args.split is None:
        args.split = "all" if args.pretrained else "val"


def _open_source(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """``(checkpoint or pretrained path, run config)``; a pretrained model's config is empty."""
    from ..train.checkpoint import read_config, resolve_checkpoint

    if args.pretrained:
        return Path(args.checkpoint), {}
    ckpt = resolve_checkpoint(args.checkpoint)
    return ckpt, read_config(ckpt)


def _load(args: argparse.Namespace, path: Path, device: Any):
    from ..sources import open_model
    from ..train.checkpoint import load_model

    return open_model(path, device) if args.pretrained else load_model(path, device)


def _result_dir(args: argparse.Namespace, path: Path) -> Path:
    """Where default result files go: RUN_DIR/eval, or ./eval for a pretrained model."""
    return Path("eval") if args.pretrained else path.parent.parent / "eval"


def _model_setting(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """The pretrained model's absolute path as a naming setting (runs name their files by their folder)."""
    return {"model": str(path.absolute())} if args.pretrained else {}


def _check_ranges(args: argparse.Namespace) -> None:
    """Every numeric flag in its range, before anything is read or written (0 is no "default" here)."""
    for flag in ("seq_len", "stride", "max_bytes", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1; got {value}")


def _settings_tag(**settings: Any) -> str:
    """Eight hex digits standing for ``settings`` in a default result file name."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _document_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that choose which documents (and how much of them) are scored, as given."""
    data = None if args.data is None else [str(Path(p).absolute()) for p in args.data]
    return {"data": data, "val_docs": args.val_docs, "max_bytes": args.max_bytes}


def _check_sweep_args(args: argparse.Namespace) -> bool:
    """True for sweep mode; every spec and budget is checked before any model is loaded."""
    from ..cache import parse_policy

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
    from ..models import capabilities
    from ..sweep import run_sweep
    from ..train.checkpoint import model_config_from
    from ..train.distributed import pick_device

    ckpt, config = _open_source(args)
    # read before the weights: a model without KV caches fails at once (a converted model is a Transformer)
    model_cfg = None if args.pretrained else model_config_from(config)
    if model_cfg is not None and not capabilities(model_cfg).cache_policies:
        raise ValueError(
            f"{ckpt} is a {model_cfg.kind} model without softmax-attention caches to bound: a policy sweep needs a "
            "transformer (or a megabyte model with global_backbone=transformer)"
        )
    docs = [(name, bytes(ids)) for name, ids in _eval_documents(args, config.get("train", {}))]
    model = _load(args, ckpt, pick_device(args.device)).eval()
    # The default folder is named by every setting that changes what the sweep writes, so sweeps with other
    # settings never overwrite each other.
    tag = _settings_tag(**_document_settings(args), seq_len=args.seq_len, policies=args.policies,
                        budgets=args.budgets, metric=args.metric, **_model_setting(args, ckpt))
    default_dir = _result_dir(args, ckpt) / f"sweep-{ckpt.name}-{args.split}-{tag}"
    out_dir = Path(args.out_dir) if args.out_dir else default_dir
    result = run_sweep(
        model, docs, args.policies, args.budgets, max_tokens=args.seq_len, out_dir=out_dir, metric=args.metric,
        progress=log if args.progress else None,
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
    from ..hf import evaluate_hf

    docs = [(path.name, path.read_text(encoding="utf-8", errors="replace")) for path in paths]
    result = evaluate_hf(
        args.hf, docs, args.policies, args.budgets, device=args.device, max_tokens=args.seq_len,
        out_dir=Path(args.out_dir or "eval-hf"), metric=args.metric,
        progress=log if args.progress else None,
    )
    _print_sweep(result, args.metric)
    return 0


def _eval_documents(args: argparse.Namespace, train_cfg: dict[str, Any]):
    """The (name, bytes) documents ``longseq eval`` scores, chosen as the run chose its split."""
    from ..data import BUILTIN_VAL_DOCS, builtin_corpus_path, load_corpus, split_documents
    from ..evaluate import corpus_documents

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
    from ..evaluate import check_seq_len, evaluate_bpb
    from ..train.distributed import pick_device

    ckpt, config = _open_source(args)
    train_cfg = config.get("train", {})
    default_seq_len = PRETRAINED_SEQ_LEN if args.pretrained else int(train_cfg.get("seq_len", 256))
    seq_len = args.seq_len if args.seq_len is not None else default_seq_len
    stride = args.stride if args.stride is not None else seq_len
    if not 1 <= stride <= seq_len:
        raise ValueError(f"--stride must be in [1, seq-len={seq_len}]; got {stride}")
    device = pick_device(args.device)
    docs = _eval_documents(args, train_cfg) if args.pretrained else None  # bad --data fails before the weights
    model = _load(args, ckpt, device)
    check_seq_len(model, seq_len)
    docs = docs if docs is not None else _eval_documents(args, train_cfg)
    result = evaluate_bpb(
        model, docs, seq_len, stride, batch_size=args.batch_size, device=device, progress=args.progress
    )
    if not result.tokens or not result.bytes:
        raise ValueError("nothing to score: every document chosen has fewer than 2 "
                         + ("tokens" if args.pretrained else "bytes"))
    what = f"model {ckpt} ({model.tokenizer!r})" if args.pretrained else f"checkpoint {ckpt}"
    what += "" if args.pretrained else f" (step {config.get('step')})"
    print(f"{what}, split {args.split}, seq_len {seq_len}, stride {stride}")
    print(result.table())
    if not math.isfinite(result.bpb):
        raise ValueError(f"the model's bits per byte is {result.bpb}: its outputs are not finite; no result written")
    out = write_json(
        args.json or _result_dir(args, ckpt) / f"{_bpb_file_stem(ckpt, args, seq_len, stride)}.json",
        {"checkpoint": str(ckpt), "step": config.get("step"), "tokenizer": model.tokenizer.kind,
         "split": args.split, **_document_settings(args), **result.to_dict()},
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _bpb_file_stem(ckpt: Path, args: argparse.Namespace, seq_len: int, stride: int) -> str:
    """``<checkpoint>-<split>-T<seq>-S<stride>``, then ``-B<max bytes>`` and ``-D<tag of --data and
    --val-docs>`` when given: evaluations with other settings never overwrite each other's results. For a
    pretrained model ``<checkpoint>`` is its file (or folder) name and the tag also covers its absolute path."""
    stem = f"{ckpt.name}-{args.split}-T{seq_len}-S{stride}"
    if args.max_bytes is not None:
        stem += f"-B{args.max_bytes}"
    if args.data is not None or args.val_docs is not None:
        settings = _document_settings(args)
        tag = _settings_tag(data=settings["data"], val_docs=settings["val_docs"], **_model_setting(args, ckpt))
        stem += f"-D{tag}"
    return stem

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

from .common import (
    add_device_flag,
    check_output_dir,
    check_output_file,
    csv_list,
    int_or_text,
    log,
    read_json_object,
    write_json,
)
from .task import add_task_flags, run_task, uses_task

#: Default context (tokens) of a pretrained model, which has no training seq-len to reuse.
PRETRAINED_SEQ_LEN = 2048
#: Default windows per forward pass of plain evaluation (the flag's default is None, so that a --batch-size
#: given to a mode that does not read it is seen, and refused).
BATCH_SIZE = 8
#: Default table metric of a sweep (None as a flag default for the same reason).
METRIC = "bpb"

#: The optional eval flags (argparse names) each mode reads; one given to another mode is refused, never
#: ignored. ``task_out`` is --out, the short form of --out-dir.
_MODE_FLAGS = {
    "plain evaluation": {"data", "split", "val_docs", "seq_len", "stride", "max_bytes", "batch_size", "json"},
    "a policy sweep": {"data", "split", "val_docs", "seq_len", "max_bytes", "metric", "out_dir", "task_out"},
    "an --hf sweep": {"data", "seq_len", "metric", "out_dir", "task_out"},
    "--task passkey": {"batch_size", "out_dir", "task_out"},
}
#: What each mode is chosen by and where it writes, for the error naming a flag it does not read.
_MODE_HINTS = {
    "plain evaluation": "(no --policies/--budgets/--task; it writes one file: --json FILE)",
    "a policy sweep": "(--policies and --budgets; it writes a folder: --out-dir DIR)",
    "an --hf sweep": "(--hf PATH; it writes a folder: --out-dir DIR)",
    "--task passkey": "(it writes a folder: --out DIR)",
}
_OPTIONAL_FLAGS = ("data", "split", "val_docs", "seq_len", "stride", "max_bytes", "batch_size", "json", "metric",
                   "out_dir", "task_out")


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
        "a pretrained model); on --data, val is the run's held-out documents found there, else a hash split of "
        "--data, as a note in the output says",
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
    p.add_argument("--max-bytes", type=int,
                   help="score at most this many bytes, spread evenly over the documents (each keeps its share, "
                   "plus its first byte, which is context only)")
    p.add_argument("--batch-size", type=int, help=f"windows per forward pass (default {BATCH_SIZE})")
    add_device_flag(p)
    p.add_argument(
        "--json", metavar="FILE",
        help="write the results here (default: RUN_DIR/eval/<checkpoint>-<split>-T<seq>-S<stride>.json, with "
        "-B<max-bytes> and -D<tag of --data/--val-docs> added when those are given; for a pretrained model "
        "./eval/<model file name>-<split>-T<seq>-S<stride>[-B..]-D<tag of --data/--val-docs and the model "
        "path>.json); an existing file is replaced only when it is an earlier eval result",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_task_flags(p)  # --task passkey (longseq.cli.task)
    p.set_defaults(func=run)


def _add_sweep_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--policies", type=csv_list(str), metavar="SPECS",
        help="sweep these cache policies, e.g. tova,tova_head,h2o,window,sink (options: sink:sinks=8; budgets "
        "come from --budgets, never from a spec); the full cache is always the last column",
    )
    p.add_argument("--budgets", type=csv_list(int_or_text), metavar="N,...",
                   help="sweep budgets (tokens kept per layer); with --task also ctx/K (the prompt length / K)")
    p.add_argument(
        "--metric", choices=["ppl", "bpb", "loss"], help=f"sweep table/plot metric (default {METRIC})"
    )
    p.add_argument(
        "--out-dir", metavar="DIR",
        help="sweep output folder for sweep.md/.json/.png (default: RUN_DIR/eval/sweep-<checkpoint>-<split>-<tag "
        "of the other settings>); sweep files already there are replaced only when they are an earlier sweep"
    )
    p.add_argument(
        "--hf", metavar="PATH",
        help="sweep a local HuggingFace causal LM folder instead of a longseq run (needs longseq[hf] and "
        "--data text files; metrics are per token of its tokenizer)",
    )


def run(args: argparse.Namespace) -> int:
    """Dispatch to bits per byte, the policy sweep of a run, or the policy sweep of an HF folder."""
    _check_spec_budgets(args)
    if uses_task(args):  # --task passkey: longseq.cli.task
        _check_mode_flags(args, "--task passkey")
        args.batch_size = BATCH_SIZE if args.batch_size is None else args.batch_size
        _check_task_output(args)
        return run_task(args)
    _check_ranges(args)
    sweep = _check_sweep_args(args)
    if args.hf:
        if args.checkpoint is not None:
            raise ValueError("give either RUN_DIR_OR_CKPT or --hf PATH, not both")
        if not sweep:
            raise ValueError("--hf evaluates a policy sweep: give --policies and --budgets")
        _check_mode_flags(args, "an --hf sweep")
        return _eval_hf(args)
    _check_mode_flags(args, "a policy sweep" if sweep else "plain evaluation")
    if args.checkpoint is None:
        raise ValueError("eval needs RUN_DIR_OR_CKPT (or --hf PATH)")
    _check_pretrained(args)
    return _eval_sweep(args) if sweep else _eval_bpb(args)


def _check_mode_flags(args: argparse.Namespace, mode: str) -> None:
    """Refuse every optional flag ``mode`` does not read (a flag silently ignored looks like one obeyed), then
    fill in the defaults of those it does."""
    foreign = [name for name in _OPTIONAL_FLAGS if getattr(args, name) is not None and name not in _MODE_FLAGS[mode]]
    if foreign:
        flags = [("--out" if name == "task_out" else f"--{name.replace('_', '-')}") for name in foreign]
        if "task_out" in foreign and "out_dir" in foreign and args.out_dir == args.task_out:
            flags.remove("--out-dir")  # uses_task copied --out into out_dir: the user gave one flag
        verb = "does" if len(flags) == 1 else "do"
        raise ValueError(f"{', '.join(flags)} {verb} not apply to {mode} {_MODE_HINTS[mode]}")
    if mode == "plain evaluation" and args.batch_size is None:
        args.batch_size = BATCH_SIZE
    if mode != "plain evaluation" and args.metric is None:
        args.metric = METRIC


def _check_spec_budgets(args: argparse.Namespace) -> None:
    """A policy spec with its own budget (``tova:32``) next to ``--budgets`` would run at one budget and be labelled
    by another: eval takes budgets from ``--budgets`` only."""
    from ..cache import parse_policy

    for spec in args.policies or []:
        try:
            parse_policy(spec, budget=1 << 20, budgets_from="--budgets")  # any budget an option allows
        except ValueError as err:
            raise ValueError(f"--policies: {err}") from None


def _check_task_output(args: argparse.Namespace) -> None:
    """``--task passkey``: its flags (``--filler`` first, which must be a file or a built-in name) and its output
    folder, checked before the model is opened."""
    from ..tasks.passkey import FILLER_NAMES
    from ..tasks.report import PASSKEY_FILES
    from .task import _out_dir, check_task_args

    if args.filler is not None and args.filler not in FILLER_NAMES and Path(args.filler).is_dir():
        raise IsADirectoryError(f"--filler: {args.filler} is a folder; give a text file or a built-in filler "
                                f"({', '.join(FILLER_NAMES)})")
    # run_task checks the flags again: the output folder is named by them (the default by a tag of them), and
    # knowing it before the run is what keeps a long run from failing at its last step.
    settings = check_task_args(args)
    flag = "--out" if args.task_out is not None else "--out-dir" if args.out_dir is not None else None
    check_output_dir(_out_dir(args, settings), flag, "passkey result", PASSKEY_FILES, _is_passkey_output)


def _is_passkey_output(folder: Path) -> bool:
    data = read_json_object(folder / "passkey.json")
    return data is not None and data.get("task") == "passkey"


def _is_sweep_output(folder: Path) -> bool:
    data = read_json_object(folder / "sweep.json")
    return data is not None and {"policies", "budgets", "scores", "full"} <= set(data)


def _is_eval_result(path: Path) -> bool:
    data = read_json_object(path)
    return data is not None and {"checkpoint", "split", "seq_len", "stride", "bpb", "documents"} <= set(data)


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

    return open_model(path, device, progress=args.progress) if args.pretrained else load_model(path, device)


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
    from ..sweep import SWEEP_FILES, run_sweep
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
    # The default folder is named by every setting that changes what the sweep writes, so sweeps with other
    # settings never overwrite each other.
    tag = _settings_tag(**_document_settings(args), seq_len=args.seq_len, policies=args.policies,
                        budgets=args.budgets, metric=args.metric, **_model_setting(args, ckpt))
    default_dir = _result_dir(args, ckpt) / f"sweep-{ckpt.name}-{args.split}-{tag}"
    out_dir = check_output_dir(args.out_dir or default_dir, _out_dir_flag(args), "policy sweep", SWEEP_FILES,
                               _is_sweep_output)
    chosen, note = _eval_documents(args, config.get("train", {}))
    docs = [(name, bytes(ids)) for name, ids in chosen]
    if note:
        log(f"note: {note}")
    model = _load(args, ckpt, pick_device(args.device)).eval()
    result = run_sweep(
        model, docs, args.policies, args.budgets, max_tokens=args.seq_len, out_dir=out_dir, metric=args.metric,
        progress=log if args.progress else None, note=note,
    )
    _print_sweep(result, args.metric)
    return 0


def _out_dir_flag(args: argparse.Namespace) -> str | None:
    """The flag that named the output folder (None: the default folder), for error messages."""
    if args.out_dir is None:
        return None
    return "--out" if args.task_out == args.out_dir else "--out-dir"


def _eval_hf(args: argparse.Namespace) -> int:
    from ..sweep import SWEEP_FILES

    if not args.data:
        raise ValueError("--hf needs --data: text files to evaluate on")
    paths = [Path(p) for p in args.data]
    for path in paths:
        if path.is_dir():
            raise IsADirectoryError(f"--data: {path} is a folder; --hf takes text files")
        if not path.is_file():
            raise FileNotFoundError(f"--data: no such file: {path}")
    out_dir = check_output_dir(args.out_dir or "eval-hf", _out_dir_flag(args), "policy sweep", SWEEP_FILES,
                               _is_sweep_output)
    from ..hf import evaluate_hf

    docs = [(path.name, path.read_text(encoding="utf-8", errors="replace")) for path in paths]
    result = evaluate_hf(
        args.hf, docs, args.policies, args.budgets, device=args.device, max_tokens=args.seq_len,
        out_dir=out_dir, metric=args.metric,
        progress=log if args.progress else None,
    )
    _print_sweep(result, args.metric)
    return 0


def _eval_documents(args: argparse.Namespace, train_cfg: dict[str, Any]) -> tuple[list, str | None]:
    """The (name, bytes) documents ``longseq eval`` scores, chosen as the run chose its split, and a note saying
    which documents those are and why when that is not simply the run's own split (None otherwise)."""
    from ..data import builtin_corpus_path, load_corpus, run_holdout, split_documents
    from ..evaluate import corpus_documents

    data = args.data if args.data is not None else train_cfg.get("data")
    builtin = data is None
    corpus = load_corpus([builtin_corpus_path()] if builtin else data, train_cfg.get("cache_dir"))
    note = None
    if args.split == "all":
        ids = list(range(corpus.num_docs))
    else:
        # the run's own data: exactly the split it trained with
        val_docs, fraction = run_holdout(builtin, train_cfg.get("val_docs"), train_cfg.get("val_fraction"))
        if args.val_docs is not None:
            val_docs = args.val_docs
        elif args.data is not None:
            val_docs, note = _held_out_in_data(args, train_cfg, corpus.names, fraction)
        if val_docs is None and fraction > 0 and corpus.num_docs < 2:
            # split_documents' own message suggests train's --val-fraction, which eval does not have
            source = "--data" if args.data is not None else "the run's data"
            raise ValueError(f"--split {args.split} holds out a share of the documents, but {source} has only "
                             f"{corpus.num_docs}: give more documents, name the held-out ones with --val-docs, or "
                             "score every document with --split all")
        split = split_documents(corpus.names, val_docs, fraction)
        ids = split.val if args.split == "val" else split.train
    return corpus_documents(corpus, ids, args.max_bytes), note


def _held_out_in_data(
    args: argparse.Namespace, train_cfg: dict[str, Any], names: list[str], fraction: float
) -> tuple[list[str] | None, str]:
    """``(val_docs, note)`` for ``--data`` other than the run's own: the run's held-out documents where --data
    has them (so "val" never means documents the run trained on), else a hash split of --data, said so."""
    from ..data import name_matches  # split_documents' own name matching, so both agree on what is present

    hashed = (f"split {args.split} is a hash split holding out {fraction:.0%} of --data's {len(names)} documents "
              "(as train's --val-fraction does)")
    if args.pretrained:
        return None, f"a pretrained model has no held-out documents: {hashed}"
    held_out = _run_held_out(train_cfg)
    if held_out is None:
        return None, f"the run's held-out documents are unknown (its data is not readable): {hashed}, which may " \
                     "include documents the run trained on"
    present = [want for want in held_out if any(name_matches(name, want) for name in names)]
    if not present:
        return None, (f"--data holds none of the run's held-out documents ({', '.join(held_out)}): {hashed}, "
                      "which may include documents the run trained on")
    missing = [want for want in held_out if want not in present]
    note = f"split {args.split}: the run's held-out documents found in --data ({', '.join(present)})"
    if args.split == "train":
        note = f"split train: --data less the run's held-out documents ({', '.join(present)})"
    return present, note + (f"; not in --data: {', '.join(missing)}" if missing else "")


def _run_held_out(train_cfg: dict[str, Any]) -> list[str] | None:
    """The names of the documents the run held out: as recorded (--val-docs, or the built-in corpus's), or, for a
    run that held out a fraction of its data, that split recomputed from its data (None if it cannot be read)."""
    import posixpath

    from ..data import DataError, builtin_corpus_path, load_corpus, run_holdout, split_documents

    builtin = train_cfg.get("data") is None
    val_docs, fraction = run_holdout(builtin, train_cfg.get("val_docs"), train_cfg.get("val_fraction"))
    if val_docs is not None:
        return val_docs
    try:
        corpus = load_corpus([builtin_corpus_path()] if builtin else train_cfg["data"], train_cfg.get("cache_dir"))
        split = split_documents(corpus.names, None, fraction)
    except (DataError, OSError):
        return None
    # by base name: --data may name the same files from another folder
    return [posixpath.basename(corpus.names[i]) for i in split.val]


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
    default_out = _result_dir(args, ckpt) / f"{_bpb_file_stem(ckpt, args, seq_len, stride)}.json"
    out = check_output_file(args.json or default_out, "--json" if args.json else None, "eval result", _is_eval_result)
    device = pick_device(args.device)
    docs, note = _eval_documents(args, train_cfg)  # bad --data fails before the weights are read
    model = _load(args, ckpt, device)
    check_seq_len(model, seq_len)
    result = evaluate_bpb(
        model, docs, seq_len, stride, batch_size=args.batch_size, device=device, progress=args.progress
    )
    if not result.tokens or not result.bytes:
        raise ValueError("nothing to score: every document chosen has fewer than 2 "
                         + ("tokens" if args.pretrained else "bytes"))
    what = f"model {ckpt} ({model.tokenizer!r})" if args.pretrained else f"checkpoint {ckpt}"
    what += "" if args.pretrained else f" (step {config.get('step')})"
    print(f"{what}, split {args.split}, seq_len {seq_len}, stride {stride}")
    if note:
        print(f"note: {note}")
    print(result.table())
    if not math.isfinite(result.bpb):
        raise ValueError(f"the model's bits per byte is {result.bpb}: its outputs are not finite; no result written")
    write_json(out, {"checkpoint": str(ckpt), "step": config.get("step"), "tokenizer": model.tokenizer.kind,
                     "split": args.split, **_document_settings(args), "split_note": note, **result.to_dict()})
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

"""``longseq train``: a training run's flags, and the :class:`~longseq.train.TrainConfig` they make.

Every flag defaults to ``None``, meaning "not given": a new run then takes ``TrainConfig``'s default and a
resumed one the value saved in its ``config.json``. The defaults named in the help texts are
``TrainConfig``'s.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from .common import add_device_flag, add_overrides_flag, csv_list, log, parse_sets


def add_parser(sub) -> None:
    """Add ``train`` to the ``longseq`` subcommands."""
    from ..models import MODELS

    p = sub.add_parser(
        "train",
        help="train a model (torchrun-compatible)",
        description=(
            "Train a language model on bytes (or, with --tokenizer, on a tokenizer's ids). Flags left out take "
            "their defaults, or on --resume the values saved in RUN_DIR/config.json."
        ),
    )
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (config, metrics, checkpoints)")
    p.add_argument("--model", choices=sorted(MODELS), help="model kind (default: gla)")
    p.add_argument("--preset", help="model size preset, e.g. tiny, small, base (default: tiny)")
    add_overrides_flag(p, "override a model config field, e.g. --set n_layers=2 (repeatable)")
    _add_data_flags(p)
    _add_optimization_flags(p)
    _add_evaluation_flags(p)
    _add_runtime_flags(p)
    p.set_defaults(func=run)


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", nargs="+", metavar="PATH",
        help="files, directories, globs or tar archives of documents (default: built-in Shakespeare)",
    )
    p.add_argument(
        "--val-docs", type=csv_list(str), metavar="NAMES",
        help="comma-separated validation documents (name, base name or stem); default for the "
        "built-in corpus: hamlet.txt,tempest.txt,sonnets.txt",
    )
    p.add_argument(
        "--val-fraction", type=float, metavar="F",
        help="fraction of documents held out for validation, instead of --val-docs (default 0.1)",
    )
    p.add_argument(
        "--within-docs", action="store_true", default=None, help="keep training windows inside single documents"
    )
    p.add_argument(
        "--cache-dir", metavar="DIR", help="where corpora are cached (default: $LONGSEQ_CACHE or ~/.cache/longseq)"
    )
    p.add_argument(
        "--tokenizer", metavar="PATH",
        help="train on this tokenizer's ids instead of bytes: a .gguf file, an HF folder with tokenizer files, "
        "or a model saved with one (the corpus is tokenized once and cached; not for megabyte)",
    )
    p.add_argument(
        "--passkey-mix", type=float, metavar="F",
        help="make this fraction of training rows begin with a passkey example (a key hidden in the row's text, "
        "asked for after it; examples of random length, the row going on with text), so the model learns the "
        "passkey task (default 0)",
    )
    p.add_argument(
        "--passkey-answer-weight", type=float, metavar="W",
        help="with --passkey-mix: loss weight of the passkey examples' answer ids, the other targets weighing 1 "
        "(default 1; the answer is a few ids of a long row, and small models learn retrieval sooner with W of "
        "~30). The logged training loss is then the weighted mean; validation bpb is not weighted",
    )
    p.add_argument("--seq-len", type=int, help="ids (bytes, or tokens with --tokenizer) per training sequence "
                   "(default 256)")
    p.add_argument("--batch-size", type=int, help="global batch in sequences per optimizer step (default 16)")


def _add_optimization_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, help="total optimizer steps (default 1000)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    p.add_argument("--min-lr-ratio", type=float, help="final learning rate as a fraction of --lr (default 0.1)")
    p.add_argument("--warmup", type=int, help="linear warmup steps (default 100)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.1)")
    p.add_argument("--grad-clip", type=float, help="clip the global gradient norm to this (0: off; default 1.0)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")


def _add_evaluation_flags(p: argparse.ArgumentParser) -> None:
    """Validation, checkpoints and metric logging."""
    p.add_argument("--eval-every", type=int, help="validate every N steps (0: only at the end; default 200)")
    p.add_argument(
        "--eval-tokens", type=int,
        help="validation bytes per evaluation, spread over the documents (0: all; default 262144)",
    )
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default: at every validation)")
    p.add_argument("--keep", type=int, help="number of checkpoints kept (default 2)")
    p.add_argument("--log-every", type=int, help="append training metrics every N steps (default 10)")


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    """Where and how the run executes, and what happens to an existing run directory."""
    p.add_argument("--parallel", choices=["none", "ddp", "fsdp"], help="data parallelism under torchrun (default none)")
    add_device_flag(p, "cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile each residual block (the blocks of one kind share one graph; validation "
                   "stays eager)")
    p.add_argument("--seed", type=int, help="seed for initialisation and data order (default 0)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")


def train_config_from_args(args: argparse.Namespace):
    """Defaults <- (on --resume) the saved config <- the flags actually given.

    The saved config is ``RUN_DIR/config.json``; one that cannot be read is an error (never guessed at, nor
    overwritten). Without the file, the newest intact checkpoint's copy of it is taken, with a note."""
    from ..train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if "overrides" in given:
        given["overrides"] = parse_sets(given["overrides"])
    base: dict[str, Any] = _saved_train_config(args.out) if args.resume else {}
    cfg = TrainConfig.from_dict({**base, **given})
    if "overrides" in given:  # the --set flags typed, on --resume too (train() checks a new run's itself)
        from ..models import config_class

        config_class(cfg.model).check_overrides(given["overrides"])
    return cfg


def _saved_train_config(out: str) -> dict[str, Any]:
    from ..train import checkpoint as ckpt_io
    from ..train.rundir import load_run_config

    saved = load_run_config(out)
    if saved is not None:
        return _without_ignored_fraction(dict(saved["train"]))
    intact, _ = ckpt_io.find_intact(out)
    if intact is None:  # nothing to resume: train() says so
        return {}
    log(f"longseq: note: {out}/config.json is missing; resuming with the settings saved in {intact}")
    return _without_ignored_fraction(dict(ckpt_io.verify_checkpoint(intact).get("train") or {}))


def _without_ignored_fraction(saved: dict[str, Any]) -> dict[str, Any]:
    """A run saved before --val-docs and --val-fraction were refused together may hold both; its split used
    the documents and ignored the fraction, so dropping the fraction keeps that run resumable, and the same."""
    if saved.get("val_docs") is not None and saved.get("val_fraction") is not None:
        saved["val_fraction"] = None
    return saved


def run(args: argparse.Namespace) -> int:
    """Train (or resume); exit status 128 + the signal's number when a signal stopped the run before it did
    all its work (its steps, or only its final validation: the message on stderr says which)."""
    from ..train import train

    result = train(train_config_from_args(args), resume=args.resume, overwrite=args.overwrite)
    if result.signal is not None:
        return 128 + int(result.signal)
    return 0

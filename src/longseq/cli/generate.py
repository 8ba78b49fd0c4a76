"""``longseq generate``: sample from a trained model, streamed to stdout (a batch of prompts is printed row
by row once it is done)."""

from __future__ import annotations

import argparse
import codecs
import sys
import time
from pathlib import Path

from .common import add_device_flag


def add_parser(sub) -> None:
    """Add ``generate`` to the ``longseq`` subcommands."""
    p = sub.add_parser("generate", help="sample text from a trained model, streamed to stdout")
    p.add_argument(
        "checkpoint", metavar="MODEL",
        help="run directory (newest checkpoint), checkpoint directory, .gguf file or HF model folder "
        "(Llama, Mistral, Qwen2, Qwen3)",
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
    p.add_argument(
        "--max-new-tokens", type=int, default=256,
        help="tokens to generate: bytes for longseq's own models, tokenizer tokens for a pretrained one (default 256)",
    )
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling: smallest set of tokens with probability >= p")
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
    add_device_flag(p)
    p.add_argument(
        "--no-echo", dest="echo", action="store_false", help="do not print the prompt before the continuation"
    )
    p.set_defaults(func=run)


def stop_bytes(text: str) -> bytes:
    """A ``--stop`` argument as bytes: UTF-8, with backslash escapes (``\\n``, ``\\x00``) decoded.

    The escapes are decoded on the UTF-8 bytes, so non-ASCII text (``é``, ``→``) keeps its encoding.
    """
    return codecs.escape_decode(text.encode("utf-8"))[0]


def _prompts(args: argparse.Namespace) -> list[bytes]:
    """The prompts as bytes, from ``--prompt-file`` or ``--prompt``; none may be empty."""
    if args.prompt_file is not None:
        prompts = [Path(f).read_bytes() for f in args.prompt_file]
    else:
        # Arguments that are not valid UTF-8 reach Python as surrogate escapes: give back their raw bytes
        # (a byte model takes any bytes) instead of failing on them.
        prompts = [p.encode("utf-8", "surrogateescape") for p in args.prompt]
    if not all(prompts):
        raise ValueError("the prompt is empty; give at least one byte")
    return prompts


def run(args: argparse.Namespace) -> int:
    """Check the sampling flags, load the model, then generate: one prompt streams its bytes as they come,
    a batch prints each row when all are done; a speed summary goes to stderr."""
    import torch

    from ..generate import check_sampling, generate
    from ..sources import open_model
    from ..train.distributed import pick_device

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0; got {args.max_new_tokens}")
    check_sampling(args.temperature, args.top_k, args.top_p)
    prompts = _prompts(args)
    stops = [stop_bytes(s) for s in args.stop or []]
    if any(not s for s in stops):  # before the model loads and the prompt is echoed
        raise ValueError("--stop: an empty stop string never matches")
    cache = None
    if args.cache:
        from ..cache import parse_policy

        cache = parse_policy(args.cache)
    model = open_model(args.checkpoint, pick_device(args.device))
    tok = model.tokenizer
    ids = [torch.tensor(tok.encode(p), dtype=torch.long) for p in prompts]
    out = sys.stdout
    batch = len(prompts) > 1
    stream = _Stream(tok, out, ids[0].tolist())
    if args.echo and not batch:
        stream.write_bytes(prompts[0])
    counted = [0]

    def on_token(token) -> None:
        counted[0] += 1
        if not batch:  # a batch is printed row by row at the end
            stream.add(int(token[0]))

    t0 = time.perf_counter()
    rows = generate(
        model, ids if batch else ids[0], args.max_new_tokens, args.temperature, args.top_k, args.top_p,
        cache=cache, seed=args.seed, on_token=on_token, stop=stops or None,
        compile="fused" if args.fused else args.compile,
    )
    dt = time.perf_counter() - t0
    if batch:
        for i, (prompt, row) in enumerate(zip(ids, rows, strict=True)):
            text = tok.decode(row.tolist() if args.echo else row[len(prompt) :].tolist())
            out.write(f"--- [{i}]\n{text.decode('utf-8', errors='replace')}\n")
    else:
        stream.close()
    out.flush()
    n_new = sum(len(r) - len(p) for p, r in zip(ids, rows, strict=True)) if batch else counted[0]
    print(
        f"{n_new} tokens in {counted[0]} steps, {dt:.2f} s ({n_new / max(dt, 1e-9):.1f} tokens/s, "
        f"prefill of {sum(map(len, ids))} prompt tokens included)",
        file=sys.stderr,
    )
    return 0


class _Stream:
    """Prints a single row's new tokens as they come.

    Byte-wise tokenizers: each id's bytes go through an incremental UTF-8 decoder, which holds back a
    partial character until it is complete (or replaces it with U+FFFD when it turns out invalid). Subword
    tokenizers: the row's ids are decoded again at every token (a token may complete a character begun by
    the one before) and the new text is printed unless it ends in an incomplete character (U+FFFD), which
    waits for the next token."""

    def __init__(self, tokenizer, out, prompt_ids: list[int]) -> None:
        self.tokenizer, self.out = tokenizer, out
        # The continuation is decoded after the prompt, not on its own: a SentencePiece decoder drops the
        # leading space of a text's first token, which inside the text is a real space.
        self.ids = list(prompt_ids)
        self.sent = len(tokenizer.decode(self.ids).decode("utf-8", errors="replace"))  # characters printed
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write_bytes(self, data: bytes) -> None:
        self.out.write(self.utf8.decode(data))
        self.out.flush()

    def add(self, token: int) -> None:
        if self.tokenizer.bytewise:
            self.write_bytes(self.tokenizer.decode([token]))
            return
        self.ids.append(token)
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids).decode("utf-8", errors="replace")
        if final or not text.endswith("\ufffd"):
            self.out.write(text[self.sent :])
            self.out.flush()
            self.sent = len(text)

    def close(self) -> None:
        if not self.tokenizer.bytewise:
            self._flush(final=True)
        self.out.write(self.utf8.decode(b"", final=True) + "\n")

"""Passkey retrieval: what a bounded KV cache loses (issue 22).

A random 5-digit key is hidden at a chosen depth of ``length`` tokens of filler text, and the prompt ends
by asking for it. A model that attends over its whole context reads the key back; a cache policy that
evicted the key's tokens cannot (unless its summary of them survived). Prompts are built in the model's own
tokens, so a prompt is exactly ``length`` tokens for any tokenizer::

    from longseq.sources import open_model
    from longseq.tasks import run_passkey

    model = open_model("runs/tiny", "cuda")
    result = run_passkey(model, lengths=[2048], depths=[0.1, 0.5, 0.9], policies=["full", "tova", "window"],
                         budgets=[256, "ctx/8"], n_trials=5)
    print(result.to_markdown())
    result.write("passkey-out")

Layout of a prompt (token ids, each part encoded on its own and joined, so the filler is cut at a token
boundary): the tokenizer's special prefix (a BOS), an instruction line, filler, the key sentence, more
filler, the question. The key sentence starts at token ``round(depth * length)`` (clamped to the filler's
span), so ``depth`` is a fraction of the whole context. Digits are removed from the filler so the key is
the only number in the prompt.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..cache import parse_policy
from ..cache.policies import parse_budget, resolve_budget
from ..generate import generate
from ..tokenizer import Tokenizer
from .report import PasskeyResult, Row

INSTRUCTION = "There is a pass key hidden in the text below. Find it and remember it.\n"
KEY_SENTENCE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
KEY_DIGITS = 5
_KEY_PATTERN = re.compile(rf"(?<!\d)\d{{{KEY_DIGITS}}}(?!\d)")


@dataclass(frozen=True)
class PasskeyPrompt:
    """One passkey prompt: its token ``ids`` (exactly ``length`` of them), the ``key`` hidden in it, and the
    token span ``[key_start, key_end)`` of the key sentence."""

    ids: tuple[int, ...]
    key: str
    key_start: int
    key_end: int
    length: int
    depth: float
    trial: int


#: The other built-in filler: a few plain sentences over and over, as in the passkey test of Mohtashami and
#: Jaggi (2023) (the idea, in our own words). The key is then the only line that is not repetition, so
#: retrieval tests what the cache kept rather than how well a small model reads prose: SmolLM2-135M finds
#: the key at every depth of 2,048 tokens of it, against a third of the time in Shakespeare.
REPEATED_SENTENCES = ("The river runs to the sea. The hills are quiet and green. The wind is cold today. "
                      "We walk on, and then we go back home again.\n")


def named_filler(name: str) -> str:
    """A built-in filler by name: ``"corpus"`` (Shakespeare's works, the default) or ``"repeat"``."""
    if name == "corpus":
        return builtin_filler()
    if name == "repeat":
        return REPEATED_SENTENCES * 200
    raise ValueError(f"unknown built-in filler {name!r}; expected 'corpus' or 'repeat' (or a text file)")


FILLER_NAMES = ("corpus", "repeat")


@lru_cache(maxsize=1)
def builtin_filler() -> str:
    """The built-in corpus (Shakespeare's works) as one text, documents in order."""
    from ..data import builtin_corpus_path, load_corpus

    corpus = load_corpus([builtin_corpus_path()])
    return "\n".join(bytes(corpus.doc(i)).decode("utf-8", "replace") for i in range(corpus.num_docs))


def _clean_filler(text: str) -> str:
    cleaned = re.sub(r"\d", "", text)
    if not cleaned.strip():
        raise ValueError("the filler text is empty (after removing its digits)")
    return cleaned


def special_prefix(tokenizer: Tokenizer) -> list[int]:
    """The ids the tokenizer puts before a prompt's text (a BOS; nothing for bytes)."""
    plain = tokenizer.encode("x", special=False)
    marked = tokenizer.encode("x", special=True)
    for start in range(len(marked) - len(plain) + 1):
        if marked[start : start + len(plain)] == plain:
            return marked[:start]
    return []


def _filler_ids(tokenizer: Tokenizer, text: str, n: int, rng: random.Random) -> list[int]:
    """``n`` filler ids: the text from a random line start on (wrapping around), encoded and cut at ``n``."""
    start = rng.randrange(len(text))
    line = text.find("\n", start)
    start = line + 1 if 0 <= line < len(text) - 1 else 0
    chars = 4 * n + 64
    while True:
        piece = text[start : start + chars]
        while len(piece) < chars:  # wrap around to the text's beginning
            piece += "\n" + text[: chars - len(piece)]
        ids = tokenizer.encode(piece, special=False)
        if len(ids) >= n:
            return ids[:n]
        chars *= 2


def prompt_parts(tokenizer: Tokenizer, key: str) -> tuple[list[int], list[int], list[int]]:
    """The ids around the filler of a prompt hiding ``key``: ``(head, needle, question)`` -- the special prefix
    and the instruction; the key sentence; the question. Each part is encoded on its own."""
    head = special_prefix(tokenizer) + tokenizer.encode(INSTRUCTION, special=False)
    needle = tokenizer.encode(KEY_SENTENCE.format(key=key), special=False)
    return head, needle, tokenizer.encode(QUESTION, special=False)


def make_prompts(
    tokenizer: Tokenizer, length: int, depths: Sequence[float], trial: int = 0, seed: int = 0,
    filler: str | None = None,
) -> list[PasskeyPrompt]:
    """Passkey prompts of exactly ``length`` tokens, one per depth, for one trial: the same key and filler at
    every depth (so depths are compared on the same text); another trial or seed draws another key and
    another stretch of filler. ``filler``: the text to hide the key in (default: the built-in corpus)."""
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"a depth is a fraction of the context in [0, 1]; got {depth}")
    rng = random.Random(f"passkey:{seed}:{length}:{trial}")
    key = str(rng.randrange(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS))
    head, needle, question = prompt_parts(tokenizer, key)
    n_filler = length - len(head) - len(needle) - len(question)
    if n_filler < 1:
        raise ValueError(
            f"a passkey prompt of {length} tokens has no room for filler: the instruction, key sentence and "
            f"question take {length - n_filler} tokens of this tokenizer"
        )
    text = _clean_filler(builtin_filler() if filler is None else filler)
    body = _filler_ids(tokenizer, text, n_filler, rng)
    prompts = []
    for depth in depths:
        cut = min(max(round(depth * length) - len(head), 0), n_filler)
        ids = head + body[:cut] + needle + body[cut:] + question
        start = len(head) + cut
        prompts.append(PasskeyPrompt(tuple(ids), key, start, start + len(needle), length, float(depth), trial))
    return prompts


def extract_key(text: str | bytes) -> str | None:
    """The first 5-digit number in ``text`` (not part of a longer number), or None."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "replace")
    match = _KEY_PATTERN.search(text)
    return match.group(0) if match else None


def score_answer(text: str | bytes, key: str) -> float:
    """1.0 when the first 5-digit number of ``text`` is ``key``, else 0.0."""
    return 1.0 if extract_key(text) == key else 0.0


@torch.no_grad()
def answer(model, prompts: Sequence[PasskeyPrompt], policy=None, max_new_tokens: int = 10) -> list[str]:
    """The model's greedy continuations of ``prompts`` (equal lengths, one batch) under cache ``policy``."""
    ids = torch.tensor([p.ids for p in prompts], dtype=torch.long, device=model.device)
    out = generate(model, ids, max_new_tokens, temperature=0, cache=policy)
    width = ids.shape[1]
    return [model.tokenizer.decode(row[width:].tolist()).decode("utf-8", "replace") for row in out]


def plan_rows(policies: Sequence[str], budgets: Sequence[int | str]) -> list[Row]:
    """The result rows: each bounded policy at each budget, and ``full`` once; every spec checked here."""
    parsed = [parse_budget(b) for b in budgets]
    rows: list[Row] = []
    for spec in policies:
        spec = spec.strip().lower()
        if spec == "full":
            rows.append(Row("full", None))
            continue
        if not parsed:
            raise ValueError(f"policy {spec!r} needs budgets (e.g. 128 or ctx/8)")
        for budget in parsed:
            # a spec's own budget is refused: the row would be labelled by a budget its policy does not use
            parse_policy(spec, budget=resolve_budget(budget, 1 << 20), budgets_from="budgets")
            rows.append(Row(spec, budget))
    if not rows:
        raise ValueError("no cache policies to test")
    if len({(r.policy, r.budget) for r in rows}) != len(rows):
        raise ValueError(f"a policy is listed twice: {list(policies)}")
    return rows


def check_model(model, lengths: Sequence[int], rows: Sequence[Row]) -> None:
    """Refuse, before any work, lengths the model cannot take and bounded policies it has no cache for."""
    from ..models.base import LanguageModel

    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be >= 1 tokens; got {list(lengths)}")
    if not isinstance(model, LanguageModel):
        return
    caps = model.capabilities
    if caps.max_seq_len is not None and max(lengths) + 16 > caps.max_seq_len:
        raise ValueError(f"the model takes at most {caps.max_seq_len} tokens; the longest prompt is {max(lengths)}"
                         " tokens plus the answer")
    if not caps.cache_policies and any(r.policy != "full" for r in rows):
        raise ValueError(f"a {model.config.kind} model has no softmax-attention KV cache to bound: only the "
                         "'full' policy applies")


def run_passkey(
    model, lengths: Sequence[int], depths: Sequence[float], policies: Sequence[str],
    budgets: Sequence[int | str] = (), n_trials: int = 5, seed: int = 0, device: torch.device | str | None = None,
    progress: Callable[[str], None] | None = None, filler: str | None = None, max_new_tokens: int = 10,
    batch_size: int = 8,
) -> PasskeyResult:
    """Passkey accuracy of ``model`` for every (policy, budget, length, depth), over ``n_trials`` keys.

    ``policies``: cache policy specs (``"full"``, ``"tova"``, ``"sink:sinks=8"``, ...); each bounded one runs
    at every budget of ``budgets`` (ints, or ``"ctx/K"`` for the prompt length / K). Every prompt of a
    trial is the same for all policies, so the rows differ only in what their caches keep. ``device``: move
    the model there first (default: where it is). ``progress`` receives a line per row and length.
    """
    rows = plan_rows(policies, budgets)
    if n_trials < 1 or batch_size < 1 or max_new_tokens < KEY_DIGITS:
        raise ValueError(f"need n_trials >= 1, batch_size >= 1 and max_new_tokens >= {KEY_DIGITS}; got "
                         f"{n_trials}, {batch_size}, {max_new_tokens}")
    check_model(model, lengths, rows)
    if device is not None:
        model = model.to(device)
    model.eval()
    result = PasskeyResult(list(lengths), [float(d) for d in depths], rows, n_trials, seed)
    by_length = {  # every prompt first: a length too short for one fails before any generation
        length: [p for t in range(n_trials) for p in make_prompts(model.tokenizer, length, depths, t, seed, filler)]
        for length in lengths
    }
    for length, prompts in by_length.items():
        for row in rows:
            policy = None if row.budget is None else parse_policy(row.policy, budget=resolve_budget(row.budget, length))
            texts = []
            for i in range(0, len(prompts), batch_size):
                texts += answer(model, prompts[i : i + batch_size], policy, max_new_tokens)
            for prompt, text in zip(prompts, texts, strict=True):
                result.add(row, prompt.length, prompt.depth, prompt.trial, prompt.key, text,
                           score_answer(text, prompt.key))
            if progress is not None:
                progress(f"passkey L={length} {row.label(length)}: accuracy {result.mean(row, length):.2f}")
    return result

"""Multi-query associative recall (MQAR; the Zoology setup of Arora et al. 2023), on bytes (issue 20).

A sequence opens with ``n_pairs`` key-value pairs, then holds ``n_pairs`` queries -- keys asked again, at
random places in filler -- each followed by its value. A model recalls when, right after a query key, it
predicts that key's value: only exact recall of tokens far back does it, which is where a fixed-size state
(GLA) and a bounded cache (TOVA, Window) may fall short of full attention. Each query asks a pair drawn with
replacement (were every key asked once, the last ones could be answered by elimination: the values not asked
yet). Layout of one row of ``seq_len`` byte ids (keys in ``[1, 128)``, values in ``[128, 256)``, filler ``0``)::

    k1 v1 k2 v2 ... kN vN  0 0 k7 v7 0 k2 v2 0 0 0 k7 v7 ...

Targets are ``-100`` (ignored) except at the query keys, whose target is the next token, the value. So a
model's loss and accuracy on the task are those of the recalls (one per query), nothing else::

    from longseq.tasks.mqar import mqar_batch, train_mqar, mqar_accuracy
    model = longseq.build_model("hybrid", "tiny", d_model=128)
    train_mqar(model, seq_len=128, n_pairs=16, steps=3000, dense=True)
    mqar_accuracy(model, seq_len=128, n_pairs=16, cache=longseq.TOVA(16))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

KEYS = range(1, 128)  # key ids
VALUES = range(128, 256)  # value ids
FILLER = 0
IGNORE = -100


@dataclass(frozen=True)
class MQARBatch:
    """``inputs`` ``[B, T]`` int64 ids; ``targets`` ``[B, T]``: the value after each query key, ``-100``
    elsewhere; ``answers`` ``[B, Q]`` the positions of the ``Q`` query keys (row-wise, sorted)."""

    inputs: Tensor
    targets: Tensor
    answers: Tensor


def check_mqar_shape(seq_len: int, n_pairs: int) -> None:
    """Raise ``ValueError`` unless ``n_pairs`` pairs and their ``n_pairs`` queries fit ``seq_len`` tokens and
    the key alphabet."""
    if not 1 <= n_pairs <= len(KEYS):
        raise ValueError(f"n_pairs must be in [1, {len(KEYS)}] (distinct byte keys); got {n_pairs}")
    if seq_len < 4 * n_pairs:
        raise ValueError(f"seq_len={seq_len} is too short for {n_pairs} pairs and their queries "
                         f"(needs >= {4 * n_pairs} tokens)")


def mqar_batch(batch_size: int, seq_len: int, n_pairs: int, generator: torch.Generator | None = None,
               n_queries: int | None = None) -> MQARBatch:
    """A batch of MQAR rows (see the module docstring); every row draws its own keys, values and query
    places from ``generator``. ``n_queries``: queries per row (default ``n_pairs``, Zoology's; at most
    ``(seq_len - 2 * n_pairs) // 2``, a row of queries with no filler)."""
    check_mqar_shape(seq_len, n_pairs)
    Q = n_pairs if n_queries is None else n_queries
    if not isinstance(Q, int) or isinstance(Q, bool) or not 1 <= Q <= (seq_len - 2 * n_pairs) // 2:
        raise ValueError(f"n_queries must be in [1, {(seq_len - 2 * n_pairs) // 2}] for seq_len={seq_len} and "
                         f"{n_pairs} pairs; got {n_queries}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    g = generator
    B, N, T = batch_size, n_pairs, seq_len
    keys = torch.stack([torch.randperm(len(KEYS), generator=g)[:N] for _ in range(B)]) + KEYS.start  # [B, N]
    values = torch.randint(VALUES.start, VALUES.stop, (B, N), generator=g)
    inputs = torch.full((B, T), FILLER, dtype=torch.long)
    inputs[:, 0 : 2 * N : 2], inputs[:, 1 : 2 * N : 2] = keys, values
    # Query slots: Q non-overlapping 2-token slots among the (T - 2N) // 2 after the pairs, chosen at random.
    n_slots = (T - 2 * N) // 2
    slots = torch.stack([torch.randperm(n_slots, generator=g)[:Q].sort().values for _ in range(B)])  # [B, Q]
    answers = 2 * N + 2 * slots  # positions of the query keys
    # Which pair each query asks for: drawn with replacement. Asking every key once would let a model answer
    # by elimination (the values not yet asked), with no recall at all: H_N / N of the recalls right.
    order = torch.randint(N, (B, Q), generator=g)
    rows = torch.arange(B)[:, None]
    inputs[rows, answers] = keys.gather(1, order)
    inputs[rows, answers + 1] = values.gather(1, order)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    targets[rows, answers] = values.gather(1, order)
    return MQARBatch(inputs, targets, answers)


def mqar_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over the recall positions (``logits`` ``[B, T, V]``, ``targets`` ``[B, T]``)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def train_mqar(
    model: torch.nn.Module, seq_len: int, n_pairs: int | Sequence[int], steps: int, *, batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.1, warmup: int = 100, seed: int = 0, device: torch.device | str | None = None,
    dense: bool = False, on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` on fresh MQAR batches (longseq's AdamW and warmup-cosine schedule, gradients clipped at 1,
    bf16 autocast on CUDA); returns the loss of every step. The loss is on the recall positions only.
    ``n_pairs``: pairs per row, or several, one drawn per batch (one model for a range of difficulties).
    ``dense``: every slot after the pairs holds a query (``(seq_len - 2 * n) // 2`` recalls per row instead of
    ``n``), more to learn from per row; the rows scored stay Zoology's. With one pair, a dense row can be
    answered by copying the previous query's value, so dense training teaches recall from 2 pairs up."""
    from ..precision import autocast
    from ..train.schedule import WarmupCosine, build_optimizer

    choices = [n_pairs] if isinstance(n_pairs, int) else list(n_pairs)
    for n in choices:
        check_mqar_shape(seq_len, n)
    if not choices or steps < 1:
        raise ValueError(f"need at least one n_pairs and steps >= 1; got {n_pairs}, {steps}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).train()
    opt, _ = build_optimizer(model, lr, weight_decay, (0.9, 0.95), device)
    schedule = WarmupCosine(lr, min(warmup, steps), steps)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = schedule(step)
        pick = int(torch.randint(len(choices), (1,), generator=g)) if len(choices) > 1 else 0
        n = choices[pick]
        b = mqar_batch(batch_size, seq_len, n, g, n_queries=(seq_len - 2 * n) // 2 if dense else None)
        with autocast(device):
            loss = mqar_loss(model(b.inputs.to(device)), b.targets.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def mqar_accuracy(
    model: torch.nn.Module, seq_len: int, n_pairs: int, *, n_rows: int = 256, batch_size: int = 64,
    cache=None, seed: int = 1_000_003, device: torch.device | str | None = None,
) -> float:
    """Fraction of the recalls ``model`` gets right (greedy: the arg-max at each query key is its value) on
    ``n_rows`` fresh rows. ``cache``: decode through ``model.step`` with that cache policy from the first
    token (what a bounded state keeps decides), instead of the plain forward (the full context)."""
    check_mqar_shape(seq_len, n_pairs)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    g = torch.Generator().manual_seed(seed)
    right = total = 0
    for start in range(0, n_rows, batch_size):
        b = mqar_batch(min(batch_size, n_rows - start), seq_len, n_pairs, g)
        x = b.inputs.to(device)
        if cache is None:
            logits = model(x)
        else:
            logits, _ = model.step(x, model.init_state(x.shape[0], cache=cache, device=device))
        rows = torch.arange(x.shape[0], device=device)[:, None]
        guess = logits[rows, b.answers.to(device)].argmax(-1)
        want = b.targets.to(device)[rows, b.answers.to(device)]
        right += int((guess == want).sum())
        total += want.numel()
    return right / total

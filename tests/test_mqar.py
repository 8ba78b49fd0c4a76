"""Multi-query associative recall (longseq.tasks.mqar): the generator against a scan of its own rows, the
accuracy against an oracle and a know-nothing model, and training that learns."""

from __future__ import annotations

import pytest
import torch

from longseq import Full, build_model
from longseq.tasks.mqar import IGNORE, VALUES, mqar_accuracy, mqar_batch, mqar_loss, train_mqar


def test_rows_hold_the_pairs_then_queries_of_random_pairs_each_followed_by_its_value():
    b = mqar_batch(8, 64, 6, torch.Generator().manual_seed(0))
    for x, y, ans in zip(b.inputs.tolist(), b.targets.tolist(), b.answers.tolist(), strict=True):
        pairs = dict(zip(x[0:12:2], x[1:12:2], strict=True))
        assert len(pairs) == 6 and all(1 <= k < 128 for k in pairs) and all(v in VALUES for v in pairs.values())
        rest = x[12:]
        asked = [(i + 12, t) for i, t in enumerate(rest) if 1 <= t < 128]  # keys after the pairs
        assert len(asked) == 6 and all(k in pairs for _, k in asked) and [i for i, _ in asked] == ans
        for i, k in asked:
            assert x[i + 1] == pairs[k] and y[i] == pairs[k]  # the value follows, and is the target
        assert sum(t != IGNORE for t in y) == 6
        assert all(t == 0 for i, t in enumerate(x) if i >= 12 and i not in ans and i - 1 not in ans)
    again = mqar_batch(8, 64, 6, torch.Generator().manual_seed(0))
    assert torch.equal(again.inputs, b.inputs)


class Eliminator(torch.nn.Module):
    """Knows no key-value pair: at each query key it guesses the first value of the row not asked yet. Had
    every key been asked exactly once, this would answer the last query always right (H_N / N overall)."""

    def __init__(self, n_pairs: int) -> None:
        super().__init__()
        self.n = n_pairs
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(*x.shape, 256)
        for r, row in enumerate(x.tolist()):
            left = row[1 : 2 * self.n : 2]
            for i in range(2 * self.n, len(row) - 1):
                if 1 <= row[i] < 128:
                    out[r, i, left[0] if left else 128] = 1.0
                    if row[i + 1] in left:
                        left.remove(row[i + 1])
        return out


def test_queries_draw_their_pairs_with_replacement_so_elimination_does_not_recall():
    b = mqar_batch(400, 48, 4, torch.Generator().manual_seed(2))
    asked = b.inputs.gather(1, b.answers)  # [B, 4] the keys asked
    repeats = sum(len(set(row)) < 4 for row in asked.tolist())
    assert 0.85 < repeats / 400 < 0.97  # 1 - 4!/4^4 = 0.906 of rows ask some pair twice
    assert mqar_accuracy(Eliminator(4), 48, 4, n_rows=400) < 0.45  # H_4 / 4 = 0.52 without replacement


def test_dense_rows_fill_every_slot_after_the_pairs_with_a_query():
    b = mqar_batch(3, 40, 4, torch.Generator().manual_seed(0), n_queries=16)
    assert b.answers.tolist() == [list(range(8, 40, 2))] * 3
    assert ((b.inputs[:, 8:] > 0).all()) and (b.targets != IGNORE).sum() == 48
    for bad in (0, 17, 4.0):
        with pytest.raises(ValueError, match="n_queries"):
            mqar_batch(1, 40, 4, n_queries=bad)


@pytest.mark.parametrize("seq_len, n_pairs, message", [(15, 4, "too short"), (64, 0, "n_pairs"),
                                                        (4096, 128, "n_pairs")])
def test_impossible_shapes_are_refused(seq_len, n_pairs, message):
    with pytest.raises(ValueError, match=message):
        mqar_batch(1, seq_len, n_pairs)


class Oracle(torch.nn.Module):
    """Recalls perfectly by looking back: at each key after the pairs, the value paired with it."""

    def __init__(self, n_pairs: int, right: bool = True) -> None:
        super().__init__()
        self.n, self.right = n_pairs, right
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(*x.shape, 256)
        for r, row in enumerate(x.tolist()):
            pairs = dict(zip(row[0 : 2 * self.n : 2], row[1 : 2 * self.n : 2], strict=True))
            for i, t in enumerate(row):
                if i >= 2 * self.n and t in pairs:
                    out[r, i, pairs[t] if self.right else 128] = 1.0
        return out


def test_accuracy_is_one_for_an_oracle_and_chance_for_a_constant_guess():
    assert mqar_accuracy(Oracle(5), 48, 5, n_rows=40) == 1.0
    assert mqar_accuracy(Oracle(5, right=False), 48, 5, n_rows=400) < 0.03  # value 128 is right 1/128 of the time
    b = mqar_batch(4, 48, 5)
    assert mqar_loss(Oracle(5)(b.inputs) * 50, b.targets) < 1e-6


class StepOracle(Oracle):
    """Recalls through ``step`` (what a cache policy decodes with) and guesses wrong through ``forward``."""

    def init_state(self, batch_size, cache=None, device=None):
        return cache

    def step(self, x, state):
        return Oracle.forward(self, x), state

    def forward(self, x):
        return Oracle(self.n, right=False)(x)


def test_a_cache_scores_through_step_and_a_full_cache_as_the_forward_does():
    assert mqar_accuracy(StepOracle(4), 48, 4, n_rows=32, cache=Full()) == 1.0  # the cache path is step's
    assert mqar_accuracy(StepOracle(4), 48, 4, n_rows=32) < 0.1  # no cache: the forward's
    # A real model: the full cache's decode predicts, at every recall, what the forward predicts.
    torch.manual_seed(0)
    model = build_model("transformer", "tiny").double().eval()
    b = mqar_batch(8, 48, 4, torch.Generator().manual_seed(1))
    rows = torch.arange(8)[:, None]
    with torch.no_grad():
        want = model(b.inputs)[rows, b.answers]
        got = model.step(b.inputs, model.init_state(8, cache=Full()))[0][rows, b.answers]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_training_on_the_task_learns_to_recall():
    """One pair per row: a tiny Transformer learns to copy the value after the key's second appearance,
    far below ln 128 (knowing only that a value comes next), and then recalls on fresh rows."""
    torch.manual_seed(0)
    model = build_model("transformer", "tiny")
    losses = train_mqar(model, 16, 1, 300, batch_size=32, lr=1e-2, warmup=20)
    assert len(losses) == 300 and losses[0] > 5.0  # ~ln 256 at initialisation
    assert sum(losses[-10:]) / 10 < 1.0
    assert mqar_accuracy(model, 16, 1, n_rows=128) > 0.9

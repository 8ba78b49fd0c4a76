"""``train --passkey-mix``: rows of a training batch turned into passkey examples made of their own corpus text.

Each mixed row is checked against the plain sampler's row (same seed) by taking the text apart: the instruction
first, one key sentence somewhere, then the question and the same key, in between exactly the window's first
ids, and after the example the window's text that follows them. Unmixed rows must be the plain rows, untouched."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from longseq.data import load_corpus
from longseq.data.errors import DataError
from longseq.data.sampler import WindowSampler
from longseq.tasks.passkey import INSTRUCTION, QUESTION
from longseq.tasks.passkey_mix import PasskeyMixSampler
from longseq.tokenizer import ByteTokenizer
from longseq.train import TrainConfig, train
from longseq.train.rundir import load_run_config

NEEDLE = re.compile(rb"\nThe pass key is (\d{5})\. Remember it\. (\d{5}) is the pass key\.\n")
WINDOW = 400


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    words = "the wind is cold and we walk on by the sea while seven lords argue".split()
    for i in range(3):
        (root / "docs").mkdir(exist_ok=True)
        text = " ".join(words[j] for j in rng.integers(0, len(words), 1500))
        (root / "docs" / f"doc{i}.txt").write_text(text + "\n")
    return root, load_corpus([root / "docs"], root / "cache")


def samplers(corpus, fraction: float, seed: int = 3) -> tuple[WindowSampler, PasskeyMixSampler]:
    plain = WindowSampler(corpus, [0, 1, 2], WINDOW, seed=seed)
    mixed = PasskeyMixSampler(WindowSampler(corpus, [0, 1, 2], WINDOW, seed=seed), ByteTokenizer(), fraction, seed)
    return plain, mixed


def take_apart(row: bytes) -> tuple[str, bytes, int, int]:
    """``(key, filler, cut, length)`` of the byte passkey example a row begins with, asserting its layout."""
    head, question = INSTRUCTION.encode(), QUESTION.encode()
    assert row.startswith(head)
    found = list(NEEDLE.finditer(row))
    assert len(found) == 1, row
    key = found[0].group(1).decode()
    assert found[0].group(2).decode() == key
    tail = question + f" {key}.".encode()
    start, stop = found[0].span()
    length = row.index(tail, stop) + len(tail)
    filler = row[len(head) : start] + row[stop : length - len(tail)]
    return key, filler, start - len(head), length


def test_every_row_becomes_an_example_of_its_own_text(corpus):
    _, data = corpus
    plain, mixed = samplers(data, 1.0)
    keys, cuts, lengths = set(), [], []
    for _ in range(4):
        want, got = plain.next_batch(8), mixed.next_batch(8)
        assert got.shape == want.shape == (8, WINDOW)
        for w, g in zip(want, got, strict=True):
            row, window = bytes(g.tolist()), bytes(w.tolist())
            key, filler, cut, length = take_apart(row)
            assert filler == window[: len(filler)]  # the window's own first bytes, in order
            assert row[length:] == window[len(filler) : len(filler) + WINDOW - length]  # then the text after them
            keys.add(key)
            cuts.append(cut / len(filler))
            lengths.append(length)
    assert len(keys) == 32  # a fresh key per row
    assert min(cuts) < 0.2 and max(cuts) > 0.8  # depths spread over the filler
    # Lengths spread from the shortest example (176 fixed bytes + 16 of filler) to the whole row.
    assert min(lengths) >= 192 and max(lengths) <= WINDOW
    assert min(lengths) < 192 + 0.2 * (WINDOW - 192) and max(lengths) > WINDOW - 0.2 * (WINDOW - 192)


def test_unmixed_rows_are_untouched_and_the_fraction_holds(corpus):
    _, data = corpus
    plain, mixed = samplers(data, 0.25)
    n_mixed = n_rows = 0
    for _ in range(40):
        want, got = plain.next_batch(16), mixed.next_batch(16)
        for w, g in zip(want, got, strict=True):
            n_rows += 1
            if bytes(g.tolist()).startswith(INSTRUCTION.encode()):
                n_mixed += 1
                take_apart(bytes(g.tolist()))
            else:
                assert bytes(g.tolist()) == bytes(w.tolist())
    # 640 rows at p = 0.25: mean 160, standard deviation 11; 5 sigma either side.
    assert 105 <= n_mixed <= 215, n_mixed


def test_ranks_split_one_global_batch_and_resume_continues_it(corpus):
    _, data = corpus
    _, whole = samplers(data, 0.5)
    _, rank0 = samplers(data, 0.5)
    _, rank1 = samplers(data, 0.5)
    for _ in range(3):
        full = whole.next_batch(8)
        assert (rank0.next_batch(8, 0, 2) == full[:4]).all()
        assert (rank1.next_batch(8, 1, 2) == full[4:]).all()
    state = whole.state_dict()
    expected = whole.next_batch(8)
    _, resumed = samplers(data, 0.5)
    resumed.load_state_dict(state)
    assert (resumed.next_batch(8) == expected).all()


def test_examples_in_a_tokenizers_ids(corpus, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from longseq.data import tokenize_corpus
    from longseq.sources import open_tokenizer
    from test_train_tokenizer import make_corpus, make_tokenizer

    docs = make_corpus(tmp_path / "docs")
    tok = open_tokenizer(make_tokenizer(tmp_path / "tok", docs))
    ids = tokenize_corpus(load_corpus([docs], tmp_path / "cache"), tok)
    mixed = PasskeyMixSampler(WindowSampler(ids, [0, 1, 2], 200, seed=0), tok, 1.0, answer_weight=5.0)
    bos = tok.encode("x")[0]
    batch, weights = mixed.next_weighted_batch(4)
    for row, w in zip(batch, weights, strict=True):
        assert row.shape == (200,) and int(row[0]) == bos
        key, _, _, _ = take_apart(tok.decode(row.tolist()))
        heavy = torch.nonzero(w != w.min()).flatten()  # the answer's targets: the tokenized " {key}."
        assert heavy.tolist() == list(range(int(heavy[0]), int(heavy[0]) + heavy.numel()))
        assert row[1:][heavy].tolist() == tok.encode(f" {key}.", special=False)
        assert tok.decode(row[: int(heavy[-1]) + 2].tolist()).endswith(f"{QUESTION} {key}.".encode())


def test_bad_mix_settings_are_refused(corpus):
    _, data = corpus
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="passkey-mix"):
            PasskeyMixSampler(WindowSampler(data, [0], WINDOW), ByteTokenizer(), bad)
    with pytest.raises(DataError, match="seq-len 149 is too short for passkey examples"):
        PasskeyMixSampler(WindowSampler(data, [0], 150), ByteTokenizer(), 0.5)
    # The room is the widest key's parts (176 bytes) plus one per digit of its three occurrences, plus 16.
    PasskeyMixSampler(WindowSampler(data, [0], 207), ByteTokenizer(), 0.5)
    with pytest.raises(DataError, match="leaving 15 of filler"):
        PasskeyMixSampler(WindowSampler(data, [0], 206), ByteTokenizer(), 0.5)
    for bad in (1.01, -1.0, float("nan")):
        with pytest.raises(ValueError, match="passkey-mix must be in"):
            TrainConfig(passkey_mix=bad)


def cfg_for(root: Path, name: str, **kw) -> TrainConfig:
    base = dict(out=str(root / name), model="transformer", preset="tiny", overrides={"n_layers": 1},
                data=[str(root / "docs")], val_docs=["doc2"], seq_len=WINDOW - 1, batch_size=4, steps=6, lr=3e-3,
                warmup=1, eval_every=3, eval_tokens=2048, log_every=1, keep=2, progress=False, device="cpu", seed=1,
                cache_dir=str(root / "cache"), passkey_mix=0.5)
    return TrainConfig(**{**base, **kw})


def test_training_with_the_mix_records_it_and_resumes_exactly(corpus):
    root, _ = corpus
    straight = train(cfg_for(root, "straight"))
    assert load_run_config(root / "straight")["train"]["passkey_mix"] == 0.5
    plain = train(cfg_for(root, "plain", passkey_mix=0.0))
    assert plain.losses[1] != straight.losses[1]  # the mix changed what the first step saw

    def interrupt(step: int, loss: float) -> None:
        if step == 3:
            signal.raise_signal(signal.SIGINT)

    cfg = cfg_for(root, "resumed")
    train(cfg, on_step=interrupt)
    second = train(cfg, resume=True)
    assert second.losses == {k: v for k, v in straight.losses.items() if k > 3}


def test_a_row_too_short_for_the_mix_fails_before_any_write(corpus):
    root, _ = corpus
    with pytest.raises(DataError, match="too short for passkey examples"):
        train(cfg_for(root, "short", seq_len=100))
    assert not (root / "short").exists()


def test_answer_weights_mark_each_answer_and_average_to_one(corpus):
    """Weights are ``W`` on exactly the answer's targets of example rows (decoded: `` 12345.``), equal elsewhere,
    and their mean over the global batch is 1 (so a weighted mean needs no other normalization); each rank's
    share is the slice of the whole batch's weights."""
    _, data = corpus
    W = 10.0
    mixed = PasskeyMixSampler(WindowSampler(data, [0, 1, 2], WINDOW, seed=3), ByteTokenizer(), 0.5, 3, answer_weight=W)
    shares = [PasskeyMixSampler(WindowSampler(data, [0, 1, 2], WINDOW, seed=3), ByteTokenizer(), 0.5, 3,
                                answer_weight=W) for _ in range(2)]
    for _ in range(3):
        batch, weights = mixed.next_weighted_batch(8)
        assert weights.shape == (8, WINDOW - 1) and weights.dtype == torch.float32
        assert weights.double().mean().item() == pytest.approx(1.0, rel=1e-6)
        base = weights.min()
        n_examples = 0
        for row, w in zip(batch, weights, strict=True):
            heavy = torch.nonzero(w != base).flatten()
            if heavy.numel() == 0:
                assert NEEDLE.search(bytes(row.tolist())) is None  # an unmixed row
                continue
            n_examples += 1
            key, _, _, length = take_apart(bytes(row.tolist()))
            assert heavy.tolist() == list(range(length - 1 - 7, length - 1))  # the example's last 7 targets
            assert bytes(row[1:][heavy].tolist()) == f" {key}.".encode()
            assert torch.allclose(w[heavy], base * W)
        # the mean is 1: base * (n_targets + (W - 1) * 7 * n_examples) = n_targets
        assert base.item() == pytest.approx(1 / (1 + (W - 1) * 7 * n_examples / (8 * (WINDOW - 1))), rel=1e-6)
        for rank, share in enumerate(shares):
            part, part_weights = share.next_weighted_batch(8, rank, 2)
            assert (part == batch[rank * 4 : (rank + 1) * 4]).all()
            assert torch.equal(part_weights, weights[rank * 4 : (rank + 1) * 4])


def test_answer_weight_is_checked_and_needs_the_mix(corpus):
    _, data = corpus
    for bad in (0.0, -2.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="passkey-answer-weight"):
            TrainConfig(passkey_mix=0.5, passkey_answer_weight=bad)
        with pytest.raises(ValueError, match="passkey-answer-weight"):
            PasskeyMixSampler(WindowSampler(data, [0], WINDOW), ByteTokenizer(), 0.5, answer_weight=bad)
    with pytest.raises(ValueError, match="--passkey-answer-weight 30.0 needs --passkey-mix"):
        TrainConfig(passkey_answer_weight=30.0)


def test_weighted_loss_is_one_weighted_mean_over_micro_batches(corpus):
    """With answer weights, step 1's loss (before any update) is the same in one batch or in one micro-batch per
    row (rows with and without an answer): each micro-batch's share is normalized by the whole batch's weight, not
    its own. Weight 1 is the plain loss exactly."""
    root, _ = corpus
    whole = train(cfg_for(root, "w-whole", passkey_answer_weight=30.0, steps=1, eval_every=0))
    halves = train(cfg_for(root, "w-halves", passkey_answer_weight=30.0, steps=1, eval_every=0, grad_accum=4))
    plain = train(cfg_for(root, "w-plain", steps=1, eval_every=0))
    unit = train(cfg_for(root, "w-unit", passkey_answer_weight=1.0, steps=1, eval_every=0))
    assert halves.losses[1] == pytest.approx(whole.losses[1], rel=1e-5)
    assert whole.losses[1] != pytest.approx(plain.losses[1], rel=1e-3)
    assert unit.losses[1] == plain.losses[1]
    assert load_run_config(root / "w-whole")["train"]["passkey_answer_weight"] == 30.0

"""``train --tokenizer``: the corpus tokenized once into a memory-mapped cache, windows of token ids, validation in
bits per UTF-8 byte, and checkpoints that carry the tokenizer. A tiny BPE trained offline on the test corpus:
nothing is downloaded."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from longseq.cli import main  # noqa: E402
from longseq.data import DataError, load_corpus, tokenize_corpus  # noqa: E402
from longseq.data.sampler import WindowSampler  # noqa: E402
from longseq.data.tokens import token_dtype  # noqa: E402
from longseq.generate import generate  # noqa: E402
from longseq.sources import open_model, open_tokenizer  # noqa: E402
from longseq.tokenizer import HFTokenizer  # noqa: E402
from longseq.train import CheckpointError, TrainConfig, train  # noqa: E402
from longseq.train.checkpoint import list_checkpoints, load_model, verify_checkpoint  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards hex bold jumping zebras".split()


def make_corpus(root: Path, n_docs: int = 4, n_words: int = 900) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (root / f"doc{i}.txt").write_text(" ".join(WORDS[j] for j in rng.integers(0, len(WORDS), n_words)) + " é\n")
    return root


def make_tokenizer(folder: Path, corpus: Path) -> Path:
    """A byte-level BPE with a BOS, trained on the corpus (merges make tokens of several bytes), saved as an
    HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p.read_text() for p in sorted(corpus.iterdir())], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>").save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = make_corpus(root / "corpus")
    return root, corpus, make_tokenizer(root / "tokenizer", corpus)


def cfg_for(root: Path, corpus: Path, tokenizer: Path | None, name: str, **kw) -> TrainConfig:
    base = dict(out=str(root / name), model="transformer", preset="tiny", overrides={"n_layers": 1},
                data=[str(corpus)], val_docs=["doc3"], tokenizer=None if tokenizer is None else str(tokenizer),
                seq_len=32, batch_size=4, steps=6, lr=3e-3, warmup=1, eval_every=3, eval_tokens=0, log_every=1,
                keep=2, progress=False, device="cpu", seed=1, cache_dir=str(root / "cache"))
    return TrainConfig(**{**base, **kw})


def test_token_corpus_holds_each_documents_ids_and_is_built_once(setup, tmp_path):
    root, corpus_dir, tok_dir = setup
    tokenizer = open_tokenizer(tok_dir)
    corpus = load_corpus([corpus_dir], tmp_path)
    tokens = tokenize_corpus(corpus, tokenizer)
    assert tokens.data.dtype == np.uint16 and tokens.names == corpus.names
    for i in range(corpus.num_docs):
        expected = tokenizer.encode(bytes(corpus.doc(i)))
        assert tokens.doc(i).tolist() == expected  # independent: the tokenizer on the document's text
        assert expected[0] == 0 and len(expected) < corpus.doc_len(i) / 2  # a BOS, and real merges
    stamp = (tokens.path / "tokens.bin").stat().st_mtime_ns
    again = tokenize_corpus(corpus, tokenizer)
    assert again.path == tokens.path and (again.path / "tokens.bin").stat().st_mtime_ns == stamp
    # A cache of another format under this name is refused, naming it, rather than read as this one.
    index = json.loads((tokens.path / "index.json").read_text())
    (tokens.path / "index.json").write_text(json.dumps({**index, "format": index["format"] + 1}))
    with pytest.raises(DataError, match=str(tokens.path)):
        tokenize_corpus(corpus, tokenizer)
    (tokens.path / "index.json").write_text(json.dumps(index))
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    # The sampler draws windows of ids from it: every window is a slice of the concatenated documents.
    sampler = WindowSampler(tokens, [0, 1, 2], 33, seed=0)
    flat = np.concatenate([tokens.doc(i) for i in range(3)]).tolist()
    for row in sampler.next_batch(8).tolist():
        assert any(flat[s : s + 33] == row for s in range(len(flat) - 32))


def test_training_on_tokens_learns_and_checkpoints_carry_the_tokenizer(setup):
    root, corpus_dir, tok_dir = setup
    tokenizer = open_tokenizer(tok_dir)
    result = train(cfg_for(root, corpus_dir, tok_dir, "run", steps=30, lr=1e-2, eval_every=0))
    # At initialisation the model predicts ~uniformly over the tokenizer's vocabulary.
    assert result.losses[1] == pytest.approx(math.log(tokenizer.vocab_size), abs=0.1)
    assert result.losses[30] < result.losses[1] - 1.0
    bpb = result.evals[30]["val_bpb"]
    assert 0 < bpb < 8 and math.isfinite(bpb)
    ckpt = list_checkpoints(result.run_dir)[-1]
    config = verify_checkpoint(ckpt)  # the tokenizer files are in the manifest, checksums included
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert any(name.startswith("tokenizer/") for name in manifest["files"])
    assert config["model"]["tokenizer"] == {"kind": "hf", "fingerprint": tokenizer.fingerprint()}
    assert config["model"]["config"]["vocab_size"] == tokenizer.vocab_size
    model = load_model(result.run_dir)
    assert isinstance(model.tokenizer, HFTokenizer) and model.tokenizer.fingerprint() == tokenizer.fingerprint()
    text = "the lazy wizards jump"
    assert model.tokenizer.encode(text) == tokenizer.encode(text)
    assert open_tokenizer(result.run_dir).fingerprint() == tokenizer.fingerprint()
    # A damaged tokenizer file is caught like a damaged weight file.
    tok_file = ckpt / "tokenizer" / "tokenizer.json"
    tok_file.write_text(tok_file.read_text().replace("wizards", "wizardz"))
    with pytest.raises(CheckpointError, match="tokenizer/tokenizer.json"):
        verify_checkpoint(ckpt)
    # ... and opening the run's tokenizer says which file is damaged, not that the run has no tokenizer.
    tok_file.write_text(tok_file.read_text()[:100])
    for path in (result.run_dir, ckpt):
        with pytest.raises(CheckpointError, match="tokenizer/tokenizer.json"):
            open_tokenizer(path)


def test_cli_trains_on_tokens_and_generates_text(setup, capsys):
    root, corpus_dir, tok_dir = setup
    out = root / "cli-run"
    assert main(["train", "--out", str(out), "--model", "gla", "--preset", "tiny", "--set", "n_layers=1",
                 "--data", str(corpus_dir), "--val-docs", "doc3", "--tokenizer", str(tok_dir), "--seq-len", "16",
                 "--batch-size", "2", "--steps", "2", "--eval-every", "0", "--device", "cpu", "--no-progress",
                 "--cache-dir", str(root / "cache")]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "the quick", "--max-new-tokens", "5", "--temperature", "0",
                 "--no-echo", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    # The continuation is the tokenizer's text of the model's greedy ids, computed here through the API.
    tok = open_tokenizer(tok_dir)
    model = open_model(out, "cpu")
    assert model.config.vocab_size == tok.vocab_size == 320
    prompt = torch.tensor([tok.encode("the quick")])
    ids = generate(model, prompt, 5, temperature=0)[0, prompt.shape[1]:].tolist()
    assert printed.rstrip("\n") == tok.decode(ids).decode("utf-8", "replace").rstrip("\n")


def test_resume_continues_on_tokens_exactly(setup):
    root, corpus_dir, tok_dir = setup
    straight = train(cfg_for(root, corpus_dir, tok_dir, "straight"))

    def interrupt(step: int, loss: float) -> None:
        if step == 3:
            signal.raise_signal(signal.SIGINT)

    cfg = cfg_for(root, corpus_dir, tok_dir, "resumed")
    train(cfg, on_step=interrupt)
    # The tokenizer's folder moved since: the resume takes the copy the checkpoint carries.
    moved = tok_dir.with_name("moved-tokenizer")
    tok_dir.rename(moved)
    try:
        with pytest.warns(UserWarning, match="resuming with the copy saved in"):
            second = train(cfg, resume=True)
    finally:
        moved.rename(tok_dir)
    assert second.losses == {k: v for k, v in straight.losses.items() if k > 3}
    # The same run on bytes, or with another tokenizer, cannot resume it.
    with pytest.raises(CheckpointError, match="with another tokenizer, not bytes"):
        train(cfg_for(root, corpus_dir, None, "resumed", overrides={"n_layers": 1, "vocab_size": 320}), resume=True)


def test_bad_tokenizer_settings_fail_before_any_write(setup):
    root, corpus_dir, tok_dir = setup
    with pytest.raises(ValueError, match="byte-level by design"):
        train(cfg_for(root, corpus_dir, tok_dir, "mb", model="megabyte", overrides={}))
    with pytest.raises(ValueError, match=r"vocab_size=256 is too small for the tokenizer .* 320 ids"):
        train(cfg_for(root, corpus_dir, tok_dir, "small", overrides={"n_layers": 1, "vocab_size": 256}))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(cfg_for(root, corpus_dir, root / "nowhere", "missing"))
    with pytest.raises(ValueError, match="holds no tokenizer"):
        train(cfg_for(root, corpus_dir, corpus_dir, "not-a-tokenizer"))
    assert not any((root / name).exists() for name in ("mb", "small", "missing", "not-a-tokenizer"))

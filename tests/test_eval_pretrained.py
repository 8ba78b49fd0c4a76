"""Evaluation and the policy sweep on tokenized (converted pretrained) models (issue 22, part 2): bits per
UTF-8 byte next to loss per token, checked against brute force on the original HF model; ``longseq eval`` on
an HF folder. Tiny random models and an offline byte-level BPE tokenizer: nothing is downloaded."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from longseq import load_pretrained  # noqa: E402
from longseq.cli import main  # noqa: E402
from longseq.evaluate import evaluate_bpb, scored_bytes  # noqa: E402
from longseq.models import build_model  # noqa: E402
from longseq.sweep import run_sweep  # noqa: E402
from longseq.tokenizer import HFTokenizer  # noqa: E402

TEXT = ("The theory of the thing: they gathered there, then the other three went home. Één café, "
        "naïve façade -- über straße. " * 3)
MERGES = [("T", "h"), ("t", "h"), ("th", "e"), ("Ġ", "th"), ("Ġth", "e"), ("e", "r"), ("Ġ", "t")]


def tiny_llama():
    config = AutoConfig.for_model("llama", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def bpe_tokenizer(bos: bool):
    """Byte-level BPE with a few merges (so tokens span several bytes) and, optionally, a BOS (id 299)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if not bos:
        return PreTrainedTokenizerFast(tokenizer_object=tok)
    tok.add_special_tokens(["<s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256 + len(MERGES))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


def reference(hf, ids: list[int], seq_len: int, stride: int) -> float:
    """Summed NLL (nats) of targets 1.. of ``ids``, target j seen from the window a stride-S evaluation gives
    it: one full forward per window start, log-softmax, gather."""
    x = torch.tensor(ids)
    nats, logp = 0.0, {}
    for j in range(1, len(ids)):
        start = 0 if j <= seq_len else math.ceil((j - seq_len) / stride) * stride
        if start not in logp:
            with torch.no_grad():
                logp[start] = F.log_softmax(hf(x[None, start : start + seq_len]).logits[0].double(), -1)
        nats -= float(logp[start][j - 1 - start, x[j]])
    return nats


def first_token_bytes(tok, ids: list[int]) -> int:
    """Bytes of the first token's text, read off its byte-level symbol (ASCII letters here) or 0 for BOS."""
    if ids[0] in tok.all_special_ids:
        return 0
    symbol = tok.convert_ids_to_tokens(ids[0])
    assert symbol.isascii() and symbol.isalpha()  # the text starts with a plain word
    return len(symbol)


@pytest.mark.parametrize("bos", [True, False])
def test_bits_per_byte_of_a_tokenized_model_equal_brute_force(bos):
    hf, tok = tiny_llama(), bpe_tokenizer(bos)
    model = load_pretrained(hf)
    model.tokenizer = HFTokenizer(tok)
    ids = tok(TEXT)["input_ids"]
    assert len(ids) < len(TEXT.encode()) - 20  # merges: a token is often several bytes
    expect_bytes = len(TEXT.encode()) - first_token_bytes(tok, ids)
    for seq_len, stride in [(32, 32), (32, 7), (400, 400)]:
        result = evaluate_bpb(model, [("doc", TEXT)], seq_len, stride, batch_size=3)
        nats = reference(hf, ids, seq_len, stride)
        assert result.tokens == len(ids) - 1 and result.bytes == expect_bytes
        assert result.loss == pytest.approx(nats / (len(ids) - 1), rel=1e-5)
        assert result.bpb == pytest.approx(nats / math.log(2) / expect_bytes, rel=1e-5)
        assert result.docs[0].ppl == pytest.approx(math.exp(nats / (len(ids) - 1)), rel=1e-5)
        fields = result.to_dict()
        assert {k: fields[k] for k in ("tokens", "bytes")} == {"tokens": len(ids) - 1, "bytes": expect_bytes}
        assert fields["documents"][0]["bpb"] == pytest.approx(result.bpb, rel=1e-12)


def test_scored_bytes_of_a_first_token_splitting_a_character():
    # Without merges for "É" (2 bytes), the first token is its lead byte, which decodes alone to U+FFFD: no
    # prefix of the text, so (as documented) every byte of the text is counted.
    tok = HFTokenizer(bpe_tokenizer(bos=False))
    ids = tok.encode("Été")
    assert tok.decode(ids[:1]) == "\ufffd".encode() and scored_bytes(tok, ids) == len("Été".encode())
    ids = tok.encode("the été")
    assert scored_bytes(tok, ids) == len(" été".encode())  # first token "the": exact


def test_byte_models_report_bits_per_byte_as_loss_over_ln2():
    torch.manual_seed(0)
    model = build_model("transformer", "tiny", n_layers=1).eval()
    docs = [("a", np.frombuffer(TEXT.encode(), dtype=np.uint8)), ("b", TEXT[:40]), ("c", b"xyz")]
    result = evaluate_bpb(model, docs, 16, 5)
    assert result.bpb == result.loss / math.log(2) and result.tokens == result.bytes == len(TEXT.encode()) - 1 + 39 + 2
    for score in result.docs:
        assert score.bpb == score.loss / math.log(2) and score.bytes == score.tokens


@pytest.fixture()
def folder(tmp_path):
    hf, tok = tiny_llama(), bpe_tokenizer(bos=True)
    hf.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "doc.txt").write_text(TEXT, encoding="utf-8")
    return tmp_path / "m"


def test_cli_evaluates_an_hf_folder_on_data(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    doc = tmp_path / "doc.txt"
    assert main(["eval", str(folder), "--data", str(doc), "--seq-len", "32", "--stride", "8", "--no-progress"]) == 0
    [out] = list((tmp_path / "eval").iterdir())
    assert out.name.startswith("m-all-T32-S8-D") and out.suffix == ".json"
    result = json.loads(out.read_text())
    ids = bpe_tokenizer(bos=True)(TEXT)["input_ids"]
    nats = reference(AutoModelForCausalLM.from_pretrained(str(folder)).eval(), ids, 32, 8)
    assert result["tokens"] == len(ids) - 1 and result["bytes"] == len(TEXT.encode())
    assert result["loss"] == pytest.approx(nats / (len(ids) - 1), rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    assert result["bpb"] == pytest.approx(nats / math.log(2) / len(TEXT.encode()), rel=1e-5)
    assert result["tokenizer"] == "hf" and [d["name"] for d in result["documents"]] == ["doc.txt"]
    assert "doc.txt" in capsys.readouterr().out


def test_cli_refuses_a_pretrained_model_without_data(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", str(folder), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("longseq: error: ") and "--data" in err[0]
    assert not (tmp_path / "eval").exists()


def test_sweep_on_a_converted_model_matches_plain_evaluation(folder, tmp_path):
    pytest.importorskip("matplotlib")
    model = load_pretrained(folder)
    plain = evaluate_bpb(model, [("doc.txt", TEXT)], 1024)
    res = run_sweep(model, [("doc.txt", TEXT)], ["tova"], [8, 1024], chunk_size=19)
    assert res.full is not None and (res.full.tokens, res.full.bytes) == (plain.tokens, plain.bytes)
    assert res.full.loss == pytest.approx(plain.loss, rel=1e-6) and res.full.bpb == pytest.approx(plain.bpb, rel=1e-6)
    assert res.value("tova", 1024, "loss") == pytest.approx(plain.loss, rel=1e-6)  # never evicts
    assert not math.isclose(res.value("tova", 8, "loss"), plain.loss, rel_tol=1e-4)

    out = tmp_path / "sweep"
    assert main(["eval", str(folder), "--data", str(tmp_path / "doc.txt"), "--policies", "tova",
                 "--budgets", "8", "--out-dir", str(out), "--no-progress"]) == 0
    written = json.loads((out / "sweep.json").read_text())
    assert written["full"]["loss"] == pytest.approx(plain.loss, rel=1e-6)
    assert written["full"]["bytes"] == plain.bytes and written["full"]["tokens"] == plain.tokens
    assert written["scores"]["tova"]["8"]["loss"] == pytest.approx(res.value("tova", 8, "loss"), rel=1e-6)

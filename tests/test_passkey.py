"""Passkey retrieval (issue 22): prompts of exactly L of the model's tokens with the key at the requested
depth, deterministic per seed; exact-match scoring; ``longseq eval MODEL --task passkey`` end to end."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from longseq import build_model
from longseq.cli import main
from longseq.tasks import extract_key, make_prompts, parse_budget, resolve_budget, run_passkey, score_answer
from longseq.tasks import passkey as passkey_module
from longseq.tasks.passkey import named_filler
from longseq.tokenizer import BYTES, HFTokenizer
from longseq.train import TrainConfig, train
from test_train import make_corpus  # tests/ is on sys.path

DEPTHS = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9]
FILLER = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds "
          "that lour'd upon our house in the deep bosom of the ocean buried. Act 3, scene 2: 1600 lines.\n") * 6


def subword_tokenizer() -> HFTokenizer:
    """A byte-level BPE with merges (so tokens span several bytes) and a BOS, trained offline on FILLER."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([FILLER, "The pass key is 12345. What is the pass key?"], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>"))


def tokenizers():
    pytest.importorskip("transformers")
    return [BYTES, subword_tokenizer()]


@pytest.mark.parametrize("which", [0, 1], ids=["bytes", "subword"])
@pytest.mark.parametrize("length", [300, 1000])
def test_prompt_is_length_tokens_with_the_key_at_its_depth(which, length):
    tok = (BYTES, None)[which] or tokenizers()[1]
    prompts = make_prompts(tok, length, DEPTHS, trial=0, seed=3, filler=None if which == 0 else FILLER)
    if which == 1:
        assert len(tok.encode(FILLER, special=False)) < 0.6 * len(FILLER.encode())  # really subwords
    bos = tok.encode("", special=True)
    checked = set()
    for p in prompts:
        assert len(p.ids) == length and list(p.ids[: len(bos)]) == bos
        key_sentence = tok.decode(p.ids[p.key_start : p.key_end]).decode()
        assert f"The pass key is {p.key}." in key_sentence
        # The key sentence starts at token depth * length, unless that is inside the instruction or the question.
        earliest = len(bos) + len(tok.encode(passkey_module.INSTRUCTION, special=False))
        latest = length - (p.key_end - p.key_start) - len(tok.encode(passkey_module.QUESTION, special=False))
        target = p.depth * length
        assert p.key_start == min(max(round(target), earliest), latest)
        if earliest <= target <= latest:
            assert abs(p.key_start - target) <= 0.5
            checked.add(p.depth)
        text = tok.decode(p.ids).decode()
        assert text.endswith("What is the pass key? The pass key is") and text.count(p.key) == 2
        assert not any(c.isdigit() for c in text.replace(p.key, ""))  # the key is the only number
    assert len({p.key for p in prompts}) == 1  # one key per trial, at every depth
    assert checked >= {0.3, 0.5}  # the middle depths are not clamped


def test_prompts_are_deterministic_and_trials_draw_new_keys_and_filler():
    first = [make_prompts(BYTES, 400, [0.5], trial=t, seed=7)[0] for t in range(8)]
    again = [make_prompts(BYTES, 400, [0.5], trial=t, seed=7)[0] for t in range(8)]
    assert first == again
    assert len({p.key for p in first}) == 8 and len({p.ids[100:140] for p in first}) == 8
    assert all(len(p.key) == 5 and p.key[0] != "0" for p in first)
    other_seed = [make_prompts(BYTES, 400, [0.5], trial=t, seed=8)[0] for t in range(8)]
    assert [p.key for p in other_seed] != [p.key for p in first]


def test_a_short_user_filler_wraps_and_too_short_prompts_are_refused():
    p = make_prompts(BYTES, 2000, [0.5], filler="tiny text 42. ")[0]
    assert len(p.ids) == 2000 and bytes(p.ids).count(b"tiny text . ") > 100
    with pytest.raises(ValueError, match="no room for filler"):
        make_prompts(BYTES, 100, [0.5])
    with pytest.raises(ValueError, match="depth"):
        make_prompts(BYTES, 400, [1.5])
    with pytest.raises(ValueError, match="filler text is empty"):
        make_prompts(BYTES, 400, [0.5], filler="123 456")


def test_scoring_is_exact_match_of_the_first_five_digit_number():
    assert score_answer(" 48213. Remember", "48213") == 1.0
    assert score_answer(b" 48213", "48213") == 1.0
    assert score_answer(" 482130", "48213") == 0.0  # a longer number is not the key
    assert score_answer(" 11111 or 48213", "48213") == 0.0  # only the first 5-digit number counts
    assert score_answer(" the key", "48213") == 0.0
    assert extract_key("1 22 333 4444 55555 x") == "55555"


def test_budgets_fixed_or_a_fraction_of_the_context():
    assert parse_budget("128") == 128 and parse_budget(" CTX/8 ") == "ctx/8"
    assert resolve_budget("ctx/8", 2048) == 256 and resolve_budget(64, 2048) == 64 and resolve_budget("ctx/8", 4) == 1
    for bad in ("0", "ctx/0", "ctx8", "1.5", "-3"):
        with pytest.raises(ValueError):
            parse_budget(bad)


def scripted_generate(knows: bool):
    """A ``generate`` for a model that reads back the key of each prompt (or answers a wrong number)."""

    def fake(model, ids, max_new_tokens, temperature, cache):
        assert temperature == 0 and max_new_tokens == 10
        rows = []
        for row in ids.tolist():
            key = extract_key(BYTES.decode(row))
            answer = f" {key if knows else '99999'}. Remember it."
            rows.append(row + list(answer.encode())[:max_new_tokens])
        return torch.tensor(rows)

    return fake


@pytest.mark.parametrize("knows", [True, False])
def test_run_passkey_scores_a_model_that_knows_the_key(monkeypatch, knows):
    model = build_model("transformer", "tiny")
    monkeypatch.setattr(passkey_module, "generate", scripted_generate(knows))
    lines = []
    result = run_passkey(model, [300, 400], [0.2, 0.8], ["full", "tova", "window"], [16, "ctx/4"], n_trials=3,
                         batch_size=4, progress=lines.append)
    expected = 1.0 if knows else 0.0
    rows = [r.label() for r in result.rows]
    assert rows == ["full", "tova@16", "tova@ctx/4", "window@16", "window@ctx/4"] and len(lines) == 10
    for row in result.rows:
        for length in (300, 400):
            assert all(result.accuracy(row, length, d) == expected for d in (0.2, 0.8))
    assert len(result.trials) == 5 * 2 * 2 * 3
    table = result.to_markdown()
    assert "| tova | ctx/4 = 100 |" in table and f"| full | - | {expected:.2f} | {expected:.2f} |" in table


def test_run_passkey_refuses_bounded_policies_on_a_model_without_kv_caches():
    with pytest.raises(ValueError, match="no softmax-attention KV cache"):
        run_passkey(build_model("gla", "tiny"), [300], [0.5], ["tova"], [16])
    with pytest.raises(ValueError, match="needs budgets"):
        run_passkey(build_model("transformer", "tiny"), [300], [0.5], ["tova"], [])


@pytest.fixture(scope="module")
def native_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("passkey")
    out = root / "run"
    train(TrainConfig(out=str(out), model="transformer", data=[str(make_corpus(root / "corpus"))], val_docs=["doc3"],
                      overrides={"n_layers": 1}, seq_len=32, batch_size=2, steps=1, eval_every=0, eval_tokens=64,
                      progress=False, device="cpu"))
    return out


def test_cli_passkey_writes_table_json_and_plot(native_run, tmp_path, capsys):
    out = tmp_path / "pk"
    assert main(["eval", str(native_run), "--task", "passkey", "--lengths", "256,384", "--depths", "0.1,0.5,0.9",
                 "--policies", "full,window,sink,h2o,tova", "--budgets", "32,ctx/4", "--trials", "2",
                 "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "### 256 tokens" in captured.out and "| h2o | ctx/4 = 96 |" in captured.out
    assert (out / "passkey.md").read_text() == captured.out
    assert (out / "passkey.png").stat().st_size > 0
    result = json.loads((out / "passkey.json").read_text())
    assert result["lengths"] == [256, 384] and result["depths"] == [0.1, 0.5, 0.9] and result["n_trials"] == 2
    assert len(result["results"]) == 2 * (1 + 4 * 2) and len(result["trials"]) == 2 * 9 * 3 * 2
    for cell in result["results"]:
        assert set(cell["accuracy"]) == {"0.1", "0.5", "0.9"}
        assert all(0.0 <= v <= 1.0 for v in cell["accuracy"].values()) and 0.0 <= cell["mean"] <= 1.0
    assert {(c["policy"], c["budget_tokens"]) for c in result["results"] if c["length"] == 384} >= {
        ("full", None), ("tova", 32), ("tova", 96)}
    assert all(len(t["key"]) == 5 and isinstance(t["answer"], str) for t in result["trials"])


def test_cli_passkey_without_matplotlib_skips_the_plot(native_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "pk"
    assert main(["eval", str(native_run), "--task", "passkey", "--lengths", "256", "--depths", "0.5", "--trials", "1",
                 "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert "no plot: matplotlib is not installed" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["passkey.json", "passkey.md"]


def test_cli_passkey_takes_a_builtin_filler_by_name(native_run, tmp_path, monkeypatch):
    """``--filler repeat``: the prompts the CLI asks with are those of the repeated sentences, nothing of the
    corpus around the key."""
    import longseq.tasks.passkey as passkey_module

    asked = []

    def recording(*args, **kwargs):
        prompts = make_prompts(*args, **kwargs)
        asked.extend(prompts)
        return prompts

    monkeypatch.setattr(passkey_module, "make_prompts", recording)
    out = tmp_path / "pk"
    assert main(["eval", str(native_run), "--task", "passkey", "--lengths", "300", "--depths", "0.5", "--trials", "1",
                 "--filler", "repeat", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    want = make_prompts(BYTES, 300, [0.5], filler=named_filler("repeat"))[0]
    assert [p.ids for p in asked] == [want.ids]
    text = bytes(asked[0].ids).decode()
    assert "The river runs to the sea." in text and "Hamlet" not in text and text.count(want.key) == 2
    assert json.loads((out / "passkey.json").read_text())["trials"][0]["key"] == want.key


@pytest.mark.parametrize("flags, message", [
    (["--task", "needle"], "unknown task 'needle'"),
    (["--task", "passkey"], "needs --lengths"),
    (["--task", "passkey", "--lengths", "2k"], "--lengths: expected a comma-separated list of int"),
    (["--task", "passkey", "--lengths", "0"], "--lengths must be >= 1"),
    (["--task", "passkey", "--lengths", "512", "--depths", "0.5,1.2"], "--depths are fractions"),
    (["--task", "passkey", "--lengths", "512", "--policies", "tova,lru", "--budgets", "8"], "unknown cache policy"),
    (["--task", "passkey", "--lengths", "512", "--policies", "tova"], "needs budgets"),
    (["--task", "passkey", "--lengths", "512", "--policies", "tova", "--budgets", "ctx/0"], "ctx/8"),
    (["--task", "passkey", "--lengths", "512", "--trials", "0"], "--trials must be >= 1"),
    (["--task", "passkey", "--lengths", "512", "--max-new-tokens", "3"], "--max-new-tokens must be >= 5"),
    (["--task", "passkey", "--lengths", "512", "--filler", "/nonexistent/f.txt"], "--filler: no such file"),
    (["--task", "passkey", "--lengths", "512", "--filler", "repeats"], "built-in fillers: corpus, repeat"),
    (["--task", "passkey", "--lengths", "512", "--stride", "4"], "--stride does not apply"),
    (["--task", "passkey", "--lengths", "512", "--device", "tpu9"], "--device"),
    (["--lengths", "512"], "--lengths applies to --task passkey only"),
    (["--policies", "tova", "--budgets", "ctx/8"], "ctx/K is for --task passkey"),
])
def test_cli_passkey_validates_every_flag_before_opening_the_model(tmp_path, capsys, flags, message):
    missing = tmp_path / "no-such-model"  # never opened: every check comes first
    assert main(["eval", str(missing), *flags, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longseq: error:") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_cli_passkey_names_a_missing_model(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing"), "--task", "passkey", "--lengths", "512"]) == 2
    assert "no such model" in capsys.readouterr().err


def test_cli_passkey_on_a_converted_hf_folder_counts_its_own_tokens(tmp_path, capsys):
    """An HF folder (tiny random Llama + a subword tokenizer with a BOS) opens through ``open_model``; its
    prompts are L of its tokens, many more bytes than L."""
    pytest.importorskip("transformers")
    from test_pretrained import hf_model

    folder = tmp_path / "hf"
    hf_model("llama").save_pretrained(folder)
    subword_tokenizer().hf.save_pretrained(folder)
    out = tmp_path / "pk"
    assert main(["eval", str(folder), "--task", "passkey", "--lengths", "200", "--depths", "0.5", "--trials", "2",
                 "--policies", "full,tova", "--budgets", "ctx/4", "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    assert "| tova | ctx/4 = 50 |" in capsys.readouterr().out
    result = json.loads((out / "passkey.json").read_text())
    assert [(c["policy"], c["budget_tokens"]) for c in result["results"]] == [("full", None), ("tova", 50)]
    assert all(0.0 <= c["mean"] <= 1.0 for c in result["results"]) and len(result["trials"]) == 4
    prompt = make_prompts(subword_tokenizer(), 200, [0.5], trial=0, seed=0)[0]
    assert len(subword_tokenizer().decode(prompt.ids)) > 210  # 200 subword tokens (one a BOS), more bytes


def test_without_task_eval_keeps_its_sweep_flags(tmp_path, capsys):
    """The hook leaves a sweep alone: ``--out`` is still its ``--out-dir``, integer budgets still go through."""
    missing = tmp_path / "missing"
    assert main(["eval", str(missing), "--policies", "tova", "--budgets", "8", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "applies to --task" not in err and "missing" in err
    assert main(["eval", str(missing), "--policies", "tova", "--budgets", "1.5"]) == 2
    assert "ctx/K is for --task passkey" in capsys.readouterr().err

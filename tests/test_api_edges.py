"""Bad arguments to the Python API get a clear error naming what was wrong (issue 18, item 9), and a
command-line prompt that is not valid UTF-8 is taken as the bytes it is."""

from __future__ import annotations

import pytest
import torch

import longseq
from longseq.cli import main
from test_cli import corpus, run  # noqa: F401  (fixtures: a tiny trained run)


@pytest.fixture(scope="module")
def model():
    return longseq.build_model("transformer", "tiny").eval()


@pytest.mark.parametrize("kind", ["transformer", "gla", "megabyte"])
def test_init_state_takes_integer_sizes_only(kind):
    m = longseq.build_model(kind, "tiny")
    with pytest.raises(TypeError, match="batch_size must be an int; got 1.5"):
        m.init_state(1.5)
    with pytest.raises(TypeError, match="max_len must be an int; got 8.0"):
        m.init_state(1, max_len=8.0)
    with pytest.raises(TypeError, match="batch_size must be an int; got True"):
        m.init_state(True)


@pytest.mark.parametrize("kind", ["transformer", "gla", "megabyte"])
def test_step_without_a_state_says_so(kind):
    m = longseq.build_model(kind, "tiny")
    with pytest.raises(TypeError, match="init_state"):
        m.step(torch.zeros(1, 2, dtype=torch.long), None)
    with pytest.raises(TypeError, match="input_ids must be a"):
        m.step([[1, 2]], m.init_state(1))


def test_parse_policy_of_a_non_string():
    with pytest.raises(TypeError, match="spec is a string"):
        longseq.parse_policy(None)
    with pytest.raises(TypeError, match="got int"):
        longseq.parse_policy(512)


def test_generate_argument_types(model):
    with pytest.raises(TypeError, match="max_new_tokens must be an int; got '5'"):
        longseq.generate(model, "ab", "5")
    with pytest.raises(TypeError, match=r"got int \(token ids go in a tensor"):
        longseq.generate(model, [1, 2, 3], 2)
    with pytest.raises(TypeError, match="integer token ids; got dtype torch.float32"):
        longseq.generate(model, torch.tensor([1.5, 2.0]), 2)
    assert longseq.generate(model, torch.tensor([1, 2]), 2, temperature=0).shape == (1, 4)  # ints still work


def test_invalid_utf8_prompt_is_taken_as_its_bytes(run, capsys):  # noqa: F811
    raw = b"ab\xff\xfe"
    arg = raw.decode("utf-8", "surrogateescape")  # how Python hands such an argv entry to the program
    argv = ["generate", str(run), "--max-new-tokens", "3", "--temperature", "0", "--no-echo"]
    assert main([*argv, "--prompt", arg]) == 0
    via_arg = capsys.readouterr().out
    (run.parent / "p.bin").write_bytes(raw)
    assert main([*argv, "--prompt-file", str(run.parent / "p.bin")]) == 0
    assert capsys.readouterr().out == via_arg  # the same bytes, the same greedy continuation

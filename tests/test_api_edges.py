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


@pytest.mark.parametrize("kind", ["transformer", "gla", "megabyte"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_narrow_integer_ids_are_refused_by_dtype(kind, dtype):
    """uint8 byte ids would wrap in the range check (256 is 0 there) and the embedding takes int64 or int32 only:
    the error names the dtype, in forward and in step, on dynamic and static states."""
    m = longseq.build_model(kind, "tiny")
    ids = torch.tensor([list(b"hello world!")], dtype=dtype)
    with pytest.raises(ValueError, match=f"integer tensor of int64 or int32; got dtype {dtype}"):
        m(ids)
    for state in (m.init_state(1), m.init_state(1, max_len=32)):
        with pytest.raises(ValueError, match=f"integer tensor of int64 or int32; got dtype {dtype}"):
            m.step(ids, state)
    assert torch.equal(m(ids.to(torch.int32)), m(ids.long()))


def test_step_refuses_a_state_of_another_model():
    """A state from another model is refused before any work, naming what differs: the layer count, a layer's kind
    (KV cache vs GLA matrix), its heads and head size (known once the cache holds tokens), or the model kind."""
    x = torch.randint(0, 256, (1, 5))
    two = longseq.build_model("transformer", "tiny", n_layers=2)
    with pytest.raises(ValueError, match="the state holds 4 layer states for 2 blocks"):
        two.step(x, longseq.build_model("transformer", "tiny", n_layers=4).init_state(1))
    with pytest.raises(ValueError, match="the state holds 1 layer states for 2 blocks"):
        two.step(x, longseq.build_model("transformer", "tiny", n_layers=1).init_state(1))
    gla = longseq.build_model("gla", "tiny", n_layers=2)
    with pytest.raises(ValueError, match="layer 0 is a Transformer block, which keeps a KVCache; the state holds a "
                                         "RecurrentState"):
        two.step(x, gla.init_state(1))
    with pytest.raises(ValueError, match="layer 0 is a GLA block, which keeps a RecurrentState; the state holds a "
                                         "KVCache"):
        gla.step(x, two.init_state(1))
    wide = longseq.build_model("transformer", "tiny", n_layers=2, n_heads=4)
    state = wide.init_state(1)
    wide.step(x, state)
    with pytest.raises(ValueError, match="layer 0: the KVCache holds 4 heads of size 16, this block 2 of size 32"):
        two.step(x, state)
    with pytest.raises(ValueError, match=r"layer 0: the RecurrentState is \[B, H, K, V\] = \[1, 4, 8, 16\], this "
                                         r"block keeps \[B, 2, 16, 32\]"):
        gla.step(x, longseq.build_model("gla", "tiny", n_layers=2, n_heads=4).init_state(1))
    megabyte = longseq.build_model("megabyte", "tiny")
    with pytest.raises(TypeError, match="state must come from TransformerLM.init_state; got MegabyteState"):
        two.step(x, megabyte.init_state(1))
    with pytest.raises(ValueError, match="the state holds 1 layer states for 2 blocks"):
        megabyte.step(x, longseq.build_model("megabyte", "tiny", n_global_layers=1).init_state(1))
    two.step(x, two.init_state(1))  # its own state still steps


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_evaluate_bpb_refuses_a_batch_size_below_one(model, batch_size):
    from longseq.evaluate import evaluate_bpb

    with pytest.raises(ValueError, match=f"batch_size must be an integer >= 1; got {batch_size!r}"):
        evaluate_bpb(model, [("doc", b"hello world, hello world")], seq_len=8, batch_size=batch_size)


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

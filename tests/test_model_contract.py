"""The contract every registered model kind keeps, run for each kind the registry lists -- including the
test-only ``toy-ema`` kind of ``toy_kind.py``, which shows that a new kind (one model file plus its registry
entry) is picked up by the state API, static decoding, training, evaluation and the CLI unchanged.

References are independent of the code under test: ``model(ids)`` (the full-sequence forward) for every
state path, in float64.
"""

from __future__ import annotations

import pytest
import torch

import toy_kind  # noqa: F401  (registers the test-only kind before the kinds are listed)
from longseq.cache import KVCache, LayerState, Window
from longseq.cli import main
from longseq.generate import generate, prefill_rows
from longseq.models import MODELS, build_model, capabilities
from longseq.testing import assert_close
from test_train import make_corpus

KINDS = sorted(MODELS)


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(kind, "tiny").double().eval()


def ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_the_registry_lists_the_shipped_kinds_and_the_toy():
    assert {"transformer", "gla", "megabyte", "toy-ema"} <= set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_step_in_any_split_reproduces_forward(kind):
    model = tiny(kind)
    x = ids(2, 37, seed=1)
    with torch.no_grad():
        ref = model(x)
        for cuts in ([*range(1, 37)], [5, 6, 20], [36]):
            state = model.init_state(2)
            bounds = [0, *cuts, 37]
            out = torch.cat([model.step(x[:, a:b], state)[0] for a, b in zip(bounds, bounds[1:], strict=False)], 1)
            assert state.position == 37
            assert_close(out, ref, rtol=1e-9, name=f"{kind} split {cuts[:4]}")


@pytest.mark.parametrize("kind", KINDS)
def test_static_state_of_ragged_prompts_reproduces_forward(kind):
    """Prompts of different lengths prefilled into the rows of one static state, then decoded together one
    token per row at their own positions: every row's logits equal the forward's."""
    model = tiny(kind)
    rows = [ids(1, n, seed=n) for n in (3, 9, 6)]
    new = ids(3, 7, seed=4)
    with torch.no_grad():
        state = model.init_state(3, max_len=24)
        first = prefill_rows(model, state, rows)
        steps = torch.cat([model.step(new[:, j : j + 1], state)[0] for j in range(new.shape[1])], 1)
        assert state.host_positions == [n + 7 for n in (3, 9, 6)]
        for i, r in enumerate(rows):
            full = model(torch.cat([r, new[i : i + 1]], 1))
            n = r.shape[1]
            assert_close(first[i], full[0, n - 1], rtol=1e-9, name=f"{kind} row {i} prefill")
            assert_close(steps[i], full[0, n:], rtol=1e-9, name=f"{kind} row {i} steps")


@pytest.mark.parametrize("kind", KINDS)
def test_layer_states_are_what_the_kind_declares(kind):
    model = tiny(kind)
    caps = capabilities(model)
    state = model.init_state(2)
    model.step(ids(2, 11, seed=5), state)
    kinds = set()
    for i, layer in enumerate(state.layers):
        assert isinstance(layer, LayerState)
        kinds.add("kv" if layer.keeps_tokens else "recurrent")
        if layer.keeps_tokens:
            assert state.kept_positions(i).shape[0] == 2
        else:
            with pytest.raises(TypeError, match=f"layer {i}"):
                state.kept_positions(i)
    assert kinds == set(caps.state_kinds)
    # Model extras (MEGABYTE's pending patch) may come on top of the layers' bytes.
    assert state.nbytes() >= sum(layer.nbytes() for layer in state.layers) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_cache_policies_apply_exactly_where_declared(kind):
    model = tiny(kind)
    if not capabilities(model).cache_policies or not any(
        layer.keeps_tokens for layer in model.init_state(1).persistent_layers
    ):
        with pytest.raises((ValueError, TypeError)):
            model.init_state(1, cache=Window(8))
        return
    sizes = []
    state = model.init_state(1, cache=Window(8))
    with torch.no_grad():
        for chunk in range(6):
            model.step(ids(1, 40, seed=chunk), state)
            sizes.append(state.nbytes())
    assert sizes[-1] == sizes[-2] == sizes[-3]  # bounded: it stops growing
    assert all(layer.bounded for layer in state.persistent_layers)
    for layer in state.persistent_layers:
        if isinstance(layer, KVCache):
            assert layer.kept_positions().shape[-1] <= 8


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_is_the_same_on_every_path(kind):
    model = build_model(kind, "tiny").eval()
    dynamic = generate(model, "To be", 9, temperature=0, static=False)
    static = generate(model, "To be", 9, temperature=0, static=True)
    assert torch.equal(dynamic, static)
    assert dynamic.shape == (1, 5 + 9)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_trains_evaluates_and_generates_from_the_cli(kind, tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus")
    seq = 8 * capabilities(build_model(kind, "tiny")).seq_multiple
    out = str(tmp_path / "run")
    common = ["--no-progress", "--device", "cpu"]
    assert main(["train", "--model", kind, "--preset", "tiny", "--out", out, "--data", str(corpus), "--steps", "2",
                 "--seq-len", str(seq), "--batch-size", "2", "--eval-tokens", "64", "--val-docs", "doc3",
                 *common]) == 0
    assert main(["eval", out, "--stride", str(seq // 2), "--no-progress"]) == 0
    assert "bpb" in capsys.readouterr().out
    assert main(["generate", out, "--prompt", "ab", "--max-new-tokens", "4", "--temperature", "0"]) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_rows_selected_and_joined_keep_the_state(kind):
    """select_rows / concat of every layer state: decoding on from rows taken apart and joined again gives the
    forward's logits (rows in the new order), in either state mode."""
    model = tiny(kind)
    x = ids(3, 20, seed=7)
    with torch.no_grad():
        ref = model(x)
        for static in (False, True):
            state = model.init_state(3, max_len=20) if static else model.init_state(3)
            model.step(x[:, :12], state)
            for i, layer in enumerate(state.layers):
                parts = [layer.select_rows([r]) for r in (2, 0, 1)]
                assert all(p.static == layer.static for p in parts)
                state.layers[i] = type(layer).concat(parts)
            if static:
                state.positions = state.positions[[2, 0, 1]]
                state.host_positions = [state.host_positions[r] for r in (2, 0, 1)]
            extra = getattr(state, "patch_ids", None)
            if extra is not None:  # MEGABYTE: the per-row pending patch and global slices move too
                state.patch_ids = state.patch_ids[[2, 0, 1]]
                state.local_from_global = state.local_from_global[[2, 0, 1]]
            out = model.step(x[[2, 0, 1], 12:], state)[0]
            assert_close(out, ref[[2, 0, 1], 12:], rtol=1e-9, name=f"{kind} static={static}")

"""The hybrid model kind: GLA blocks with softmax-attention blocks at chosen layers (issue 20). The model-level
contract (step == forward, static states, policies, generation, CLI) runs for it in test_model_contract.py;
these tests check what is particular to it."""

from __future__ import annotations

import pytest
import torch

from longseq import build_model
from longseq.cache import H2O, TOVA, KVCache, RecurrentState, Window
from longseq.hf import load_hf, save_hf
from longseq.models import HybridConfig, capabilities
from longseq.nn.blocks import GLABlock, TransformerBlock
from longseq.sweep import kept_position_stats
from longseq.testing import assert_close


def hybrid(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    # tiny has attn_every=2 (given here too, it would contradict an attn_layers override)
    return build_model("hybrid", "tiny", **{"n_layers": 4, "attn_kv_heads": 1, **overrides}).double()


def token_ids(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides, layers", [
    ({"attn_every": 2}, [1, 3]),
    ({"attn_every": 4}, [3]),
    ({"attn_every": 1}, [0, 1, 2, 3]),
    ({"attn_layers": "0, 2"}, [0, 2]),
    ({"attn_layers": "3", "attn_every": 0}, [3]),
])
def test_attention_layers_are_where_the_config_puts_them(overrides, layers):
    model = hybrid(**overrides)
    kinds = [type(b) for b in model.blocks]
    assert kinds == [TransformerBlock if i in layers else GLABlock for i in range(4)]
    assert model.config.attention_layers() == layers
    state = model.init_state(2, cache=TOVA(4))
    assert [type(s) for s in state.layers] == [KVCache if i in layers else RecurrentState for i in range(4)]
    assert capabilities(model).state_kinds == ({"kv"} if len(layers) == 4 else {"kv", "recurrent"})


@pytest.mark.parametrize("overrides, message", [
    ({"attn_every": 0}, "at least one attention layer"),
    ({"attn_every": 5}, "at least one attention layer"),
    ({"attn_layers": "1,4"}, r"attn_layers \[4\] are not layers of a 4-layer model"),
    ({"attn_layers": "one"}, "comma-separated layer indices"),
    ({"attn_every": -1}, "attn_every"),
    ({"attn_heads": 3}, r"attention layers \(attn_heads=3, attn_kv_heads=3\) are not valid: .*divisible"),
])
def test_bad_layouts_are_refused_with_the_field_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        HybridConfig.from_preset("tiny", **{"n_layers": 4, **overrides})


@pytest.mark.parametrize("policy", [TOVA(6), TOVA(6, per_head=True), H2O(6, recent=2), Window(6)], ids=str)
def test_policy_bounds_only_the_attention_layers_and_prefill_is_exact(policy):
    """A 40-token prompt in one call and in uneven chunks, against one token at a time (float64): same
    logits, same kept positions; the GLA states are the full-context matrices, the caches hold <= budget."""
    model = hybrid(attn_kv_heads=2)
    x = token_ids(2, 40, seed=3)
    with torch.no_grad():
        stepwise = model.init_state(2, cache=policy)
        ref = torch.cat([model.step(x[:, j : j + 1], stepwise)[0] for j in range(40)], dim=1)
        for cuts in ([], [7, 8, 25]):
            state = model.init_state(2, cache=policy)
            outs, start = [], 0
            for end in [*cuts, 40]:
                outs.append(model.step(x[:, start:end], state)[0])
                start = end
            assert_close(torch.cat(outs, 1), ref, rtol=1e-10, name=f"{policy} cuts={cuts}")
            for i in (1, 3):
                assert torch.equal(state.kept_positions(i), stepwise.kept_positions(i))
                assert state.kept_positions(i).shape[-1] == 6
            for i in (0, 2):  # GLA: the same matrix however the prompt was chunked
                assert_close(state.layers[i].matrix, stepwise.layers[i].matrix, rtol=1e-12, name=f"GLA layer {i}")
    # Evictions happened and changed the output: the bounded model is not the full one.
    assert (ref - model(x)).abs().max() > 1e-6


def test_whole_state_is_bounded_with_a_policy_and_grows_without():
    model = hybrid()
    sizes = {}
    for policy in (None, TOVA(8)):
        state = model.init_state(1, cache=policy)
        with torch.no_grad():
            for n in range(4):
                model.step(token_ids(1, 50, seed=n), state)
                sizes[(policy, n)] = state.nbytes()
    assert sizes[(None, 3)] > sizes[(None, 0)]  # the full caches grow
    assert sizes[(TOVA(8), 3)] == sizes[(TOVA(8), 1)] < sizes[(None, 3)]  # bounded


def test_kept_position_stats_cover_the_attention_layers_only():
    stats = kept_position_stats(hybrid(), bytes(range(97, 123)) * 4, TOVA(8), every=16)
    assert [s.layer for s in stats] == [1, 3]


def test_hf_folder_round_trip_keeps_the_layout_and_the_logits(tmp_path):
    model = hybrid(attn_layers="0,3", attn_every=0).float()
    save_hf(model, tmp_path / "hf")
    loaded = load_hf(tmp_path / "hf")
    assert loaded.config.attention_layers() == [0, 3]
    x = token_ids(1, 30, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

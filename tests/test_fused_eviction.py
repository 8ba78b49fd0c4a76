"""The fused eviction of a static bounded cache's decode step (``longseq.ops.decode_block.evict``, run here in
Triton's interpreter) against the PyTorch path it replaces: the op against its definition on random cache
states, and whole decode runs of tiny models -- the module path and the fused block path -- against the same
static state evicting through ``policy.select_victim``."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from longseq import build_model, parse_policy  # noqa: E402
from longseq.cache import static as static_mode  # noqa: E402
from longseq.nn import fused as fused_step  # noqa: E402
from longseq.ops import decode_block  # noqa: E402
from longseq.ops.decode_block import KEY_ACCUMULATED, KEY_ATTENTION, KEY_POSITION, evict_reference  # noqa: E402
from longseq.ops.decode_block import kernels as decode_kernels  # noqa: E402
from longseq.testing import triton_interpreter_problem  # noqa: E402

_problem = triton_interpreter_problem(decode_kernels.evict_kernel)
pytestmark = pytest.mark.skipif(_problem is not None, reason=str(_problem))
HAS_CUDA = torch.cuda.is_available()
# On a GPU machine the same tests run compiled on CUDA (and are marked gpu, so the GPU suite runs them).
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
on_device = pytest.mark.gpu if HAS_CUDA else (lambda test: test)


def random_cache(B, G, C, H, n_kept, seed, empty_first=False):
    """Slot positions of B rows x G groups, each holding ``n_kept`` distinct positions in random slots, then
    the new token ``pos`` written to its first empty slot; random attention rows and scores."""
    gen = torch.Generator().manual_seed(seed)
    slot_pos = torch.full((B, G, C), -1, dtype=torch.long)
    pos = torch.randint(n_kept + 5, 4 * C, (B,), generator=gen)
    for b in range(B):
        for g in range(G):
            kept = torch.randperm(int(pos[b]), generator=gen)[:n_kept]
            slots = torch.randperm(C, generator=gen)[:n_kept]
            slot_pos[b, g, slots] = kept
            first = int((slot_pos[b, g] < 0).nonzero()[0])
            slot_pos[b, g, first] = pos[b]
    weights = torch.softmax(torch.randn(B, H, C, generator=gen), -1) * (slot_pos.repeat_interleave(H // G, 1) >= 0)
    score = torch.rand(B, G, C, generator=gen)
    return tuple(x.contiguous().to(DEVICE) for x in (slot_pos, pos, weights, score))


@on_device
@pytest.mark.parametrize("key, sinks, recent", [(KEY_POSITION, 0, -1), (KEY_POSITION, 3, -1), (KEY_ATTENTION, 0, -1),
                                                (KEY_ACCUMULATED, 0, 4), (KEY_ACCUMULATED, 0, 0)])
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("as_logits", [False, True])
def test_evict_kernel_equals_its_definition(key, sinks, recent, G, as_logits):
    """``as_logits``: the kernel gets the attention rows as log2 logits and their log2-sum-exp (as the split-KV
    kernel leaves them) and normalises them itself; the definition gets ``exp2(logits - lse)``."""
    B, C, H = 3, 19, 4
    for seed, n_kept in ((0, C - 1), (1, C - 1), (2, 7)):  # full rows evict; a row with room does not
        slot_pos, pos, w, score = random_cache(B, G, C, H, n_kept, seed)
        lse = None
        if as_logits and key != KEY_POSITION:
            lse = torch.randn(B, H, generator=torch.Generator().manual_seed(seed)).to(DEVICE) * 4
            w, lse = torch.log2(w) + lse[..., None], lse  # empty slots: -inf
        mask = torch.tensor([True, False, True], device=DEVICE)
        want_sp, want_sc = slot_pos.clone(), score.clone()
        evict_reference(want_sp, pos, key, sinks, recent, w if lse is None else torch.exp2(w - lse[..., None]),
                        want_sc, mask)
        got_sp, got_sc = slot_pos.clone(), score.clone()
        decode_kernels.evict(got_sp, pos, key, sinks, recent, w, got_sc, mask, lse)
        assert torch.equal(got_sp, want_sp), (seed, got_sp - want_sp)
        torch.testing.assert_close(got_sc, want_sc, rtol=1e-6, atol=1e-7)
        evicted = (slot_pos >= 0) & (got_sp < 0)
        assert int(evicted.sum()) == (B * G if n_kept == C - 1 else 0)


@on_device
@pytest.mark.parametrize("key, recent", [(KEY_POSITION, -1), (KEY_ACCUMULATED, 0)])
def test_evict_kernel_on_odd_states_equals_its_definition(key, recent):
    """States no healthy decode reaches, where only the definition says what happens: duplicate positions
    (only the first slot of the oldest goes), a full group with no candidate (positions after ``pos``: slot 0
    goes, as ``argmin`` of nothing gives), and a masked row whose position is already kept (its kept token's
    score is not the one restarted)."""
    slot_pos = torch.tensor([[[3, 3, 4, 5, 6]], [[9, 8, 7, 12, 11]], [[0, 1, 2, 3, -1]]], device=DEVICE)
    pos = torch.tensor([6, 6, 3], device=DEVICE)
    mask = torch.tensor([True, True, False], device=DEVICE)
    w = torch.full((3, 2, 5), 0.2, device=DEVICE)
    score = torch.arange(15.0, device=DEVICE).view(3, 1, 5)
    want_sp, want_sc = slot_pos.clone(), score.clone()
    evict_reference(want_sp, pos, key, 0, recent, w, want_sc, mask)
    got_sp, got_sc = slot_pos.clone(), score.clone()
    decode_kernels.evict(got_sp, pos, key, 0, recent, w, got_sc, mask)
    assert torch.equal(got_sp, want_sp), (got_sp, want_sp)
    torch.testing.assert_close(got_sc, want_sc)
    assert int((got_sp[0] < 0).sum()) == 1 and int((got_sp[1] < 0).sum()) == 1
    if key == KEY_ACCUMULATED:
        assert float(got_sc[2, 0, 3]) == 13.0  # the kept position 3 of the masked row keeps its score


@on_device
def test_masked_row_writes_into_an_empty_slot_even_when_its_position_is_kept():
    """``rope_write(first_empty=True)``: a row outside the mask whose position is already in the cache writes
    (invisibly) into its first empty slot, never over the kept token."""
    B, H, Hkv, D, S = 2, 2, 1, 8, 5
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, (H + 2 * Hkv) * D, generator=gen).to(DEVICE)
    k, v = (torch.randn(B, Hkv, S, D, generator=gen).to(DEVICE) for _ in range(2))
    slot_pos = torch.tensor([[[0, 1, 2, -1, -1]], [[0, 1, 2, -1, -1]]], device=DEVICE)
    pos, mask = torch.tensor([3, 2], device=DEVICE), torch.tensor([True, False], device=DEVICE)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)).to(DEVICE)
    outs = []
    for use_kernel in (False, True):
        kk, vv, sp = k.clone(), v.clone(), slot_pos.clone()
        write = decode_kernels.rope_write if use_kernel else decode_block.rope_write_reference
        q = write(qkv, pos, mask, kk, vv, sp, H, Hkv, inv_freq, first_empty=True)
        outs.append((q, kk, vv, sp))
    (q0, k0, v0, sp0), (q1, k1, v1, sp1) = outs
    assert sp0.tolist() == sp1.tolist() == [[[0, 1, 2, 3, -1]], [[0, 1, 2, -1, -1]]]
    assert torch.equal(k1[1, :, 2], k[1, :, 2]) and torch.equal(v1[1, :, 2], v[1, :, 2])  # kept token untouched
    torch.testing.assert_close(k1, k0)
    torch.testing.assert_close(v1, v0)
    torch.testing.assert_close(q1, q0)


def test_evict_rejects_bad_input():
    slot_pos, pos, w, score = random_cache(2, 1, 9, 2, 8, 0)
    with pytest.raises(ValueError, match=r"weights must be \[B=2, H \(a multiple of G=1\), C=9\]"):
        decode_block.evict(slot_pos, pos, KEY_ATTENTION, weights=w[:, :, :5])
    with pytest.raises(ValueError, match=r"score must be \[B, G, C\] = \(2, 1, 9\)"):
        decode_block.evict(slot_pos, pos, KEY_ACCUMULATED, weights=w)
    with pytest.raises(ValueError, match="pos must be a \\[B=2\\] integer tensor"):
        decode_block.evict(slot_pos, pos.float(), KEY_POSITION)
    with pytest.raises(ValueError, match="unknown eviction key 7"):
        decode_block.evict(slot_pos, pos, 7)
    with pytest.raises(ValueError, match=r"lse must be fp32 \[B, H\] = \(2, 2\)"):
        decode_block.evict(slot_pos, pos, KEY_ATTENTION, weights=w, lse=torch.zeros(2, 3))


CASES = [
    ("transformer", {"n_kv_heads": 1}, "window:12"),
    ("transformer", {"n_kv_heads": 1}, "sink:12:sinks=3"),
    ("transformer", {"n_kv_heads": 1}, "h2o:12"),
    ("transformer", {"n_kv_heads": 2}, "tova:12"),
    ("transformer", {}, "tova:12:per_head"),
    ("hybrid", {"n_layers": 3, "attn_layers": "1", "attn_kv_heads": 1}, "tova:12"),
    ("megabyte", {}, "h2o:4"),  # the global cache, over patches; rows between patch ends are masked
]


# The fused block step runs its GEMVs in the interpreter too (minutes per case at the module path's length):
# one layer, 8 evictions, for an attention-scored and an accumulated policy.
FUSED_BLOCK_CASES = [("transformer", {"n_kv_heads": 2, "n_layers": 1}, "tova:12", 20),
                     ("transformer", {"n_kv_heads": 1, "n_layers": 1}, "h2o:12", 20)]


@on_device
@pytest.mark.parametrize("kind, overrides, spec, n_tokens, fuse_block",
                         [(*c, 48, False) for c in CASES] + [(*c, True) for c in FUSED_BLOCK_CASES],
                         ids=[c[2] + "-" + c[0] + "-module-step" for c in CASES]
                         + [c[2] + "-fused-block-step" for c in FUSED_BLOCK_CASES])
def test_decode_with_fused_eviction_keeps_what_select_victim_keeps(kind, overrides, spec, n_tokens, fuse_block,
                                                                   monkeypatch):
    """Token by token past a budget of 12 (an eviction every step once full): the same logits and the same
    kept positions, per layer and step, as the static state evicting in PyTorch."""
    torch.manual_seed(0)
    model = build_model(kind, "tiny", **overrides).to(DEVICE).eval()
    policy = parse_policy(spec)
    tokens = torch.randint(0, 256, (2, n_tokens), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    states = {flag: model.init_state(2, cache=policy, max_len=n_tokens) for flag in (False, True)}
    with torch.no_grad():
        for j in range(tokens.shape[1]):
            logits = {}
            for fused, state in states.items():
                monkeypatch.setattr(static_mode, "FUSED_EVICTION", fused)
                monkeypatch.setattr(fused_step, "FORCE_FUSED_STEP", fused and fuse_block)
                logits[fused], _ = model.step(tokens[:, j : j + 1], state)
            torch.testing.assert_close(logits[True], logits[False], rtol=2e-4, atol=2e-4,
                                       msg=lambda m, j=j: f"step {j}: {m}")
            if kind == "megabyte":
                layers = range(states[True].n_global_layers)
            else:
                layers = getattr(model, "policy_layers", None) or range(len(states[True].layers))
            for layer in layers:
                assert torch.equal(states[True].kept_positions(layer), states[False].kept_positions(layer)), (j, layer)
    assert all(states[True].kept_positions(layer).shape[-1] == policy.budget for layer in layers)  # it evicted

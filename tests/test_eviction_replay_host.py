"""The CPU eviction replay (NumPy, ``ops/eviction_replay/host.py``) against the PyTorch loop it replaces,
and inside the KV cache: what a chunked TOVA/H2O prefill keeps and outputs equals token by token."""

from __future__ import annotations

import pytest
import torch

from longseq import build_model
from longseq.cache import H2O, TOVA, KVCache
from longseq.ops.eviction_replay import host, replay_evictions_host, replay_evictions_reference
from longseq.testing import assert_close

POLICIES = [
    (TOVA(8), 4, 1),
    (TOVA(8, per_head=True), 4, 2),
    (H2O(8, recent=3), 2, 1),
    (H2O(8, recent=0), 4, 2),
]
POLICY_IDS = ["tova", "tova-per-head", "h2o", "h2o-per-head-recent0"]


def _case(B, H, G, C, c, dtype, seed, sorted_cache=False, scale=3.0):
    """Random scores; a cache of C slots at positions < 1000 (shuffled unless ``sorted_cache``) with a free
    slot and one more dead entry, then c new tokens at positions 1000, 1001, ..."""
    gen = torch.Generator().manual_seed(seed)
    S = C + c
    scores = (torch.randn(B, H, c, S, generator=gen, dtype=torch.float64) * scale).to(dtype)
    cache_pos = torch.stack([torch.randperm(1000, generator=gen)[:C] for _ in range(B * G)]).view(B, G, C)
    if sorted_cache:
        cache_pos = cache_pos.sort(-1).values
    cache_pos[..., -1] = -1  # the free slot
    cache_pos[..., 0] = -1  # an evicted entry
    pos = (1000 + torch.arange(c)).expand(B, c).contiguous()
    key_pos = torch.cat([cache_pos, pos[:, None].expand(B, G, c)], dim=2)
    alive = key_pos >= 0
    alive[..., C:] = False
    acc = torch.rand(B, G, S, generator=gen, dtype=torch.float64).to(dtype)
    acc[..., C:] = 0
    return scores, key_pos, pos, alive, acc


def _both(policy, scores, key_pos, pos, alive, acc):
    h2o = isinstance(policy, H2O)
    ref = replay_evictions_reference(scores, key_pos, pos, alive.clone(), acc.clone() if h2o else None,
                                     policy.select_victim)
    got = replay_evictions_host(scores, key_pos, pos, alive.clone(), acc.clone() if h2o else None,
                                policy.replay_recent)
    assert got is not None
    return ref, got


@pytest.mark.parametrize("sorted_cache", [False, True], ids=["shuffled", "sorted"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("policy, H, G", POLICIES, ids=POLICY_IDS)
def test_host_replay_matches_the_pytorch_loop(policy, H, G, dtype, B, sorted_cache):
    """Same alive sets seen by every query, same survivors, same accumulated attention (H2O); one (row,
    group) takes the scalar loop, several the batched one."""
    C, c = 11, 29
    scores, key_pos, pos, alive, acc = _case(B, H, G, C, c, dtype, seed=H + G + B, sorted_cache=sorted_cache)
    ref, got = _both(policy, scores, key_pos, pos, alive, acc)
    assert torch.equal(got[0], ref[0]), "the alive sets the queries saw differ"
    assert torch.equal(got[1], ref[1]), "the survivors differ"
    assert int(got[1].sum(-1).min()) == int(got[1].sum(-1).max()) == C - 2  # one in, one out per token
    if isinstance(policy, H2O):
        assert_close(got[2], ref[2], rtol=1e-12 if dtype == torch.float64 else 1e-6, name="accumulated attention")
        assert got[2].dtype == dtype


def test_host_replay_evicts_something_nontrivial():
    """Guard against a vacuous comparison: the survivors are neither the oldest nor the newest entries."""
    scores, key_pos, pos, alive, acc = _case(1, 4, 1, 11, 29, torch.float64, seed=0)
    _, got = _both(TOVA(8), scores, key_pos, pos, alive, acc)
    kept = key_pos[got[1]]
    assert (kept < 1000).any() and (kept >= 1000).any() and not (kept >= 1000 + 29 - 9).all()


@pytest.mark.parametrize("policy", [TOVA(5), H2O(5, recent=2)], ids=str)
def test_host_replay_breaks_ties_towards_the_oldest(policy):
    """All scores equal, so every step is a tie: with a shuffled cache the first minimum in slot order is
    not the oldest, and the loop's rule (oldest first) must still hold."""
    scores, key_pos, pos, alive, acc = _case(2, 2, 1, 6, 5, torch.float64, seed=1)
    scores.zero_()
    acc.zero_()
    ref, got = _both(policy, scores, key_pos, pos, alive, acc)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0])
    if isinstance(policy, TOVA):  # uniform attention: the c oldest kept entries left, in order
        kept = key_pos[0, 0][got[1][0, 0]].sort().values
        everything = key_pos[0, 0][key_pos[0, 0] >= 0].sort().values
        assert torch.equal(kept, everything[5:])


def test_fp32_scores_with_a_wide_range_take_float64_and_still_match():
    """Scores spanning more than fp32's exponent range after the row max (span > SPAN_FP32): the host
    computes in float64 and decides as the loop does."""
    scores, key_pos, pos, alive, acc = _case(1, 4, 1, 11, 29, torch.float32, seed=2, scale=40.0)
    assert float((scores.amax(-1) - scores.amin(-1)).max()) > host.SPAN_FP32
    ref, got = _both(TOVA(8), scores, key_pos, pos, alive, acc)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0])


def test_scores_too_wide_for_float64_are_declined_untouched():
    scores, key_pos, pos, alive, acc = _case(1, 2, 1, 6, 5, torch.float64, seed=3)
    scores[0, 0, 0, 0] = 1e4
    before = alive.clone()
    assert replay_evictions_host(scores, key_pos, pos, alive, None, 0) is None
    assert torch.equal(alive, before)
    scores[0, 0, 0, 0] = float("nan")
    assert replay_evictions_host(scores, key_pos, pos, alive, None, 0) is None


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(scores=a["scores"][0]), "scores must be a float"),
        (lambda a: a.update(alive=a["alive"].to(torch.int8)), "alive must be a bool"),
        (lambda a: a.update(recent=-1), "recent must be >= 0"),
    ],
)
def test_host_replay_rejects_bad_arguments_before_any_work(change, match):
    scores, key_pos, pos, alive, _ = _case(1, 2, 1, 5, 3, torch.float64, seed=0)
    args = dict(scores=scores, key_pos=key_pos, pos=pos, alive=alive.clone(), acc=None, recent=0)
    change(args)
    before = args["alive"].clone()
    with pytest.raises(ValueError, match=match):
        replay_evictions_host(**args)
    assert torch.equal(args["alive"], before)


@pytest.mark.parametrize("policy", [TOVA(12), TOVA(12, per_head=True), H2O(12, recent=4)], ids=str)
def test_cache_prefill_on_cpu_equals_token_by_token_and_stays_in_position_order(policy, monkeypatch):
    """A 90-token prompt into a 12-token cache in one call (sub-chunks of 20 tokens, so later chunks start
    from what earlier ones kept) against one token at a time: same logits, same kept positions, the host
    replay doing the work, and the kept slots in position order after every chunk."""
    calls = []
    real = host.replay_evictions_host

    def counted(*args):
        calls.append(args[1].clone())  # key_pos: the entries as the cache handed them over
        return real(*args)

    from longseq.cache import eviction

    monkeypatch.setattr(eviction, "replay_evictions_host", counted)
    monkeypatch.setattr(KVCache, "_evict_chunk_size", lambda self, batch, n_heads: 20)
    torch.manual_seed(0)
    model = build_model("transformer", "tiny", n_kv_heads=2).to(torch.float64).eval()
    ids = torch.randint(0, 256, (2, 90))
    with torch.no_grad():
        stepwise = model.init_state(2, cache=policy)
        ref = torch.cat([model.step(ids[:, j : j + 1], stepwise)[0] for j in range(90)], dim=1)
        n_step_calls = len(calls)
        chunked = model.init_state(2, cache=policy)
        got, _ = model.step(ids, chunked)
    assert n_step_calls == 0 and len(calls) > 0, "the chunked prefill did not go through the host replay"
    assert_close(got, ref, rtol=1e-12, name="logits")
    for layer in range(len(chunked.layers)):
        assert torch.equal(chunked.kept_positions(layer), stepwise.kept_positions(layer))
    for key_pos in calls:  # the cache part of every sub-chunk: kept entries first, increasing, free slot last
        cache = key_pos[..., :13]
        assert (cache[..., :12].diff(dim=-1) > 0).all() and (cache[..., 12] == -1).all()


@pytest.mark.parametrize("B", [1, 3], ids=["one-row", "batched"])
def test_a_recent_window_that_protects_every_entry_is_a_clear_error(B):
    """With ``recent`` above the number of alive entries nothing may be evicted: a ValueError that says so
    (not NumPy's argmin of an empty sequence, nor a dead entry evicted again), and nothing changed."""
    scores, key_pos, pos, alive, acc = _case(B, 2, 1, 6, 5, torch.float64, seed=4)
    before_alive, before_acc = alive.clone(), acc.clone()
    with pytest.raises(ValueError, match="no alive entry outside the protected recent window"):
        replay_evictions_host(scores, key_pos, pos, alive, acc, recent=10_000)
    with pytest.raises(ValueError, match="no alive entry outside the protected recent window"):
        # limit -1 for the first token: only the dead entry (position -1) falls below it
        replay_evictions_host(scores, key_pos, pos, alive, acc, recent=1001)
    assert torch.equal(alive, before_alive) and torch.equal(acc, before_acc)

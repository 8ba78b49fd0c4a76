"""The Triton eviction-replay kernel against its PyTorch loop, and inside the KV cache against token-by-token
eviction.

Without CUDA the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is first
imported) on small shapes; with CUDA it runs compiled.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from longseq import build_model  # noqa: E402
from longseq.cache import H2O, TOVA, KVCache  # noqa: E402
from longseq.ops import eviction_replay as er  # noqa: E402
from longseq.ops.eviction_replay import kernel as er_kernel  # noqa: E402
from longseq.testing import triton_interpreter_problem  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
_problem = triton_interpreter_problem(er_kernel._replay_kernel)
pytestmark = pytest.mark.skipif(_problem is not None, reason=str(_problem))


def _case(B, H, G, C, c, dtype, seed, holes=True):
    """Random scores; a cache of C slots at shuffled positions < 1000 with one free slot (and, with
    ``holes``, one more dead entry), then c new tokens at positions 1000, 1001, ..."""
    gen = torch.Generator().manual_seed(seed)
    S = C + c
    scores = torch.randn(B, H, c, S, generator=gen, dtype=torch.float64).to(dtype)
    cache_pos = torch.stack([torch.randperm(1000, generator=gen)[:C] for _ in range(B * G)]).view(B, G, C)
    cache_pos[..., -1] = -1  # the free slot
    if holes and C > 2:
        cache_pos[..., 0] = -1
    pos = (1000 + torch.arange(c)).expand(B, c).contiguous()
    key_pos = torch.cat([cache_pos, pos[:, None].expand(B, G, c)], dim=2)
    alive = key_pos >= 0
    alive[..., C:] = False
    return [x.to(DEVICE) for x in (scores, key_pos, pos, alive)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "policy, H, G",
    [(TOVA(8), 4, 1), (TOVA(8, per_head=True), 4, 2), (H2O(8, recent=3), 2, 1), (H2O(8, recent=0), 4, 2)],
    ids=["tova", "tova-per-head", "h2o", "h2o-per-head-recent0"],
)
def test_kernel_matches_the_pytorch_loop(policy, H, G, dtype):
    B, C, c = 2, 9, 13  # S = 22: padded to a 32-wide block
    scores, key_pos, pos, alive = _case(B, H, G, C, c, dtype, seed=H + G)
    acc = torch.rand(B, G, C + c, generator=torch.Generator().manual_seed(1), dtype=dtype).to(DEVICE)
    acc[..., C:] = 0
    h2o = isinstance(policy, H2O)
    ref = er.replay_evictions_reference(
        scores, key_pos, pos, alive.clone(), acc.clone() if h2o else None, policy.select_victim
    )
    got = er.replay_evictions(scores, key_pos, pos, alive.clone(), acc.clone() if h2o else None,
                              policy.replay_recent)
    assert torch.equal(got[0], ref[0]), "the alive sets the queries saw differ"
    assert torch.equal(got[1], ref[1]), "the survivors differ"
    assert int(got[1].sum(-1).min()) == int(ref[1].sum(-1).max()) == C - 2  # one in, one out per token
    if h2o:
        torch.testing.assert_close(got[2], ref[2], rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


def test_kernel_breaks_ties_towards_the_oldest_position():
    """All scores equal: TOVA's mean attention is uniform, so every step evicts the oldest alive entry."""
    B, H, G, C, c = 1, 2, 1, 6, 4
    scores, key_pos, pos, alive = _case(B, H, G, C, c, torch.float64, seed=0, holes=False)
    scores.zero_()
    _, survivors, _ = er.replay_evictions(scores, key_pos, pos, alive.clone(), None, 0)
    kept = key_pos[survivors].sort().values
    everything = key_pos[0, 0][key_pos[0, 0] >= 0].sort().values
    assert torch.equal(kept, everything[c:])  # the c oldest left, in order


def test_h2o_ties_are_broken_as_the_loop_breaks_them():
    """All scores and accumulations equal, so every step is a tie among many candidates (within the
    ``recent`` rule): the kernel must pick the same victims as select_evictions in the loop."""
    B, H, G, C, c, recent = 2, 2, 1, 6, 5, 2
    scores, key_pos, pos, alive = _case(B, H, G, C, c, torch.float64, seed=1, holes=False)
    scores.zero_()
    acc = torch.zeros(B, G, C + c, dtype=torch.float64, device=DEVICE)
    victim = H2O(5, recent=recent).select_victim
    ref = er.replay_evictions_reference(scores, key_pos, pos, alive.clone(), acc.clone(), victim)
    got = er.replay_evictions(scores, key_pos, pos, alive.clone(), acc.clone(), recent)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0])


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(scores=a["scores"][0]), "scores must be a float"),
        (lambda a: a.update(key_pos=a["key_pos"][:, :, :-1]), "key_pos must be"),
        (lambda a: a.update(pos=a["pos"][:, :-1]), "pos must be"),
        (lambda a: a.update(alive=a["alive"].to(torch.int8)), "alive must be a bool"),
        (lambda a: a.update(acc=torch.zeros(1)), "acc must be"),
        (lambda a: a.update(recent=-1), "recent must be >= 0"),
    ],
)
def test_bad_arguments_are_rejected_before_any_work(change, match):
    scores, key_pos, pos, alive = _case(1, 2, 1, 5, 3, torch.float64, seed=0)
    args = dict(scores=scores, key_pos=key_pos, pos=pos, alive=alive.clone(), acc=None, recent=0)
    change(args)
    before = args["alive"].clone()
    with pytest.raises(ValueError, match=match):
        er.replay_evictions(**args)
    assert torch.equal(args["alive"], before)  # nothing was written


@pytest.mark.parametrize("policy", [TOVA(12), TOVA(12, per_head=True), H2O(12, recent=4)], ids=str)
def test_cache_prefill_through_the_kernel_equals_token_by_token(policy, monkeypatch):
    """A 70-token prompt into a 12-token cache, in one call with the kernel forced (on CPU it is not the
    default), against feeding the tokens one at a time: same logits, same kept positions."""
    torch.manual_seed(0)
    model = build_model("transformer", "tiny", n_kv_heads=2).to(DEVICE, torch.float64).eval()
    ids = torch.randint(0, 256, (2, 70), device=DEVICE)

    def kernel_replay(self, scores, key_pos, pos, alive, acc):
        return er.replay_evictions(scores, key_pos, pos, alive, acc, self.policy.replay_recent)

    with torch.no_grad():
        stepwise = model.init_state(2, cache=policy)
        ref = torch.cat([model.step(ids[:, j : j + 1], stepwise)[0] for j in range(70)], dim=1)
        monkeypatch.setattr(KVCache, "_replay", kernel_replay)
        chunked = model.init_state(2, cache=policy)
        got, _ = model.step(ids, chunked)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    for layer in range(len(chunked.layers)):
        assert torch.equal(chunked.kept_positions(layer), stepwise.kept_positions(layer))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("policy, G", [(TOVA(512), 1), (TOVA(512, per_head=True), 4), (H2O(512, recent=128), 1)],
                         ids=["tova", "tova-per-head", "h2o"])
def test_gpu_kernel_matches_the_loop_at_prefill_shapes(policy, G):
    """Compiled, at the shapes a TOVA(512) prefill of a 12-head model hands it: 513 slots + 256 tokens.
    float64, so that no near-tie among ~770 entries can be decided differently by the two summation orders."""
    B, H, C, c = 4, 12, 513, 256
    scores, key_pos, pos, alive = _case(B, H, G, C, c, torch.float64, seed=7)
    acc = torch.zeros(B, G, C + c, device=DEVICE, dtype=torch.float64) if isinstance(policy, H2O) else None
    recent = policy.replay_recent
    ref = er.replay_evictions_reference(
        scores, key_pos, pos, alive.clone(), None if acc is None else acc.clone(), policy.select_victim
    )
    got = er.replay_evictions(scores, key_pos, pos, alive.clone(), None if acc is None else acc.clone(), recent)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_cache_prefill_uses_the_kernel(monkeypatch):
    """On CUDA a chunked TOVA prefill goes through the Triton replay (counted), with the loop's result."""
    from longseq.cache import eviction as kv

    calls = []
    kernel = kv.replay_evictions
    monkeypatch.setattr(kv, "replay_evictions", lambda *a: (calls.append(1), kernel(*a))[1])
    torch.manual_seed(0)
    model = build_model("transformer", "tiny").to(DEVICE, torch.float64).eval()
    ids = torch.randint(0, 256, (2, 300), device=DEVICE)
    with torch.no_grad():
        got, _ = model.step(ids, model.init_state(2, cache=TOVA(16)))
        monkeypatch.setattr(kv, "replay_evictions", lambda *a: pytest.fail("kernel used on the CPU copy"))
        ref, _ = model.cpu().step(ids.cpu(), model.init_state(2, cache=TOVA(16)))
    assert calls, "the replay kernel was not used on CUDA"
    torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=1e-9)

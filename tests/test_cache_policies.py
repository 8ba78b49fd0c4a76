"""Bounded KV-cache policies (Full, Window, Sink, H2O, TOVA, TOVA-head) against a brute-force reference.

The reference re-runs the model's layers one token at a time with an explicit kept set per layer (and per
kv head for TOVA-head), attends each new token over exactly the kept keys with plain per-head softmax, and
applies each policy's rule by its definition. It shares no code with ``longseq.cache`` or
``longseq.ops.attention``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import longseq
from longseq.cache import H2O, TOVA, CachePolicy, Full, KVCache, Sink, Window, parse_policy, select_evictions
from longseq.testing import assert_close

# --------------------------------------------------------------------------------------------------
# models


def tiny_model(
    n_heads: int = 2, n_kv_heads: int = 2, d_model: int = 32, seed: int = 0
) -> longseq.TransformerLM:
    """A float64 tiny Transformer with weights large enough that attention is peaked (random init at
    std 0.02 gives near-uniform attention, where eviction decisions would be arbitrary)."""
    torch.manual_seed(seed)
    model = longseq.build_model(
        "transformer", "tiny", n_heads=n_heads, n_kv_heads=n_kv_heads, d_model=d_model
    )
    model = model.double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (1.2 / math.sqrt(p.shape[1])))
    return model


MODELS: dict[str, longseq.TransformerLM] = {}


def get_model(kind: str) -> longseq.TransformerLM:
    shapes = {"mha": (2, 2, 32), "gqa": (2, 1, 32), "gqa4": (4, 2, 32)}
    if kind not in MODELS:
        MODELS[kind] = tiny_model(*shapes[kind])
    return MODELS[kind]


def token_ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# brute-force reference


def reference_victim(
    policy: CachePolicy, kept: set[int], score: dict[int, float], acc: dict[int, float]
) -> int:
    """The token a policy evicts from ``kept`` (budget + 1 tokens), straight from its definition."""
    if isinstance(policy, Window):
        return min(kept)
    if isinstance(policy, Sink):
        return min(p for p in kept if p >= policy.sinks)
    if isinstance(policy, TOVA):
        return min(kept, key=lambda p: (score[p], p))
    if isinstance(policy, H2O):
        protected = set(sorted(kept)[len(kept) - policy.recent :]) if policy.recent else set()
        return min(kept - protected, key=lambda p: (acc[p], p))
    raise AssertionError(f"no reference rule for {policy}")


@torch.no_grad()
def reference_run(model: longseq.TransformerLM, ids: torch.Tensor, policy: CachePolicy):
    """Logits ``[B, T, V]`` and, after every token, each layer's kept positions ``[B, (H_kv,) n]``."""
    cfg = model.config
    B, T = ids.shape
    H, Hkv = cfg.n_heads, cfg.n_kv_heads
    D = cfg.d_model // H
    per_head = isinstance(policy, TOVA) and policy.per_head
    n_sets = Hkv if per_head else 1
    L = len(model.blocks)
    logits = torch.zeros(B, T, cfg.vocab_size, dtype=torch.float64)
    history: list[list[torch.Tensor]] = [[None] * L for _ in range(T)]  # type: ignore[list-item]
    snaps = [[[[] for _ in range(L)] for _ in range(T)] for _ in range(B)]
    for b in range(B):
        keys = [dict() for _ in range(L)]  # position -> [Hkv, D]
        values = [dict() for _ in range(L)]
        kept = [[set() for _ in range(n_sets)] for _ in range(L)]
        acc = [[dict() for _ in range(n_sets)] for _ in range(L)]
        for t in range(T):
            h = model.embed(ids[b, t : t + 1])  # [1, d]
            for layer, block in enumerate(model.blocks):
                attn = block.attn
                x = block.attn_norm(h)
                q, k, v = attn.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
                pos = torch.tensor([t])
                q = attn.rope(q.view(1, 1, H, D).transpose(1, 2), pos)[0, :, 0]  # [H, D]
                k = attn.rope(k.view(1, 1, Hkv, D).transpose(1, 2), pos)[0, :, 0]  # [Hkv, D]
                keys[layer][t], values[layer][t] = k, v.view(Hkv, D)
                for s in kept[layer]:
                    s.add(t)
                heads_out = []
                head_rows: list[tuple[list[int], torch.Tensor]] = []
                for hq in range(H):
                    kv = hq // (H // Hkv)
                    order = sorted(kept[layer][kv if per_head else 0])
                    K = torch.stack([keys[layer][p][kv] for p in order])
                    V = torch.stack([values[layer][p][kv] for p in order])
                    w = torch.softmax(K @ q[hq] / math.sqrt(D), dim=0)
                    heads_out.append(w @ V)
                    head_rows.append((order, w))
                for g in range(n_sets):
                    members = [hq for hq in range(H) if not per_head or hq // (H // Hkv) == g]
                    score: dict[int, float] = {}
                    for hq in members:
                        order, w = head_rows[hq]
                        for p, wp in zip(order, w.tolist(), strict=True):
                            score[p] = score.get(p, 0.0) + wp / len(members)
                    for p, s in score.items():
                        acc[layer][g][p] = acc[layer][g].get(p, 0.0) + s
                    if policy.budget is not None and len(kept[layer][g]) > policy.budget:
                        kept[layer][g].remove(reference_victim(policy, kept[layer][g], score, acc[layer][g]))
                h = h + attn.out(torch.cat(heads_out)[None])
                h = h + block.mlp(block.mlp_norm(h))
                snaps[b][t][layer] = [sorted(s) for s in kept[layer]]
            logits[b, t] = model.head(model.norm(h))[0]
    for t in range(T):
        for layer in range(L):
            rows = torch.tensor([snaps[b][t][layer] for b in range(B)])  # [B, n_sets, n]
            history[t][layer] = rows if per_head else rows[:, 0]
    return logits, history


POLICY_CASES = [
    Full(),
    Window(5),
    Sink(6, sinks=2),
    H2O(6),
    H2O(5, recent=0),
    H2O(5, recent=5),
    TOVA(5),
    TOVA(5, per_head=True),
]

_REFERENCE_CACHE: dict = {}


def cached_reference(kind: str, B: int, T: int, policy: CachePolicy):
    key = (kind, B, T, policy)
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = reference_run(get_model(kind), token_ids(B, T, seed=B * 100 + T), policy)
    return _REFERENCE_CACHE[key]


def run_chunks(model, ids, policy, splits):
    state = model.init_state(ids.shape[0], cache=policy)
    outs, kept = [], []
    start = 0
    with torch.no_grad():
        for end in [*splits, ids.shape[1]]:
            if end > start:
                out, state = model.step(ids[:, start:end], state)
                outs.append(out)
                kept.append((end, [state.kept_positions(i) for i in range(model.config.n_layers)]))
                start = end
    return torch.cat(outs, dim=1), kept, state


@pytest.mark.parametrize("policy", POLICY_CASES, ids=str)
@pytest.mark.parametrize("kind,B", [("mha", 2), ("gqa", 2), ("gqa4", 1)])
def test_policy_matches_brute_force_reference(policy, kind, B):
    T = 24
    model = get_model(kind)
    ids = token_ids(B, T, seed=B * 100 + T)
    ref_logits, ref_kept = cached_reference(kind, B, T, policy)
    # Token by token: kept positions after every token; one big prefill; an uneven split.
    for splits in (list(range(1, T)), [], [3, 4, 11, 19]):
        logits, kept, _ = run_chunks(model, ids, policy, splits)
        assert_close(logits, ref_logits, rtol=1e-9, name=f"{policy} {kind} splits={splits[:5]}")
        for end, layers in kept:
            for layer, got in enumerate(layers):
                assert torch.equal(got, ref_kept[end - 1][layer]), (
                    policy,
                    kind,
                    end,
                    layer,
                    got,
                    ref_kept[end - 1][layer],
                )


def test_reference_evicts_differently_per_policy_and_row():
    """Guard against a vacuous comparison: the policies really differ, and batch rows evict independently."""
    kept = {str(p): cached_reference("mha", 2, 24, p)[1][-1][0] for p in POLICY_CASES[1:]}
    assert len({str(v.tolist()) for v in kept.values()}) >= 5
    assert not torch.equal(kept["tova:5"][0], kept["tova:5"][1])
    assert any(not torch.equal(kept[p][0], kept[p][1]) for p in ("h2o:6", "h2o:5:recent=0"))
    per_head = kept["tova:5:per_head"]
    assert per_head.shape == (2, 2, 5) and not torch.equal(per_head[:, 0], per_head[:, 1])


# --------------------------------------------------------------------------------------------------
# prefill in any split == token by token (shape fuzzing)

policy_strategy = st.sampled_from(["window", "sink", "h2o", "tova", "tova_head"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=policy_strategy,
    budget=st.integers(1, 12),
    kind=st.sampled_from(["mha", "gqa", "gqa4"]),
    B=st.integers(1, 3),
    cuts=st.lists(st.integers(1, 29), max_size=4),
    sub_chunk=st.sampled_from([256, 3]),
)
def test_any_split_matches_token_by_token(name, budget, kind, B, cuts, sub_chunk):
    """Also with score-based eviction replayed over sub-chunks of 3 tokens (as a tight memory bound gives)."""
    T = 30
    size = KVCache._evict_chunk_size
    if sub_chunk != 256:
        KVCache._evict_chunk_size = lambda self, batch, n_heads: sub_chunk  # type: ignore[method-assign]
    try:
        _check_split(name, budget, kind, B, cuts, T)
    finally:
        KVCache._evict_chunk_size = size  # type: ignore[method-assign]


def _check_split(name, budget, kind, B, cuts, T):
    if name == "sink":
        spec = f"sink:{budget}:sinks={min(2, budget - 1)}"
    elif name == "h2o":
        spec = f"h2o:{budget}:recent={budget // 3}"
    else:
        spec = f"{name}:{budget}"
    policy = parse_policy(spec)
    model = get_model(kind)
    ids = token_ids(B, T, seed=budget)
    ref, ref_kept, _ = run_chunks(model, ids, policy, list(range(1, T)))
    out, kept, _ = run_chunks(model, ids, policy, sorted(set(cuts)))
    assert_close(out, ref, rtol=1e-9, name=spec)
    for end, layers in kept:
        for layer, got in enumerate(layers):
            assert torch.equal(got, ref_kept[end - 1][1][layer]), (spec, end, layer)


# --------------------------------------------------------------------------------------------------
# no eviction -> exactly the model's logits


@pytest.mark.parametrize(
    "policy", [Full(), Window(40), Sink(40), H2O(40), TOVA(40), TOVA(39, per_head=True), Window(39)], ids=str
)
def test_no_eviction_gives_the_no_cache_logits(policy):
    model = get_model("gqa4")
    ids = token_ids(2, 40, seed=7)
    with torch.no_grad():
        expected = model(ids)
        for splits in ([], [1, 17, 18]):
            out, kept, _ = run_chunks(model, ids, policy, splits)
            assert_close(out, expected, rtol=1e-9, name=str(policy))
            n = min(40, policy.budget or 40)
            last = kept[-1][1][0]
            assert last.shape[-1] == n
            if n == 40 or isinstance(policy, Window):
                assert torch.equal(last[0].reshape(-1, n)[0], torch.arange(40 - n, 40))


def test_window_and_sink_keep_what_they_promise():
    model = get_model("mha")
    ids = token_ids(2, 50, seed=3)
    for splits in ([], [7, 8, 30]):
        *_, state = run_chunks(model, ids, Window(9), splits)
        for layer in range(2):
            assert torch.equal(state.kept_positions(layer), torch.arange(41, 50).expand(2, 9))
        *_, state = run_chunks(model, ids, Sink(9, sinks=3), splits)
        expected = torch.cat([torch.arange(3), torch.arange(44, 50)]).expand(2, 9)
        assert torch.equal(state.kept_positions(1), expected)


def test_tova_worked_example_from_the_paper():
    # Five tokens, budget 3: the two lowest scores (positions 1 and 3) are evicted.
    scores = torch.tensor([0.3, 0.1, 0.25, 0.05, 0.3])
    evicted = select_evictions(scores, 2)
    assert sorted(evicted.tolist()) == [1, 3]
    assert evicted.tolist() == [3, 1]  # lowest first
    # One at a time, as the cache does it: the lowest goes, then the next lowest among the rest.
    first = select_evictions(scores, 1)
    assert first.tolist() == [3]
    rest = torch.ones(5, dtype=torch.bool)
    rest[3] = False
    assert select_evictions(scores, 1, candidates=rest).tolist() == [1]


def test_select_evictions_breaks_ties_towards_the_oldest_and_respects_candidates():
    scores = torch.tensor([[0.2, 0.1, 0.1, 0.6], [0.5, 0.5, 0.5, 0.5]])
    positions = torch.tensor([[9, 7, 3, 1], [4, 2, 8, 6]])
    assert select_evictions(scores, 1, positions).tolist() == [[2], [1]]
    assert select_evictions(scores, 2, positions).tolist() == [[2, 1], [1, 0]]
    candidates = positions >= 5
    assert select_evictions(scores, 1, positions, candidates).tolist() == [[1], [3]]
    # integer scores (Window evicts by position)
    assert select_evictions(positions, 1, positions).tolist() == [[3], [1]]


# --------------------------------------------------------------------------------------------------
# construction and specs


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: Window(0), "budget=0"),
        (lambda: TOVA(-3), "budget=-3"),
        (lambda: H2O(4, recent=5), "recent=5"),
        (lambda: H2O(4, recent=-1), "recent=-1"),
        (lambda: Sink(4, sinks=4), "sinks=4"),
        (lambda: Sink(4, sinks=-1), "sinks=-1"),
        (lambda: parse_policy("tova"), "needs an integer budget"),
        (lambda: parse_policy("tova:abc"), "'tova:abc' needs an integer budget"),
        (lambda: parse_policy("tova:0"), "budget=0"),
        (lambda: parse_policy("lru:8"), "unknown cache policy 'lru'"),
        (lambda: parse_policy("full:8"), "takes no budget"),
        (lambda: parse_policy("sink:8:sinks=x"), "sinks='x'"),
        (lambda: parse_policy("h2o:8:bogus=1"), "no option 'bogus'"),
        (lambda: parse_policy("sink:8:sinks=8"), "sinks=8"),
        # Options of the wrong type fail here, not at the first eviction (or as a spec that cannot be parsed).
        (lambda: TOVA(4, per_head="no"), "per_head must be True or False; got per_head='no'"),
        (lambda: H2O(4, recent=True), "recent must be an integer; got recent=True"),
        (lambda: H2O(4, recent=1.5), "recent must be an integer; got recent=1.5"),
        (lambda: Sink(4, sinks=1.5), "sinks must be an integer; got sinks=1.5"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_parse_policy_specs_round_trip():
    cases = {
        "full": Full(),
        "window:64": Window(64),
        "sink:64": Sink(64, sinks=4),
        "sink:64:sinks=8": Sink(64, sinks=8),
        "h2o:64": H2O(64, recent=32),
        "h2o:64:recent=16": H2O(64, recent=16),
        "tova:512": TOVA(512),
        "tova:512:per_head": TOVA(512, per_head=True),
    }
    for spec, policy in cases.items():
        assert parse_policy(spec) == policy
        assert policy.spec == spec and str(policy) == spec
        assert parse_policy(policy.spec) == policy
    assert parse_policy("tova_head:32") == TOVA(32, per_head=True)
    assert parse_policy(" TOVA:32:per_head=true ") == TOVA(32, per_head=True)
    assert parse_policy("sink:sinks=2", budget=16) == Sink(16, sinks=2)
    assert parse_policy("tova", budget=16) == TOVA(16)
    assert parse_policy("full", budget=16) == Full()
    with pytest.raises(dataclasses.FrozenInstanceError):
        TOVA(8).budget = 9  # type: ignore[misc]  # frozen


def test_gla_rejects_and_transformer_checks_policies():
    with pytest.raises(ValueError, match="does not apply"):
        longseq.build_model("gla", "tiny").init_state(1, cache=TOVA(8))
    with pytest.raises(TypeError):
        KVCache("tova:8")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# memory


@pytest.mark.parametrize(
    "policy", [TOVA(16), TOVA(16, per_head=True), H2O(16), Window(16), Sink(16)], ids=str
)
def test_memory_is_bounded_by_the_budget(policy):
    model = get_model("gqa4")
    state = model.init_state(2, cache=policy)
    ids = token_ids(2, 520, seed=11)
    with torch.no_grad():
        model.step(ids[:, :3], state)
        cache = state.layers[0]
        assert isinstance(cache, KVCache)
        assert cache.capacity == 3  # until it first evicts, a bounded cache holds only what arrived
        model.step(ids[:, 3:17], state)  # the 17th token is the first eviction: budget + 1 slots from here on
        allocated, ptr = state.layers[0].allocated_nbytes(), cache.k.data_ptr()
        filled = state.nbytes()
        for t in range(17, 520):
            model.step(ids[:, t : t + 1], state)
        model.step(ids[:, :1], state)  # a 521st token after a long decode
    for layer in state.layers:
        assert layer.capacity == 17 and layer.k.shape[2] == 17 and layer.v.shape[2] == 17
        assert layer.slot_pos.shape[-1] == 17 and len(layer) == 16
    assert state.nbytes() == filled
    assert cache.allocated_nbytes() == allocated and cache.k.data_ptr() == ptr  # written in place
    kept = state.kept_positions(1)
    assert kept.shape[-1] == 16 and int(kept.min()) >= 0 and int(kept.max()) <= 520
    if not isinstance(policy, TOVA):  # TOVA may evict the newest token itself
        assert bool((kept[..., -1] == 520).all())
    # kept positions are distinct and in temporal order
    assert bool((kept[..., 1:] > kept[..., :-1]).all())


def test_full_cache_grows_geometrically_and_reserve_preallocates():
    model = get_model("mha")
    ids = token_ids(1, 100, seed=5)
    state = model.init_state(1)
    with torch.no_grad():
        model.step(ids[:, :10], state)
        reallocations, ptr = 0, state.layers[0].k.data_ptr()
        for t in range(10, 100):
            model.step(ids[:, t : t + 1], state)
            reallocations += state.layers[0].k.data_ptr() != ptr
            ptr = state.layers[0].k.data_ptr()
    assert reallocations <= 7  # 10 -> 15 -> 22 -> 33 -> 49 -> 73 -> 109
    per_token = 2 * 2 * 16 * 8 + 8
    assert state.nbytes() == 2 * 100 * per_token
    reserved = model.init_state(1)
    for layer in reserved.layers:
        layer.reserve(100)
    with torch.no_grad():
        model.step(ids[:, :10], reserved)
        ptr = reserved.layers[0].k.data_ptr()
        for t in range(10, 100):
            model.step(ids[:, t : t + 1], reserved)
    assert reserved.layers[0].k.data_ptr() == ptr and reserved.layers[0].capacity == 100


def _qkv_source():
    """``qkv(T)``: one row of T random float64 queries (4 heads) and keys and values (2 kv heads, dim 8)."""
    gen = torch.Generator().manual_seed(0)

    def qkv(T):
        return tuple(torch.randn(1, h, T, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))

    return qkv


@pytest.mark.parametrize("policy", [TOVA(4), H2O(4, recent=1), TOVA(4, per_head=True)], ids=str)
def test_caches_at_their_budget_share_one_layout_however_they_got_there(policy):
    """A bounded cache grows until it holds its budget, then keeps budget + 1 slots: one row that reached the
    budget exactly and one that evicted on the way concatenate (as the HF cache merges padded rows), and the
    merged cache continues exactly as the two rows do on their own."""
    qkv = _qkv_source()

    exact, over = KVCache(policy), KVCache(policy)
    exact.attend(*qkv(4), torch.arange(4))
    over.attend(*qkv(7), torch.arange(7))
    assert len(exact) == len(over) == 4 and exact.capacity == over.capacity == 5
    merged = KVCache.concat([exact.select_rows([0]), over.select_rows([0])])
    q, k, v = qkv(1)
    both = merged.attend(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                         torch.tensor([[4], [7]]))
    alone = [exact.attend(q, k, v, torch.tensor([4])), over.attend(q, k, v, torch.tensor([7]))]
    assert_close(both, torch.cat(alone), rtol=1e-12, name="merged rows")
    assert torch.equal(merged.kept_positions(), torch.cat([exact.kept_positions(), over.kept_positions()]))


@pytest.mark.parametrize("policy", [Full(), TOVA(10), H2O(10, recent=2)], ids=str)
def test_growing_caches_fed_in_other_chunks_concatenate(policy):
    """Below its budget a dynamic cache's capacity depends on how tokens arrived (5 at once: 5 slots; 3 + 1 + 1:
    6). Such caches still concatenate, and the merged cache continues exactly as each row does on its own."""
    qkv = _qkv_source()

    once, steps = KVCache(policy), KVCache(policy)
    once.attend(*qkv(5), torch.arange(5))
    for a, b in ((0, 3), (3, 4), (4, 5)):
        steps.attend(*qkv(b - a), torch.arange(a, b))
    assert len(once) == len(steps) == 5 and once.capacity != steps.capacity
    merged = KVCache.concat([once, steps])
    assert merged.capacity == max(once.capacity, steps.capacity)
    for t in range(5, 8):  # on past the inputs' capacities (and, for the bounded ones, not yet to the budget)
        q, k, v = qkv(1)
        both = merged.attend(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                             torch.tensor([[t], [t]]))
        alone = [once.attend(q, k, v, torch.tensor([t])), steps.attend(q, k, v, torch.tensor([t]))]
        assert_close(both, torch.cat(alone), rtol=1e-12, name=f"merged rows at {t}")
    assert torch.equal(merged.kept_positions(), torch.cat([once.kept_positions(), steps.kept_positions()]))

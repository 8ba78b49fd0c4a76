"""Sampling and generation through the state API, against full recomputation."""

from __future__ import annotations

import pytest
import torch

from longseq import H2O, TOVA, Sink, build_model, generate, sample_next
from longseq.generate import as_token_ids


@pytest.mark.parametrize("kind", ["transformer", "gla"])
def test_greedy_generation_equals_argmax_of_full_recompute(kind):
    torch.manual_seed(0)
    model = build_model(kind, "tiny").double()
    prompt = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    out = generate(model, prompt, max_new_tokens=12, temperature=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):  # the reference re-runs the whole sequence every step
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_sampling_is_seeded_and_streams_every_token():
    model = build_model("gla", "tiny")
    seen = []
    a = generate(model, "To be", 15, temperature=1.0, seed=7, on_token=lambda t: seen.append(int(t[0])))
    b = generate(model, b"To be", 15, temperature=1.0, seed=7)
    assert torch.equal(a, b) and a.shape == (1, 20)
    assert a[0, :5].tolist() == list(b"To be") and seen == a[0, 5:].tolist()
    assert torch.equal(generate(model, "To be", 0), as_token_ids("To be"))


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.3, 0.1, 0.05]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=gen).tolist()) == {1, 2}
    # nucleus 0.75: 0.5 + 0.3 reaches it, so exactly tokens {1, 2} stay
    assert set(sample_next(logits, 1.0, top_p=0.75, generator=gen).tolist()) == {1, 2}
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=gen).tolist()) == {1}
    assert set(sample_next(logits, 1.0, top_k=1).tolist()) == {1}
    assert torch.equal(sample_next(logits, 0.0), torch.ones(2000, dtype=torch.long))
    # with no restriction the empirical frequencies follow the probabilities
    freq = torch.bincount(sample_next(logits, 1.0, generator=gen), minlength=5).float() / 2000
    assert torch.allclose(freq, logits[0].exp(), atol=0.04)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
        (dict(max_new_tokens=3, temperature=-0.5), "temperature must be >= 0"),
        (dict(max_new_tokens=3, top_k=0), "top_k must be >= 1"),
        (dict(max_new_tokens=3, top_p=1.5), r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_generation_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        generate(build_model("gla", "tiny"), "x", **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(top_k=2.5), TypeError, "top_k must be an int or None; got 2.5"),
        (dict(top_k=True), TypeError, "top_k must be an int or None; got True"),
        (dict(temperature="0"), TypeError, "temperature must be a number; got '0'"),
        (dict(top_p="0.9"), TypeError, "top_p must be a number"),
        (dict(prefill_chunk=1.5), TypeError, "prefill_chunk must be an int or None; got 1.5"),
        (dict(prefill_chunk=True), TypeError, "prefill_chunk must be an int or None; got True"),
        (dict(stop=1.5), TypeError, "stop must be an int token id, a str, bytes or a list"),
        (dict(stop=[10, 1000]), ValueError, r"stop id 1000 is outside the model's vocabulary \[0, 256\)"),
    ],
)
def test_bad_generation_argument_types_fail_before_any_work(kwargs, error, pattern, monkeypatch):
    """Wrong types or impossible stops are named before the prompt is prefilled (a prefill here fails the test)."""
    model = build_model("gla", "tiny")

    def no_work(*args, **kw):
        raise AssertionError("the model ran before the arguments were checked")

    for name in ("step", "step_last", "init_state"):
        monkeypatch.setattr(model, name, no_work)
    with pytest.raises(error, match=pattern):
        generate(model, "x", 3, **kwargs)


def test_empty_prompt_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        generate(build_model("gla", "tiny"), "", 3)


def test_prefill_computes_the_logits_of_the_last_token_only():
    """A long prompt to a large-vocabulary model would hold [T, V] logits: prefill asks for the last position's
    only (the head sees one position per row), and greedy decoding still equals a loop over full forwards."""
    torch.manual_seed(0)
    model = build_model("transformer", "tiny").double()
    prompt = torch.randint(0, 256, (2, 50))
    seen = []
    hook = model.head.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    try:
        got = generate(model, prompt, 5, temperature=0)
    finally:
        hook.remove()
    assert seen[0] == (2, 1, model.config.d_model)  # the prompt's call
    x = prompt
    with torch.no_grad():
        for _ in range(5):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, x)


@pytest.mark.parametrize("policy", [TOVA(10**9), H2O(10**9), Sink(10**9)], ids=["tova", "h2o", "sink"])
def test_a_budget_above_the_sequence_allocates_only_what_arrives(policy):
    """A budget of 10^9 never evicts within 11 tokens: greedy generation equals a loop over full forwards (nothing
    evicted), static and dynamic, instead of allocating 10^9 slots, and a dynamic cache holds only the tokens seen."""
    torch.manual_seed(0)
    model = build_model("transformer", "tiny").double()

    def greedy(x, n):
        with torch.no_grad():
            for _ in range(n):
                x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return x

    prompt = torch.randint(0, 256, (2, 5))
    for static in (True, False):
        assert torch.equal(generate(model, prompt, 6, temperature=0, cache=policy, static=static), greedy(prompt, 6))
    # 4 tokens in all: at or below Sink's 4 sinks, so its fitted budget must stay above them
    assert torch.equal(generate(model, prompt[:, :2], 2, temperature=0, cache=policy, static=True),
                       greedy(prompt[:, :2], 2))
    state = model.init_state(2, cache=policy)
    model.step(prompt, state)
    assert state.layers[0].capacity == 5  # the 5 tokens seen, not the budget


def test_generate_takes_a_policy_spec_and_refuses_other_caches():
    torch.manual_seed(0)
    model = build_model("transformer", "tiny").double()
    prompt = torch.randint(0, 256, (1, 9))
    assert torch.equal(generate(model, prompt, 4, temperature=0, cache="tova:4"),
                       generate(model, prompt, 4, temperature=0, cache=TOVA(4)))
    with pytest.raises(TypeError, match="cache must be a CachePolicy such as TOVA"):
        generate(model, prompt, 4, cache=512)


def test_a_sequence_longer_than_the_models_limit_fails_before_decoding(monkeypatch):
    model = build_model("megabyte", "tiny")
    limit = model.capabilities.max_seq_len
    for name in ("step", "step_last"):
        monkeypatch.setattr(model, name, lambda *a: (_ for _ in ()).throw(AssertionError("decoded")))
    with pytest.raises(ValueError, match=f"make {limit + 1} tokens, more than this model's max_seq_len={limit}"):
        generate(model, torch.zeros(1, 4, dtype=torch.long), limit - 3)

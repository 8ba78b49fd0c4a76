"""Sampling and generation through the state API, against full recomputation."""

from __future__ import annotations

import pytest
import torch

from longseq import TOVA, build_model, generate, sample_next
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

    monkeypatch.setattr(model, "step", no_work)
    monkeypatch.setattr(model, "init_state", no_work)
    with pytest.raises(error, match=pattern):
        generate(model, "x", 3, **kwargs)


def test_empty_prompt_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        generate(build_model("gla", "tiny"), "", 3)


def test_prefill_bounds_the_logits_of_one_call_and_stays_exact(monkeypatch):
    """The model returns logits for every token of a call: a long prompt goes through in chunks whose logits fit
    PREFILL_LOGITS (greedy continuation as with one call, computed before the bound applies)."""
    import importlib

    prefill_mod = importlib.import_module("longseq.generate.prefill")  # the package exports a function of that name
    torch.manual_seed(0)
    model = build_model("transformer", "tiny").double()
    prompt = torch.randint(0, 256, (1, 50))
    expected = generate(model, prompt, 5, temperature=0)
    calls = []
    real = model.step
    monkeypatch.setattr(model, "step", lambda ids, state: calls.append(ids.shape[1]) or real(ids, state))
    monkeypatch.setattr(prefill_mod, "PREFILL_LOGITS", 8 * 256)  # 8 tokens of a 256-id vocabulary
    got = generate(model, prompt, 5, temperature=0)
    assert torch.equal(got, expected)
    assert calls[:7] == [8] * 6 + [2]  # the prompt: 6 x 8 + 2 tokens, then one token per step


def test_a_budget_above_the_sequence_allocates_only_what_arrives():
    """TOVA(10^9) never evicts within 11 tokens: generation equals the full cache's (static and dynamic) instead
    of allocating 10^9 slots, and a dynamic cache holds only the tokens seen."""
    torch.manual_seed(0)
    model = build_model("transformer", "tiny").double()
    prompt = torch.randint(0, 256, (2, 5))
    full = generate(model, prompt, 6, temperature=0)
    for static in (True, False):
        assert torch.equal(generate(model, prompt, 6, temperature=0, cache=TOVA(10**9), static=static), full)
    state = model.init_state(2, cache=TOVA(10**9))
    model.step(prompt, state)
    assert state.layers[0].capacity < 64


def test_a_sequence_longer_than_the_models_limit_fails_before_decoding(monkeypatch):
    model = build_model("megabyte", "tiny")
    limit = model.capabilities.max_seq_len
    monkeypatch.setattr(model, "step", lambda *a: (_ for _ in ()).throw(AssertionError("decoded")))
    with pytest.raises(ValueError, match=f"make {limit + 1} tokens, more than this model's max_seq_len={limit}"):
        generate(model, torch.zeros(1, 4, dtype=torch.long), limit - 3)

"""Static (preallocated, graph-capturable) decode states, batched generation of ragged prompts, stop
sequences and graph-safe sampling; GPU-marked tests check CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch

from longseq import build_model, parse_policy
from longseq.generate import (
    capture_count,
    clear_decode_cache,
    exponential_noise,
    generate,
    prefill_rows,
    sample_race,
)

# (kind, config overrides, cache policy spec)
CASES = [
    ("transformer", {}, None),
    ("transformer", {"n_kv_heads": 1}, "window:16"),
    ("transformer", {"n_kv_heads": 1}, "sink:16:sinks=3"),
    ("transformer", {"n_kv_heads": 1}, "h2o:16"),
    ("transformer", {"n_kv_heads": 1}, "tova:16"),
    ("transformer", {}, "tova:16:per_head"),
    ("gla", {}, None),
    ("megabyte", {}, "tova:16"),
    ("megabyte", {"global_backbone": "gla", "local_backbone": "gla"}, None),
]
IDS = [f"{k}-{p or 'full'}-{'-'.join(f'{a}={b}' for a, b in o.items())}".rstrip("-") for k, o, p in CASES]


def _model(kind, overrides, dtype=torch.float64, device="cpu"):
    torch.manual_seed(0)
    return build_model(kind, "tiny", **overrides).to(device=device, dtype=dtype).eval()


def _policy(spec):
    return parse_policy(spec) if spec else None


@pytest.mark.parametrize("kind, overrides, spec", CASES, ids=IDS)
def test_static_state_gives_the_dynamic_logits(kind, overrides, spec):
    """300 decode steps (well past every budget: evictions every step) plus a prompt fed token by token
    into a fresh static state, against the dynamic state fed the prompt in one chunk."""
    model = _model(kind, overrides)
    gen = torch.Generator().manual_seed(1)
    B, T0, steps = 2, 20, 300
    prompt = torch.randint(0, 256, (B, T0), generator=gen)
    tokens = torch.randint(0, 256, (B, steps), generator=gen)
    with torch.no_grad():
        dynamic = model.init_state(B, cache=_policy(spec))
        ref, _ = model.step(prompt, dynamic)
        static = model.init_state(B, cache=_policy(spec), max_len=T0 + steps)
        assert static.static and static.positions.tolist() == [0, 0]
        got = torch.cat([model.step(prompt[:, j : j + 1], static)[0] for j in range(T0)], dim=1)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
        for j in range(steps):
            a, _ = model.step(tokens[:, j : j + 1], dynamic)
            b, _ = model.step(tokens[:, j : j + 1], static)
            torch.testing.assert_close(b, a, rtol=0, atol=1e-10, msg=lambda m, j=j: f"step {j}: {m}")
    assert static.positions.tolist() == [T0 + steps] * B and static.host_positions == [T0 + steps] * B
    if spec is not None and kind == "transformer":
        for layer in range(len(static.layers)):  # same kept tokens, in the same order
            assert torch.equal(static.kept_positions(layer), dynamic.kept_positions(layer))
    with pytest.raises(ValueError, match="max_len"):
        model.step(tokens[:, :1], static)  # the static state is full


@pytest.mark.parametrize("kind, overrides, spec", [CASES[0], CASES[4], CASES[6], CASES[7]],
                         ids=[IDS[0], IDS[4], IDS[6], IDS[7]])
@pytest.mark.parametrize("group_tokens", [32768, 40])
def test_grouped_prefill_equals_one_row_at_a_time(kind, overrides, spec, group_tokens, monkeypatch):
    """Equal-length prompts prefilled together (TOVA's exact token-by-token prefill batched over rows)
    load the same static state and logits as one row at a time; a shorter prompt in between splits the
    groups, so padding never enters. With a 40-token cap per model call, groups go in chunks of 16."""
    import sys

    # The module, not the `longseq.generate` function the package exports under the same name.
    monkeypatch.setattr(sys.modules["longseq.generate"], "GROUP_PREFILL_TOKENS", group_tokens)
    model = _model(kind, overrides)
    calls = []  # (rows, tokens) of every model call: the grouping and the per-call token cap
    step = model.step
    monkeypatch.setattr(model, "step", lambda ids, state: (calls.append(tuple(ids.shape)), step(ids, state))[1])
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 256, (1, n), generator=gen) for n in (40, 40, 40, 17, 40, 40)]
    states, logits = [], []
    with torch.no_grad():
        for group in (None, 1, 2):
            state = model.init_state(len(rows), cache=_policy(spec), max_len=64)
            logits.append(prefill_rows(model, state, rows, _policy(spec), max_group=group))
            states.append(state)
            assert state.host_positions == [40, 40, 40, 17, 40, 40]
            if group is None:  # automatic: bounded states group the runs of equal length
                assert max(b for b, _ in calls) == (3 if spec or kind == "gla" else 1)
                assert all(b * t <= max(group_tokens, t) for b, t in calls), calls
            calls.clear()
        follow = torch.randint(0, 256, (len(rows), 1), generator=gen)
        after = [model.step(follow, st)[0] for st in states]
    for i in (1, 2):
        torch.testing.assert_close(logits[i], logits[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(after[i], after[0], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="max_group"):
        prefill_rows(model, model.init_state(1, cache=_policy(spec), max_len=64), rows[:1], max_group=0)


@pytest.mark.parametrize("kind, overrides, spec", [CASES[0], CASES[4], CASES[6], CASES[7], CASES[8]],
                         ids=[IDS[0], IDS[4], IDS[6], IDS[7], IDS[8]])
def test_ragged_batch_equals_each_prompt_alone(kind, overrides, spec):
    model = _model(kind, overrides)
    prompts = [b"To be, or not to be", b"ab", b"Whether 'tis nob"]  # 19, 2, 16 bytes
    out = generate(model, prompts, 24, temperature=0, cache=_policy(spec))
    assert isinstance(out, list) and len(out) == 3
    for p, row in zip(prompts, out, strict=True):
        alone = generate(model, p, 24, temperature=0, cache=_policy(spec))  # dynamic state, batch 1
        assert torch.equal(row, alone[0])
        assert row[: len(p)].tolist() == list(p)


def test_stop_sequences_end_rows_independently():
    model = _model("transformer", {})
    prompts = [b"hello", b"a longer prompt"]
    free = generate(model, prompts, 30, temperature=0)
    gen0 = free[0][5:].tolist()
    gen1 = free[1][15:].tolist()
    stop_str = bytes(gen0[6:8])  # a 2-byte stop string that row 0 produces
    stop_byte = gen1[3]  # a single stop byte row 1 produces

    def expected(gen):
        for end in range(1, len(gen) + 1):
            if gen[:end][-2:] == list(stop_str) or gen[end - 1] == stop_byte:
                return gen[:end]
        return gen

    streamed = []
    out = generate(model, prompts, 30, temperature=0, stop=[stop_str, stop_byte], on_token=streamed.append)
    for row, prompt_len, gen in zip(out, (5, 15), (gen0, gen1), strict=True):
        assert row[prompt_len:].tolist() == expected(gen)
    assert len(out[0]) - 5 != len(out[1]) - 15  # the rows stopped at different steps
    # Streaming: finished rows emit the pad id; the longest row decides the number of steps.
    longest = max(len(out[0]) - 5, len(out[1]) - 15)
    assert len(streamed) == longest
    for b, (row, plen) in enumerate(zip(out, (5, 15), strict=True)):
        emitted = [int(t[b]) for t in streamed]
        n = len(row) - plen
        assert emitted[:n] == row[plen:].tolist() and all(x == 0 for x in emitted[n:])
    # A tensor prompt gives a tensor, padded after each row's stop.
    ids = torch.tensor([list(b"hello"), list(b"world")])
    padded = generate(model, ids, 30, temperature=0, stop=stop_byte, pad_id=7)
    assert padded.shape == (2, 35)
    for b in range(2):
        gen = padded[b, 5:].tolist()
        if stop_byte in gen:
            cut = gen.index(stop_byte) + 1
            assert all(x == 7 for x in gen[cut:])


def test_graph_safe_sampler():
    logits = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_race(logits, 0.0), logits.argmax(-1))
    # Empirical frequencies over many draws follow the probabilities (temperature 0.7).
    row = torch.log(torch.tensor([0.05, 0.5, 0.3, 0.1, 0.05]))
    n = 20000
    gen = torch.Generator().manual_seed(1)
    many = row.repeat(n, 1) * 0.7  # logits scaled so that / 0.7 gives back the row
    draws = sample_race(many, 0.7, noise=exponential_noise(many.shape, gen))
    freq = torch.bincount(draws, minlength=5).double() / n
    assert torch.allclose(freq, row.exp().double(), atol=0.015)
    # top-k / top-p restrict the support exactly as sample_next does.
    noise = exponential_noise((n, 5), gen)
    assert set(sample_race(row.repeat(n, 1), 1.0, top_k=2, noise=noise).tolist()) == {1, 2}
    assert set(sample_race(row.repeat(n, 1), 1.0, top_p=0.75, noise=noise).tolist()) == {1, 2}
    assert set(sample_race(row.repeat(n, 1), 1.0, top_p=0.5, noise=noise).tolist()) == {1}
    with pytest.raises(ValueError, match="noise"):
        sample_race(logits, 1.0)


def test_compile_on_cpu_warns_and_matches_the_dynamic_path():
    import longseq.generate as g

    g._warned_cpu_compile = False
    model = _model("gla", {})
    with pytest.warns(RuntimeWarning, match="eagerly"):
        a = generate(model, "To be", 12, temperature=1.0, seed=3, compile=True)
    b = generate(model, "To be", 12, temperature=1.0, seed=3)  # dynamic state, same noise stream
    assert torch.equal(a, b)


# -------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind, overrides, spec", CASES, ids=IDS)
def test_captured_decode_equals_eager_and_captures_once_per_batch_size(kind, overrides, spec):
    model = _model(kind, overrides, dtype=torch.float32, device="cuda")
    clear_decode_cache(model)
    prompts = [b"To be, or not to be", b"ab", b"Whether 'tis nob"]
    kw = dict(temperature=0, cache=_policy(spec))
    eager = generate(model, prompts, 40, static=True, **kw)
    captured = generate(model, prompts, 40, compile=True, **kw)
    for a, b in zip(eager, captured, strict=True):
        assert torch.equal(a, b)
    # MEGABYTE has two graphs per batch size (steps with and without a global-model step).
    per_batch = 2 if kind == "megabyte" else 1
    assert capture_count(model) == per_batch
    again = generate(model, prompts, 40, compile=True, **kw)  # same batch size: replayed, not recaptured
    assert all(torch.equal(a, b) for a, b in zip(again, captured, strict=True))
    assert capture_count(model) == per_batch
    two = generate(model, prompts[:2], 40, compile=True, **kw)
    assert capture_count(model) == 2 * per_batch
    for a, b in zip(two, generate(model, prompts[:2], 40, static=True, **kw), strict=True):
        assert torch.equal(a, b)
    # Sampling: the noise is drawn outside the graph, so eager and captured draw the same tokens.
    s1 = generate(model, prompts, 40, temperature=0.9, top_p=0.9, seed=5, compile=True, cache=_policy(spec))
    s2 = generate(model, prompts, 40, temperature=0.9, top_p=0.9, seed=5, static=True, cache=_policy(spec))
    assert all(torch.equal(a, b) for a, b in zip(s1, s2, strict=True))
    clear_decode_cache(model)


def test_bench_decode_cli_writes_jsonl_and_table(tmp_path, capsys):
    import json

    from longseq.cli import main

    out = tmp_path / "decode.jsonl"
    argv = ["bench", "decode", "--models", "gla,transformer,megabyte:tiny", "--presets", "tiny",
            "--contexts", "32", "--batch-sizes", "1,2", "--policies", "full,tova:ctx/8", "--gen-tokens", "3",
            "--warmup", "2", "--compile", "--device", "cpu", "--jsonl", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| impl | model |" in table and "ms/step" in table
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # gla: 1 policy-less case; transformer and megabyte: full and tova:4; x 2 batch sizes
    assert len(rows) == 10
    assert {r["policy"] for r in rows} == {"-", "full", "tova:4"}
    assert all(r["ms_per_step"] > 0 and r["tok_s"] > 0 and r["prefill_s"] > 0 for r in rows)

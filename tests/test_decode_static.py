"""Static (preallocated, graph-capturable) decode states, batched generation of ragged prompts, stop
sequences and graph-safe sampling; GPU-marked tests check CUDA-graph capture."""

from __future__ import annotations

import warnings

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
    ("hybrid", {"n_layers": 3, "attn_layers": "1", "attn_kv_heads": 1}, "tova:16"),
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
@pytest.mark.parametrize("group_tokens, group_rows", [(32768, 3), (40, 3), (32768, 2)])
def test_grouped_prefill_equals_one_row_at_a_time(kind, overrides, spec, group_tokens, group_rows, monkeypatch):
    """Equal-length prompts prefilled together (TOVA's exact token-by-token prefill batched over rows)
    load the same static state and logits as one row at a time; a shorter prompt in between splits the
    groups, so padding never enters. With a 40-token cap per model call, groups go in chunks of 16; with
    room for two rows of temporary state, groups hold two rows."""
    import sys

    # The module, not the `longseq.generate` function the package exports under the same name.
    module = sys.modules["longseq.generate.prefill"]
    monkeypatch.setattr(module, "GROUP_PREFILL_TOKENS", group_tokens)
    if group_rows == 2:
        per_row = _model(kind, overrides).init_state(1, cache=_policy(spec), max_len=64).nbytes()
        monkeypatch.setattr(module, "GROUP_STATE_BYTES", 2 * per_row + per_row // 2)
    model = _model(kind, overrides)
    calls = []  # (rows, tokens) of every model call: the grouping and the per-call token cap
    step = model.step_last  # what prefill calls
    monkeypatch.setattr(model, "step_last", lambda ids, state: (calls.append(tuple(ids.shape)), step(ids, state))[1])
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
                assert max(b for b, _ in calls) == (group_rows if spec or kind == "gla" else 1)
                assert all(b * t <= max(group_tokens, t) for b, t in calls), calls
            calls.clear()
        follow = torch.randint(0, 256, (len(rows), 1), generator=gen)
        after = [model.step(follow, st)[0] for st in states]
    for i in (1, 2):
        torch.testing.assert_close(logits[i], logits[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(after[i], after[0], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="max_group"):
        prefill_rows(model, model.init_state(1, cache=_policy(spec), max_len=64), rows[:1], max_group=0)


@pytest.mark.parametrize("kind, overrides, spec", [CASES[0], CASES[4], CASES[6], CASES[7], CASES[8],
                                                   ("megabyte", {}, None)],
                         ids=[IDS[0], IDS[4], IDS[6], IDS[7], IDS[8], "megabyte-full"])
def test_ragged_batch_equals_each_prompt_alone(kind, overrides, spec):
    model = _model(kind, overrides)
    prompts = [b"To be, or not to be", b"ab", b"Whether 'tis nob"]  # 19, 2, 16 bytes
    out = generate(model, prompts, 24, temperature=0, cache=_policy(spec))
    assert isinstance(out, list) and len(out) == 3
    for p, row in zip(prompts, out, strict=True):
        alone = generate(model, p, 24, temperature=0, cache=_policy(spec))  # dynamic state, batch 1
        assert torch.equal(row, alone[0])
        assert row[: len(p)].tolist() == list(p)


def test_a_loaded_state_reports_its_length_and_a_failed_load_changes_nothing():
    torch.manual_seed(0)
    model = build_model("hybrid", "tiny").double()  # layer 0 GLA, layer 1 attention
    dyn = model.init_state(1)
    model.step(torch.randint(0, 256, (1, 3)), dyn)
    static = model.init_state(1, max_len=16).load_(dyn)
    attn = static.layers[1]
    assert len(attn) == 3 and "kept=3" in repr(attn)
    assert static.kept_positions(1).tolist() == [[0, 1, 2]]
    # A GLA model's state has a matrix where the hybrid keeps a KV cache: refused, naming the layer, before
    # the GLA layer (which would fit) is overwritten.
    gla = build_model("gla", "tiny").double()
    other = gla.init_state(1)
    gla.step(torch.randint(0, 256, (1, 5)), other)
    before = [static.layers[0].matrix.clone(), attn.k.clone(), attn.slot_pos.clone()]
    with pytest.raises(TypeError, match="layer 1: cannot load a RecurrentState into a KVCache"):
        static.load_(other)
    after = [static.layers[0].matrix, attn.k, attn.slot_pos]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert static.host_positions == [3]


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
    from longseq.generate import api as g

    g._warned_cpu_compile = False
    model = _model("gla", {})
    with pytest.warns(RuntimeWarning, match="eagerly"):
        a = generate(model, "To be", 12, temperature=1.0, seed=3, compile=True)
    b = generate(model, "To be", 12, temperature=1.0, seed=3)  # dynamic state, same noise stream
    assert torch.equal(a, b)


def test_fused_step_equals_the_eager_one():
    """The ``torch.compile``'d decode step (``compile="fused"``; here uncaptured, on the CPU) gives the
    eager step's logits at every step of a MEGABYTE with a TOVA global cache (both decode keys, evictions),
    and compiles on the first two steps of each key (constants, then symbolic host integers), not on the
    third, where the captured path records its graph (a guard on a value range may still fail later:
    the capture refuses to compile and warms up once more, see ``Decoder.step``)."""
    from torch._dynamo.utils import counters

    from longseq.generate import Decoder

    model = _model("megabyte", {}, dtype=torch.float32)
    # 64 prompt bytes = 16 patches fill the global TOVA(16) cache; the 24 steps evict 6 patches.
    prompt = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    policy = _policy("tova:16")
    class Recording(Decoder):  # keeps the logits each (compiled) step samples from in a fixed buffer
        def _body(self):
            logits, _ = self.model.step(self.tokens, self.state)
            self.last.copy_(logits[:, -1])
            self.tokens.copy_(self.sample(logits[:, -1])[:, None])

    logits_seen = []
    graphs_before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for fuse in (False, True):
            state = model.init_state(2, cache=policy, max_len=96)
            first = prefill_rows(model, state, [prompt[:1], prompt[1:]], policy)
            dec = Recording(model, state, 0.0, None, None, capture=False, fuse=fuse)
            dec.last = torch.empty_like(first)
            dec.tokens.copy_(first.argmax(-1)[:, None])
            seen, late_compiles, occurrences = [], [], {}
            for i in range(24):  # six patches of P = 4: six global steps, each evicting
                key = model.decode_key(state)
                occurrences[key] = occurrences.get(key, 0) + 1
                graphs = counters["stats"]["unique_graphs"]
                dec.step()
                seen.append(dec.last.clone())
                if occurrences[key] == 3 and counters["stats"]["unique_graphs"] > graphs:
                    late_compiles.append(i)  # the capture, which comes here, would have to compile
            logits_seen.append(torch.stack(seen))
            assert not late_compiles, late_compiles
            assert len(occurrences) == 2  # both MEGABYTE keys: with and without the global step
    torch.testing.assert_close(logits_seen[1], logits_seen[0], rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] > graphs_before  # it did compile


def test_fused_step_that_cannot_compile_runs_unfused_once_and_rewarms():
    """Inductor failing (raised while compiling, before the step ran) -> one warning, the step runs once
    unfused, and every key's warm-up count restarts so each gets an eager warm-up before its capture."""
    from torch._dynamo.exc import BackendCompilerFailed

    from longseq.generate import Decoder

    model = _model("gla", {}, dtype=torch.float32)
    state = model.init_state(1, max_len=16)
    prefill_rows(model, state, [torch.tensor([[1, 2, 3]])])
    dec = Decoder(model, state, 0.0, None, None, capture=False, fuse=True)
    dec._warm = {"other key": 2}

    def failing():
        raise BackendCompilerFailed(lambda *a: None, RuntimeError("no C compiler"), None)

    dec._run = failing
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        dec._warm_step()
    assert not dec.fuse and dec._run == dec._body and dec._warm == {}
    assert state.host_positions == [4]  # the step ran exactly once


def test_compile_modes_are_checked():
    from longseq.generate import compile_mode

    assert [compile_mode(c) for c in (False, True, "graph", "fused")] == [None, "graph", "graph", "fused"]
    with pytest.raises(ValueError, match="compile must be"):
        generate(_model("gla", {}), b"abc", 2, compile="fast")


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


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind, overrides, spec", [CASES[0], CASES[4], CASES[6], CASES[7], CASES[8],
                                                   ("megabyte", {}, None)],
                         ids=[IDS[0], IDS[4], IDS[6], IDS[7], IDS[8], "megabyte-full"])
def test_fused_capture_equals_eager_and_captures_once_per_batch_size(kind, overrides, spec):
    """``compile="fused"``: the torch.compile'd step, captured, gives the eager greedy tokens (fp32), and
    is captured once per batch size and decode key like the unfused one."""
    model = _model(kind, overrides, dtype=torch.float32, device="cuda")
    clear_decode_cache(model)
    prompts = [b"To be, or not to be", b"ab", b"Whether 'tis nob"]
    kw = dict(temperature=0, cache=_policy(spec))
    eager = generate(model, prompts, 40, static=True, **kw)
    with warnings.catch_warnings():
        # A fallback to the unfused step: fail instead. (?s): the warning quotes a multi-line compiler error.
        warnings.filterwarnings("error", message="(?s).*unfused")
        fused = generate(model, prompts, 40, compile="fused", **kw)
        again = generate(model, prompts, 40, compile="fused", **kw)
    for a, b, c in zip(eager, fused, again, strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)
    assert capture_count(model) == (2 if kind == "megabyte" else 1)
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


def test_largest_batch_shrinks_on_out_of_memory_only():
    from longseq.bench.decode import largest_batch

    tried = []

    def run(b):  # "fits" up to 40 rows
        tried.append(b)
        if b > 40:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return {"ms_per_step": 1.0}

    assert largest_batch(run, 100, torch.device("cpu")) == {"ms_per_step": 1.0, "batch": 40}
    assert tried == [100, 80, 64, 51, 40]
    tried.clear()  # a far-off estimate: four fine steps, then halving, down to what fits
    assert largest_batch(run, 1000, torch.device("cpu"))["batch"] == 25
    assert tried == [1000, 800, 640, 512, 409, 204, 102, 51, 25]

    def broken(b):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        largest_batch(broken, 8, torch.device("cpu"))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        largest_batch(lambda b: run(b + 1000), 4, torch.device("cpu"))


def test_bench_decode_max_batch_without_a_memory_limit_is_the_cap(tmp_path):
    import json

    from longseq.cli import main

    out = tmp_path / "decode.jsonl"
    argv = ["bench", "decode", "--models", "gla", "--presets", "tiny", "--contexts", "16",
            "--batch-sizes", "1,max", "--max-batch", "3", "--gen-tokens", "2", "--device", "cpu",
            "--jsonl", str(out)]
    assert main(argv) == 0
    assert [json.loads(line)["batch"] for line in out.read_text().splitlines()] == [1, 3]
    with pytest.raises(SystemExit):
        main(argv[:9] + ["1,many"] + argv[10:])

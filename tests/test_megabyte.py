"""MEGABYTE: wiring against a per-target reference, step == forward, causality, patch lag, padding,
overfitting, bad inputs and generation. CPU, tiny configs, float64 wherever results are compared."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import longseq
from longseq import Full, MegabyteConfig, MegabyteLM, build_model
from longseq.cache import parse_policy
from longseq.models import MODELS
from longseq.testing import assert_close

BACKBONES = [("transformer", "transformer"), ("gla", "transformer"), ("transformer", "gla"), ("gla", "gla")]


def make_model(global_backbone: str = "transformer", local_backbone: str = "transformer", seed: int = 0,
               **overrides) -> MegabyteLM:
    torch.manual_seed(seed)
    model = build_model("megabyte", "tiny", global_backbone=global_backbone, local_backbone=local_backbone,
                        **overrides)
    # Random (not zero/init-scale) pads and larger weights so every path carries a visible signal.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.double().eval()


def random_bytes(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=g)


# -- an independent reference: the paper's equations, one target at a time -----------------------------
def _run_stack(blocks, h: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(h.shape[1])
    for block in blocks:
        h = block(h, positions, None)
    return h


def reference_logits(model: MegabyteLM, x: torch.Tensor) -> torch.Tensor:
    """``[B, T] -> [B, T, 256]`` straight from the paper's equations, recomputed for every target.

    Output i predicts target t = i + 1 in patch k = t // P at offset p = t % P. The global input of
    patch k is [pad, concat(E_g[x_j] + E_pos[j] for j in patch 0), ..., same for patch k-1]; the local
    input at offset q <= p is w_GL(slice q of the global output of patch k) plus the pad (q = 0) or
    E_l[x_{kP+q-1}].
    """
    P, DG = model.config.patch_size, model.config.byte_dim
    B, T = x.shape
    out = torch.empty(B, T, model.config.vocab_size, dtype=model.head.weight.dtype)
    for i in range(T):
        t = i + 1
        k, p = divmod(t, P)
        g_in = [model.global_pad.expand(B, -1)]
        for patch in range(k):
            byte_positions = range(patch * P, patch * P + P)
            parts = [model.global_embed(x[:, j]) + model.pos_embed.weight[j] for j in byte_positions]
            g_in.append(torch.cat(parts, dim=-1))
        g_out = model.global_norm(_run_stack(model.global_blocks, torch.stack(g_in, dim=1)))
        g_out = g_out[:, -1]  # [B, P * D_G]: the output of patch k
        l_in = []
        for q in range(p + 1):
            byte = model.local_pad.expand(B, -1) if q == 0 else model.local_embed(x[:, k * P + q - 1])
            l_in.append(model.global_to_local(g_out[:, q * DG : (q + 1) * DG]) + byte)
        h = _run_stack(model.local_blocks, torch.stack(l_in, dim=1))[:, -1]
        out[:, i] = model.head(model.norm(h))
    return out


def step_in_pieces(model: MegabyteLM, x: torch.Tensor, sizes: list[int], cache=None) -> torch.Tensor:
    state = model.init_state(x.shape[0], cache=cache)
    outs, start = [], 0
    for size in sizes:
        logits, state = model.step(x[:, start : start + size], state)
        assert logits.shape == (x.shape[0], size, 256)
        outs.append(logits)
        start += size
    assert start == x.shape[1] and state.position == x.shape[1]
    return torch.cat(outs, dim=1)


# -- wiring ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("global_backbone,local_backbone", BACKBONES)
@pytest.mark.parametrize("T", [1, 3, 4, 9, 12])
def test_forward_matches_paper_reference(global_backbone, local_backbone, T):
    model = make_model(global_backbone, local_backbone)
    x = random_bytes(2, T)
    with torch.no_grad():
        assert_close(model(x), reference_logits(model, x), name=f"forward T={T}")


def test_registry_build_and_config_roundtrip():
    assert (MODELS["megabyte"].config_class, MODELS["megabyte"].model_class) == (MegabyteConfig, MegabyteLM)
    model = build_model("megabyte", "tiny", global_backbone="gla", patch_size=8)
    assert isinstance(model, longseq.LanguageModel)
    assert model.config.patch_size == 8 and model.config.byte_dim == 64 // 8
    assert model.config.d_model == model.config.d_global
    assert model.config.n_layers == model.config.n_global_layers + model.config.n_local_layers
    cfg = MegabyteConfig.from_dict(model.config.to_dict())
    assert cfg == model.config
    cli_cfg = MegabyteConfig.from_preset("tiny", patch_size="8", global_backbone="gla")  # strings from a CLI
    assert cli_cfg.patch_size == 8
    assert model.num_params() > model.num_params(exclude_embeddings=True) > 0


PRESET_PARAMS = {"tiny": 157_696, "small": 29_208_064, "paper95m": 98_730_496}


@pytest.mark.parametrize("preset,expected", list(PRESET_PARAMS.items()))
def test_preset_sizes(preset, expected):
    cfg = MegabyteConfig.from_preset(preset)
    assert cfg.d_global > cfg.d_local and cfg.n_global_layers > cfg.n_local_layers
    assert cfg.patch_size in (4, 8)
    with torch.device("meta"):
        model = MegabyteLM(cfg)
    assert model.num_params() == expected


# -- step == forward --------------------------------------------------------------------------------------
SPLITS = {
    "one_at_a_time": [1] * 21,
    "whole": [21],
    "uneven": [3, 1, 6, 2, 9],
    "patch_aligned": [4, 8, 4, 5],   # prompts ending exactly at patch boundaries
    "mid_patch_then_decode": [6] + [1] * 15,
    "boundary_then_decode": [8] + [1] * 13,
    "long_chunk_over_patches": [2, 17, 2],
}


@pytest.mark.parametrize("global_backbone,local_backbone", BACKBONES)
@pytest.mark.parametrize("split", list(SPLITS))
def test_step_equals_forward(global_backbone, local_backbone, split):
    model = make_model(global_backbone, local_backbone)
    x = random_bytes(2, 21)
    with torch.no_grad():
        expected = model(x)
        assert_close(step_in_pieces(model, x, SPLITS[split]), expected, name=split)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    backbones=st.sampled_from(BACKBONES),
    cuts=st.lists(st.integers(1, 25), min_size=0, max_size=6, unique=True),
)
def test_step_equals_forward_any_split(backbones, cuts):
    model = _hypothesis_models[backbones]
    x = random_bytes(1, 26, seed=7)
    bounds = [0, *sorted(cuts), 26]
    sizes = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    with torch.no_grad():
        assert_close(step_in_pieces(model, x, sizes), model(x), name=f"sizes {sizes}")


_hypothesis_models = {bb: make_model(*bb) for bb in BACKBONES}


def test_step_with_full_cache_policy_and_state_contents():
    model = make_model("transformer", "transformer")
    P = model.config.patch_size
    x = random_bytes(1, 3 * P + 2)
    with torch.no_grad():
        assert_close(step_in_pieces(model, x, [5, 4, x.shape[1] - 9], cache=Full()), model(x))
        state = model.init_state(1, cache=Full())
        sizes = []
        for i in range(x.shape[1]):
            _, state = model.step(x[:, i : i + 1], state)
            sizes.append(state.nbytes())
            # Global: the pad plus one position per completed input patch; local: the current patch only.
            n_patches = (i + 1) // P
            assert state.kept_positions(0).tolist() == [list(range(n_patches + 1))]
            n_local = (i + 1) % P + 1
            assert len(state.local_layers[0]) == n_local <= P
            assert state.patch_ids.shape == (1, (i + 1) % P)
    assert sizes[-1] > sizes[0]


def test_bounded_policy_applies_to_global_caches():
    """A bounded policy goes to the global KV caches (over patch positions): exact while nothing is
    evicted, and never more than ``budget`` patches kept afterwards; the local cache stays full."""
    try:
        policy = parse_policy("window:4")
    except ValueError:
        pytest.skip("no bounded cache policy registered in this checkout")
    model = make_model()
    P = model.config.patch_size
    x = random_bytes(1, 8 * P)
    with torch.no_grad():
        expected = model(x)
        state = model.init_state(1, cache=policy)
        got = torch.cat([model.step(x[:, i : i + 3], state)[0] for i in range(0, x.shape[1], 3)], dim=1)
    # Global positions 0..3 (pad + 3 patches) fit the budget: targets up to byte 4P - 1 are exact.
    assert_close(got[:, : 4 * P - 1], expected[:, : 4 * P - 1], name="before eviction")
    kept = state.kept_positions(0)
    assert kept.shape[-1] == 4 and int(kept.max()) == x.shape[1] // P
    assert len(state.local_layers[0]) <= P


def _held_bytes(obj, seen=None) -> int:
    """Bytes of every tensor storage reachable from ``obj``'s attributes (each storage once): what a state
    really keeps alive, views' whole bases included."""
    seen = {} if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _held_bytes(item, seen)
    elif isinstance(obj, dict):
        for item in obj.values():
            _held_bytes(item, seen)
    elif type(obj).__module__.startswith("longseq") and hasattr(obj, "__dict__") and id(obj) not in seen:
        seen[id(obj)] = 0
        for item in vars(obj).values():
            _held_bytes(item, seen)
    return sum(seen.values())


def test_a_bounded_state_holds_no_more_memory_after_a_longer_prompt():
    """Under Window(4) the state of a 10-patch and of a 100-patch prompt keep the same tensors: nothing in it
    may be a view of the call's whole conditioning table or of all its ids."""
    model = make_model()
    P = model.config.patch_size
    held = []
    with torch.no_grad():
        for n in (10 * P + 3, 100 * P + 3):
            state = model.init_state(2, cache=parse_policy("window:4"))
            model.step(random_bytes(2, n), state)
            held.append(_held_bytes(state))
    assert held[0] == held[1], held


def test_gla_global_state_is_constant_size():
    model = make_model("gla", "gla")
    P = model.config.patch_size
    state = model.init_state(1)
    x = random_bytes(1, 6 * P)
    seen = set()
    with torch.no_grad():
        for i in range(0, x.shape[1], P):
            _, state = model.step(x[:, i : i + P], state)
            seen.add(state.nbytes())
    assert len(seen) == 1
    with pytest.raises(ValueError, match="cache policy"):
        model.init_state(1, cache=Full())


# -- causality and the patch lag ---------------------------------------------------------------------
@pytest.mark.parametrize("global_backbone,local_backbone", BACKBONES[:2])
def test_causality_by_perturbation(global_backbone, local_backbone):
    model = make_model(global_backbone, local_backbone)
    P = model.config.patch_size
    T = 4 * P + 3
    x = random_bytes(2, T)
    with torch.no_grad():
        base = model(x)
        positions = sorted({0, 1, P - 1, P, P + 1, 2 * P - 1, 2 * P, 3 * P - 2, 3 * P - 1, T - 1})
        for j in positions:
            y = x.clone()
            y[:, j] = (y[:, j] + 1 + torch.arange(2)) % 256
            out = model(y)
            # Logits at positions < j predict bytes <= j: they must not see byte j at all.
            assert torch.equal(out[:, :j], base[:, :j]), f"byte {j} leaked into earlier logits"
            # ...and the logits right at j (predicting byte j + 1) must see it, patch boundary or not.
            assert (out[:, j] - base[:, j]).abs().amax(-1).min() > 1e-6, f"logits at {j} ignore byte {j}"


@pytest.mark.parametrize("global_backbone", ["transformer", "gla"])
def test_first_byte_of_patch_sees_previous_patch_through_global_path(global_backbone):
    """Target x_{kP} (logits at kP - 1) depends on x_{kP-1} only through the global model: the local
    input at offset 0 is the pad. A one-patch shift applied to the already byte-shifted sequence
    would cut exactly this dependency."""
    model = make_model(global_backbone, "transformer")
    P = model.config.patch_size
    x = random_bytes(1, 3 * P + 1)
    captured = {}

    def keep(name):
        def hook(module, args, out):
            out.retain_grad()
            captured[name] = out
        return hook

    handles = [model.global_embed.register_forward_hook(keep("global")),
               model.local_embed.register_forward_hook(keep("local"))]
    try:
        for k in (1, 2, 3):
            captured.clear()
            model.zero_grad()
            logits = model(x)
            logits[0, k * P - 1].square().sum().backward()
            g_global = captured["global"].grad  # [1, (T // P) * P, D_G]: one row per byte position
            g_local = captured["local"].grad  # [1, K * P, D_L]: row t = byte t - 1, local input of target t
            assert g_global[0, k * P - 1].abs().max() > 1e-8, f"patch {k}: no global path from {k * P - 1}"
            assert g_local[0, k * P].abs().max() == 0, f"patch {k}: the pad slot leaks byte {k * P - 1}"
            # Nothing from the target's own patch or later reaches it through either path.
            assert g_global[0, k * P :].abs().sum() == 0
            assert g_local[0, k * P + 1 :].abs().sum() == 0
    finally:
        for h in handles:
            h.remove()


# -- padding and windows -------------------------------------------------------------------------------
@pytest.mark.parametrize("global_backbone", ["transformer", "gla"])
def test_padding_non_multiple_lengths(global_backbone):
    model = make_model(global_backbone, "transformer")
    P = model.config.patch_size
    x = random_bytes(2, 5 * P)
    with torch.no_grad():
        full = model(x)
        for T in (1, P - 1, P, P + 1, 2 * P + 3, 5 * P - 1):
            assert_close(model(x[:, :T]), full[:, :T], name=f"T={T}")
        assert model(x[:, :0]).shape == (2, 0, 256)


def test_strided_windows_and_max_len():
    model = make_model()
    L = model.config.max_seq_len
    x = random_bytes(1, L)
    with torch.no_grad():
        assert model(x).shape == (1, L, 256)
        window = x[:, 40 : 40 + 16 * model.config.patch_size]  # a later window restarts at position 0
        assert torch.isfinite(model(window)).all()


def test_loss_is_finite_and_backward_reaches_every_parameter():
    model = make_model().float().train()
    x = random_bytes(2, 30)
    logits = model(x)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 256), x[:, 1:].reshape(-1))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("global_backbone,local_backbone", BACKBONES)
@pytest.mark.parametrize("T", [11, 12])
def test_fast_stateless_path_matches_module_path_with_gradients(global_backbone, local_backbone, T):
    """forward's fast path (RoPE folded into the local qkv weight) against the blocks
    called as modules: same logits and the same gradient for every parameter (float64)."""
    from torch.nn.attention import SDPBackend

    model = make_model(global_backbone, local_backbone).train()
    x = random_bytes(2, T)
    results = []
    for fast, backends in [(False, None), (True, None), (True, [SDPBackend.MATH])]:
        model.fast_stateless, model.local_sdpa_backends = fast, backends
        model.zero_grad(set_to_none=True)
        logits = model(x)
        (logits * torch.linspace(-1, 1, 256, dtype=logits.dtype)).sum().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_logits, ref_grads), *fast_results = results
    for logits, grads in fast_results:
        assert_close(logits, ref_logits, name="logits")
        for name, grad in grads.items():
            assert_close(grad, ref_grads[name], name=f"grad {name}")


@pytest.mark.parametrize("where", ["block", "submodule", "final_norm"])
def test_fast_path_skips_blocks_with_hooks(where):
    """A hook on a block, on any module inside it (FSDP2 shards submodules; adapters wrap qkv) or on the
    final norm must run: the fast path, which calls none of them, steps aside there."""
    model = make_model()
    calls = []
    target = {
        "block": model.local_blocks[0],
        "submodule": model.local_blocks[0].attn.qkv,
        "final_norm": model.norm,
    }[where]
    target.register_forward_pre_hook(lambda module, args: calls.append(1))
    x = random_bytes(1, 9)
    with torch.no_grad():
        expected = reference_logits(model, x)
        calls.clear()
        assert_close(model(x), expected)
    assert calls == [1]


# -- training ------------------------------------------------------------------------------------------
def test_tiny_megabyte_overfits_a_short_text():
    start = time.perf_counter()
    torch.manual_seed(0)
    model = build_model("megabyte", "tiny")
    text = b"MEGABYTE predicts bytes patch by patch: a global model over patches, a local one inside."
    data = torch.tensor(list(text))[None]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(300):
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if loss.item() < 0.1 * losses[0]:
            break
    assert losses[-1] < 0.1 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    assert time.perf_counter() - start < 30


# -- bad inputs ------------------------------------------------------------------------------------------
def test_bad_inputs():
    model = make_model()
    L = model.config.max_seq_len
    with pytest.raises(ValueError, match=r"256\]"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match=r"-1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=f"{L + 1}.*max_seq_len={L}"):
        model(torch.zeros(1, L + 1, dtype=torch.long))
    state = model.init_state(1)
    model.step(torch.zeros(1, L - 2, dtype=torch.long), state)
    with pytest.raises(ValueError, match=f"{L + 1}.*max_seq_len"):
        model.step(torch.zeros(1, 3, dtype=torch.long), state)
    with pytest.raises(ValueError, match="256"):
        model.step(torch.tensor([[300]]), model.init_state(1))
    with pytest.raises(ValueError, match="batch"):
        model.step(torch.zeros(2, 1, dtype=torch.long), model.init_state(1))
    with pytest.raises(TypeError, match="init_state"):
        model.step(torch.zeros(1, 1, dtype=torch.long), longseq.ModelState(layers=[], batch_size=1))
    for bad in (0, -4):
        with pytest.raises(ValueError, match=f"patch_size.*{bad}"):
            build_model("megabyte", "tiny", patch_size=bad)
    with pytest.raises(ValueError, match="max_seq_len=1001.*patch_size=4"):
        build_model("megabyte", "tiny", max_seq_len=1001)
    with pytest.raises(ValueError, match="d_global=66"):
        build_model("megabyte", "tiny", d_global=66)
    with pytest.raises(ValueError, match="global_backbone.*'mamba'"):
        build_model("megabyte", "tiny", global_backbone="mamba")
    with pytest.raises(ValueError, match="d_model"):
        build_model("megabyte", "tiny", d_model=999)
    with pytest.raises(ValueError, match="unknown megabyte preset"):
        build_model("megabyte", "huge")
    with pytest.raises(TypeError, match="CachePolicy"):
        model.init_state(1, cache="tova")


# -- generation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("global_backbone", ["transformer", "gla"])
@pytest.mark.parametrize("prompt_len", [6, 8])  # ends mid-patch / at a patch boundary
def test_generate_matches_greedy_recompute(global_backbone, prompt_len):
    model = make_model(global_backbone, "transformer")
    prompt = random_bytes(2, prompt_len, seed=3)
    out = longseq.generate(model, prompt, 11, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(11):  # full recompute: the reference the cached path must match
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    text = longseq.generate(model.float(), "hello", 5, temperature=1.0, top_k=20, seed=0)
    assert text.shape == (1, 10) and int(text.max()) < 256


def test_a_prefill_reserves_patch_slots_in_the_global_caches_and_bytes_in_none():
    """The global model takes one position per patch: a prefill of T bytes reserves T // P + 2 slots in each
    global Full cache (not T), the local caches stay at one patch, and the last logits equal the forward's."""
    from longseq.generate.prefill import prefill

    model = make_model()
    P, T = model.config.patch_size, 61
    ids = random_bytes(2, T)
    logits, state = prefill(model, ids, Full(), chunk=16)
    assert [layer.capacity for layer in state.global_layers] == [T // P + 2] * model.config.n_global_layers
    assert all(layer.capacity <= P for layer in state.local_layers)
    with torch.no_grad():
        assert_close(logits, model(ids)[:, -1])

"""The fused one-token block kernels (:mod:`longseq.ops.decode_block`) against their PyTorch references,
and the models' fused decode step against the module path and the full-sequence forward.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest before Triton
is first imported) on small shapes, including widths that are not powers of two and the looped GEMV path;
outputs are allocated NaN-filled, so an element a kernel forgets to write fails. The model tests force the
fused path onto CPU tensors (``FORCE_FUSED_STEP``); the ``gpu`` tests run it compiled.
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
from longseq.generate import generate, prefill_rows  # noqa: E402
from longseq.nn import fused as fused_step  # noqa: E402
from longseq.nn.blocks import TransformerBlock  # noqa: E402
from longseq.ops import decode_block  # noqa: E402
from longseq.ops.decode_block import kernels  # noqa: E402
from longseq.testing import assert_close, triton_interpreter_problem  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
_problem = triton_interpreter_problem(kernels.gemv_kernel)
pytestmark = pytest.mark.skipif(_problem is not None, reason=str(_problem))
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


@pytest.fixture
def poison(monkeypatch):
    """``torch.empty`` inside the kernel wrappers returns NaN-filled memory."""
    empty = torch.empty

    def nan_empty(*a, **kw):
        t = empty(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(kernels.torch, "empty", nan_empty)


def _inputs(B, D, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(DEVICE, dtype)
    w = (torch.randn(N, D, generator=g) * D**-0.5).to(DEVICE, dtype)
    nw = (1 + 0.3 * torch.randn(D, generator=g)).to(DEVICE, dtype)
    return x, w, nw


SHAPES = [(1, 64, 48), (3, 48, 20), (2, 40, 72)]  # (B, D, N): widths off the power-of-two tiles too
# bf16 only compiled: Triton's interpreter converts fp32 to bf16 by truncation, not rounding to nearest,
# which alone puts it 5x further from the exact result than the module path (checked against fp64).
DTYPES = [torch.float32, torch.bfloat16] if HAS_CUDA else [torch.float32]


@pytest.fixture(params=["one block, small programs", "one block, large programs", "looped"])
def gemv_path(request, monkeypatch):
    """Every kernel configuration: the reduction dim in one block (2-row and 8-row programs), or in a loop of
    16-wide blocks."""
    if request.param != "one block, small programs":
        monkeypatch.setattr(kernels, "SMALL_WEIGHT", 0)
    if request.param == "looped":
        monkeypatch.setattr(kernels, "MAX_BLOCK_D", 16)
    return request.param


@pytest.mark.parametrize("B,D,N", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm", [True, False])
def test_norm_linear_matches_reference(B, D, N, dtype, with_norm, gemv_path, poison):
    x, w, nw = _inputs(B, D, N, dtype)
    nw = nw if with_norm else None
    out = decode_block.norm_linear(x, w, nw, 1e-5)
    assert out.dtype == dtype and out.shape == (B, N)
    assert_close(out, decode_block.norm_linear_reference(x, w, nw, 1e-5), name="norm_linear")


@pytest.mark.parametrize("B,D,N", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_residual_matches_reference(B, D, N, dtype, gemv_path, poison):
    a, w, _ = _inputs(B, D, N, dtype)
    res = torch.randn(B, N).to(DEVICE, dtype)
    out = decode_block.linear_residual(a, w, res)
    assert_close(out, decode_block.linear_residual_reference(a, w, res), name="linear_residual")
    # The residual really enters: a zero weight gives it back exactly.
    assert torch.equal(decode_block.linear_residual(a, torch.zeros_like(w), res), res)


@pytest.mark.parametrize("B,D,N", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_swiglu_matches_reference(B, D, N, dtype, gemv_path, poison):
    x, w, nw = _inputs(B, D, 2 * N, dtype)
    out = decode_block.norm_swiglu(x, nw, 1e-5, w)
    assert out.shape == (B, N)
    assert_close(out, decode_block.norm_swiglu_reference(x, nw, 1e-5, w), name="norm_swiglu")


def test_gemv_rows_of_a_strided_batch(poison):
    """Rows are read with their own stride (a ``h[:, 0]`` view of ``[B, 1, D]`` and a column slice)."""
    x, w, nw = _inputs(3, 32, 24, torch.float32)
    wide = torch.randn(3, 2, 64).to(DEVICE)
    wide[:, 1, :32] = x
    view = wide[:, 1, :32]
    assert_close(decode_block.norm_linear(view, w, nw), decode_block.norm_linear_reference(x, w, nw, 1e-5))


def _cache_case(B, H, Hkv, S, D, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, (H + 2 * Hkv) * D, generator=g).to(DEVICE)
    k = torch.randn(B, Hkv, S, D, generator=g).to(DEVICE)
    v = torch.randn(B, Hkv, S, D, generator=g).to(DEVICE)
    sp = torch.randint(-1, S, (B, groups, S), generator=g).to(DEVICE)
    inv_freq = (10000.0 ** -(torch.arange(0, D, 2, dtype=torch.float64) / D)).float().to(DEVICE)
    return qkv, k, v, sp, inv_freq


@pytest.mark.parametrize("H,Hkv,groups", [(4, 2, 1), (4, 2, 2), (2, 2, 1), (3, 1, 1)])
def test_patch_attention_matches_reference(H, Hkv, groups, poison):
    """RoPE at in-patch position p, the write to slot p, the slot positions (j <= p, else -1) and attention
    over slots 0..p -- per row at its own p, including the first and the last slot of the patch."""
    B, S, D = 4, 8, 16
    qkv, k, v, sp, inv_freq = _cache_case(B, H, Hkv, S, D, groups)
    p = torch.tensor([0, 3, 7, 5], device=DEVICE)
    ref_k, ref_v, ref_sp = k.clone(), v.clone(), sp.clone()
    expected = decode_block.patch_attention_reference(qkv, p, ref_k, ref_v, ref_sp, H, Hkv, inv_freq)
    out = decode_block.patch_attention(qkv, p, k, v, sp, H, Hkv, inv_freq)
    assert_close(out, expected, name="o")
    assert_close(k, ref_k, name="k cache")
    assert torch.equal(v, ref_v) and torch.equal(sp, ref_sp)
    # Independent check of the definition: row 0 (p = 0) sees only its own value.
    assert_close(out[0].view(H, D), v[0, torch.arange(H) // (H // Hkv), 0], name="p = 0 output")


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_rope_write_matches_reference(with_mask, groups, poison):
    B, H, Hkv, S, D = 3, 4, 2, 12, 16
    qkv, k, v, sp, inv_freq = _cache_case(B, H, Hkv, S, D, groups, seed=1)
    pos = torch.tensor([0, 11, 6], device=DEVICE)
    mask = torch.tensor([True, False, True], device=DEVICE) if with_mask else None
    ref = [k.clone(), v.clone(), sp.clone()]
    expected = decode_block.rope_write_reference(qkv, pos, mask, *ref, H, Hkv, inv_freq)
    q = decode_block.rope_write(qkv, pos, mask, k, v, sp, H, Hkv, inv_freq)
    assert q.shape == (B, H, 1, D)
    assert_close(q, expected, name="q")
    assert_close(k, ref[0], name="k cache")
    assert torch.equal(v, ref[1]) and torch.equal(sp, ref[2])
    if with_mask:
        assert (sp[1, :, 11] == -1).all() and (sp[2, :, 6] == 6).all()


def test_bad_inputs_raise_before_any_work():
    x, w, nw = _inputs(2, 32, 16, torch.float32)
    with pytest.raises(ValueError, match=r"x must be \[B, 32\]"):
        decode_block.norm_linear(x[:, :31], w, nw)
    with pytest.raises(ValueError, match="must match the activations"):
        decode_block.norm_linear(x, w.double(), nw)
    with pytest.raises(ValueError, match="residual must be"):
        decode_block.linear_residual(x[:, :16], w.T.contiguous(), torch.zeros(2, 31, device=DEVICE))
    with pytest.raises(ValueError, match="even number of rows"):
        decode_block.norm_swiglu(x, nw, 1e-5, w[:15])
    qkv, k, v, sp, inv_freq = _cache_case(2, 4, 2, 8, 16, 1)
    before = k.clone()
    with pytest.raises(ValueError, match="caches must be"):
        decode_block.patch_attention(qkv, torch.zeros(2, dtype=torch.long), k[:, :1], v, sp, 4, 2, inv_freq)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        decode_block.rope_write(qkv[:, :96], torch.zeros(2, dtype=torch.long), None, k[..., :12], v[..., :12],
                                sp, 4, 2, inv_freq)
    with pytest.raises(ValueError, match="slot_pos must be"):
        decode_block.rope_write(qkv, torch.zeros(2, dtype=torch.long), None, k, v, sp[:, :, :5], 4, 2, inv_freq)
    with pytest.raises(ValueError, match="row_mask must be"):
        decode_block.rope_write(qkv, torch.zeros(2, dtype=torch.long), torch.ones(3, dtype=torch.bool), k, v, sp,
                                4, 2, inv_freq)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        decode_block.patch_attention(qkv, torch.zeros(2, dtype=torch.long), k, v, sp, 3, 2, inv_freq)
    with pytest.raises(ValueError, match="norm_weight must be"):
        decode_block.norm_linear(x, w, nw[:31])
    with pytest.raises(ValueError, match=r"p must be a \[B=2\] integer tensor"):
        decode_block.patch_attention(qkv, torch.zeros(2), k, v, sp, 4, 2, inv_freq)
    with pytest.raises(ValueError, match="pos must be"):
        decode_block.rope_write(qkv, torch.zeros(2, 1, dtype=torch.long), None, k, v, sp, 4, 2, inv_freq)
    assert torch.equal(k, before)


# -- the models' fused step --------------------------------------------------------------------------
CASES = [
    ("transformer", {}),
    ("megabyte", dict(global_backbone="transformer")),
    ("megabyte", dict(global_backbone="gla")),  # local Transformer fused, GLA global on its own path
]


def _static_logits(model, rows, new, fused, monkeypatch, max_len=64):
    if not HAS_CUDA:  # 8-row programs: a quarter of the interpreted programs (both kinds are tested above)
        monkeypatch.setattr(kernels, "SMALL_WEIGHT", 0)
    monkeypatch.setattr(fused_step, "FORCE_FUSED_STEP", fused)
    monkeypatch.setattr(fused_step, "FUSED_STEP_MAX_ROWS", 8 if fused else 0)
    with torch.no_grad():
        state = model.init_state(len(rows), max_len=max_len)
        prefill_rows(model, state, rows, None)
        logits = torch.cat([model.step(new[:, j : j + 1], state)[0] for j in range(new.shape[1])], 1)
    return logits, state


def _count_fused_calls(monkeypatch):
    calls = {"n": 0}
    gemv = kernels.gemv

    def counted(*a, **kw):
        calls["n"] += 1
        return gemv(*a, **kw)

    monkeypatch.setattr(kernels, "gemv", counted)
    return calls


@pytest.mark.parametrize("kind,overrides", CASES)
def test_fused_step_matches_module_path_and_forward(kind, overrides, monkeypatch):
    """Rows at different positions (MEGABYTE: different phases of the patch, so the global step runs for
    some rows only): every step's logits and the caches equal the module path's, and the forward's."""
    torch.manual_seed(0)
    model = build_model(kind, "tiny", **overrides).eval()
    g = torch.Generator().manual_seed(1)
    lengths = [5, 8, 11]
    rows = [torch.randint(0, 256, (1, n), generator=g) for n in lengths]
    new = torch.randint(0, 256, (3, 9), generator=g)
    calls = _count_fused_calls(monkeypatch)
    fused, fused_state = _static_logits(model, rows, new, True, monkeypatch)
    assert calls["n"] > 0, "the fused path did not run"
    n_fused = calls["n"]
    plain, plain_state = _static_logits(model, rows, new, False, monkeypatch)
    assert calls["n"] == n_fused, "the module path ran fused kernels"
    assert_close(fused, plain, name="fused vs module logits")
    for a, b in zip(fused_state.layers, plain_state.layers, strict=True):
        if hasattr(a, "k"):
            assert_close(a.k, b.k, name="k cache")
            assert torch.equal(a.slot_pos, b.slot_pos)
            assert len(a) == len(b)
    with torch.no_grad():
        for i, r in enumerate(rows):
            full = model(torch.cat([r, new[i : i + 1]], 1))[:, r.shape[1] :]
            assert_close(fused[i : i + 1], full, name=f"row {i} vs forward")


def test_fused_generation_gives_the_module_path_tokens(monkeypatch):
    torch.manual_seed(0)
    model = build_model("megabyte", "tiny").eval()
    prompt = torch.randint(0, 256, (1, 10))
    out = {}
    monkeypatch.setattr(kernels, "SMALL_WEIGHT", 0)
    for fused in (True, False):
        monkeypatch.setattr(fused_step, "FORCE_FUSED_STEP", fused)
        out[fused] = generate(model, prompt, 12, temperature=0, static=True)
    assert torch.equal(out[True], out[False])


def test_fused_step_is_skipped_where_it_would_bypass_something(monkeypatch):
    monkeypatch.setattr(fused_step, "FORCE_FUSED_STEP", True)
    model = build_model("transformer", "tiny").eval()
    block = model.blocks[0]
    assert isinstance(block, TransformerBlock)
    h = torch.randn(2, 1, model.config.d_model)
    with torch.no_grad():
        assert block.can_fuse_step(h)
        assert not block.can_fuse_step(torch.randn(2, 3, model.config.d_model))  # several tokens
        assert not block.can_fuse_step(torch.randn(9, 1, model.config.d_model))  # too many rows
        assert not block.can_fuse_step(h.double())  # weights in another dtype
        handle = block.attn.out.register_forward_hook(lambda *a: None)
        assert not block.can_fuse_step(h)  # a hook would be skipped
        handle.remove()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not block.can_fuse_step(h)

        class Adapter(torch.nn.Linear):
            pass

        class Wrapper(torch.nn.Module):  # LoRA-style: holds the Linear, adds its own term
            def __init__(self, base):
                super().__init__()
                self.base, self.weight = base, base.weight

            def forward(self, x):
                return self.base(x) + 1.0

        original = block.mlp.down
        block.mlp.down = Adapter(original.in_features, original.out_features, bias=False)
        assert not block.can_fuse_step(h)  # a subclass's forward would be skipped
        block.mlp.down = Wrapper(original)
        assert not block.can_fuse_step(h)  # so would a wrapper's
        block.mlp.down = original
        block.mlp_norm.weight.requires_grad_(False)
        assert not block.can_fuse_step(h.double())  # float64: the kernels sum in fp32
        model.double()
        assert not block.can_fuse_step(h.double())
        model.float()
    assert not block.can_fuse_step(h)  # autograd on the weights
    for p in model.parameters():
        p.requires_grad_(False)
    assert block.can_fuse_step(h)
    assert not block.can_fuse_step(h.clone().requires_grad_(True))  # autograd on the input
    block.mlp_norm.weight.requires_grad_(True)
    assert not block.can_fuse_step(h)  # autograd on a norm weight (not only on the projections)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind,overrides", CASES)
def test_fused_step_on_gpu_matches_module_path(kind, overrides, monkeypatch):
    """Compiled kernels in fp32 (tight) and bf16 (the module path's own rounding points: same tolerance as
    the module path against the forward)."""
    torch.manual_seed(0)
    for dtype, rtol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        model = build_model(kind, "tiny", **overrides).to(DEVICE, dtype).eval()
        g = torch.Generator().manual_seed(1)
        rows = [torch.randint(0, 256, (1, n), generator=g).to(DEVICE) for n in (5, 8, 11)]
        new = torch.randint(0, 256, (3, 9), generator=g).to(DEVICE)
        fused, _ = _static_logits(model, rows, new, True, monkeypatch)
        plain, _ = _static_logits(model, rows, new, False, monkeypatch)
        assert_close(fused.float(), plain.float(), rtol=rtol, name=f"{dtype} fused vs module")

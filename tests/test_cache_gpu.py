"""Cache policies on CUDA against the same model on the CPU (GPU-marked).

The CPU path is checked exactly against brute-force references (test_cache_policies.py); this file checks
that the CUDA path (scatter/gather of per-head slots, SDPA with masks) makes the same decisions at a
realistic size: a small reproduction run once scored TOVA-head far worse on the GPU than any CPU test
allows, so this comparison is kept as a regression test.
"""

from __future__ import annotations

import pytest
import torch

import longseq
from longseq.cache import H2O, TOVA, Full, Sink, Window
from longseq.testing import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

POLICIES = [Full(), Window(64), Sink(64), H2O(64), TOVA(64), TOVA(64, per_head=True)]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.spec)
def test_cuda_matches_cpu_at_realistic_size(policy):
    torch.manual_seed(0)
    model = longseq.build_model("transformer", "small", d_model=384, n_layers=4, n_heads=6).eval()
    ids = torch.randint(0, 256, (3, 400))
    results = {}
    for device in ("cpu", "cuda"):
        m = model.to(device)
        with torch.inference_mode():
            state = m.init_state(3, cache=policy)
            logits = torch.cat([m.step(ids[:, a : a + 128].to(device), state)[0] for a in range(0, 400, 128)], 1)
        results[device] = (logits.cpu(), [state.kept_positions(i).cpu() for i in range(len(m.blocks))])
    assert_close(results["cuda"][0], results["cpu"][0], rtol=1e-3, name=f"{policy.spec} logits")
    for layer, (a, b) in enumerate(zip(results["cuda"][1], results["cpu"][1], strict=True)):
        agree = (a == b).float().mean().item()
        assert agree > 0.97, f"{policy.spec} layer {layer}: only {agree:.1%} of kept positions agree"

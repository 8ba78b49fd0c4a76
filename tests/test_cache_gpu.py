"""Cache policies on CUDA against the same model on the CPU (GPU-marked).

The CPU path is checked exactly against brute-force references (test_cache_policies.py). This file checks
that the CUDA path (per-head slot scatter/gather, SDPA with masks) takes the same decisions. It runs a
float64 model with peaked attention (the reference tests' ``tiny_model``, at a larger size), where
eviction decisions are not decided by rounding, so kept positions must be identical on both devices.
"""

from __future__ import annotations

import pytest
import torch

from longseq.cache import H2O, TOVA, Full, Sink, Window
from longseq.testing import assert_close
from test_cache_policies import tiny_model  # tests/ is on sys.path: one definition of the peaked model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

POLICIES = [Full(), Window(48), Sink(48), H2O(48), TOVA(48), TOVA(48, per_head=True)]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.spec)
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_cuda_takes_the_same_decisions_as_cpu(policy, n_kv_heads):
    model = tiny_model(n_heads=4, n_kv_heads=n_kv_heads, d_model=64)
    ids = torch.randint(0, 256, (3, 300), generator=torch.Generator().manual_seed(0))
    results = {}
    for device in ("cpu", "cuda"):
        m = model.to(device)
        with torch.inference_mode():
            state = m.init_state(3, cache=policy)
            logits = torch.cat([m.step(ids[:, a : a + 128].to(device), state)[0] for a in range(0, 300, 128)], 1)
        results[device] = (logits.cpu(), [state.kept_positions(i).cpu() for i in range(len(m.blocks))])
    assert_close(results["cuda"][0], results["cpu"][0], rtol=1e-9, name=f"{policy.spec} logits")
    for layer, (a, b) in enumerate(zip(results["cuda"][1], results["cpu"][1], strict=True)):
        assert torch.equal(a, b), f"{policy.spec}: layer {layer} keeps different positions on CUDA"

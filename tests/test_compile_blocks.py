"""Regional compilation (``compile_blocks``): one graph per block kind, the eager model's values and gradients, and
``longseq train --compile`` training through it."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from longseq.models import build_model, compile_blocks
from longseq.testing import assert_close
from longseq.train import TrainConfig, train
from test_train import make_corpus  # tests/ is on sys.path (pytest rootdir-relative imports)

pytestmark = pytest.mark.slow


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("kind, overrides, blocks, graphs", [
    ("transformer", {"n_layers": 3}, 3, 1),
    ("hybrid", {"n_layers": 4, "attn_every": 2}, 4, 2),  # GLA and attention blocks: one graph each
    ("megabyte", {"n_global_layers": 2, "n_local_layers": 2}, 4, 2),  # one block kind at two widths
])
def test_blocks_of_one_kind_share_one_graph_and_match_eager_in_float64(kind, overrides, blocks, graphs):
    """Every block of a kind and shape reuses one compiled graph (a 28-layer model compiles in one layer's time),
    and the compiled model's logits and every parameter's gradient equal the eager model's, both in float64."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_model(kind, "tiny", **overrides).double()
    compiled = copy.deepcopy(eager)
    before = _unique_graphs()
    assert compile_blocks(compiled, dynamic=False) == blocks
    x = torch.randint(0, eager.config.vocab_size, (2, 24))
    outs = []
    for model in (eager, compiled):
        logits = model(x)
        logits.square().mean().backward()
        outs.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    assert _unique_graphs() - before == graphs
    assert_close(outs[1][0], outs[0][0], rtol=1e-10, name="logits")
    for name, grad in outs[0][1].items():
        assert_close(outs[1][1][name], grad, rtol=1e-10, atol=1e-30, name=f"grad {name}")
    # the state dict is the eager model's: checkpoints of a compiled run load into a plain model
    assert list(compiled.state_dict()) == list(eager.state_dict())


def test_train_compile_trains_the_same_run_through_compiled_blocks(tmp_path):
    """`longseq train --compile` (TrainConfig.compile) trains through compiled blocks, one graph for the GLA model's
    two blocks (validation runs eager: no graph for its grad mode and batch shapes), and trains the same run as
    eager: equal losses step by step (fp32: to rounding) and a checkpoint with the same keys and values."""
    from safetensors.torch import load_file
    corpus = make_corpus(tmp_path / "corpus")
    losses, weights = {}, {}
    for compile in (False, True):
        torch._dynamo.reset()
        before = _unique_graphs()
        out = tmp_path / f"run_compile_{compile}"
        train(TrainConfig(out=str(out), data=[str(corpus)], val_docs=["doc3"], overrides={"n_layers": 2}, seq_len=32,
                          batch_size=4, steps=3, log_every=1, eval_tokens=256, progress=False, device="cpu",
                          compile=compile))
        assert _unique_graphs() - before == (1 if compile else 0)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[compile] = torch.tensor([r["loss"] for r in rows if "loss" in r], dtype=torch.float64)
        weights[compile] = load_file(out / "checkpoints" / "step_00000003" / "model.safetensors")
    assert len(losses[True]) == 3
    assert_close(losses[True], losses[False], rtol=1e-4, name="losses")
    assert list(weights[True]) == list(weights[False])
    for name, w in weights[False].items():
        assert_close(weights[True][name], w, rtol=1e-3, atol=1e-6, name=name)

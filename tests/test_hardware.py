"""The kernels launch on their tensors' device: Triton launches on the *current* CUDA device, so each public op that
launches kernels makes its first argument's device current (``longseq.ops.hardware.on_first_arg_device``)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from longseq.ops import hardware


def test_on_first_arg_device_enters_the_first_arguments_device_and_passes_everything_through(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def recording(x):
        entered.append(x)
        yield

    monkeypatch.setattr(hardware, "device_of", recording)

    @hardware.on_first_arg_device
    def op(x, y, *, z=0):
        """doc"""
        assert entered == [x]  # inside the context
        return x + y + z

    a = torch.ones(2)
    torch.testing.assert_close(op(a, 2.0, z=3.0), torch.full((2,), 6.0))
    assert entered == [a] and op.__doc__ == "doc" and op.__name__ == "op"


def test_every_public_launcher_switches_to_its_tensors_device():
    from longseq.ops.decode_attention import decode_attention
    from longseq.ops.decode_block import kernels
    from longseq.ops.eviction_replay.kernel import replay_evictions

    launchers = [decode_attention, replay_evictions, kernels.gemv, kernels.patch_attention, kernels.rope_write,
                 kernels.evict]
    assert all(getattr(f, "__wrapped__", None) is not None and f.__code__.co_name == "on_device" for f in launchers)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_decode_attention_on_the_second_gpu_while_the_first_is_current():
    from longseq.ops.decode_attention import decode_attention, decode_attention_reference

    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(2, 4, 1, 64, device=dev, generator=g)
    k, v = (torch.randn(2, 2, 300, 64, device=dev, generator=g) for _ in range(2))
    got = decode_attention(q, k, v, None, None)
    torch.testing.assert_close(got, decode_attention_reference(q, k, v, None, None), rtol=1e-4, atol=1e-4)
    assert torch.cuda.current_device() == 0

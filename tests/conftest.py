"""Shared test setup.

* One intra-op thread: these tests run many tiny ops, and on a 2-core CI machine OpenMP threads that
  spin-wait for each other made some files 20-50x slower whenever anything else was running. The
  variable is set for subprocesses (CLI, torchrun) too.
* Without CUDA, Triton kernels run in Triton's interpreter. ``triton.jit`` reads TRITON_INTERPRET when a
  kernel module is imported, and any test file may import them first (through longseq or transformers),
  so it is set here, before every test module.
* Corpora are cached in a per-session temporary directory, never in ~/.cache.
"""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _corpus_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LONGSEQ_CACHE", str(tmp_path_factory.getbasetemp() / "longseq-cache"))

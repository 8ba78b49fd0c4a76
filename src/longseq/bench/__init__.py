"""Model-level benchmarks (``longseq bench``).

* :mod:`.train` -- training tokens/s and peak memory, and generation tokens/s (``longseq bench [train]``);
* :mod:`.decode` -- the decode benchmark: prefill, ms per step, tokens/s and peak memory per model x cache
  policy x context x batch size (``longseq bench decode``);
* :mod:`.baselines` -- the HF / fla reference implementations the decode benchmark compares against;
* :mod:`.timing` and :mod:`.report` -- synchronized timing, memory and out-of-memory handling, and what a
  report says about its machine.
"""

from .decode import bench_decode_longseq, decode_markdown, decode_warmup, run_decode_bench
from .train import bench_generate, bench_train, markdown_table, run_bench

__all__ = [
    "bench_decode_longseq", "bench_generate", "bench_train", "decode_markdown", "decode_warmup",
    "markdown_table", "run_bench", "run_decode_bench",
]

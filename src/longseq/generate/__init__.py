"""Sampling from any longseq model through its recurrent state: the past is never recomputed.

:func:`generate` prefills each prompt (chunked, uncaptured), then decodes all rows together one token per
step. Three paths share one loop:

* dynamic (default for one prompt or equal-length prompts): the state grows as before;
* static (prompts of different lengths, or ``compile=True``): ``init_state(B, max_len=N)`` buffers, each
  prompt prefilled on its own into a dynamic state and loaded into its row, per-row positions;
* captured (``compile=True`` on CUDA): the static decode step -- model step + sampling + feeding the
  token back -- is captured once as a ``torch.cuda.CUDAGraph`` per batch size (and per
  :meth:`~longseq.models.base.LanguageModel.decode_key`: MEGABYTE has a second graph for the steps in
  which its global model runs) and replayed; graphs and static buffers are kept on the model and reused by
  later calls of the same shape.
* fused (``compile="fused"`` on CUDA): as captured, but the step is first compiled with ``torch.compile``
  (Inductor), so the graph replays a few fused kernels per layer instead of one launch per elementwise
  op -- at batch 1 a decode step is a chain of tiny kernels, and their number is its cost.

Sampling is graph-safe everywhere: the exponential race (Gumbel-max) ``argmax(logits / T - log E)``
with ``E ~ Exp(1)`` drawn into a fixed buffer *before* each step, so the step itself has no RNG call,
no ``torch.multinomial`` and no host sync, and eager and captured runs draw the same tokens.
"""

from .api import generate
from .decoder import COMPILE_MODES, Decoder, capture_count, clear_decode_cache, compile_mode
from .prefill import GROUP_PREFILL_TOKENS, GROUP_STATE_BYTES, prefill, prefill_rows
from .sampling import as_token_ids, check_sampling, exponential_noise, sample_next, sample_race

__all__ = [
    "COMPILE_MODES", "Decoder", "GROUP_PREFILL_TOKENS", "GROUP_STATE_BYTES", "as_token_ids", "capture_count",
    "check_sampling", "clear_decode_cache", "compile_mode", "exponential_noise", "generate", "prefill",
    "prefill_rows", "sample_next", "sample_race",
]

"""HF ``generate()`` with transformers' full cache versus a longseq TOVA cache: speed, memory, running out.

A Llama-style model (default ~0.8B parameters: hidden 2048, 16 layers, 32 query / 8 kv heads, MLP 5632,
vocabulary 32000, tied embeddings, SDPA) is built from a config with random bf16 weights -- nothing is
downloaded; speed and memory do not depend on the weights. One batch of random prompts is used throughout;
context ``L`` is its first ``L`` tokens. For every context (ascending) and cache:

* ``hf-dynamic``: transformers' own ``DynamicCache`` with SDPA -- the full cache HF users decode with today;
* ``full``: ``longseq.hf.cache(model, Full())`` (same attention through longseq's KVCache; not by default);
* ``tova:512`` (any longseq spec): a bounded cache of fixed size,

``model.generate(max_new_tokens=N)`` runs greedily. A logits processor timestamps every step (after a CUDA
sync), which separates the prefill (prompt -> first token) from decoding in ONE call: decode tokens/s is
``batch x (N - 1 - warmup) / time``, the first ``--warmup`` decode steps untimed. Peak GPU memory
(``max_memory_allocated``) is reported for the prefill and, reset after the first token, for decoding; the
cache's own bytes after the run. A run that raises ``torch.OutOfMemoryError`` is recorded as ``OOM`` (with the
phase and how many tokens the cache held), memory is freed and the benchmark goes on.

Running out (CUDA)
------------------
Unless ``--batch`` is given, the batch is chosen from the free GPU memory (``torch.cuda.mem_get_info`` after
the model is loaded, or ``--memory-limit-gib`` enforced with ``torch.cuda.set_per_process_memory_fraction``)
so that the full KV cache at the largest context alone is ``--oom-factor`` (1.15) times that memory: the full
cache fits at 8K and 16K and runs out at 32K, while TOVA(512) at the same batch holds ``budget`` tokens per
layer and its peak memory is the same at every context. Prefill goes in chunks of ``--prefill-chunk`` tokens
(default: about ``--tokens-per-forward`` / batch) so activations do not grow with the context either.

Prefill of bounded caches
-------------------------
Exact (default): the prompt goes through the policy token by token, as everywhere in longseq (TOVA scores
and evicts one token per token and layer once ``budget`` are kept -- per-token Python steps, so this is
the slow part: ~16 x (L - 512) eviction steps). Chunking does not change the result (``KVCache.attend`` is
exact per token whatever the chunk). To fit the time budget the exact prefill is done once, incrementally:
the cache is prefilled with ``model(...)`` in chunks up to ``L - 1`` tokens, a copy is parked in CPU memory,
and ``generate`` is called with the whole ``L``-token prompt and that cache (it feeds the last prompt token,
then decodes); the next context resumes from the parked copy. The prefill time reported for ``L`` is the
sum of its segments (what one prefill from scratch costs); ``--no-prefix-reuse`` instead prefills every
context from scratch inside ``generate`` (``prefill_chunk_size``). ``--fast-prefill`` prefills with full
attention (a ``Full()`` longseq cache) and keeps the last ``budget`` tokens per layer -- an approximation
whose prefill memory is the full cache's, so it runs out where the full cache does. Every bounded row
carries ``kept_sha1`` (a hash of every layer's kept positions) to check that two modes decided alike.

Cost of the exact prefill: one eviction step is ~40 small tensor ops, ~0.1 ms on a CPU at tiny sizes and
(launch-bound, nearly independent of the batch) an estimated 0.15-0.25 ms on a GPU, linear in
``layers x (L - budget)``: 16 x 32K steps, ~80-130 s for the 32K prefix. The script prints the measured
rate and the time left for the longest context after each segment.

GPU (the lead runs this; ~3-5 minutes):
    python benchmarks/bench_hf_cache.py --out results/hf_cache
    python benchmarks/bench_hf_cache.py --memory-limit-gib 40 --out results/hf_cache_40g   # any card
CPU smoke test (every path, the out-of-memory one through a simulated memory limit):
    python benchmarks/bench_hf_cache.py --small --device cpu --out /tmp/hf_cache_small
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import longseq
import longseq.hf as lh
from longseq.bench.timing import is_oom, release_memory, sync
from longseq.cache import CachePolicy, Full, KVCache, parse_policy

GIB = 2**30
MIB = 2**20


@dataclass
class Result:
    cache: str
    context: int
    batch: int
    prefill: str  # "chunked (generate)", "exact, prefix reused", "exact (generate)", "fast (...)"
    status: str  # "ok", "OOM" or "skipped"
    oom_phase: str | None = None  # "prefill" / "decode"
    oom_at_tokens: int | None = None  # tokens per row the cache held when memory ran out
    prefill_s: float | None = None  # prompt -> first token
    prefill_tok_s: float | None = None  # batch x context / prefill_s
    decode_tok_s: float | None = None  # batch x timed steps / time
    ms_per_step: float | None = None
    decode_steps_timed: int | None = None
    prefill_peak_bytes: int | None = None  # None on CPU (not measured)
    decode_peak_bytes: int | None = None
    cache_bytes: int | None = None  # the cache's own tensors after the run
    tokens_sha1: str | None = None  # of the generated tokens
    kept_sha1: str | None = None  # of every layer's kept positions after the run (compare prefill modes)
    note: str | None = None


# -- small helpers ------------------------------------------------------------------------------------
def reset_peak(device: torch.device) -> None:
    release_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def gib(x: int | None) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def human(x: int | None) -> str:
    if x is None:
        return "-"
    return f"{x / GIB:.2f} GiB" if x >= GIB // 4 else f"{x / MIB:.2f} MiB"


def log(msg: str) -> None:
    print(msg, flush=True)


def cache_bytes(cache: Any) -> int:
    if isinstance(cache, lh.LongseqCache):
        return cache.nbytes()
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(t, torch.Tensor)
    )


def tokens_sha1(seq: torch.Tensor, n_new: int) -> str:
    return hashlib.sha1(seq[:, -n_new:].cpu().numpy().tobytes()).hexdigest()[:12]


def kept_sha1(cache: Any) -> str | None:
    """Hash of the positions every layer keeps: equal for two prefill modes that made the same decisions."""
    if not isinstance(cache, lh.LongseqCache):
        return None
    h = hashlib.sha1()
    for i in range(len(cache.layers)):
        h.update(cache.kept_positions(i).cpu().numpy().tobytes())
    return h.hexdigest()[:12]


class Monitor:
    """A forward pre-hook on the model: progress lines while prefilling (every ``every_s`` seconds) and,
    with ``limit_bytes``, a simulated memory limit -- ``torch.OutOfMemoryError`` once the cache in use holds
    more bytes than that (``--simulate-memory-mib``: the out-of-memory path without a GPU)."""

    def __init__(self, every_s: float, limit_bytes: int | None) -> None:
        self.every_s, self.limit = every_s, limit_bytes
        self.label, self.total, self.fed, self.t0, self.last = "", 0, 0, 0.0, 0.0

    def start(self, label: str, total: int, fed: int = 0) -> None:
        self.label, self.total, self.fed = label, total, fed
        self.t0 = self.last = time.perf_counter()

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        cache = kwargs.get("past_key_values")
        if self.limit is not None and cache is not None and cache_bytes(cache) > self.limit:
            raise torch.OutOfMemoryError(
                f"simulated: the cache holds {cache_bytes(cache)} bytes > --simulate-memory-mib"
            )
        if ids is None or ids.shape[1] <= 1:
            return
        self.fed += ids.shape[1]
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            log(f"    [{self.label}] prefill {self.fed}/{self.total} tokens, {now - self.t0:.1f} s")


def step_clock(device: torch.device) -> Any:
    """A logits processor recording a timestamp per generated token (after a sync); at the first one it also
    records the prefill's peak memory and resets the peak counter for the decode."""
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.prefill_peak: int | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            sync(device)
            self.times.append(time.perf_counter())
            if len(self.times) == 1 and device.type == "cuda":
                self.prefill_peak = peak(device)
                torch.cuda.reset_peak_memory_stats(device)
            return scores

    return StepClock()


# -- model --------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.contexts) + args.new_tokens + 16,
        tie_word_embeddings=True,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a CPU init of ~1B parameters takes minutes
        model = LlamaForCausalLM(cfg).to(args.dtype)
    return model.eval()


def kv_bytes_per_token(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Full-cache bytes per token and sequence: layers x (k, v) x kv heads x head dim x element size."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def choose_batch(args: argparse.Namespace, device: torch.device, per_token: int) -> tuple[int, dict[str, Any]]:
    """The batch at which the full KV cache at the largest context is ``oom_factor`` x the memory available
    (after the model), unless ``--batch`` is given. Also applies ``--memory-limit-gib``."""
    info: dict[str, Any] = {"kv_bytes_per_token_per_row": per_token}
    avail = None
    if args.simulate_memory_mib:
        avail = int(args.simulate_memory_mib * MIB)
    elif device.type == "cuda":
        release_memory(device)
        free, total = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device)
        avail = free
        info.update(gpu_total_bytes=total, gpu_free_bytes_after_model=free, model_reserved_bytes=reserved)
        if args.memory_limit_gib:
            limit = int(args.memory_limit_gib * GIB)
            # The fraction is per device index; a bare "cuda" means the current device.
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), index)
            avail = min(free, limit - reserved)
            info["memory_limit_bytes"] = limit
    if avail is not None:
        info["available_bytes"] = avail
    if args.batch:
        batch = args.batch
    elif avail is not None:
        batch = max(1, math.ceil(args.oom_factor * avail / (per_token * max(args.contexts))))
    else:
        batch = 2
    info["batch"] = batch
    info["full_kv_bytes"] = {str(L): batch * per_token * L for L in args.contexts}
    return batch, info


# -- caches -------------------------------------------------------------------------------------------
def move_cache(cache: lh.LongseqCache, device: torch.device | str) -> lh.LongseqCache:
    """A copy of ``cache`` with every tensor on ``device`` (the model config is shared, not copied)."""
    memo: dict[int, Any] = {id(cache._config): cache._config}
    for layer in cache.layers:
        for obj in (layer, layer.batched, *(layer.rows or [])):
            for value in vars(obj).values() if obj is not None else ():
                if isinstance(value, torch.Tensor):
                    memo[id(value)] = value.to(device, copy=True)
    return copy.deepcopy(cache, memo)


def keep_last(cache: lh.LongseqCache, policy: CachePolicy, n_heads: int) -> lh.LongseqCache:
    """``--fast-prefill``: replace every layer's Full KVCache by a ``policy`` KVCache holding its last
    ``budget`` tokens (keys after RoPE, original positions), filled through ``KVCache.attend`` (they fit, so
    nothing is evicted; the dummy queries' outputs are discarded)."""
    assert policy.budget is not None
    out = lh.LongseqCache(policy, len(cache.layers), cache._config)
    for old, new in zip(cache.layers, out.layers, strict=True):
        full = old.batched
        n = len(full)
        b = min(policy.budget, n)
        k, v = full.k[:, :, n - b : n], full.v[:, :, n - b : n]
        positions = full.slot_pos[:, 0, n - b : n]  # [B, b]
        kv = KVCache(policy)
        kv.attend(k.new_zeros(k.shape[0], n_heads, b, k.shape[-1]), k, v, positions)
        new.batched, new.next_pos, new.seen = kv, old.next_pos.clone(), old.seen
        new.dtype, new.device, new.is_initialized = old.dtype, old.device, True
        old.batched = None  # free the full buffers now
    return out


# -- the runs -----------------------------------------------------------------------------------------
class Bench:
    def __init__(self, model: Any, args: argparse.Namespace, device: torch.device, ids: torch.Tensor) -> None:
        self.model, self.args, self.device, self.ids = model, args, device, ids
        self.batch = ids.shape[0]
        self.monitor = Monitor(args.progress_s, None)
        self.reuse: dict[str, dict[str, Any]] = {}  # spec -> parked prefix state (exact prefill)

    # generate() over a prompt whose first `held` tokens are already in `cache`
    def _generate(
        self,
        cache: Any,
        L: int,
        n_new: int,
        res: Result,
        prior_s: float = 0.0,
        prior_peak: int | None = None,
        chunked: bool = False,
        label: str = "",
    ) -> Any:
        from transformers import LogitsProcessorList

        d, B = self.device, self.batch
        prompt = self.ids[:, :L]
        clock = step_clock(d)
        kwargs: dict[str, Any] = {}
        if chunked:
            kwargs["prefill_chunk_size"] = self.args.prefill_chunk
        self.monitor.start(label, L, cache.get_seq_length())
        sync(d)
        t0 = time.perf_counter()
        try:
            seq = self.model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                past_key_values=cache,
                max_new_tokens=n_new,
                do_sample=False,
                logits_processor=LogitsProcessorList([clock]),
                **kwargs,
            )
        except Exception as e:  # noqa: BLE001 - running out of memory is a result here
            if not is_oom(e):
                raise
            res.status, res.oom_phase = "OOM", "decode" if clock.times else "prefill"
            res.oom_at_tokens = cache.get_seq_length()
            res.note = str(e).splitlines()[0][:200]
            return None
        t = clock.times
        res.prefill_s = prior_s + (t[0] - t0)
        res.prefill_tok_s = B * L / res.prefill_s
        pk = [p for p in (prior_peak, clock.prefill_peak) if p is not None]
        res.prefill_peak_bytes = max(pk) if pk else None
        w = min(self.args.warmup, max(0, len(t) - 2))
        steps = len(t) - 1 - w
        if steps > 0:
            dt = t[-1] - t[w]
            res.decode_tok_s, res.ms_per_step, res.decode_steps_timed = B * steps / dt, 1e3 * dt / steps, steps
        res.decode_peak_bytes = peak(d)
        res.cache_bytes = cache_bytes(cache)
        res.tokens_sha1 = tokens_sha1(seq, n_new)
        res.kept_sha1 = kept_sha1(cache)
        return seq

    def _prefill(self, cache: Any, start: int, stop: int, label: str) -> tuple[float, int | None]:
        """``model(...)`` over prompt tokens ``[start, stop)`` in chunks; returns (seconds, peak). Raises OOM."""
        d, chunk = self.device, self.args.prefill_chunk
        self.monitor.start(label, stop, start)
        sync(d)
        t0 = time.perf_counter()
        for a in range(start, stop, chunk):
            self.model(
                input_ids=self.ids[:, a : min(stop, a + chunk)],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        sync(d)
        return time.perf_counter() - t0, peak(d)

    def run(self, spec: str, L: int, n_new: int | None = None) -> Result:
        args, d = self.args, self.device
        n_new = n_new or args.new_tokens
        label = f"{spec} ctx {L}"
        policy = None if spec == "hf-dynamic" else parse_policy(spec)
        bounded = policy is not None and policy.budget is not None
        if not bounded:
            mode = "chunked (generate)"
        elif args.fast_prefill:
            mode = "fast (full attention, last budget kept)"
        else:
            mode = "exact (generate)" if args.no_prefix_reuse else "exact, prefix reused"
        res = Result(cache=spec, context=L, batch=self.batch, prefill=mode, status="ok")
        reset_peak(d)
        if policy is None:
            from transformers import DynamicCache

            self.model.set_attn_implementation("sdpa")  # transformers' own path (lh.cache switched it)
            cache: Any = DynamicCache(config=self.model.config)
        else:
            cache = lh.cache(self.model, policy)

        if not bounded or (not args.fast_prefill and args.no_prefix_reuse):
            self._generate(cache, L, n_new, res, chunked=True, label=label)
        elif args.fast_prefill:
            full = lh.cache(self.model, Full())
            try:
                s, pk = self._prefill(full, 0, L - 1, label)
                cache = keep_last(full, policy, self.model.config.num_attention_heads)
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                res.status, res.oom_phase, res.oom_at_tokens = "OOM", "prefill", full.get_seq_length()
            full = None
            if res.status == "ok":
                reset_peak(d)
                self._generate(cache, L, n_new, res, prior_s=s, prior_peak=pk, label=label)
        else:
            self._run_reused(spec, cache, L, n_new, res, label)
        cache = None
        release_memory(d)
        return res

    def _run_reused(self, spec: str, cache: lh.LongseqCache, L: int, n_new: int, res: Result, label: str) -> None:
        """Exact prefill, resumed from the parked prefix of the previous (shorter) context."""
        d = self.device
        state = self.reuse.get(spec)
        if state is not None and not state.get("oom") and state["held"] > L - 1:
            state = None  # contexts not ascending (e.g. the warm-up): start over
        if state is not None and state.get("oom"):
            res.status, res.note = "skipped", f"prefill ran out of memory at a shorter context ({state['oom']})"
            return
        if state is not None:
            cache = move_cache(state["cache"], d)
            held, prior_s, prior_peak = state["held"], state["seconds"], state["peak"]
        else:
            held, prior_s, prior_peak = 0, 0.0, None
        try:
            s, pk = self._prefill(cache, held, L - 1, label)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            res.status, res.oom_phase, res.oom_at_tokens = "OOM", "prefill", cache.get_seq_length()
            self.reuse[spec] = {"oom": L}
            return
        peaks = [p for p in (prior_peak, pk) if p is not None]
        state = {
            "cache": move_cache(cache, "cpu"),
            "held": L - 1,
            "seconds": prior_s + s,
            "peak": max(peaks) if peaks else None,
        }
        self.reuse[spec] = state
        if L - 1 > held and s > 0:
            rate = (L - 1 - held) / s
            rest = max(self.args.contexts) - (L - 1)
            log(
                f"    [{label}] exact prefill {rate:.0f} tokens/s per row ({1e3 / rate:.2f} ms per token); "
                f"the rest up to {max(self.args.contexts)} tokens: ~{rest / rate:.0f} s"
            )
        reset_peak(d)
        self._generate(cache, L, n_new, res, prior_s=state["seconds"], prior_peak=state["peak"], label=label)


# -- report -------------------------------------------------------------------------------------------
def status_text(r: Result) -> str:
    if r.status == "OOM":
        at = "" if r.oom_at_tokens is None else f" at {r.oom_at_tokens} tok"
        return f"**OOM** ({r.oom_phase}{at})"
    return r.status


def to_markdown(results: list[Result], meta: dict[str, Any]) -> str:
    m, plan = meta["model"], meta["plan"]
    avail = plan.get("available_bytes")
    lines = [
        f"### HF generate: full cache vs longseq TOVA ({meta['device']})",
        "",
        f"Command: `{meta['command']}`  ",
        f"Model: Llama-style {m['params'] / 1e6:.1f}M parameters (hidden {m['hidden']}, {m['layers']} layers, "
        f"{m['heads']}/{m['kv_heads']} heads), random {m['dtype']} weights, SDPA; batch {meta['batch']}, "
        f"{meta['new_tokens']} new tokens (first {meta['warmup']} decode steps untimed), prefill chunk "
        f"{meta['prefill_chunk']}.  ",
        f"Memory: {human(avail)} available after the model"
        + (f" (limit {meta['memory_limit_gib']} GiB)" if meta.get("memory_limit_gib") else "")
        + (" (simulated)" if meta.get("simulate_memory_mib") else "")
        + "; full KV cache at this batch: "
        + ", ".join(f"{L}: {human(b)}" for L, b in plan["full_kv_bytes"].items())
        + ".  ",
        f"Versions: torch {meta['torch']}, transformers {meta['transformers']}, longseq {meta['longseq']}, "
        f"Python {meta['python']}.",
        "",
        "| cache | context | prefill | status | prefill s | decode tok/s | ms/step | prefill peak GiB "
        "| decode peak GiB | KV cache MiB |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        tps = "-" if r.decode_tok_s is None else f"{r.decode_tok_s:.1f}"
        ms = "-" if r.ms_per_step is None else f"{r.ms_per_step:.2f}"
        pf = "-" if r.prefill_s is None else f"{r.prefill_s:.2f}"
        mb = "-" if r.cache_bytes is None else f"{r.cache_bytes / MIB:.2f}"
        lines.append(
            f"| {r.cache} | {r.context} | {r.prefill} | {status_text(r)} | {pf} | {tps} | {ms} | "
            f"{gib(r.prefill_peak_bytes)} | {gib(r.decode_peak_bytes)} | {mb} |"
        )
    return "\n".join(lines) + "\n"


def write_report(out: str, meta: dict[str, Any], results: list[Result]) -> None:
    """Rewrite OUT.json and OUT.md (atomically) -- after every row, so a timeout keeps what was done."""
    if not out:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "results": [asdict(r) for r in results]}
    for suffix, text in ((".json", json.dumps(report, indent=2) + "\n"), (".md", to_markdown(results, meta))):
        target = path.with_suffix(suffix)
        tmp = target.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)


# -- main ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="weights (default bfloat16; float32 with --small on CPU)",
    )
    p.add_argument(
        "--small",
        action="store_true",
        help="smoke test: a tiny model, contexts 96,192,384, budget 32, 8 new tokens, chunk 40, and "
        "(without a GPU memory limit) a simulated memory limit that the full cache outgrows",
    )
    p.add_argument("--hidden", type=int, default=2048, help="hidden size")
    p.add_argument("--layers", type=int, default=16, help="decoder layers")
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (GQA)")
    p.add_argument("--intermediate", type=int, default=5632, help="MLP hidden size")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    p.add_argument("--contexts", default="8192,16384,32768", help="comma-separated prompt lengths")
    p.add_argument(
        "--caches",
        default="hf-dynamic,tova",
        help="comma-separated: hf-dynamic (transformers DynamicCache, SDPA), full (longseq Full) or "
        "longseq policy specs; a spec without a budget gets --budget",
    )
    p.add_argument("--budget", type=int, default=512, help="budget of bounded policies given without one")
    p.add_argument("--batch", type=int, default=0, help="sequences per generate call (0: chosen from memory)")
    p.add_argument(
        "--oom-factor",
        type=float,
        default=1.15,
        help="automatic batch: the full KV cache at the largest context is this many times the "
        "available memory (the 2nd-largest context should still fit: keep it below ~1.4)",
    )
    p.add_argument(
        "--memory-limit-gib",
        type=float,
        default=0.0,
        help="CUDA: cap this process's GPU memory (set_per_process_memory_fraction) and size the "
        "batch to it, so the demo behaves the same on any card",
    )
    p.add_argument(
        "--simulate-memory-mib",
        type=float,
        default=0.0,
        help="pretend this much memory is available: size the batch to it and raise "
        "torch.OutOfMemoryError when a cache outgrows it (the OOM path without a GPU)",
    )
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per call")
    p.add_argument("--warmup", type=int, default=4, help="decode steps not timed (after the first token)")
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=0,
        help="prompt tokens per forward while prefilling (0: --tokens-per-forward / batch, a power "
        "of two in [64, 4096])",
    )
    p.add_argument(
        "--tokens-per-forward",
        type=int,
        default=32768,
        help="automatic prefill chunk: about this many tokens (batch x chunk) per forward",
    )
    p.add_argument(
        "--fast-prefill",
        action="store_true",
        help="bounded caches: full-attention prefill, then keep the last budget tokens "
        "(approximation; default is the exact token-by-token policy prefill)",
    )
    p.add_argument(
        "--no-prefix-reuse",
        action="store_true",
        help="exact prefill from scratch for every context (inside generate) instead of resuming "
        "the previous context's prefix (same result, ~1.7x the prefill time for 8K,16K,32K)",
    )
    p.add_argument("--no-warmup-run", action="store_true", help="skip the short untimed run per cache")
    p.add_argument("--progress-s", type=float, default=15.0, help="seconds between prefill progress lines")
    p.add_argument("--out", default="", help="write OUT.md and OUT.json (rewritten after every row)")
    args = p.parse_args(argv)
    if args.small:
        args.hidden, args.layers, args.heads, args.kv_heads = 64, 2, 4, 2
        args.intermediate, args.vocab, args.budget = 128, 256, 32
        if args.contexts == p.get_default("contexts"):
            args.contexts = "96,192,384"
        if args.new_tokens == p.get_default("new_tokens"):
            args.new_tokens = 8
        args.warmup = min(args.warmup, 2)
        args.prefill_chunk = args.prefill_chunk or 40
        args.progress_s = min(args.progress_s, 0.0)
    args.contexts = sorted({int(c) for c in args.contexts.split(",") if c})
    if min(args.contexts) < 2:
        raise SystemExit("contexts must be >= 2 tokens")
    if args.dtype is None:
        args.dtype = "float32" if args.small and args.device == "cpu" else "bfloat16"
    args.dtype = getattr(torch, args.dtype)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not (
        os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    ):
        try:  # growing DynamicCaches fragment the default allocator; expandable segments do not
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
        except Exception:  # noqa: BLE001
            pass
    specs = []
    for spec in (s.strip() for s in args.caches.split(",") if s.strip()):
        specs.append(spec if spec in ("hf-dynamic", "full") else parse_policy(spec, budget=args.budget).spec)

    import transformers

    t_start = time.perf_counter()
    model = build_model(args, device)
    per_token = kv_bytes_per_token(model, args.dtype)
    if args.small and not (args.simulate_memory_mib or args.memory_limit_gib or args.batch):
        # room for 2.5 rows of the largest context's full cache: batch 3, the full cache outgrows it there
        args.simulate_memory_mib = 2.5 * per_token * max(args.contexts) / MIB
    batch, plan = choose_batch(args, device, per_token)
    if not args.prefill_chunk:
        args.prefill_chunk = min(4096, max(64, 2 ** int(math.log2(max(1, args.tokens_per_forward // batch)))))
    monitor_limit = int(args.simulate_memory_mib * MIB) if args.simulate_memory_mib else None

    meta: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]) if argv is None else " ".join(["bench_hf_cache.py", *argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "longseq": longseq.__version__,
        "python": platform.python_version(),
        "batch": batch,
        "contexts": args.contexts,
        "caches": specs,
        "new_tokens": args.new_tokens,
        "warmup": args.warmup,
        "prefill_chunk": args.prefill_chunk,
        "fast_prefill": args.fast_prefill,
        "prefix_reuse": not args.no_prefix_reuse,
        "memory_limit_gib": args.memory_limit_gib or None,
        "simulate_memory_mib": args.simulate_memory_mib or None,
        "allocator_conf": os.environ.get("PYTORCH_ALLOC_CONF")
        or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        or ("expandable_segments:True (set by the script)" if device.type == "cuda" else None),
        "plan": plan,
        "model": {
            "params": sum(p.numel() for p in model.parameters()),
            "dtype": str(args.dtype).replace("torch.", ""),
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "intermediate": args.intermediate,
            "vocab": args.vocab,
        },
    }
    avail = plan.get("available_bytes")
    log(
        f"{meta['device']}: {meta['model']['params'] / 1e6:.1f}M-parameter model, batch {batch}, prefill chunk "
        f"{args.prefill_chunk}, {human(avail)} available"
        + (" (simulated)" if args.simulate_memory_mib else "")
        + "; full KV cache "
        + ", ".join(f"{L}: {human(b)}" for L, b in plan["full_kv_bytes"].items())
    )
    results: list[Result] = []
    write_report(args.out, meta, results)

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(1, args.vocab, (batch, max(args.contexts)), generator=g).to(device)
    bench = Bench(model, args, device, ids)
    bench.monitor.limit = monitor_limit
    hook = model.register_forward_pre_hook(bench.monitor, with_kwargs=True)
    try:
        with torch.inference_mode():
            if not args.no_warmup_run:  # kernels, cuBLAS handles, autotuning: untimed
                L = min(args.contexts[0], args.budget + 64)
                for spec in specs:
                    r = bench.run(spec, L, n_new=args.warmup + 2)
                    log(f"  warm-up {spec} ctx {L}: {r.status}")
                bench.reuse.clear()
            for L in args.contexts:
                for spec in specs:
                    t = time.perf_counter()
                    r = bench.run(spec, L)
                    results.append(r)
                    meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
                    write_report(args.out, meta, results)
                    tps = "-" if r.decode_tok_s is None else f"{r.decode_tok_s:.1f}"
                    pf = "-" if r.prefill_s is None else f"{r.prefill_s:.1f}"
                    log(
                        f"{spec:>12s} ctx {L:>6d}: {status_text(r)}, prefill {pf} s, decode {tps} tok/s, "
                        f"peak prefill/decode {gib(r.prefill_peak_bytes)}/{gib(r.decode_peak_bytes)} GiB, "
                        f"cache {human(r.cache_bytes)} ({time.perf_counter() - t:.1f} s; "
                        f"{time.perf_counter() - t_start:.0f} s total)"
                    )
    finally:
        hook.remove()
    md = to_markdown(results, meta)
    log(md)
    return {"meta": meta, "results": [asdict(r) for r in results]}


if __name__ == "__main__":
    main()

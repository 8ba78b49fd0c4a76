"""Decode speed and memory of an HF Llama-style model with a longseq TOVA cache versus full caches.

A Llama-style model (default ~0.8B parameters: hidden 2048, 16 layers, 32 query / 8 kv heads, MLP 5632,
vocabulary 32000, tied embeddings) is built from a config with random bf16 weights -- nothing is
downloaded; speed and memory do not depend on the weights. For every context length and cache:

* ``hf-dynamic``: transformers' own ``DynamicCache`` (SDPA attention), how HF users decode today;
* ``full``: ``longseq.hf.cache(model, Full())`` -- the same attention through longseq's KVCache;
* ``tova:512`` (any longseq spec): a bounded cache of fixed size,

the batch is prefilled with ``context`` random tokens (chunks of ``--prefill-chunk``; only the last
token's logits are computed), then ``--new-tokens`` greedy tokens are decoded one at a time (after
``--warmup`` untimed steps). Reported: decode tokens/s (batch x steps / time), the peak GPU memory during
prefill and during decode, and the cache's own bytes. Out-of-memory is caught and reported as ``OOM``.

Prefill of bounded caches
-------------------------
Exact (default): the context goes through the policy token by token, as everywhere in longseq -- every
token after the first ``budget`` is scored and one is evicted, in every layer. That is the true semantics
but slow for 32K contexts (one small eviction step per token and layer). ``--fast-prefill`` instead
prefills with plain full attention (a ``Full()`` longseq cache) and then keeps only the *last* ``budget``
tokens of every layer (a sliding-window approximation of the prefill, so TOVA's choices only start with
decoding). Decode speed is the same either way (it depends on how many tokens are kept, not which); the
prefill peak memory of ``--fast-prefill`` is the full cache's. Results say which mode produced them.

GPU (the lead runs this):
    python benchmarks/bench_hf_cache.py --out results/hf_cache            # writes .md and .json
    python benchmarks/bench_hf_cache.py --fast-prefill --out results/hf_cache_fast
CPU smoke test:
    python benchmarks/bench_hf_cache.py --device cpu --hidden 64 --layers 2 --heads 4 --kv-heads 2 \\
        --intermediate 128 --vocab 256 --contexts 128,256 --budget 32 --batch 2 --new-tokens 4 --warmup 1
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import longseq
import longseq.hf as lh
from longseq.cache import CachePolicy, Full, KVCache, parse_policy


@dataclass
class Result:
    cache: str
    context: int
    batch: int
    prefill: str  # "exact", "fast (last-budget approximation)" or "full" (unbounded caches)
    status: str  # "ok", or "OOM in prefill" / "OOM in decode"
    tokens_per_s: float | None = None
    ms_per_step: float | None = None
    prefill_s: float | None = None
    prefill_peak_bytes: int | None = None  # None on CPU (not measured)
    decode_peak_bytes: int | None = None
    cache_bytes: int | None = None


def is_oom(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(err, oom)) or "out of memory" in str(err).lower()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.contexts) + args.new_tokens + args.warmup + 1,
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


def dynamic_cache_bytes(cache: Any) -> int:
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (layer.keys, layer.values)
        if t is not None
    )


def keep_last(cache: lh.LongseqCache, policy: CachePolicy, n_heads: int) -> lh.LongseqCache:
    """``--fast-prefill``: replace every layer's Full KVCache by a ``policy`` KVCache holding its last
    ``budget`` tokens (keys after RoPE, original positions), filled through ``KVCache.attend`` (they fit, so
    nothing is evicted; the dummy queries' outputs are discarded)."""
    assert policy.budget is not None
    out = lh.LongseqCache(policy, len(cache.layers), cache._config)
    for old, new in zip(cache.layers, out.layers, strict=True):
        full = old.batched
        n, b = len(full), policy.budget
        k, v = full.k[:, :, n - b : n], full.v[:, :, n - b : n]
        positions = full.slot_pos[:, 0, n - b : n]  # [B, budget]
        kv = KVCache(policy)
        kv.attend(k.new_zeros(k.shape[0], n_heads, b, k.shape[-1]), k, v, positions)
        new.batched, new.next_pos, new.seen = kv, old.next_pos.clone(), old.seen
        new.is_initialized = True
        old.batched = None  # free the full buffers now
    return out


@torch.inference_mode()
def run_one(model, spec: str, context: int, args, device: torch.device) -> Result:
    B = args.batch
    policy = None if spec == "hf-dynamic" else parse_policy(spec)
    bounded = policy is not None and policy.budget is not None
    fast = bounded and args.fast_prefill
    mode = ("fast (last-budget approximation)" if fast else "exact") if bounded else "full"
    res = Result(cache=spec, context=context, batch=B, prefill=mode, status="ok")
    g = torch.Generator().manual_seed(context)
    ids = torch.randint(0, args.vocab, (B, context), generator=g).to(device)
    reset_peak(device)
    try:
        if policy is None:
            from transformers import DynamicCache

            model.set_attn_implementation("sdpa")  # transformers' own path (lh.cache switched it)
            cache = DynamicCache(config=model.config)
        else:
            cache = lh.cache(model, Full() if fast else policy)
        sync(device)
        t0 = time.perf_counter()
        for start in range(0, context, args.prefill_chunk):
            out = model(
                input_ids=ids[:, start : start + args.prefill_chunk],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        if fast:
            cache = keep_last(cache, policy, model.config.num_attention_heads)
        sync(device)
        res.prefill_s = time.perf_counter() - t0
        res.prefill_peak_bytes = peak(device)
    except Exception as e:  # noqa: BLE001 - OOM is a result here
        if not is_oom(e):
            raise
        res.status = "OOM in prefill"
        return res
    finally:
        ids = None
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    out = None
    reset_peak(device)
    try:
        for _ in range(args.warmup):
            nxt = (
                model(input_ids=nxt, past_key_values=cache, use_cache=True)
                .logits[:, -1]
                .argmax(-1, keepdim=True)
            )
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.new_tokens):
            nxt = (
                model(input_ids=nxt, past_key_values=cache, use_cache=True)
                .logits[:, -1]
                .argmax(-1, keepdim=True)
            )
        sync(device)
        dt = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        res.status = "OOM in decode"
        return res
    res.tokens_per_s = B * args.new_tokens / dt
    res.ms_per_step = 1e3 * dt / args.new_tokens
    res.decode_peak_bytes = peak(device)
    res.cache_bytes = dynamic_cache_bytes(cache) if policy is None else cache.nbytes()
    return res


def gib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def mib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def to_markdown(results: list[Result], meta: dict[str, Any]) -> str:
    lines = [
        f"### HF Llama-style decode: longseq TOVA vs full caches ({meta['device']})",
        "",
        f"Command: `{meta['command']}`  ",
        f"Model: {meta['model']['params'] / 1e9:.2f}B parameters, {meta['model']['dtype']}, "
        f"batch {meta['batch']}, {meta['new_tokens']} timed decode steps.  ",
        f"Versions: torch {meta['torch']}, transformers {meta['transformers']}, longseq {meta['longseq']}, "
        f"Python {meta['python']}.",
        "",
        "| cache | context | prefill | status | decode tok/s | ms/step | prefill s | prefill peak GiB "
        "| decode peak GiB | cache MiB |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        tps = "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.1f}"
        ms = "-" if r.ms_per_step is None else f"{r.ms_per_step:.2f}"
        pf = "-" if r.prefill_s is None else f"{r.prefill_s:.1f}"
        lines.append(
            f"| {r.cache} | {r.context} | {r.prefill} | {r.status} | {tps} | {ms} | {pf} | "
            f"{gib(r.prefill_peak_bytes)} | {gib(r.decode_peak_bytes)} | {mib(r.cache_bytes)} |"
        )
    if any(r.prefill.startswith("fast") for r in results):
        lines += [
            "",
            "fast prefill: full-attention prefill, then the last `budget` tokens kept per layer "
            "(an approximation of the policy's prefill; decode numbers are unaffected).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="weights")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size")
    p.add_argument("--layers", type=int, default=16, help="decoder layers")
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (GQA)")
    p.add_argument("--intermediate", type=int, default=5632, help="MLP hidden size")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    p.add_argument("--contexts", default="8192,16384,32768", help="comma-separated context lengths")
    p.add_argument(
        "--caches",
        default="hf-dynamic,full,tova",
        help="comma-separated: hf-dynamic (transformers DynamicCache) or longseq policy specs; "
        "a spec without a budget gets --budget",
    )
    p.add_argument("--budget", type=int, default=512, help="budget of bounded policies given without one")
    p.add_argument("--batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--new-tokens", type=int, default=32, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps before timing")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per forward while prefilling")
    p.add_argument(
        "--fast-prefill",
        action="store_true",
        help="bounded caches: full-attention prefill, then keep the last budget tokens "
        "(approximation; default is the exact token-by-token policy prefill)",
    )
    p.add_argument("--out", default="", help="write OUT.md and OUT.json")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    args.contexts = [int(c) for c in args.contexts.split(",") if c]
    device = torch.device(args.device)
    specs = []
    for spec in (s.strip() for s in args.caches.split(",") if s.strip()):
        if spec in ("hf-dynamic", "full"):
            specs.append(spec)
        else:
            specs.append(parse_policy(spec, budget=args.budget).spec)

    import transformers

    model = build_model(args, device)
    meta = {
        "command": " ".join(["python", *sys.argv])
        if argv is None
        else " ".join(["bench_hf_cache.py", *argv]),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "longseq": longseq.__version__,
        "python": platform.python_version(),
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "fast_prefill": args.fast_prefill,
        "model": {
            "params": sum(p.numel() for p in model.parameters()),
            "dtype": str(args.dtype),
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "intermediate": args.intermediate,
            "vocab": args.vocab,
        },
    }
    results = []
    for context in args.contexts:
        for spec in specs:
            r = run_one(model, spec, context, args, device)
            results.append(r)
            tps = "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.1f} tok/s"
            print(
                f"{spec:>12s} ctx {context:>6d}: {r.status}, {tps}, "
                f"decode peak {gib(r.decode_peak_bytes)} GiB",
                flush=True,
            )
    md = to_markdown(results, meta)
    print(md)
    report = {"meta": meta, "results": [asdict(r) for r in results]}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(md)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

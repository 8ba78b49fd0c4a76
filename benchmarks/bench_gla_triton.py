"""Benchmark the Triton GLA kernels (longseq) against fla's chunk_gla and SDPA causal attention.

    python benchmarks/bench_gla_triton.py                      # H100: both shapes, T = 1K..32K
    python benchmarks/bench_gla_triton.py --T 2048 8192 --no-sdpa --out results.jsonl
    python benchmarks/bench_gla_triton.py --variants --T 2048 8192 --out variants.jsonl   # tuning choices

Fixed tokens per batch (B * T = --tokens, default 32,768), bf16 q/k/v, fp32 gates (as the GLA layer
passes them), two shapes: H=16, K=V=128 and H=4, K=256, V=512. Columns: longseq fwd and fwd+bwd
(ms, triton.testing.do_bench, median; a fwd+bwd resets the inputs' ``.grad`` to None before each run, so
accumulating into it is not timed), fla ``chunk_gla`` on the same inputs when ``fla`` imports,
SDPA causal (flash and cuDNN backends, H=16, D=128, same B and T), the longseq/fla ratio, and the
first call's wall time (Triton compile; the script points TRITON_CACHE_DIR at a fresh temporary
directory, seeded with the old one's autotune winners, unless --keep-cache). Before timing, each
shape is checked against the PyTorch ``chunk``
backend in fp32 (relative RMS error of o, final state and every gradient), so a wrong kernel is
visible in the same log. Decode: one token (T=1) through the fused recurrent kernel at B in {1, 64}
(vs fla ``fused_recurrent_gla``): the kernel alone, updating the state in place, timed from a CUDA graph
(as a captured model step runs it; ``do_bench`` would add the Python launch cost), next to a graph-timed
copy of the same state (its ceiling), and the public op and fla's step with ``do_bench`` (the public
op's input checks sync on max(g)); TFLOP/s and GB/s are the kernel's. The kernel and ``gla_decode_step`` are
also timed in an eager loop of back-to-back calls (``loop_ms``: what an uncaptured decode loop waits per call,
host launch cost included, with no L2 clear between calls to hide it).

FLOP and byte counts (per head; C = 64 the chunk size):
* chunk forward: ``T * (4*K*V + C*(K + V))`` (states k^T v and the inter-chunk q H, 2KV each; the
  causal intra-chunk q k^T and A v, C/2 keys on average). fwd+bwd counts 3x the forward.
* decode step: ``5*K*V`` FLOPs (decay S, add k^T v, q S); bytes ``8*K*V`` (fp32 state read + write)
  ``+ 2*(2K + 2V) + 4*K`` (bf16 q, k, v, o and the fp32 gate). The ceiling it is held to is measured in
  the same run: ``copy_`` of the same fp32 state (read once, written once), and the ratio reported.

Prints a Markdown table per section and one JSON line per measurement (device and versions included).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32_768, help="B * T, fixed across T")
    p.add_argument("--T", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768], help="lengths")
    p.add_argument("--shapes", nargs="+", default=["16x128x128", "4x256x512"], help="H x K x V per shape")
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 64], help="batch sizes for decode")
    p.add_argument("--no-sdpa", action="store_true", help="skip the SDPA rows")
    p.add_argument("--sdpa", nargs="+", default=["flash", "cudnn"], help="SDPA backends to time")
    p.add_argument("--no-fla", action="store_true", help="skip fla even if it imports")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check")
    p.add_argument("--decode-only", action="store_true", help="only the decode rows")
    p.add_argument("--variants", action="store_true",
                   help="instead of the tables: the kernels' tuning choices side by side (chunk-state storage "
                        "dtypes and output tile: errors, fwd and fwd+bwd ms at each --T; decode tile, warps "
                        "and V tile at --decode-batch, graph-timed)")
    p.add_argument(
        "--keep-cache", action="store_true", help="use the existing Triton cache (no compile timing)"
    )
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    return p.parse_args()


def fresh_cache_keeping_autotune() -> None:
    """Point TRITON_CACHE_DIR at a fresh folder (so the first-call column measures a real compile) that starts
    with the autotune winners of the old one (``*.autotune.json``: fla tunes each kernel for minutes on a
    fresh host) and hands new winners back to it at exit."""
    old = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    fresh = Path(tempfile.mkdtemp(prefix="longseq-triton-cache-"))

    def copy_autotune(src: Path, dst: Path) -> None:
        for f in src.rglob("*.autotune.json") if src.is_dir() else ():
            target = dst / f.relative_to(src)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)

    def hand_back() -> None:
        copy_autotune(fresh, old)
        shutil.rmtree(fresh, ignore_errors=True)

    copy_autotune(old, fresh)
    atexit.register(hand_back)
    # A step limit (`timeout`, SIGTERM) must not lose minutes of tuning: exit normally, so atexit runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ["TRITON_CACHE_DIR"] = str(fresh)
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # winners on disk even where fla does not ask


ARGS = parse_args()
if not ARGS.keep_cache:
    fresh_cache_keeping_autotune()  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from longseq.ops.gla import gated_linear_attention, gla_decode_step  # noqa: E402
from longseq.ops.gla.triton import common, recurrent, recurrent_gla  # noqa: E402
from longseq.testing import relative_rms_error  # noqa: E402

try:
    if ARGS.no_fla:
        raise ImportError("--no-fla")
    import fla  # noqa: F401
    from fla.ops.gla import chunk_gla, fused_recurrent_gla

    FLA_VERSION = getattr(fla, "__version__", "?")
except Exception as e:  # fla is optional; any import failure just drops its columns
    chunk_gla = fused_recurrent_gla = None
    FLA_VERSION = f"n/a ({type(e).__name__})"

CHUNK = 64
DEVICE = torch.device("cuda")
ROWS: list[dict] = []


def env() -> dict:
    return dict(
        device=torch.cuda.get_device_name(DEVICE),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        fla=FLA_VERSION,
        python=platform.python_version(),
    )


def emit(row: dict) -> None:
    row = {**row, **env()}
    ROWS.append(row)
    line = json.dumps(row)
    print(line, flush=True)
    if ARGS.out:
        with open(ARGS.out, "a") as f:
            f.write(line + "\n")


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def inputs(B: int, T: int, H: int, K: int, V: int, requires_grad: bool = True, seed: int = 0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(B, T, H, K, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    k = torch.randn(B, T, H, K, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    v = torch.randn(B, T, H, V, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(B, T, H, K, device=DEVICE, generator=gen)) / 16
    return [x.requires_grad_(requires_grad) for x in (q, k, v, g)]


def ms(fn, grads: list[torch.Tensor] | None = None) -> float:
    """Median ms; ``grads``: the leaves a backward fills, reset to None before each run (untimed), so a
    fwd+bwd is not also timed accumulating into ``.grad`` (an elementwise pass over every input, ~0.65 ms at
    B*T = 32K, H16 K=V=128, that a model's activations never pay)."""
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grads)


GRAPH_CALLS = 20


def graph_ms(fn) -> float:
    """Per-call time of ``fn`` replayed from a CUDA graph of GRAPH_CALLS calls: the GPU time a captured
    decode step pays, without the Python launch cost that ``do_bench`` also measures for kernels this
    short (tens of microseconds)."""
    return do_bench_cudagraph(lambda: [fn() for _ in range(GRAPH_CALLS)], rep=50) / GRAPH_CALLS


LOOP_CALLS = 200


def loop_ms(fn, repeats: int = 5) -> float:
    """Per-call time of ``fn`` called LOOP_CALLS times back to back (best of ``repeats``): what an eager decode
    loop waits per call, ``max(host time, GPU time)``. ``do_bench`` clears L2 before each call, which gives the
    host a head start of that memset's duration: how much launch cost it hides depends on the card's bandwidth."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(LOOP_CALLS):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / LOOP_CALLS)
    return best


def check(B: int, T: int, H: int, K: int, V: int, **tag) -> None:
    """Relative RMS error of the triton backend vs the fp32 chunk backend, forward and backward."""
    q, k, v, g = inputs(B, T, H, K, V, seed=1)
    s0 = torch.randn(B, H, K, V, device=DEVICE, requires_grad=True)
    do = torch.randn(B, T, H, V, device=DEVICE, dtype=torch.bfloat16)
    ds = torch.randn(B, H, K, V, device=DEVICE)
    res = {}
    for backend, cast in (("triton", lambda x: x), ("chunk", lambda x: x.float())):
        leaves = [cast(x.detach()).requires_grad_(True) for x in (q, k, v, g, s0)]
        o, s = gated_linear_attention(
            *leaves[:4], initial_state=leaves[4], output_final_state=True, backend=backend
        )
        grads = torch.autograd.grad([o, s], leaves, [do.to(o.dtype), ds])
        res[backend] = [o, s, *grads]
    errs = {
        name: relative_rms_error(a, b)
        for name, a, b in zip(
            ["o", "state", "dq", "dk", "dv", "dg", "ds0"], res["triton"], res["chunk"], strict=True
        )
    }
    ok = (
        errs["o"] <= 4e-3 and errs["state"] <= 4e-3 and all(e <= 5e-3 for n, e in errs.items() if n[0] == "d")
    )
    print(
        f"check B={B} T={T} H={H} K={K} V={V}: "
        + " ".join(f"{n}={e:.2e}" for n, e in errs.items())
        + ("  OK" if ok else "  FAILED (tolerance 4e-3 outputs / 5e-3 gradients)"),
        flush=True,
    )
    emit(dict(kind="check", B=B, T=T, H=H, K=K, V=V, ok=ok, **tag, **{f"err_{n}": e for n, e in errs.items()}))


def first_call_s(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def triton_calls(q, k, v, g, do, check_values: bool = False):
    """The timed longseq calls: forward (no grad) and forward+backward. Without ``check_values``, as the models
    call the op (and as fla runs: no input scan); with it, the public op's default finiteness checks (one
    reduction per input and a host sync) are timed too."""

    def fwd():
        with torch.no_grad():
            gated_linear_attention(q, k, v, g, backend="triton", check_values=check_values)

    def fwd_bwd():
        o, _ = gated_linear_attention(q, k, v, g, backend="triton", check_values=check_values)
        o.backward(do)

    return fwd, fwd_bwd


def bench_chunk(H: int, K: int, V: int) -> None:
    compile_s = None
    for T in ARGS.T:
        compile_s = bench_chunk_one(max(1, ARGS.tokens // T), T, H, K, V, compile_s)
        torch.cuda.empty_cache()


def bench_chunk_one(B: int, T: int, H: int, K: int, V: int, compile_s: tuple[float, float] | None):
    """One row of the chunk table; measures the first-call (compile) times when ``compile_s`` is None."""
    q, k, v, g = inputs(B, T, H, K, V)
    do = torch.randn_like(v)
    fwd, fwd_bwd = triton_calls(q, k, v, g, do)
    if compile_s is None:
        compile_s = (first_call_s(fwd), first_call_s(fwd_bwd))
    row = dict(kind="chunk", B=B, T=T, H=H, K=K, V=V, fwd_ms=ms(fwd), fwd_bwd_ms=ms(fwd_bwd, [q, k, v, g]))
    row["fwd_checked_ms"] = ms(triton_calls(q, k, v, g, do, check_values=True)[0])
    row["compile_fwd_s"], row["compile_fwd_bwd_s"] = compile_s
    flops = B * H * T * (4 * K * V + CHUNK * (K + V))
    row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
    row["fwd_bwd_tflops"] = 3 * flops / row["fwd_bwd_ms"] / 1e9
    row["fla_fwd_ms"] = row["fla_fwd_bwd_ms"] = None
    if chunk_gla is not None:

        def fla_fwd():
            with torch.no_grad():
                chunk_gla(q, k, v, g, scale=K**-0.5)

        def fla_fwd_bwd():
            o, _ = chunk_gla(q, k, v, g, scale=K**-0.5)
            o.backward(do)

        try:
            row["fla_fwd_ms"], row["fla_fwd_bwd_ms"] = ms(fla_fwd), ms(fla_fwd_bwd, [q, k, v, g])
        except Exception as e:  # an fla version that rejects these inputs: report, keep going
            print(f"fla chunk_gla failed at T={T}: {type(e).__name__}: {e}", file=sys.stderr)
    row["ratio_fwd"] = row["fwd_ms"] / row["fla_fwd_ms"] if row["fla_fwd_ms"] else None
    row["ratio_fwd_bwd"] = row["fwd_bwd_ms"] / row["fla_fwd_bwd_ms"] if row["fla_fwd_bwd_ms"] else None
    for sdpa in ("flash", "cudnn"):
        timed = sdpa in ARGS.sdpa
        row[f"sdpa_{sdpa}_fwd_ms"], row[f"sdpa_{sdpa}_fwd_bwd_ms"] = bench_sdpa(B, T, sdpa) if timed else (None, None)
    emit(row)
    return compile_s


def bench_sdpa(B: int, T: int, which: str) -> tuple[float | None, float | None]:
    """SDPA causal attention at H=16, D=128 with one backend forced; (None, None) if unavailable."""
    if ARGS.no_sdpa:
        return None, None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[which]
    q, k, v = (
        torch.randn(B, 16, T, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    do = torch.randn_like(q)

    def fwd():
        with torch.no_grad(), sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)

    try:
        return ms(fwd), ms(fwd_bwd, [q, k, v])
    except RuntimeError as e:  # backend not built in / not supported on this GPU
        print(f"SDPA {which} unavailable at T={T}: {str(e).splitlines()[0]}", file=sys.stderr)
        return None, None


def bench_decode(H: int, K: int, V: int) -> None:
    for B in ARGS.decode_batch:
        bench_decode_one(B, H, K, V)


def bench_decode_one(B: int, H: int, K: int, V: int) -> None:
    q, k, v, g = inputs(B, 1, H, K, V, requires_grad=False)
    state = torch.randn(B, H, K, V, device=DEVICE)
    copy_dst = torch.empty_like(state)

    def step():  # the kernel alone, updating the state in place (what a captured model step replays)
        recurrent_gla(q, k, v, g, K**-0.5, state, out_state=state)

    def copy():  # the ceiling: read and write the same fp32 state bytes once
        copy_dst.copy_(state)

    q1, k1, v1, g1 = q[:, 0], k[:, 0], v[:, 0], g[:, 0]

    def api_step():  # the public one-step op: shape checks in Python, then the kernel (in place)
        gla_decode_step(q1, k1, v1, g1, state, backend="triton")

    def seq_step():  # the sequence op on one token: adds value checks (a host sync) and a fresh state
        gated_linear_attention(q, k, v, g, initial_state=state, output_final_state=True, backend="triton")

    def fla_step():
        fused_recurrent_gla(q, k, v, gk=g, scale=K**-0.5, initial_state=state, output_final_state=True)

    with torch.no_grad():
        compile_s = first_call_s(step)
        t, copy_t, api_t, seq_t = graph_ms(step), graph_ms(copy), ms(api_step), ms(seq_step)
        kernel_loop_t, api_loop_t = loop_ms(step), loop_ms(api_step)
        fla_t = None
        if fused_recurrent_gla is not None:
            try:
                fla_t = ms(fla_step)
            except Exception as e:  # an fla version with another signature: report, keep going
                print(f"fla fused_recurrent_gla failed: {type(e).__name__}: {e}", file=sys.stderr)
    flops = 5 * B * H * K * V
    nbytes = B * H * (8 * K * V + 2 * (2 * K + 2 * V) + 4 * K)
    emit(
        dict(
            kind="decode",
            B=B,
            T=1,
            H=H,
            K=K,
            V=V,
            step_ms=t,
            copy_ms=copy_t,
            ratio_copy=t / copy_t,
            api_step_ms=api_t,
            kernel_loop_ms=kernel_loop_t,
            api_loop_ms=api_loop_t,
            ratio_api_loop=api_loop_t / t,
            seq_op_step_ms=seq_t,
            fla_step_ms=fla_t,
            compile_s=compile_s,
            tflops=flops / t / 1e9,
            gbps=nbytes / t / 1e6,
        )
    )


# (h in bf16, dh in bf16, output kernel V tile); the defaults are the last row.
STATE_VARIANTS = [(False, False, 64), (True, False, 64), (True, True, 64), (True, True, 128)]
DECODE_VARIANTS = [(tile, warps, bv) for tile in (8192, 16384) for warps in (1, 2, 4, 8) for bv in (64, 128)]


def bench_variants(H: int, K: int, V: int) -> None:
    """Each choice behind the constants of ``longseq.ops.gla.triton`` measured in one process (the
    constants are module attributes read at launch)."""
    saved = (common.STATES_IN_BF16, common.DSTATES_IN_BF16, common.OUTPUT_BV,
             recurrent.DECODE_TILE, recurrent.DECODE_WARPS, recurrent.DECODE_MAX_BV, recurrent.DECODE_MANY_PROGRAMS)
    try:
        for h16, dh16, bv in STATE_VARIANTS:
            common.STATES_IN_BF16, common.DSTATES_IN_BF16, common.OUTPUT_BV = h16, dh16, bv
            tag = dict(variant=f"h {'bf16' if h16 else 'fp32'}, dh {'bf16' if dh16 else 'fp32'}, output BV {bv}")
            check(2, 2048, H, K, V, **tag)
            for T in ARGS.T:
                B = max(1, ARGS.tokens // T)
                q, k, v, g = inputs(B, T, H, K, V)
                fwd, fwd_bwd = triton_calls(q, k, v, g, torch.randn_like(v))
                emit(dict(kind="variant", B=B, T=T, H=H, K=K, V=V, fwd_ms=ms(fwd),
                          fwd_bwd_ms=ms(fwd_bwd, [q, k, v, g]), **tag))
        recurrent.DECODE_MANY_PROGRAMS = 0  # every grid takes DECODE_WARPS
        for B in ARGS.decode_batch:
            decode_variants(B, H, K, V)
    finally:
        (common.STATES_IN_BF16, common.DSTATES_IN_BF16, common.OUTPUT_BV, recurrent.DECODE_TILE,
         recurrent.DECODE_WARPS, recurrent.DECODE_MAX_BV, recurrent.DECODE_MANY_PROGRAMS) = saved


@torch.no_grad()
def decode_variants(B: int, H: int, K: int, V: int) -> None:
    q, k, v, g = inputs(B, 1, H, K, V, requires_grad=False)
    state = torch.randn(B, H, K, V, device=DEVICE)
    dst = torch.empty_like(state)
    copy_t = graph_ms(lambda: dst.copy_(state))

    def step():
        recurrent_gla(q, k, v, g, K**-0.5, state, out_state=state)

    for tile, warps, bv in DECODE_VARIANTS:
        recurrent.DECODE_TILE, recurrent.DECODE_WARPS, recurrent.DECODE_MAX_BV = tile, warps, bv
        t = graph_ms(step)
        emit(dict(kind="decode_variant", B=B, H=H, K=K, V=V, tile=tile, warps=warps, max_bv=bv,
                  step_ms=t, copy_ms=copy_t, ratio_copy=t / copy_t))


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_gla_triton.py needs a CUDA GPU")
    print(json.dumps(env()))
    shapes = [tuple(int(x) for x in s.split("x")) for s in ARGS.shapes]
    if ARGS.variants:
        for H, K, V in shapes:
            bench_variants(H, K, V)
        return
    for H, K, V in shapes:
        if not ARGS.no_check and not ARGS.decode_only:
            check(2, 2048, H, K, V)
            check(1, 1000, H, K, V)
        if not ARGS.decode_only:
            bench_chunk(H, K, V)
        bench_decode(H, K, V)

    print(
        "\n| H | K | V | B | T | longseq fwd | longseq fwd+bwd | fla fwd | fla fwd+bwd | ratio fwd | "
        "ratio fwd+bwd | SDPA flash fwd / fwd+bwd | SDPA cuDNN fwd / fwd+bwd | TFLOP/s fwd / fwd+bwd | "
        "first call fwd / fwd+bwd (s) | fwd with value checks |"
    )
    print("|" + "---|" * 16)
    for r in ROWS:
        if r["kind"] == "chunk":
            print(
                f"| {r['H']} | {r['K']} | {r['V']} | {r['B']} | {r['T']} | {fmt(r['fwd_ms'])} | "
                f"{fmt(r['fwd_bwd_ms'])} | {fmt(r['fla_fwd_ms'])} | {fmt(r['fla_fwd_bwd_ms'])} | "
                f"{fmt(r['ratio_fwd'], '.2f')} | {fmt(r['ratio_fwd_bwd'], '.2f')} | "
                f"{fmt(r['sdpa_flash_fwd_ms'])} / {fmt(r['sdpa_flash_fwd_bwd_ms'])} | "
                f"{fmt(r['sdpa_cudnn_fwd_ms'])} / {fmt(r['sdpa_cudnn_fwd_bwd_ms'])} | "
                f"{r['fwd_tflops']:.1f} / {r['fwd_bwd_tflops']:.1f} | "
                f"{r['compile_fwd_s']:.1f} / {r['compile_fwd_bwd_s']:.1f} | {fmt(r['fwd_checked_ms'])} |"
            )
    print("\n(times in ms, median of triton.testing.do_bench; longseq as the models call it, without the public "
          "op's input value checks, which the last column adds)\n")
    print(
        "| H | K | V | B | decode kernel, graph (ms) | state copy, graph (ms) | kernel / copy | gla_decode_step (ms) "
        "| op / kernel | kernel, eager loop (ms) | op, eager loop (ms) | op loop / kernel graph "
        "| gated_linear_attention, T=1 (ms) | fla step (ms) | TFLOP/s | GB/s | first call (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in ROWS:
        if r["kind"] == "decode":
            print(
                f"| {r['H']} | {r['K']} | {r['V']} | {r['B']} | {r['step_ms']:.4f} | {r['copy_ms']:.4f} | "
                f"{r['ratio_copy']:.2f} | {r['api_step_ms']:.4f} | {r['api_step_ms'] / r['step_ms']:.2f} | "
                f"{r['kernel_loop_ms']:.4f} | {r['api_loop_ms']:.4f} | {r['ratio_api_loop']:.2f} | "
                f"{r['seq_op_step_ms']:.4f} | {fmt(r['fla_step_ms'], '.4f')} | "
                f"{r['tflops']:.2f} | {r['gbps']:.0f} | {r['compile_s']:.2f} |"
            )
    print(f"\n(graph: per call, replayed from a CUDA graph of {GRAPH_CALLS} calls; eager loop: per call, best of 5 "
          f"runs of {LOOP_CALLS} back-to-back calls; gla_decode_step, T=1 op and fla: do_bench median)")
    e = env()
    print(
        f"\ndevice: {e['device']}; torch {e['torch']}, triton {e['triton']}, CUDA {e['cuda']}, "
        f"fla {e['fla']}, Python {e['python']}; command: {' '.join(sys.argv)}"
    )


if __name__ == "__main__":
    main()

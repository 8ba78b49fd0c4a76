"""MEGABYTE throughput: training bytes/s and batch-1 generation bytes/s, longseq next to MEGABYTE-pytorch.

    python benchmarks/bench_megabyte.py --device cuda --json megabyte.json          # paper95m, 4K context
    python benchmarks/bench_megabyte.py --device cuda --compile --profile           # + compiled rows, kernels
    python benchmarks/bench_megabyte.py --device cpu --small                        # CPU smoke test

* training: one optimizer step = forward + backward + AdamW on ``--batch`` sequences of
  ``--train-len`` bytes (bf16 autocast on CUDA, fp32 on CPU); bytes/s counts predicted bytes.
  ``--compile`` adds rows with ``torch.compile(model)`` (the whole model; ``longseq train --compile``
  compiles each block instead) for longseq and for MEGABYTE-pytorch; the eager rows stay.
  ``--local-sdpa`` times the longseq rows once per SDPA backend of the local model's attention;
  ``--module-path`` adds a row with the blocks called as modules (the implementation before the stateless
  fast path; same math).
* generation: batch 1, a ``--context``-byte prompt, greedy. longseq prefills its state once, then
  decodes one byte per step with the decode step of ``longseq bench decode``
  (:func:`longseq.bench.decode.bench_decode_longseq`): the headline row is the captured path (static
  state, the step + sampling recorded as CUDA graphs, one per MEGABYTE decode key, as
  ``generate(..., compile=True)``), the second row the eager one (dynamic state); ``--fused`` adds a row
  whose step is ``torch.compile``'d before its capture (``compile="fused"``), ``--module-step`` a captured
  row with the fused single-token kernels of :mod:`longseq.ops.decode_block` off (every other row
  uses them: they are the default on CUDA). ``--gen-bytes`` are
  timed after untimed warm-up steps (which include the two captures). MEGABYTE-pytorch has no cache: its
  own ``generate`` re-runs ``forward`` over the whole sequence for every byte, so it is timed over
  fewer bytes (``--ref-gen-bytes``); its ``max_seq_len`` is set so that ``generate`` stops after
  them (without ``pos_emb`` that attribute is only its loop bound; top-k 0.9 + Gumbel sampling as in
  its default). Prefill is reported on its own and is not in decode bytes/s. The ratio columns are
  longseq / MEGABYTE-pytorch. The models run in bf16 on CUDA, fp32 on CPU.
* ``--profile``: after the timing, one more training step of each implementation (eager) under
  ``torch.profiler``, printed as a kernel table (CUDA kernels on a GPU, CPU ops otherwise).

MEGABYTE-pytorch (``pip install MEGABYTE-pytorch``) is optional: without it its rows say "not installed".
It is configured with the same widths, depths and patch size, ``max_seq_len=(patches, P)``, its default
``dim_head=64, heads=8`` (both stages) and ``flash_attn=True`` on CUDA (which on non-A100 GPUs lets SDPA
pick the memory-efficient or math kernel); its blocks differ (GELU MLP x4, attention with a 512-wide
inner dimension in the global model, no RoPE/positional embedding by default, token shift), so the
parameter counts are printed next to the speeds.

Prints one JSON line per row, then a Markdown table and a JSON summary with device and versions
(also written to ``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # MEGABYTE-pytorch's generate wraps its loop in tqdm

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

import longseq
from longseq.bench.decode import bench_decode_longseq, decode_warmup
from longseq.bench.timing import release_memory, sync
from longseq.models import build_model
from longseq.nn import fused as fused_step

SDPA_BACKENDS = {
    "auto": None,
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "math": [SDPBackend.MATH],
}


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def print_profile(title: str, one_step: Callable[[], float], device: torch.device, rows: int) -> None:
    """One ``one_step()`` under ``torch.profiler``. On CUDA: the kernels by GPU time (name, launches, total
    and mean time, share), then the aten ops by the GPU time of the kernels they launched; on CPU: the ops
    by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        one_step()
        sync(device)
    events = prof.key_averages()
    if device.type != "cuda":
        print(f"\n### profile: {title} -- one training step, {sum(e.count for e in events)} op calls\n", flush=True)
        print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=90), flush=True)
        return
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: -e.self_device_time_total)
    if not kernels:  # a profiler build that does not tag kernel events: the standard table
        print(f"\n### profile: {title} -- one training step\n", flush=True)
        print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=90), flush=True)
        return
    total_us = sum(e.self_device_time_total for e in kernels)
    print(f"\n### profile: {title} -- one training step: {sum(e.count for e in kernels)} kernel launches, "
          f"{total_us / 1e3:.2f} ms of kernel time\n", flush=True)
    print("| kernel | launches | total ms | mean us | share |\n|---|---|---|---|---|")
    for e in kernels[:rows]:
        name = e.key if len(e.key) <= 110 else e.key[:107] + "..."
        print(f"| `{name}` | {e.count} | {e.self_device_time_total / 1e3:.3f} "
              f"| {e.self_device_time_total / e.count:.1f} | {e.self_device_time_total / max(total_us, 1):.1%} |")
    print(f"\nops by the GPU time of their own kernels ({title}):\n", flush=True)
    print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60), flush=True)


def time_training(
    model: torch.nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor], seq: torch.Tensor,
    steps: int, warmup: int, device: torch.device, profile_title: str | None = None, profile_rows: int = 30,
) -> dict:
    """Seconds per optimizer step (mean over ``steps`` after ``warmup``) and peak CUDA memory."""
    model.train()
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)

    def one_step() -> float:
        with _autocast(device):
            loss = loss_fn(seq)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup):
        one_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    loss = float("nan")
    for _ in range(steps):
        loss = one_step()
    sync(device)
    seconds = (time.perf_counter() - start) / max(steps, 1)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if profile_title is not None:
        print_profile(profile_title, one_step, device, profile_rows)
    opt.state.clear()
    release_memory(device)
    return dict(step_s=seconds, loss=loss, peak_gib=peak)


def _train_row(row: dict, args, t: dict) -> None:
    row.update(train_step_s=t["step_s"], train_loss=t["loss"], train_peak_gib=t["peak_gib"],
               train_bytes_per_s=args.batch * (args.train_len - 1) / t["step_s"])


def _compiled(model: torch.nn.Module, row: dict) -> torch.nn.Module | None:
    try:
        return torch.compile(model)
    except Exception as e:  # noqa: BLE001 -- report, keep the other rows
        row["status"] = f"torch.compile failed: {e.__class__.__name__}: {e}"
        return None


def _guard(row: dict, fn: Callable[[], None]) -> None:
    """Run ``fn``; an exception (e.g. compilation of a third-party model failing) becomes the row's status."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            row["status"] = "OOM"
        else:
            row["status"] = f"{e.__class__.__name__}: {str(e).splitlines()[0][:200]}"


def bench_longseq(args, backbone: str, device: torch.device, gen_dtype: torch.dtype) -> list[dict]:
    torch.manual_seed(0)
    model = build_model("megabyte", args.preset, global_backbone=backbone).to(device)
    cfg = model.config
    P = cfg.patch_size
    # Both decode keys (global model runs / not) warmed up and captured, fused or not.
    gen_warmup = decode_warmup(2, P, fused=args.fused)
    need = max(args.train_len, args.context + gen_warmup + args.gen_bytes + 1)
    if need > cfg.max_seq_len:
        raise SystemExit(f"--train-len / --context + --gen-bytes need {need} bytes; {args.preset} has "
                         f"max_seq_len={cfg.max_seq_len}")
    name = f"longseq MEGABYTE ({backbone} global)"
    params = model.num_params()
    seq = torch.randint(0, 256, (args.batch, args.train_len), device=device)
    rows: list[dict] = []

    def loss_of(m: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        def loss_fn(s: torch.Tensor) -> torch.Tensor:
            # Inputs of train_len - 1 bytes: whole patches of targets (t = 0..train_len-1), no padding.
            logits = m(s[:, :-1])
            return F.cross_entropy(logits.float().reshape(-1, 256), s[:, 1:].reshape(-1))
        return loss_fn

    if args.steps:
        variants = [(sdpa, True) for sdpa in args.local_sdpa]
        if args.module_path:
            variants.append((args.local_sdpa[0], False))
        for i, (sdpa, fast) in enumerate(variants):
            model.fast_stateless, model.local_sdpa_backends = fast, SDPA_BACKENDS[sdpa]
            label = name
            if len(args.local_sdpa) > 1 or sdpa != "auto":
                label += f", local SDPA {sdpa}"
            if not fast:
                label += ", blocks as modules"
            row = dict(impl=label, params=params, mode="eager", gen="-")
            profile = f"{label}, eager" if args.profile and i == 0 else None
            _guard(row, lambda row=row, profile=profile: _train_row(row, args, time_training(
                model, loss_of(model), seq, args.steps, args.warmup, device, profile, args.profile_rows)))
            rows.append(row)
        model.fast_stateless, model.local_sdpa_backends = True, SDPA_BACKENDS[args.local_sdpa[0]]
        if args.compile:
            row = dict(impl=name, params=params, mode="compiled", gen="-")
            compiled = _compiled(model, row)
            if compiled is not None:
                _guard(row, lambda: _train_row(row, args, time_training(
                    model, loss_of(compiled), seq, args.steps, args.warmup + 1, device)))
            rows.append(row)
            compiled = None
            torch._dynamo.reset()
    if args.gen_bytes:
        model.to(gen_dtype)
        # static=True: static state, captured as CUDA graphs on CUDA (eager static steps elsewhere).
        static_label = "captured (CUDA graph)" if device.type == "cuda" else "static state (no CUDA graph on CPU)"
        modes = [(True, static_label, True), (False, "eager (dynamic state)", True)]
        if device.type == "cuda" and args.fused:
            modes.insert(0, ("fused", "torch.compile'd + captured", True))
        if device.type == "cuda" and args.module_step:
            modes.insert(len(modes) - 1, (True, static_label + ", module path (fused step kernels off)", False))
        for static, label, fused_kernels in modes:
            row = dict(impl=name, params=params, mode="-", gen=label)
            with _fused_step_kernels(fused_kernels):
                _guard(row, lambda row=row, static=static: row.update(_gen_fields(bench_decode_longseq(
                    model, None, args.context, 1, args.gen_bytes, gen_warmup, static, device))))
            rows.append(row)
            release_memory(device)
    return rows


@contextlib.contextmanager
def _fused_step_kernels(enabled: bool):
    """The fused single-token step (:mod:`longseq.ops.decode_block`) on (the default) or off."""
    saved = fused_step.FUSED_STEP_MAX_ROWS
    if not enabled:
        fused_step.FUSED_STEP_MAX_ROWS = 0
    try:
        yield
    finally:
        fused_step.FUSED_STEP_MAX_ROWS = saved


def _gen_fields(d: dict) -> dict:
    return dict(gen_prefill_s=d["prefill_s"], gen_ms_per_byte=d["ms_per_step"], gen_bytes_per_s=d["tok_s"],
                gen_captures=d["captures"], gen_peak_gib=d["peak_gib"])


def bench_reference(args, device: torch.device, gen_dtype: torch.dtype) -> list[dict]:
    name = "MEGABYTE-pytorch"
    try:
        from MEGABYTE_pytorch import MEGABYTE
    except ImportError as e:
        return [dict(impl=name, params=None, mode="-", gen="-", status=f"not installed ({e.__class__.__name__})")]
    cfg = longseq.MegabyteConfig.from_preset(args.preset)
    P = cfg.patch_size
    train_patches = -(-args.train_len // P)
    torch.manual_seed(0)
    try:
        model = MEGABYTE(
            num_tokens=256, dim=(cfg.d_global, cfg.d_local), depth=(cfg.n_global_layers, cfg.n_local_layers),
            max_seq_len=(train_patches, P), dim_head=args.ref_dim_head, heads=args.ref_heads,
            flash_attn=device.type == "cuda",
        ).to(device)
    except TypeError as e:  # another release with another signature
        return [dict(impl=name, params=None, mode="-", gen="-", status=f"unsupported MEGABYTE-pytorch API: {e}")]
    params = _num_params(model)
    seq = torch.randint(0, 256, (args.batch, args.train_len), device=device)
    rows: list[dict] = []
    if args.steps:
        # Its loss predicts bytes 1..L-1 of the L given (like longseq's inputs[:-1] -> targets[1:]).
        row = dict(impl=name, params=params, mode="eager", gen="-")
        profile = f"{name}, eager" if args.profile else None
        _guard(row, lambda: _train_row(row, args, time_training(
            model, lambda s: model(s, return_loss=True), seq, args.steps, args.warmup, device, profile,
            args.profile_rows)))
        rows.append(row)
        if args.compile:
            row = dict(impl=name, params=params, mode="compiled", gen="-")
            compiled = _compiled(model, row)
            if compiled is not None:
                _guard(row, lambda: _train_row(row, args, time_training(
                    model, lambda s: compiled(s, return_loss=True), seq, args.steps, args.warmup + 1, device)))
            rows.append(row)
            compiled = None
            torch._dynamo.reset()
    if args.ref_gen_bytes:
        model.to(gen_dtype).eval()
        prompt = torch.randint(0, 256, (1, args.context), device=device)
        total = -(-(args.context + args.ref_gen_bytes) // P) * P  # its generate fills whole patches
        row = dict(impl=name, params=params, mode="-", gen="own generate (full recompute)",
                   gen_new_bytes=total - args.context)

        def run() -> None:
            with torch.no_grad():
                model(prompt)  # warm-up: the same kernels as its first generate step
                sync(device)
                model.max_seq_len = (total // P, P)  # generate() runs until prod(max_seq_len) bytes
                start = time.perf_counter()
                out = model.generate(prompt)
                sync(device)
                seconds = time.perf_counter() - start
            assert out.numel() == total, out.shape
            row.update(gen_prefill_s=None, gen_ms_per_byte=seconds / row["gen_new_bytes"] * 1e3,
                       gen_bytes_per_s=row["gen_new_bytes"] / seconds)

        _guard(row, run)
        rows.append(row)
    return rows


def _fmt(value, spec: str) -> str:
    return "—" if value is None or isinstance(value, str) else format(value, spec)


def add_ratios(rows: list[dict]) -> None:
    """``train_ratio`` / ``gen_ratio``: each longseq row over MEGABYTE-pytorch's row of the same mode."""
    ref_train = {r["mode"]: r.get("train_bytes_per_s") for r in rows
                 if r["impl"] == "MEGABYTE-pytorch" and r.get("train_bytes_per_s")}
    ref_gen = next((r["gen_bytes_per_s"] for r in rows
                    if r["impl"] == "MEGABYTE-pytorch" and r.get("gen_bytes_per_s")), None)
    for r in rows:
        if r["impl"] == "MEGABYTE-pytorch":
            continue
        if r.get("train_bytes_per_s") and ref_train.get(r["mode"]):
            r["train_ratio"] = r["train_bytes_per_s"] / ref_train[r["mode"]]
        if r.get("gen_bytes_per_s") and ref_gen:
            r["gen_ratio"] = r["gen_bytes_per_s"] / ref_gen


def markdown(rows: list[dict]) -> str:
    lines = ["| implementation | params | train | train bytes/s | x ref | train peak GiB "
             "| generation | gen bytes/s | x ref | ms/byte | prefill s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params = "—" if r.get("params") is None else f"{r['params'] / 1e6:.1f}M"
        status = r.get("status")
        train = _fmt(r.get("train_bytes_per_s"), ",.0f") if not status else status
        lines.append(
            f"| {r['impl']} | {params} | {r.get('mode', '-')} | {train} | {_fmt(r.get('train_ratio'), '.2f')} "
            f"| {_fmt(r.get('train_peak_gib'), '.2f')} | {r.get('gen', '-')} "
            f"| {_fmt(r.get('gen_bytes_per_s'), ',.1f')} | {_fmt(r.get('gen_ratio'), ',.1f')} "
            f"| {_fmt(r.get('gen_ms_per_byte'), '.3f')} | {_fmt(r.get('gen_prefill_s'), '.3f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available)")
    parser.add_argument("--small", action="store_true",
                        help="CPU smoke-test settings: preset tiny, context 256, train 2 x 256 bytes, "
                             "2 steps, 16 (longseq) / 8 (MEGABYTE-pytorch) generated bytes; explicit "
                             "flags still win")
    parser.add_argument("--preset", default=None,
                        help="MegabyteConfig preset (default paper95m: dims 768/512, depths 12/4, P=8)")
    parser.add_argument("--context", type=int, default=None, help="generation prompt length in bytes (4096)")
    parser.add_argument("--gen-bytes", type=int, default=None,
                        help="longseq bytes timed per generation row (256; 0: skip longseq generation)")
    parser.add_argument("--ref-gen-bytes", type=int, default=None,
                        help="bytes MEGABYTE-pytorch's generate produces, rounded up to fill its last patch "
                             "(64; 0: skip)")
    parser.add_argument("--train-len", type=int, default=None, help="training sequence length in bytes (8192)")
    parser.add_argument("--batch", type=int, default=None, help="training batch size (8)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (10; 0: skip training)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first (+1 when compiled)")
    parser.add_argument("--global-backbones", nargs="+", default=["transformer", "gla"],
                        choices=["transformer", "gla"], help="longseq global backbones to time")
    parser.add_argument("--fused", action="store_true",
                        help="CUDA: also time generation with the decode step torch.compile'd before its capture "
                             "(generate(..., compile='fused'))")
    parser.add_argument("--module-step", action="store_true",
                        help="CUDA: also time the captured generation with the fused step kernels off (the "
                             "blocks' module path), beside the default row")
    parser.add_argument("--compile", action="store_true",
                        help="also train both implementations under torch.compile (extra rows)")
    parser.add_argument("--local-sdpa", nargs="+", default=["auto"], choices=list(SDPA_BACKENDS),
                        help="SDPA backend(s) of longseq's local attention during training; one training "
                             "row per value (the first is used for compiled rows and generation)")
    parser.add_argument("--module-path", action="store_true",
                        help="also train longseq with its blocks called as modules (fast path off)")
    parser.add_argument("--profile", action="store_true",
                        help="print a torch.profiler kernel table of one eager training step of each "
                             "implementation")
    parser.add_argument("--profile-rows", type=int, default=30, help="rows of each profile table")
    parser.add_argument("--ref-heads", type=int, default=8, help="MEGABYTE-pytorch heads (both stages)")
    parser.add_argument("--ref-dim-head", type=int, default=64, help="MEGABYTE-pytorch head dim")
    parser.add_argument("--skip-reference", action="store_true", help="do not time MEGABYTE-pytorch")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON summary to this file")
    args = parser.parse_args()
    defaults = dict(preset="paper95m", context=4096, gen_bytes=256, ref_gen_bytes=64, train_len=8192,
                    batch=8, steps=10)
    if args.small:
        defaults.update(preset="tiny", context=256, gen_bytes=16, ref_gen_bytes=8, train_len=256, batch=2, steps=2)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    device = torch.device(args.device)
    gen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows: list[dict] = []
    for backbone in args.global_backbones:
        rows += bench_longseq(args, backbone, device, gen_dtype)
        release_memory(device)
    if not args.skip_reference:
        rows += bench_reference(args, device, gen_dtype)
        release_memory(device)
    add_ratios(rows)
    for row in rows:
        print(json.dumps(row), flush=True)

    print(f"\n{args.preset}, train {args.batch} x {args.train_len} bytes (AdamW, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}), generate at batch 1 after "
          f"{args.context} bytes of context ({args.gen_bytes} bytes longseq, {args.ref_gen_bytes} "
          f"MEGABYTE-pytorch), on {_device_name(device)}; x ref = longseq / MEGABYTE-pytorch "
          f"(same training mode)\n")
    print(markdown(rows))
    summary = dict(
        command=" ".join(sys.argv), device=_device_name(device), device_type=device.type,
        threads=torch.get_num_threads(), python=platform.python_version(), torch=torch.__version__,
        cuda=torch.version.cuda, longseq=longseq.__version__, megabyte_pytorch=_version("MEGABYTE-pytorch"),
        args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, rows=rows,
    )
    print("\n" + json.dumps(summary))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

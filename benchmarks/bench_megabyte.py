"""MEGABYTE throughput: training bytes/s and batch-1 generation bytes/s, longseq next to MEGABYTE-pytorch.

    python benchmarks/bench_megabyte.py --device cuda                      # paper95m, 4K context (H100)
    python benchmarks/bench_megabyte.py --device cpu --preset tiny --context 256 --train-len 256 \\
        --batch 2 --steps 2 --gen-bytes 16                                  # CPU smoke test

* training: one optimizer step = forward + backward + AdamW on ``--batch`` sequences of
  ``--train-len`` bytes (bf16 autocast on CUDA, fp32 on CPU); bytes/s counts predicted bytes.
* generation: batch 1, a ``--context``-byte prompt, then ``--gen-bytes`` greedy bytes. longseq prefills
  its state once and decodes one byte per ``step`` (the global model advances once per patch);
  MEGABYTE-pytorch has no cache, so each new byte re-runs ``forward`` over the whole sequence (what its
  ``generate`` does). Decode bytes/s excludes longseq's prefill, which is reported on its own. The
  model runs in bf16 on CUDA, fp32 on CPU.

MEGABYTE-pytorch (``pip install MEGABYTE-pytorch``) is optional: without it its rows say "not installed".
It is configured with the same widths, depths and patch size, ``max_seq_len=(patches, P)``, its default
``dim_head=64, heads=8`` (both stages) and flash attention on CUDA; its blocks differ (GELU MLP x4,
multi-query attention, ALiBi, token shift), so the parameter counts are printed next to the speeds.

Prints one JSON line per row, then a Markdown table and a JSON summary with device and versions.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import platform
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import longseq
from longseq.models import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def time_training(
    model: torch.nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor], seq: torch.Tensor,
    steps: int, warmup: int, device: torch.device,
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
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = one_step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(step_s=seconds, loss=loss, peak_gib=peak)


@torch.no_grad()
def time_longseq_generation(model, prompt: torch.Tensor, new_bytes: int, device: torch.device) -> dict:
    """Prefill the state with ``prompt`` [1, C], then greedy-decode ``new_bytes`` bytes one ``step`` each."""
    model.eval()
    _sync(device)
    start = time.perf_counter()
    state = model.init_state(1)
    logits, state = model.step(prompt, state)
    _sync(device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_bytes):
        token = logits[:, -1].argmax(-1, keepdim=True)
        logits, state = model.step(token, state)
    _sync(device)
    decode = time.perf_counter() - start
    return dict(prefill_s=prefill, decode_s=decode, state_mib=state.nbytes() / 2**20)


@torch.no_grad()
def time_recompute_generation(model, prompt: torch.Tensor, new_bytes: int, device: torch.device) -> dict:
    """Greedy decoding by re-running ``model(seq)`` over the whole sequence for every new byte."""
    model.eval()
    seq = prompt
    _sync(device)
    start = time.perf_counter()
    for _ in range(new_bytes):
        token = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, token], dim=1)
    _sync(device)
    return dict(prefill_s=None, decode_s=time.perf_counter() - start, state_mib=None)


def bench_longseq(args, backbone: str, device: torch.device, gen_dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    model = build_model("megabyte", args.preset, global_backbone=backbone).to(device)
    cfg = model.config
    need = max(args.train_len, args.context + args.gen_bytes)
    if need > cfg.max_seq_len:
        raise SystemExit(f"--train-len / --context + --gen-bytes need {need} bytes; {args.preset} has "
                         f"max_seq_len={cfg.max_seq_len}")
    row = dict(impl=f"longseq MEGABYTE ({backbone} global)", params=model.num_params())
    seq = torch.randint(0, 256, (args.batch, args.train_len), device=device)

    def loss_fn(s: torch.Tensor) -> torch.Tensor:
        # Inputs of train_len - 1 bytes: whole patches of targets (t = 0..train_len-1), no padding.
        logits = model(s[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, 256), s[:, 1:].reshape(-1))

    if args.steps:
        t = time_training(model, loss_fn, seq, args.steps, args.warmup, device)
        row.update(train_step_s=t["step_s"], train_peak_gib=t["peak_gib"],
                   train_bytes_per_s=args.batch * (args.train_len - 1) / t["step_s"])
    if args.gen_bytes:
        model.to(gen_dtype)
        prompt = torch.randint(0, 256, (1, args.context), device=device)
        time_longseq_generation(model, prompt[:, : 2 * cfg.patch_size], 2 * cfg.patch_size, device)  # warm-up
        g = time_longseq_generation(model, prompt, args.gen_bytes, device)
        row.update(gen_prefill_s=g["prefill_s"], gen_bytes_per_s=args.gen_bytes / g["decode_s"],
                   gen_state_mib=g["state_mib"])
    return row


def bench_reference(args, device: torch.device, gen_dtype: torch.dtype) -> dict:
    row = dict(impl="MEGABYTE-pytorch", params=None)
    try:
        from MEGABYTE_pytorch import MEGABYTE
    except ImportError as e:
        row["status"] = f"not installed ({e.__class__.__name__})"
        return row
    cfg = longseq.MegabyteConfig.from_preset(args.preset)
    P = cfg.patch_size
    patches = -(-max(args.train_len, args.context + args.gen_bytes) // P)
    torch.manual_seed(0)
    try:
        model = MEGABYTE(
            num_tokens=256, dim=(cfg.d_global, cfg.d_local), depth=(cfg.n_global_layers, cfg.n_local_layers),
            max_seq_len=(patches, P), dim_head=args.ref_dim_head, heads=args.ref_heads,
            flash_attn=device.type == "cuda",
        ).to(device)
    except TypeError as e:  # another release with another signature
        row["status"] = f"unsupported MEGABYTE-pytorch API: {e}"
        return row
    row["params"] = _num_params(model)
    seq = torch.randint(0, 256, (args.batch, args.train_len), device=device)
    if args.steps:
        # Its loss predicts bytes 1..L-1 of the L given (like longseq's inputs[:-1] -> targets[1:]).
        t = time_training(model, lambda s: model(s, return_loss=True), seq, args.steps, args.warmup, device)
        row.update(train_step_s=t["step_s"], train_peak_gib=t["peak_gib"],
                   train_bytes_per_s=args.batch * (args.train_len - 1) / t["step_s"])
    if args.gen_bytes:
        model.to(gen_dtype)
        prompt = torch.randint(0, 256, (1, args.context), device=device)
        time_recompute_generation(model, prompt, 2, device)  # warm-up
        g = time_recompute_generation(model, prompt, args.gen_bytes, device)
        row.update(gen_prefill_s=None, gen_bytes_per_s=args.gen_bytes / g["decode_s"])
    return row


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available)")
    parser.add_argument("--preset", default="paper95m",
                        help="MegabyteConfig preset (paper95m: dims 768/512, depths 12/4, P=8)")
    parser.add_argument("--context", type=int, default=4096, help="generation prompt length in bytes")
    parser.add_argument("--gen-bytes", type=int, default=256, help="bytes to generate (0: skip generation)")
    parser.add_argument("--train-len", type=int, default=8192, help="training sequence length in bytes")
    parser.add_argument("--batch", type=int, default=8, help="training batch size")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (0: skip training)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--global-backbones", nargs="+", default=["transformer", "gla"],
                        choices=["transformer", "gla"], help="longseq global backbones to time")
    parser.add_argument("--ref-heads", type=int, default=8, help="MEGABYTE-pytorch heads (both stages)")
    parser.add_argument("--ref-dim-head", type=int, default=64, help="MEGABYTE-pytorch head dim")
    parser.add_argument("--skip-reference", action="store_true", help="do not time MEGABYTE-pytorch")
    args = parser.parse_args()

    device = torch.device(args.device)
    gen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = [bench_longseq(args, backbone, device, gen_dtype) for backbone in args.global_backbones]
    if not args.skip_reference:
        rows.append(bench_reference(args, device, gen_dtype))
    for row in rows:
        print(json.dumps(row), flush=True)

    print(f"\n{args.preset}, train {args.batch} x {args.train_len} bytes, generate {args.gen_bytes} bytes "
          f"after {args.context} bytes of context, batch 1, on {_device_name(device)}\n")
    print("| implementation | params | train bytes/s | train peak GiB | gen bytes/s | prefill s "
          "| state MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "status" in r:
            print(f"| {r['impl']} | — | {r['status']} | — | — | — | — |")
            continue
        params = f"{r['params'] / 1e6:.1f}M"
        print(f"| {r['impl']} | {params} | {_fmt(r.get('train_bytes_per_s'), ',.0f')} "
              f"| {_fmt(r.get('train_peak_gib'), '.2f')} | {_fmt(r.get('gen_bytes_per_s'), ',.1f')} "
              f"| {_fmt(r.get('gen_prefill_s'), '.3f')} | {_fmt(r.get('gen_state_mib'), '.2f')} |")
    summary = dict(
        command=" ".join(sys.argv), device=_device_name(device), device_type=device.type,
        threads=torch.get_num_threads(), python=platform.python_version(), torch=torch.__version__,
        cuda=torch.version.cuda, longseq=longseq.__version__, megabyte_pytorch=_version("MEGABYTE-pytorch"),
        args=vars(args), rows=rows,
    )
    print("\n" + json.dumps(summary))


if __name__ == "__main__":
    main()

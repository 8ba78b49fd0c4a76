r"""Registers, spills and shared memory of each Triton GLA chunk kernel as the package launches it, compiled for
an NVIDIA GPU on any machine: no GPU needed, only Triton and its bundled ``ptxas``.

    python benchmarks/gla_kernel_resources.py [--shapes 16x128x128x8x4096 ...] [--set QKG_BK=32 ...]

The package's forward and backward run on CPU tensors with every kernel launch turned into a compile for the
target (``--arch``, default 90 = H100/H200): the launch code picks tiles, warps and stages exactly as it does on
the GPU (``--sms`` stands in for the card's SM count, which the state passes' segment plan reads). Each kernel's
PTX then goes through ``ptxas -v`` for its registers per thread and spills. From those and the shared memory the
table derives how many programs fit one SM (registers: 64K per SM; shared memory: ``--smem-kib``; at most 64
warps) and so how many warps an SM holds to hide latency. A kernel at 255 registers with 8 warps fits one program
per SM: 8 warps.

The numbers come from this machine's Triton: to match the device's (RESULTS.md names its version), put that
version first on the path, e.g. ``pip install --target /tmp/t36 triton==3.6.0`` and ``PYTHONPATH=/tmp/t36``.
``--set NAME=VALUE`` sets constants of ``longseq.ops.gla.triton.common`` first (as ``ab_gla_triton.py``'s
variants do), to see a tuning choice's effect on registers before timing it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

os.environ.pop("TRITON_INTERPRET", None)  # kernels must be JIT functions, not interpreted ones

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["16x128x128x8x4096", "4x256x512x8x4096"],
                   help="HxKxVxBxT per shape (bf16 q, k, v; fp32 gate)")
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                   help="constants of longseq.ops.gla.triton.common to set first")
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (Hopper) or 80 (Ampere)")
    p.add_argument("--sms", type=int, default=132, help="SM count the launch code plans for (H100 SXM: 132)")
    p.add_argument("--smem-kib", type=int, default=228, help="shared memory per SM in KiB (H100: 228)")
    p.add_argument("--scale-fp64", action="store_true",
                   help="type each kernel's float `scale` argument fp64, as torch.compile (inductor) passes it, add a "
                   "decode step's launch, and count the fp64 arithmetic left in each kernel's PTX (last column; 0 when "
                   "the kernel casts it)")
    args = p.parse_args(argv)
    for shape in args.shapes:
        if not re.fullmatch(r"\d+x\d+x\d+x\d+x\d+", shape):
            p.error(f"--shapes: {shape!r} is not HxKxVxBxT (five integers joined by 'x')")
    for item in args.set:
        if item.count("=") != 1:
            p.error(f"--set: {item!r} is not NAME=VALUE")
    return args


class TargetOnlyDriver:
    """Stands in for Triton's CUDA driver where JIT functions ask for the device: compiles for ``target`` and
    never loads or launches anything."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


@dataclass
class Launch:
    name: str
    programs: int
    compiled: object


def record_launches(run_package, target: GPUTarget) -> list[Launch]:
    """Run ``run_package()`` with each JIT launch compiled for ``target`` instead of run; the launches in order."""
    launches: list[Launch] = []
    original_run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        compiled = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        grid = grid(kwargs) if callable(grid) else grid
        programs = 1
        for extent in grid:
            programs *= int(extent)
        launches.append(Launch(self.fn.__name__, programs, compiled))
        return compiled

    previous = getattr(triton_driver, "_active", None)  # None off a GPU: no driver to go back to
    triton_driver.set_active(TargetOnlyDriver(target))
    JITFunction.run = compile_only
    try:
        run_package()
    finally:
        JITFunction.run = original_run
        triton_driver.set_active(previous)
    return launches


def type_scale_as_fp64() -> None:
    """Replace each GLA kernel taking a float ``scale`` by a copy whose ``scale`` is annotated ``fp64``: Triton then
    compiles it with the argument typed as inductor types a Python float (the launch code looks the kernels up in
    its module at call time, so the copies are what it launches)."""
    import types

    from longseq.ops.gla.triton import chunk_bwd, chunk_fwd, recurrent

    for module in (chunk_fwd, chunk_bwd, recurrent):
        for name, kernel in list(vars(module).items()):
            if isinstance(kernel, JITFunction) and "scale" in kernel.signature.parameters:
                fn = kernel.fn
                copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
                copy.__annotations__ = {**fn.__annotations__, "scale": "fp64"}
                copy.__module__, copy.__qualname__ = fn.__module__, fn.__qualname__
                setattr(module, name, triton.jit(copy))


def fp64_arithmetic(ptx: str) -> int:
    """fp64 arithmetic instructions in ``ptx`` (not counting conversions such as ``cvt.rn.f32.f64``)."""
    ops = "add|sub|mul|fma|div|neg|abs|max|min|ex2|lg2|rcp|sqrt|setp|selp"
    return len(re.findall(rf"^\s*(?:@!?%p\d+\s+)?(?:{ops})(?:\.\w+)*\.f64\b", ptx, flags=re.M))


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers per thread, spill store bytes, spill load bytes) from ``ptxas -v`` on one kernel's PTX, with the
    first of Triton's bundled assemblers that takes this PTX version (newer Tritons emit PTX for their newer one)."""
    tools = [triton.knobs.nvidia.ptxas, getattr(triton.knobs.nvidia, "ptxas_blackwell", None)]
    suffix = "a" if arch >= 90 else ""
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        for tool in filter(None, tools):
            cmd = [tool.path, "-v", f"--gpu-name=sm_{arch}{suffix}", path, "-o", os.path.join(tmp, "kernel.cubin")]
            out = subprocess.run(cmd, capture_output=True, text=True)
            report = out.stdout + out.stderr
            if out.returncode == 0:
                break
            failures.append(f"{tool.path}: exit status {out.returncode}\n{report}")
        else:
            raise RuntimeError("no ptxas took the kernel's PTX:\n" + "\n".join(failures))
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if regs is None:
        raise RuntimeError(f"no register count in ptxas output:\n{report}")
    return int(regs.group(1)), int(spills.group(1)) if spills else 0, int(spills.group(2)) if spills else 0


def programs_per_sm(regs: int, warps: int, shared: int, smem_kib: int) -> int:
    """Programs of one kernel resident per SM, by registers (allocated per warp in units of 256), shared memory
    and the warp limit."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = REGISTERS_PER_SM // (regs_per_warp * warps)
    by_smem = (smem_kib * 1024) // shared if shared else MAX_WARPS_PER_SM
    return min(by_regs, by_smem, MAX_WARPS_PER_SM // warps)


def run_decode_step(H: int, K: int, V: int, B: int):
    """One decode step of the package (``recurrent_step``, B rows) on CPU tensors: bf16 q, k, v, an fp32 gate and
    the fp32 state, as a compiled decode step passes them."""
    from longseq.ops.gla.triton.autograd import recurrent_step

    def run():
        q, k, g = (torch.zeros(B, H, K, dtype=dtype) for dtype in (torch.bfloat16, torch.bfloat16, torch.float32))
        recurrent_step(q, k, torch.zeros(B, H, V, dtype=torch.bfloat16), g, K**-0.5, torch.zeros(B, H, K, V))

    return run


def run_shape(H: int, K: int, V: int, B: int, T: int):
    """The package's forward and backward on CPU tensors of this shape (values never computed): bf16 q, k, v and an
    fp32 gate, as the GLA layer and the benchmarks pass them (the backward then reuses the forward's cumsums)."""
    from longseq.ops.gla.triton.autograd import chunk_gla

    def run():
        q, k = (torch.zeros(B, T, H, K, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        v = torch.zeros(B, T, H, V, dtype=torch.bfloat16, requires_grad=True)
        g = torch.zeros(B, T, H, K, dtype=torch.float32, requires_grad=True)
        o, _ = chunk_gla(q, k, v, g, K**-0.5)
        o.backward(torch.zeros_like(o))

    return run


def main(argv=None) -> None:
    args = parse_args(argv)
    from ab_gla_triton import set_constants  # this folder is on the path when run as a script

    from longseq.ops.gla.triton import common

    set_constants(common, args.set, "--set")
    if args.scale_fp64:
        type_scale_as_fp64()
    common.cuda_sm_count = lambda device: args.sms  # the segment plan and the strong kernels' grid on --sms SMs

    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, target sm_{args.arch}, {args.sms} SMs, {args.smem_kib} KiB shared per SM"
          + (f", set: {' '.join(args.set)}" if args.set else ""))
    print("\n| shape | kernel | programs | warps | stages | registers | spill stores / loads (B) | shared (KiB) "
          "| programs per SM | warps per SM |" + (" fp64 ops |" if args.scale_fp64 else ""))
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.scale_fp64 else ""))
    for shape in args.shapes:
        H, K, V, B, T = (int(x) for x in shape.split("x"))
        launches = record_launches(run_shape(H, K, V, B, T), target)
        if args.scale_fp64:  # a compiled decode step types its scale fp64 too
            decode = record_launches(run_decode_step(H, K, V, B), target)
            launches += [Launch(f"{launch.name} (decode step)", launch.programs, launch.compiled) for launch in decode]
        for launch in launches:
            meta = launch.compiled.metadata
            regs, stores, loads = ptxas_usage(launch.compiled.asm["ptx"], args.arch)
            per_sm = programs_per_sm(regs, meta.num_warps, meta.shared, args.smem_kib)
            print(f"| {shape} | {launch.name} | {launch.programs} | {meta.num_warps} | {meta.num_stages} | {regs} "
                  f"| {stores} / {loads} | {meta.shared / 1024:.0f} | {per_sm} | {per_sm * meta.num_warps} |"
                  + (f" {fp64_arithmetic(launch.compiled.asm['ptx'])} |" if args.scale_fp64 else ""))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

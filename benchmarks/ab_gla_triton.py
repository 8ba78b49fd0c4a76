r"""A/B of Triton GLA kernel versions in one process: the repository's kernels against frozen copies.

A kernel change is only judged against the kernels it replaces, timed in the same process on the same card
(two hosts of one card model have timed the same kernels 12-25% apart). Freeze a version as a plain package
(``--freeze REV:FOLDER``, REV a git revision or ``worktree``; no GPU needed), edit copies as you like, then time:

    python benchmarks/ab_gla_triton.py --freeze 259dde4:base_triton worktree:mine
    python benchmarks/ab_gla_triton.py --variants base_triton mine [more_dirs ...] [--out ab.jsonl]

A variant ``folder:NAME=VALUE,...`` times a copy of ``folder`` with those constants of its ``common`` module
set (e.g. ``seg_triton:SEGMENT_PROGRAMS_PER_SM=8``), to time a tuning rule's settings side by side.

(``benchmarks/tmp_ab/`` is git-ignored: name it in a device call's carry list.) Each variant is timed
forward-only (no grad) and forward+backward with ``triton.testing.do_bench`` (median ms), interleaved per
shape so clock drift hits every variant alike, and its outputs and gradients are compared with the
repository's: ``max_abs_diff`` is 0 when a change only moved work between kernels.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [  # (H, K, V, B, T) at B * T = 32K: the two shapes, short and long sequences
    (16, 128, 128, 16, 2048),
    (16, 128, 128, 4, 8192),
    (16, 128, 128, 1, 32768),
    (4, 256, 512, 16, 2048),
    (4, 256, 512, 4, 8192),
    (4, 256, 512, 1, 32768),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", help="package folders under --root to time")
    p.add_argument("--freeze", nargs="+", metavar="REV:FOLDER",
                   help="first copy the kernel package at git revision REV (or 'worktree') into a new folder "
                   "--root/FOLDER")
    p.add_argument("--root", default="benchmarks/tmp_ab", help="folder holding the frozen packages")
    p.add_argument("--shapes", nargs="+", default=None, help="HxKxVxBxT, e.g. 16x128x128x16x2048")
    p.add_argument("--rep", type=int, default=60, help="do_bench's rep (ms)")
    p.add_argument("--out", default=None, help="append one JSON line per (shape, variant)")
    args = p.parse_args(argv)
    if not args.variants and not args.freeze:
        p.error("give --variants to time, or --freeze to make frozen copies")
    return args


PACKAGE = "src/longseq/ops/gla/triton"


def read_frozen(root: Path, spec: str) -> tuple[Path, dict[str, str]]:
    """For ``--freeze REV:FOLDER``: the folder ``root/FOLDER`` to make and the kernel package's sources at git
    revision ``REV`` (or in the working tree), each checked before anything is written. A folder that already
    exists is refused, never replaced: it may hold a variant's edits."""
    rev, sep, folder = spec.partition(":")
    if not sep or not rev or not folder.isidentifier():
        raise SystemExit(f"--freeze {spec!r}: expected REV:FOLDER with FOLDER a Python package name, e.g. "
                         "259dde4:base_triton or worktree:mine")
    shadowed = shadowed_module(folder, root)
    if shadowed:
        raise SystemExit(f"--freeze {spec!r}: a package named {folder!r} would shadow the module {shadowed} once "
                         "the folder is on sys.path (torch imports it); name another folder")
    out = root / folder
    if out.exists():
        raise SystemExit(f"--freeze {spec!r}: {out} already exists; remove it or name another folder")
    repo = Path(__file__).resolve().parents[1]
    if rev == "worktree":
        return out, {f.name: f.read_text() for f in sorted((repo / PACKAGE).glob("*.py"))}

    def git(*cmd):
        done = subprocess.run(["git", "-C", str(repo), *cmd], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"--freeze {spec!r}: git {' '.join(cmd)} failed: {done.stderr.strip()}")
        return done.stdout

    names = [n for n in git("ls-tree", "--name-only", f"{rev}:{PACKAGE}").split() if n.endswith(".py")]
    sources = {n: git("show", f"{rev}:{PACKAGE}/{n}") for n in names}
    if "__init__.py" not in sources:
        raise SystemExit(f"--freeze {spec!r}: no kernel package at {PACKAGE} in {rev}")
    return out, sources


def shadowed_module(name: str, root: Path) -> str | None:
    """Where the module ``name`` lives if one is importable from outside ``root`` (a standard-library module such
    as ``queue``, or an installed package): a frozen package of that name in ``root``, first on ``sys.path``, would
    replace it for every import."""
    if name in sys.stdlib_module_names or name in sys.builtin_module_names:
        return f"{name} (standard library)"
    spec = importlib.util.find_spec(name)
    if spec is None or (spec.origin and Path(spec.origin).resolve().is_relative_to(root)):
        return None
    return f"{name} ({spec.origin})"


def write_frozen(out: Path, sources: dict[str, str]) -> None:
    """Write ``sources`` into ``out`` as a top-level package: its relative imports from the rest of longseq
    (``from ...hardware``) become absolute."""
    out.mkdir(parents=True)
    levels = PACKAGE.split("/")[1:]  # longseq, ops, gla, triton: `from ..x` is longseq.ops.gla.x
    for name, text in sources.items():
        def absolute(m):
            return f"from {'.'.join(levels[: len(levels) + 1 - len(m.group(1))])}.{m.group(2)} import"

        (out / name).write_text(re.sub(r"^from (\.{2,})(\w[\w.]*) import", absolute, text, flags=re.M))


def load_variant(root: Path, spec: str, index: int):
    """``chunk_gla`` of the package ``root/folder`` for ``folder[:NAME=VALUE,...]``; with settings, of a copy
    (a package imports once per name) whose ``common`` constants are set to them."""
    folder, _, settings = spec.partition(":")
    shadowed = shadowed_module(folder, root)
    if shadowed:
        raise SystemExit(f"variant {spec!r}: a package named {folder!r} shadows the module {shadowed}; rename the "
                         "folder")
    if not (root / folder / "__init__.py").is_file():
        raise SystemExit(f"variant {spec!r}: {root / folder} is not a frozen kernel package (see the docstring)")
    if settings and not all(item.count("=") == 1 for item in settings.split(",")):
        raise SystemExit(f"variant {spec!r}: settings must read NAME=VALUE,...")
    if not settings:
        return importlib.import_module(folder).chunk_gla
    name = f"_ab{index}_{folder}"
    shutil.rmtree(root / name, ignore_errors=True)
    shutil.copytree(root / folder, root / name)
    package = importlib.import_module(name)
    set_constants(importlib.import_module(f"{name}.common"), settings.split(","), f"variant {spec!r}")
    return package.chunk_gla


def set_constants(common, items: list[str], what: str) -> None:
    """Set ``NAME=VALUE`` constants of a kernel package's ``common`` module, each value converted to the type the
    constant has (``"-1"``, ``"1e6"``, ``"False"``); ``SystemExit`` naming ``what`` for an unknown name or a value
    that does not read as one. Also used by ``gla_kernel_resources.py --set``."""
    for item in items:
        key, value = item.split("=")
        if not hasattr(common, key):
            raise SystemExit(f"{what}: {common.__name__} has no constant {key!r}")
        kind = type(getattr(common, key))
        try:
            setattr(common, key, kind(ast.literal_eval(value)))
        except (ValueError, SyntaxError, TypeError):
            raise SystemExit(f"{what}: {key}={value} is not of type {kind.__name__} (the type of {key})") from None


def make_inputs(H, K, V, B, T, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, device="cuda", generator=gen).bfloat16().requires_grad_() for _ in range(2))
    v = torch.randn(B, T, H, V, device="cuda", generator=gen).bfloat16().requires_grad_()
    g = (F.logsigmoid(torch.randn(B, T, H, K, device="cuda", generator=gen)) / 16).requires_grad_()
    do = torch.randn(B, T, H, V, device="cuda", generator=gen).bfloat16()
    return (q, k, v, g), do


def outputs_and_grads(fn, leaves, do):
    for x in leaves:
        x.grad = None
    o, _ = fn(*leaves, leaves[0].shape[-1] ** -0.5)
    o.backward(do)
    return [o.detach()] + [x.grad.clone() for x in leaves]


def main(argv=None) -> None:
    args = parse_args(argv)
    root = Path(args.root).resolve()
    frozen = [read_frozen(root, spec) for spec in args.freeze or []]  # every spec checked before any write
    if len({out for out, _ in frozen}) < len(frozen):
        raise SystemExit(f"--freeze {' '.join(args.freeze)}: two copies name the same folder")
    for (out, sources), spec in zip(frozen, args.freeze or [], strict=True):
        write_frozen(out, sources)
        print(f"froze {spec} into {out}")
    if not args.variants:
        return
    from longseq.ops.gla.triton import chunk_gla as current

    sys.path.insert(0, str(root))
    fns = {"current": current}
    for i, spec in enumerate(args.variants):
        fns[spec] = load_variant(root, spec, i)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for H, K, V, B, T in shapes:
        leaves, do = make_inputs(H, K, V, B, T)
        reference = outputs_and_grads(current, leaves, do)
        for name, fn in fns.items():
            got = outputs_and_grads(fn, leaves, do)
            diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, reference, strict=True))
            fwd_ms, fwd_bwd_ms = time_variant(fn, leaves, do, args.rep)
            row = {"H": H, "K": K, "V": V, "B": B, "T": T, "variant": name, "fwd_ms": fwd_ms,
                   "fwd_bwd_ms": fwd_bwd_ms, "max_abs_diff_vs_current": diff}
            print(f"H{H} K{K} V{V} B{B} T{T} {name:>14}: fwd {fwd_ms:.3f} ms, fwd+bwd {fwd_bwd_ms:.3f} ms, "
                  f"max |diff| vs current {diff:.3g}", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
        torch.cuda.empty_cache()


def time_variant(fn, leaves, do, rep: int) -> tuple[float, float]:
    """Median ms of a no-grad forward and of a forward+backward."""
    from triton.testing import do_bench

    scale = leaves[0].shape[-1] ** -0.5

    def fwd():
        with torch.no_grad():
            fn(*leaves, scale)

    def fwd_bwd():
        fn(*leaves, scale)[0].backward(do)

    return (do_bench(fwd, warmup=10, rep=rep),
            do_bench(fwd_bwd, warmup=10, rep=rep, grad_to_none=leaves))

if __name__ == "__main__":
    main()

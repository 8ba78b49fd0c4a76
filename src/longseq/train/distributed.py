"""Data parallelism applied from the outside: DDP and FSDP2 over ``torchrun`` processes.

Launch with ``torchrun --nproc-per-node N -m longseq train ... --parallel ddp|fsdp``. The backend is NCCL
on CUDA and gloo on CPU. Model files know nothing of this module. Checkpoints hold full (unsharded)
state dicts gathered to rank 0, so they load on any number of ranks.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

PARALLEL_MODES = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, its device, and the parallel mode."""

    parallel: str
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.parallel != "none"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The device types ``--device`` takes (torch parses more, e.g. ``meta``, which cannot run a model), and the
#: forms that error messages list.
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
DEVICE_FORMS = "cpu, cuda, cuda:N (the GPU numbered N), mps or xpu"


def pick_device(requested: str | torch.device | None, local_rank: int = 0, name: str = "--device") -> torch.device:
    """``requested`` (``cpu``, ``cuda``, ``cuda:1``, a ``torch.device``, ...) or CUDA when available, else CPU.

    Raises ``ValueError`` naming ``name`` (the flag or argument) and its value for a string torch cannot parse
    (``tpu``, ``cuda:x``), a type that cannot run a model, or a device this machine does not have: torch's own
    ``RuntimeError`` would reach the user as a traceback."""
    if requested in (None, "", "auto"):
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ValueError(f"{name} {str(requested)!r} is not a device longseq can use; use {DEVICE_FORMS} "
                         f"(or leave {name} out: cuda if available, else cpu)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {requested} asked for CUDA but torch.cuda.is_available() is False")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name} {requested}: this machine has {count} CUDA device(s), cuda:0 ... "
                             f"cuda:{count - 1}")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name} {requested} asked for Apple's MPS but torch.backends.mps.is_available() is "
                         "False")
    elif device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ValueError(f"{name} {requested} asked for an Intel XPU but torch.xpu.is_available() is False")
    return device


def check_parallel(parallel: str) -> None:
    """Raise ``ValueError`` for an unknown mode, for FSDP on a torch without FSDP2, or for a multi-process
    launch (``WORLD_SIZE > 1``) without a parallel mode."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"unknown --parallel {parallel!r}; choose one of {PARALLEL_MODES}")
    if parallel == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError as err:
            raise ValueError(
                f"--parallel fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); "
                f"this is torch {torch.__version__}"
            ) from err
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel == "none" and world > 1:
        raise ValueError(
            f"launched as {world} processes (WORLD_SIZE={world}) but --parallel is 'none'; "
            "pass --parallel ddp or --parallel fsdp"
        )


def init_distributed(parallel: str, device: str | None = None) -> DistInfo:
    """Join the process group ``torchrun`` describes (a single process may run ddp/fsdp alone)."""
    check_parallel(parallel)
    if parallel == "none":
        return DistInfo("none", 0, 1, 0, pick_device(device))
    if "RANK" not in os.environ:  # a lone process: a world of one, e.g. to test the parallel code path
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"timeout": datetime.timedelta(minutes=30)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev  # binds NCCL to this GPU up front
        dist.init_process_group(backend, **kwargs)
    return DistInfo(parallel, rank, world, local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP: one replica a rank; FSDP2: ``fully_shard`` each block, then the root (parameters sharded
    over ranks)."""
    if info.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if info.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return model


def set_grad_sync(model: nn.Module, info: DistInfo, sync: bool):
    """A context manager: skip the gradient all-reduce on accumulation micro-steps that are not the last."""
    import contextlib

    if info.parallel == "ddp" and not sync:
        return model.no_sync()
    if info.parallel == "fsdp":
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_model_state(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The unsharded model weights on CPU (complete on rank 0; every rank must call this)."""
    if not info.distributed:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo, names: list[str]
) -> dict[str, Any]:
    """Optimizer state keyed by parameter names (complete on rank 0; every rank must call this).

    ``names`` are the parameter names in the optimizer's order (used without a process group)."""
    if not info.distributed:
        return optimizer_state_by_name(optimizer, names)
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=_options(full_state_dict=True, cpu_offload=True)
    )


def load_full_optimizer_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    info: DistInfo,
    names: list[str],
) -> None:
    """Inverse of :func:`full_optimizer_state`; every rank passes the full state read from disk."""
    if not info.distributed:
        optimizer.load_state_dict(optimizer_state_by_index(state, names))
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_options(full_state_dict=True))


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, Any]:
    """``optimizer.state_dict()`` with integer parameter ids replaced by parameter names (the format
    ``torch.distributed.checkpoint`` uses), so one checkpoint serves every parallel mode."""
    sd = optimizer.state_dict()
    return {
        "state": {
            names[i]: {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in s.items()}
            for i, s in sd["state"].items()
        },
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]],
    }


def optimizer_state_by_index(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    index = {n: i for i, n in enumerate(names)}
    missing = [p for g in state["param_groups"] for p in g["params"] if p not in index]
    if missing:
        raise ValueError(f"optimizer state names parameters the model does not have: {missing[:5]}")
    return {
        "state": {index[n]: s for n, s in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    }


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over ranks (identity without a process group)."""
    if info.distributed and info.world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a signal reached one of them)."""
    if not (info.distributed and info.world_size > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.distributed and info.world_size > 1:
        dist.barrier()

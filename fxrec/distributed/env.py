"""The process group and this process's place in it (torchrun's environment).

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. ``init_distributed()`` creates the
default process group when ``WORLD_SIZE > 1`` and none exists: NCCL when CUDA is available (after
``torch.cuda.set_device(LOCAL_RANK)``), else gloo. A group created by the user (the tutorial calls
``dist.init_process_group()`` itself) is used as it is.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["all_true", "collective_device", "default_device", "init_distributed", "is_distributed", "rank",
           "world_size"]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def is_distributed() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: the process group's, else ``RANK`` (0 without it)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def world_size() -> int:
    """The number of processes: the process group's, else ``WORLD_SIZE`` (1 without it)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return torch.device("cpu")


def init_distributed() -> bool:
    """Create the default process group from torchrun's environment if ``WORLD_SIZE > 1`` and there
    is none yet (module docstring). Returns whether this call created it."""
    if not dist.is_available() or dist.is_initialized() or _env_int("WORLD_SIZE", 1) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(default_device())
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    return True


def collective_device(hint: torch.device | None = None) -> torch.device:
    """Where small tensors of a collective must live for the default group's backend: the CPU for
    gloo (or a group with a gloo CPU backend), the current CUDA device for NCCL-only groups."""
    backend = str(dist.get_backend())
    if "gloo" in backend and (hint is None or hint.type == "cpu" or "nccl" not in backend):
        return torch.device("cpu")
    if hint is not None and hint.type == "cuda":
        return hint
    return torch.device("cuda", torch.cuda.current_device())


def all_true(flag: bool, device: torch.device | None = None) -> bool:
    """Whether ``flag`` holds on EVERY rank (an all-reduce MIN; just ``flag`` in one process).
    The Trainer asks it before each micro-batch ("does every rank have data?") so that all ranks
    stop together when one runs out."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())

"""``wrap_ddp``: a model's dense parameters under ``DistributedDataParallel``, its tables left out.

The tables' buffers (``HashTable``: index, rows, optimizer slots) are rank-local shards
(``fxrec.distributed.sharded``): DDP must never broadcast or all-reduce them, so they are on DDP's
ignore list. No buffer sync in forward (``broadcast_buffers=False``; torch >= 2.13 names it
``forward_sync_buffers`` and deprecates the old name): DDP's one sync at construction only copies
rank 0's small buffers (metric counters).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fxrec.distributed.env import is_distributed
from fxrec.nn.modules.hashtable import HashTable

__all__ = ["wrap_ddp"]


def wrap_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> DistributedDataParallel | None:
    """``model`` in DDP (module docstring), or None in one process or without trainable parameters."""
    if not is_distributed() or not any(p.requires_grad for p in model.parameters()):
        return None
    ignore = [f"{prefix}.{name}" if prefix else name
              for prefix, module in model.named_modules() if isinstance(module, HashTable)
              for name, _ in module.named_buffers(recurse=False)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    device_ids = [device.index] if device.type == "cuda" else None
    sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters, **sync)

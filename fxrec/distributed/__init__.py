"""fxrec.distributed: running on several processes (``torchrun``).

``env``: the process group from torchrun's environment (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``),
the device of a rank, and small collectives the Trainer needs (``all_true``).
``replicated``: keeping REPLICATED sparse tables identical on every rank (``sync_replicated_grads``,
called by the sparse optimizers' ``step``). Row-wise sharded tables (SPEC §8) replace it later.
"""

from fxrec.distributed.env import all_true, default_device, init_distributed, is_distributed, rank, world_size
from fxrec.distributed.replicated import sync_replicated_grads

__all__ = [
    "all_true",
    "default_device",
    "init_distributed",
    "is_distributed",
    "rank",
    "sync_replicated_grads",
    "world_size",
]

"""fxrec.distributed: running on several processes (``torchrun``).

``env``: the process group from torchrun's environment (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``),
the device of a rank, and small collectives the Trainer needs (``all_true``).
``sharded``: row-wise sharded tables (SPEC §8): each id's owner rank, lookups and row gradients
over all-to-all. ``checkpoint``: each rank saves its shard; loading reshards to any world size.
``ddp``: a model's dense parameters under DistributedDataParallel, its tables left out.
"""

from fxrec.distributed.env import all_true, default_device, init_distributed, is_distributed, rank, world_size
from fxrec.distributed.sharded import owner_of, reduce_grads_to_owners, reset_traffic, traffic

__all__ = [
    "all_true",
    "default_device",
    "init_distributed",
    "is_distributed",
    "owner_of",
    "rank",
    "reduce_grads_to_owners",
    "reset_traffic",
    "traffic",
    "world_size",
]

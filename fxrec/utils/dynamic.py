"""Mark a batch's row dimensions dynamic so one compiled graph serves every batch.

Batch sizes and ragged lengths change every step, including the 0/1 sizes that plain automatic
dynamic shapes specialize on (one recompile each). Marking dim 0 of every tensor as *unbacked*
makes Dynamo compile one graph with no guards on those sizes.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

__all__ = ["mark_dynamic_batch"]


def mark_dynamic_batch(batch):
    """Mark dim 0 of every tensor in ``batch`` (any pytree, RaggedTensors included) unbacked."""
    for leaf in pytree.tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            torch._dynamo.decorators.mark_unbacked(leaf, 0)
    return batch

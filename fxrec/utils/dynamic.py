"""Mark a batch's row dimensions dynamic so one compiled graph serves every batch.

Batch sizes and ragged lengths change every step, including the 0/1 sizes that plain automatic
dynamic shapes specialize on (one recompile each). Marking dim 0 of every tensor as *unbacked*
makes Dynamo compile one graph with no guards on those sizes.

The batch's dense tensors (every tensor that is not part of a ``RaggedTensor``: labels, dense
columns) share ONE unbacked size, the batch size (``shape_id``; a runtime assert checks that
they agree): the compiler then knows a model's predictions (rows of the dense columns) and its
labels have the same length, which a loss such as ``binary_cross_entropy`` checks. A
``RaggedTensor``'s values, offsets and weights each get their own.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from fxrec.ragged import RaggedTensor

__all__ = ["BATCH_ROWS", "mark_dynamic_batch"]

BATCH_ROWS = "fxrec_batch_rows"  # the shape_id of the dense tensors' first dimension


def mark_dynamic_batch(batch):
    """Mark dim 0 of every tensor in ``batch`` (any pytree, RaggedTensors included) unbacked; the
    dense tensors' share one size (module docstring). Returns ``batch``."""
    for leaf in pytree.tree_leaves(batch, is_leaf=lambda x: isinstance(x, RaggedTensor)):
        if isinstance(leaf, RaggedTensor):
            for part in pytree.tree_leaves(leaf):
                if isinstance(part, torch.Tensor) and part.dim() > 0:
                    torch._dynamo.decorators.mark_unbacked(part, 0)
        elif isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            torch._dynamo.decorators.mark_unbacked(leaf, 0, shape_id=BATCH_ROWS)
    return batch

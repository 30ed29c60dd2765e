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

__all__ = ["BATCH_ROWS", "dynamic_batch"]

BATCH_ROWS = "fxrec_batch_rows"  # the shape_id of the dense tensors' first dimension


def dynamic_batch(batch):
    """``batch`` (any pytree, RaggedTensors included) over aliases of its tensors with dim 0 of
    each marked unbacked, the dense tensors' sharing one size (module docstring). An alias is
    ``detach()`` (same storage and values); a tensor that requires grad is kept as it is (its
    alias would cut it from autograd's graph). The caller's other tensors stay unmarked: the
    marks would follow them into any other compiled code they meet. One pass over the batch."""
    leaves, spec = pytree.tree_flatten(batch, is_leaf=lambda x: isinstance(x, RaggedTensor))
    return pytree.tree_unflatten([_marked(leaf) for leaf in leaves], spec)


def _marked(leaf):
    if isinstance(leaf, RaggedTensor):  # values, offsets and weight: each its own size
        parts, spec = pytree.tree_flatten(leaf)
        return pytree.tree_unflatten([_marked_alias(part) for part in parts], spec)
    if isinstance(leaf, torch.Tensor):
        return _marked_alias(leaf, shape_id=BATCH_ROWS)
    return leaf


def _marked_alias(tensor: torch.Tensor, shape_id: str | None = None) -> torch.Tensor:
    alias = tensor if tensor.requires_grad else tensor.detach()
    if alias.dim() > 0:
        torch._dynamo.decorators.mark_unbacked(alias, 0, shape_id=shape_id)
    return alias

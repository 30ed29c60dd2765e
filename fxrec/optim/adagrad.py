"""``SparseAdagrad``: lazy Adagrad on the touched rows, element-wise or row-wise.

Through ``torch.ops.fxrec.sparse_adagrad_update``, for each row r with gradient g::

    element-wise (rowwise=False, slot "accum" [capacity, dim]): acc_r = acc_r + g*g
    row-wise     (rowwise=True,  slot "accum" [capacity, 1]):   acc_r = acc_r + mean(g*g)
    p_r = p_r - lr * g / (sqrt(acc_r) + eps)

Row-wise keeps one accumulator per row (TorchRec's ``ROWWISE_ADAGRAD`` rule, ``1/dim`` of the
memory). Defaults as ``torch.optim.Adagrad``: ``lr=1e-2``, ``eps=1e-10``,
``initial_accumulator_value=0`` (every new id's accumulator starts there). No lr decay or weight
decay. ``rowwise`` fixes the slot's shape, so it is an attribute of the optimizer, not of the
param group.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from fxrec.nn.modules.hashtable import HashTable
from fxrec.optim.sparse_optimizer import SparseOptimizer, check_hyperparameter

__all__ = ["SparseAdagrad"]


class SparseAdagrad(SparseOptimizer):
    """Sparse Adagrad (module docstring)."""

    def __init__(self, tables: Mapping[str, HashTable] | Iterable[HashTable], lr: float = 1e-2, eps: float = 1e-10,
                 initial_accumulator_value: float = 0.0, rowwise: bool = False) -> None:
        owner = type(self).__name__
        if not isinstance(rowwise, bool):
            raise ValueError(f"{owner}: rowwise must be a bool, got {rowwise!r}")
        self.rowwise = rowwise
        defaults = {
            "lr": check_hyperparameter(owner, "lr", lr),
            "eps": check_hyperparameter(owner, "eps", eps),
            "initial_accumulator_value": check_hyperparameter(
                owner, "initial_accumulator_value", initial_accumulator_value),
        }
        super().__init__(tables, defaults)

    def _slot_specs(self, table):
        width = 1 if self.rowwise else table.dim
        return {"accum": (width, self.defaults["initial_accumulator_value"])}

    def _update(self, param, scalars, slots, rows, grads, group):
        torch.ops.fxrec.sparse_adagrad_update(
            param, slots["accum"], rows, grads, float(group["lr"]), float(group["eps"]), self.rowwise
        )

    def _couples_columns(self) -> bool:
        return self.rowwise  # a row's step size is the mean over its columns

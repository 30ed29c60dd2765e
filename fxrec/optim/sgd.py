"""``SparseSGD``: ``p_r = p_r - lr * g`` on the touched rows (``torch.ops.fxrec.sparse_sgd_update``).
No slots, no momentum; default ``lr=1e-3`` as ``torch.optim.SGD``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from fxrec.nn.modules.hashtable import HashTable
from fxrec.optim.sparse_optimizer import SparseOptimizer, check_hyperparameter

__all__ = ["SparseSGD"]


class SparseSGD(SparseOptimizer):
    """Sparse SGD (module docstring)."""

    def __init__(self, tables: Mapping[str, HashTable] | Iterable[HashTable], lr: float = 1e-3) -> None:
        super().__init__(tables, {"lr": check_hyperparameter(type(self).__name__, "lr", lr)})

    def _slot_specs(self, table):
        return {}

    def _update(self, param, scalars, slots, rows, grads, group):
        torch.ops.fxrec.sparse_sgd_update(param, rows, grads, float(group["lr"]))

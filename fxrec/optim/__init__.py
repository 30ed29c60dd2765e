"""fxrec.optim: sparse optimizers for ``HashTable``s (SPEC §5.1), RecIS's ``recis.optim`` names.

``SparseAdamWTF``, ``SparseAdamW``, ``SparseAdam`` (``adam``), ``SparseAdagrad`` (``adagrad``),
``SparseSGD`` (``sgd``), on the base ``SparseOptimizer`` (``sparse_optimizer``: param group,
gradients, per-table state, ``state_dict``). Build one from ``filter_out_sparse_param(model)``::

    sparse_optim = SparseAdamWTF(filter_out_sparse_param(model), lr=0.001)
"""

from fxrec.optim.adagrad import SparseAdagrad
from fxrec.optim.adam import SparseAdam, SparseAdamW, SparseAdamWTF
from fxrec.optim.sgd import SparseSGD
from fxrec.optim.sparse_optimizer import SparseOptimizer

__all__ = ["SparseAdagrad", "SparseAdam", "SparseAdamW", "SparseAdamWTF", "SparseOptimizer", "SparseSGD"]

"""The sparse Adam family (SPEC §5.1): ``SparseAdamWTF``, ``SparseAdamW``, ``SparseAdam``.

Per table, per optimizer step (every step, see ``fxrec.optim.sparse_optimizer``):
``b1p *= beta1; b2p *= beta2`` (float64 tensors, in place); then for each row r with
gradient g, through ``torch.ops.fxrec.sparse_adam_update``::

    p_r = p_r * decay
    m_r = beta1*m_r + (1-beta1)*g ;  v_r = beta2*v_r + (1-beta2)*g*g
    p_r -= lr * sqrt(1-b2p)/(1-b1p) * m_r / (sqrt(v_r) + eps)

``SparseAdamWTF``: ``decay = 1 - weight_decay`` (TF style, no lr factor); ``SparseAdamW``:
``decay = 1 - lr*weight_decay`` (torch's AdamW, with the group's current lr); ``SparseAdam``:
``decay = 1``. Slots ``exp_avg`` and ``exp_avg_sq`` (``[capacity, dim]``, initially 0).

Hyperparameters are torch's (``betas=(beta1, beta2)``, kept in the param group so schedulers
that cycle momentum find them); RecIS's ``beta1=``/``beta2=`` keywords are accepted too.
RecIS's ``use_nesterov``/``amsgrad`` are not (RecIS did not support them either).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Mapping

import torch

from fxrec.nn.modules.hashtable import HashTable
from fxrec.optim.sparse_optimizer import SparseOptimizer, check_hyperparameter

__all__ = ["SparseAdam", "SparseAdamW", "SparseAdamWTF"]

Tables = Mapping[str, HashTable] | Iterable[HashTable]


def _betas(owner: str, betas, beta1, beta2) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{owner}: betas must be a pair (beta1, beta2), got {betas!r}")
    if beta1 is not None or beta2 is not None:
        if tuple(betas) != (0.9, 0.999):
            raise ValueError(f"{owner}: give betas or beta1/beta2, not both")
        betas = (0.9 if beta1 is None else beta1, 0.999 if beta2 is None else beta2)
    return (check_hyperparameter(owner, "betas[0]", betas[0], 0.0, 1.0, high_open=True),
            check_hyperparameter(owner, "betas[1]", betas[1], 0.0, 1.0, high_open=True))


class _SparseAdamBase(SparseOptimizer):
    """Shared by the family; subclasses define ``_decay(group)``."""

    def __init__(self, tables: Tables, lr: float, betas, eps: float, weight_decay: float | None,
                 beta1: float | None, beta2: float | None, max_weight_decay: float = float("inf")) -> None:
        owner = type(self).__name__
        defaults = {
            "lr": check_hyperparameter(owner, "lr", lr),
            "betas": _betas(owner, betas, beta1, beta2),
            "eps": check_hyperparameter(owner, "eps", eps),
        }
        if weight_decay is not None:  # SparseAdam has none
            defaults["weight_decay"] = check_hyperparameter(owner, "weight_decay", weight_decay, high=max_weight_decay)
        super().__init__(tables, defaults)

    def _new_table_state(self, device):
        # b1p/b2p: float64 of shape [1], not 0-d (fxrec.optim.sparse_optimizer: torch.compile drops
        # in-place updates of 0-d CPU float64 inputs); state_dict gives them 0-d all the same.
        ones = {key: torch.ones(1, dtype=torch.float64, device=device) for key in ("b1p", "b2p")}
        return {**super()._new_table_state(device), **ones}

    def _slot_specs(self, table):
        return {"exp_avg": (table.dim, 0.0), "exp_avg_sq": (table.dim, 0.0)}

    @abstractmethod
    def _decay(self, group) -> float:
        """The factor ``p`` is multiplied by before the update (module docstring)."""

    def _advance(self, states, group):
        """``b1p *= beta1; b2p *= beta2`` ([1] float64 tensors, in place:
        ``fxrec.optim.sparse_optimizer``), then each table's bias corrections ``1 - b1p``,
        ``1 - b2p`` ([1] tensors): three foreach ops over both products of all tables."""
        beta1, beta2 = (float(b) for b in group["betas"])
        n = len(states)
        products = [state["b1p"] for state in states] + [state["b2p"] for state in states]
        torch._foreach_mul_(products, [beta1] * n + [beta2] * n)
        # 1 - b as (-b) + 1: the same correctly rounded float64 difference
        corrections = torch._foreach_add(torch._foreach_neg(products), 1.0)
        return list(zip(corrections[:n], corrections[n:]))

    def _update(self, param, scalars, slots, rows, grads, group):
        beta1, beta2 = (float(b) for b in group["betas"])
        bias_correction1, bias_correction2 = scalars
        torch.ops.fxrec.sparse_adam_update(
            param, slots["exp_avg"], slots["exp_avg_sq"], rows, grads,
            float(group["lr"]), beta1, beta2, float(group["eps"]), self._decay(group),
            bias_correction1.reshape(()), bias_correction2.reshape(()),  # only the updated units' (one per storage)
        )


class SparseAdamWTF(_SparseAdamBase):
    """Sparse AdamW with TF-style decay ``p *= 1 - weight_decay`` (module docstring);
    ``weight_decay`` in ``[0, 1]``."""

    def __init__(self, tables: Tables, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, beta1: float | None = None, beta2: float | None = None) -> None:
        super().__init__(tables, lr, betas, eps, weight_decay, beta1, beta2, max_weight_decay=1.0)

    def _decay(self, group):
        return 1.0 - float(group["weight_decay"])


class SparseAdamW(_SparseAdamBase):
    """Sparse AdamW, torch-style decay ``p *= 1 - lr * weight_decay`` (module docstring)."""

    def __init__(self, tables: Tables, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, beta1: float | None = None, beta2: float | None = None) -> None:
        super().__init__(tables, lr, betas, eps, weight_decay, beta1, beta2)

    def _decay(self, group):
        return 1.0 - float(group["lr"]) * float(group["weight_decay"])


class SparseAdam(_SparseAdamBase):
    """Sparse (lazy) Adam without weight decay (module docstring)."""

    def __init__(self, tables: Tables, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 *, beta1: float | None = None, beta2: float | None = None) -> None:
        super().__init__(tables, lr, betas, eps, None, beta1, beta2)

    def _decay(self, group):
        return 1.0

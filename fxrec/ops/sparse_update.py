"""Fused sparse-optimizer row updates: ``fxrec::sparse_adam_update``,
``fxrec::sparse_adagrad_update``, ``fxrec::sparse_sgd_update`` (SPEC §5.1).

A table keeps its embedding and each optimizer slot as ``[capacity, dim]`` tensors that share
the row index. These ops update, IN PLACE, only the rows ``rows[i]`` of ``param`` and its slots
with the gradient ``grads[i]``; every other row is left untouched (lazy updates). They are the
only fxrec ops that mutate their inputs (``mutates_args`` names the tensors written).

    sparse_adam_update(param, exp_avg, exp_avg_sq, rows, grads, lr, beta1, beta2, eps, decay,
                       bias_correction1, bias_correction2)
        p_r = p_r * decay
        m_r = beta1 * m_r + (1 - beta1) * g;   v_r = beta2 * v_r + (1 - beta2) * g * g
        p_r = p_r - lr * sqrt(bias_correction2) / bias_correction1 * m_r / (sqrt(v_r) + eps)
    with ``bias_correction1 = 1 - b1p`` and ``bias_correction2 = 1 - b2p``, where ``b1p``/``b2p`` are
    the table's running products ``beta^t`` kept by the optimizer. The two bias corrections are
    0-d float64 TENSORS on ``param``'s device (the optimizer's per-table counters are tensors, so a
    compiled step neither guards on them nor syncs to read them); the other hyperparameters are
    floats (the param group's, constant across steps). One op serves the family:
    SparseAdamWTF (``decay = 1 - weight_decay``), SparseAdamW (``decay = 1 - lr * weight_decay``),
    SparseAdam (``decay = 1``).

    sparse_adagrad_update(param, accum, rows, grads, lr, eps, rowwise)
        element-wise (accum ``[capacity, dim]``): acc_r = acc_r + g * g
        row-wise     (accum ``[capacity, 1]``):   acc_r = acc_r + mean(g * g)   (TorchRec's rule)
        p_r = p_r - lr * g / (sqrt(acc_r) + eps)

    sparse_sgd_update(param, rows, grads, lr)
        p_r = p_r - lr * g

Decisions:
- ``rows`` must be UNIQUE within a call, but for ``-1``: the caller deduplicates the step's ids
  and sums their gradients first (SPEC §4.5). Rows ``-1`` are padding and skipped (their gradient
  is not read): ``HashTable.take_grads`` merges several lookups' rows without a host sync by
  keeping one entry per row and padding the others with -1. Duplicates are not detected (that
  would cost a sort); with them the result is undefined (on CUDA, programs race on the row).
- float32 only (param, slots, grads): the tables' dtype. ``rows`` is int64 1-D, ``grads`` is
  ``[len(rows), dim]``, ``dim >= 1``; param and slots may be strided views (e.g. of a larger
  buffer), their rows are addressed through their strides. Bad metadata raises
  ``TypeError``/``ValueError`` naming the argument. Row ids outside ``[-1, capacity)`` raise
  ``ValueError`` on CPU (the kernel reads rows anyway); on CUDA, where that check would need a
  host sync, such rows are skipped and nothing outside the tables is written.
- Hyperparameters are ``float`` (float64 on the host) but for Adam's bias corrections (0-d float64
  tensors); products of them (``1 - beta1``, the step size ``lr * sqrt(bias_correction2) /
  bias_correction1``) are formed in float64 (the step size from the 0-d tensors: by torch float64
  ops on CPU, ``_adam_step_size``, and inside the kernel on CUDA with IEEE sqrt/div, not by four
  more kernels per call; rounded to float32 once either way), then every tensor
  operation runs in float32, one correctly rounded operation at a time (sqrt included, see
  ``_sqrt_rn``), in the order written above. The CUDA kernels (``fxrec/ops/triton/sparse_update.py``)
  follow the same order with IEEE sqrt/div and no FMA contraction, so the two devices are meant to
  agree bit for bit (checked under the Triton interpreter), except the row-wise Adagrad mean,
  whose sum runs in a different order (a few ulps).
- No autograd: these are optimizer steps, run under ``torch.no_grad()``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from fxrec.ops.triton.sparse_update import (
    sparse_adagrad_update_triton,
    sparse_adam_update_triton,
    sparse_sgd_update_triton,
)

__all__ = ["sparse_adam_update", "sparse_adagrad_update", "sparse_sgd_update"]


# -- validation (metadata only: no host sync) ----------------------------------------------------

def _check_float32(op: str, name: str, t: Tensor) -> None:
    if t.dtype != torch.float32:
        raise TypeError(f"fxrec::{op}: {name} must be float32, got {t.dtype}")


def _check_update_args(op: str, param: Tensor, rows: Tensor, grads: Tensor, slots: dict[str, Tensor],
                       rowwise_slots: tuple[str, ...] = ()) -> None:
    """``param [capacity, dim]``, each slot ``[capacity, dim]`` (those in ``rowwise_slots``:
    ``[capacity, 1]``), ``rows [n]`` int64, ``grads [n, dim]``; float32 tensors; one device."""
    _check_float32(op, "param", param)
    if param.dim() != 2 or guard_or_false(param.shape[1] == 0):
        raise ValueError(
            f"fxrec::{op}: param must be 2-D [capacity, dim] with dim >= 1, got shape {tuple(param.shape)}"
        )
    capacity, dim = param.shape
    for name, slot in slots.items():
        _check_float32(op, name, slot)
        expected = (capacity, 1 if name in rowwise_slots else dim)
        if slot.dim() != 2 or guard_or_false(slot.shape[0] != expected[0]) or guard_or_false(
            slot.shape[1] != expected[1]
        ):
            raise ValueError(f"fxrec::{op}: {name} must have shape {tuple(expected)}, got {tuple(slot.shape)}")
    if rows.dtype != torch.int64:
        raise TypeError(f"fxrec::{op}: rows must be int64, got {rows.dtype}")
    if rows.dim() != 1:
        raise ValueError(f"fxrec::{op}: rows must be 1-D, got shape {tuple(rows.shape)}")
    _check_float32(op, "grads", grads)
    if grads.dim() != 2 or guard_or_false(grads.shape[0] != rows.shape[0]) or guard_or_false(grads.shape[1] != dim):
        raise ValueError(
            f"fxrec::{op}: grads must have shape [len(rows), dim] = [{rows.shape[0]}, {dim}], "
            f"got {tuple(grads.shape)}"
        )
    for name, t in (("rows", rows), ("grads", grads), *slots.items()):
        if t.device != param.device:
            raise ValueError(f"fxrec::{op}: {name} is on {t.device} but param on {param.device}")


def _rows_to_update(op: str, rows: Tensor, grads: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """CPU kernels only (reads ``rows``): the rows to update and their gradients, rows -1 (padding)
    left out; rows outside ``[-1, capacity)`` raise."""
    if rows.numel() == 0:
        return rows, grads
    low, high = (int(x) for x in torch.aminmax(rows))  # read once, compared on the host
    if low < -1 or high >= capacity:
        raise ValueError(f"fxrec::{op}: rows must lie in [0, capacity) = [0, {capacity}), or be -1 (padding)")
    if low >= 0:
        return rows, grads
    keep = (rows >= 0).nonzero().squeeze(1)
    return rows[keep], grads[keep]


def _adam_step_size(lr: float, bias_correction1: Tensor, bias_correction2: Tensor) -> Tensor:
    """Adam's step size ``lr * sqrt(bias_correction2) / bias_correction1`` as a 0-d float32 tensor:
    formed in float64 (correctly rounded mul, sqrt, div, in that order, from the 0-d float64
    tensors), then rounded to float32 once. The CUDA kernel forms it the same way in-kernel."""
    return (lr * bias_correction2.sqrt() / bias_correction1).to(torch.float32)


def _sqrt_rn(t: Tensor) -> Tensor:
    """Correctly rounded float32 sqrt. torch's vectorized CPU float32 sqrt is not (about 1 in 6
    results is 1 ulp off); the float64 sqrt rounded to float32 is (53 >= 2 * 24 + 2 bits), and it
    is what Triton's ``sqrt_rn`` computes on the GPU."""
    return t.double().sqrt().float()


# -- sparse_adam_update --------------------------------------------------------------------------

_ADAM_SCHEMA = (
    "(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor rows, Tensor grads, float lr, "
    "float beta1, float beta2, float eps, float decay, Tensor bias_correction1, Tensor bias_correction2) -> ()"
)


def _check_adam(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, rows: Tensor, grads: Tensor,
                bias_correction1: Tensor, bias_correction2: Tensor) -> None:
    _check_update_args("sparse_adam_update", param, rows, grads, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq})
    for name, bc in (("bias_correction1", bias_correction1), ("bias_correction2", bias_correction2)):
        if not isinstance(bc, Tensor) or bc.dtype != torch.float64 or bc.dim() != 0:
            got = f"a {bc.dtype} tensor of shape {tuple(bc.shape)}" if isinstance(bc, Tensor) else repr(bc)
            raise TypeError(f"fxrec::sparse_adam_update: {name} must be a 0-d float64 tensor, got {got}")
        if bc.device != param.device:
            raise ValueError(f"fxrec::sparse_adam_update: {name} is on {bc.device} but param on {param.device}")


@torch.library.custom_op(
    "fxrec::sparse_adam_update", mutates_args=("param", "exp_avg", "exp_avg_sq"), schema=_ADAM_SCHEMA
)
def sparse_adam_update(
    param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, rows: Tensor, grads: Tensor,
    lr: float, beta1: float, beta2: float, eps: float, decay: float,
    bias_correction1: Tensor, bias_correction2: Tensor,
) -> None:
    """Adam/AdamW/AdamWTF step on the rows ``rows`` (see the module docstring), in place."""
    _check_adam(param, exp_avg, exp_avg_sq, rows, grads, bias_correction1, bias_correction2)
    rows, grads = _rows_to_update("sparse_adam_update", rows, grads, param.shape[0])
    step_size = _adam_step_size(lr, bias_correction1, bias_correction2)
    p = param.index_select(0, rows) * decay
    m = exp_avg.index_select(0, rows) * beta1 + grads * (1.0 - beta1)
    v = exp_avg_sq.index_select(0, rows) * beta2 + (1.0 - beta2) * grads * grads
    p = p - step_size * (m / (_sqrt_rn(v) + eps))
    param.index_copy_(0, rows, p)
    exp_avg.index_copy_(0, rows, m)
    exp_avg_sq.index_copy_(0, rows, v)


@sparse_adam_update.register_kernel("cuda")
def _(param, exp_avg, exp_avg_sq, rows, grads, lr, beta1, beta2, eps, decay, bias_correction1, bias_correction2):
    _check_adam(param, exp_avg, exp_avg_sq, rows, grads, bias_correction1, bias_correction2)
    sparse_adam_update_triton(
        param, exp_avg, exp_avg_sq, rows, grads, lr, beta1, beta2, eps, decay, bias_correction1, bias_correction2
    )


@sparse_adam_update.register_fake
def _(param, exp_avg, exp_avg_sq, rows, grads, lr, beta1, beta2, eps, decay, bias_correction1, bias_correction2):
    _check_adam(param, exp_avg, exp_avg_sq, rows, grads, bias_correction1, bias_correction2)


# -- sparse_adagrad_update -----------------------------------------------------------------------

def _check_adagrad(param: Tensor, accum: Tensor, rows: Tensor, grads: Tensor, rowwise: bool) -> None:
    _check_update_args("sparse_adagrad_update", param, rows, grads, {"accum": accum}, ("accum",) if rowwise else ())


@torch.library.custom_op(
    "fxrec::sparse_adagrad_update",
    mutates_args=("param", "accum"),
    schema="(Tensor(a!) param, Tensor(b!) accum, Tensor rows, Tensor grads, float lr, float eps, bool rowwise) -> ()",
)
def sparse_adagrad_update(
    param: Tensor, accum: Tensor, rows: Tensor, grads: Tensor, lr: float, eps: float, rowwise: bool
) -> None:
    """Adagrad step on the rows ``rows``, element-wise or row-wise (see the module docstring)."""
    _check_adagrad(param, accum, rows, grads, rowwise)
    rows, grads = _rows_to_update("sparse_adagrad_update", rows, grads, param.shape[0])
    squares = grads * grads
    if rowwise:
        squares = squares.mean(dim=1, keepdim=True)
    acc = accum.index_select(0, rows) + squares
    p = param.index_select(0, rows) - lr * (grads / (_sqrt_rn(acc) + eps))
    param.index_copy_(0, rows, p)
    accum.index_copy_(0, rows, acc)


@sparse_adagrad_update.register_kernel("cuda")
def _(param, accum, rows, grads, lr, eps, rowwise):
    _check_adagrad(param, accum, rows, grads, rowwise)
    sparse_adagrad_update_triton(param, accum, rows, grads, lr, eps, rowwise)


@sparse_adagrad_update.register_fake
def _(param, accum, rows, grads, lr, eps, rowwise):
    _check_adagrad(param, accum, rows, grads, rowwise)


# -- sparse_sgd_update ---------------------------------------------------------------------------

def _check_sgd(param: Tensor, rows: Tensor, grads: Tensor) -> None:
    _check_update_args("sparse_sgd_update", param, rows, grads, {})


@torch.library.custom_op(
    "fxrec::sparse_sgd_update",
    mutates_args=("param",),
    schema="(Tensor(a!) param, Tensor rows, Tensor grads, float lr) -> ()",
)
def sparse_sgd_update(param: Tensor, rows: Tensor, grads: Tensor, lr: float) -> None:
    """``p_r = p_r - lr * g`` on the rows ``rows``, in place."""
    _check_sgd(param, rows, grads)
    rows, grads = _rows_to_update("sparse_sgd_update", rows, grads, param.shape[0])
    param.index_copy_(0, rows, param.index_select(0, rows) - lr * grads)


@sparse_sgd_update.register_kernel("cuda")
def _(param, rows, grads, lr):
    _check_sgd(param, rows, grads)
    sparse_sgd_update_triton(param, rows, grads, lr)


@sparse_sgd_update.register_fake
def _(param, rows, grads, lr):
    _check_sgd(param, rows, grads)

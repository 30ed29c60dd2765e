"""Triton kernels of the fused sparse-optimizer row updates (``fxrec::sparse_adam_update``,
``fxrec::sparse_adagrad_update``, ``fxrec::sparse_sgd_update``).

Each launcher updates, in place, the rows ``rows[i]`` of a ``[capacity, dim]`` parameter and of
its optimizer slots with ``grads[i]``: ONE launch, a program per (block of ``BLOCK_R`` gradient
rows) x (tile of ``BLOCK_D`` columns); the row-wise Adagrad kernel covers whole rows (it needs the
mean of a row's squared gradient first). Slots are addressed through their own strides, so views
of a larger buffer work. Rows outside ``[0, capacity)`` are skipped (the CUDA path validates
nothing that would need a host sync; the CPU kernels raise instead).

The arithmetic is written op for op like the CPU kernels in ``fxrec/ops/sparse_update.py``, with
IEEE-rounded ``sqrt``/``div`` (``sqrt_rn``/``div_rn``) and no fused multiply-add
(``enable_fp_fusion=False``), so each element sees the same sequence of correctly rounded float32
operations as on CPU. The row-wise Adagrad mean is the exception: its sum runs in another order
than torch's.

Launchers work on CUDA tensors and, under ``TRITON_INTERPRET=1``, on CPU tensors.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

__all__ = ["sparse_adam_update_triton", "sparse_adagrad_update_triton", "sparse_sgd_update_triton"]

_MAX_BLOCK_D = 128
_ELEMENTS_PER_PROGRAM = 2048
_NUM_WARPS = 4


def _blocks(dim: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D): fixed per dim (not per batch size) so a table compiles once."""
    block_d = min(_MAX_BLOCK_D, triton.next_power_of_2(dim))
    return max(1, _ELEMENTS_PER_PROGRAM // block_d), block_d


@triton.jit
def _tile(rows, n_rows, capacity, dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's gradient rows ``i``, table rows ``r``, columns ``d`` and element mask."""
    i = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    r = tl.load(rows + i, mask=i < n_rows, other=-1)
    row_ok = (i < n_rows) & (r >= 0) & (r < capacity)
    mask = row_ok[:, None] & (d < dim)[None, :]
    return i, r, d, mask


@triton.jit
def _sparse_adam_kernel(
    param, exp_avg, exp_avg_sq, rows, grads, n_rows, capacity, dim,
    p_s0, p_s1, m_s0, m_s1, v_s0, v_s1,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, lr: tl.float64, bias_correction1, bias_correction2, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i, r, d, mask = _tile(rows, n_rows, capacity, dim, BLOCK_R, BLOCK_D)
    # The step size lr * sqrt(bc2) / bc1 in float64 (mul, sqrt, div in that order, as the CPU
    # kernel's torch ops; float64 sqrt and division are IEEE correctly rounded in PTX, sqrt.rn.f64
    # and div.rn.f64: no approximate forms exist), rounded to float32 once: formed here, per
    # program, instead of by four torch kernels per call.
    step_size = ((lr * tl.sqrt(tl.load(bias_correction2))) / tl.load(bias_correction1)).to(tl.float32)
    p_ptr = param + r[:, None] * p_s0 + d[None, :] * p_s1
    m_ptr = exp_avg + r[:, None] * m_s0 + d[None, :] * m_s1
    v_ptr = exp_avg_sq + r[:, None] * v_s0 + d[None, :] * v_s1
    g = tl.load(grads + i[:, None] * dim + d[None, :], mask=mask, other=0.0)
    p = tl.load(p_ptr, mask=mask, other=0.0) * decay
    m = tl.load(m_ptr, mask=mask, other=0.0) * beta1 + g * one_minus_beta1
    v = tl.load(v_ptr, mask=mask, other=0.0) * beta2 + one_minus_beta2 * g * g
    denom = tl.sqrt_rn(v) + eps
    p = p - step_size * tl.div_rn(m, denom)
    tl.store(p_ptr, p, mask=mask)
    tl.store(m_ptr, m, mask=mask)
    tl.store(v_ptr, v, mask=mask)


@triton.jit
def _sparse_adagrad_kernel(
    param, accum, rows, grads, n_rows, capacity, dim, p_s0, p_s1, a_s0, a_s1, lr, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i, r, d, mask = _tile(rows, n_rows, capacity, dim, BLOCK_R, BLOCK_D)
    p_ptr = param + r[:, None] * p_s0 + d[None, :] * p_s1
    a_ptr = accum + r[:, None] * a_s0 + d[None, :] * a_s1
    g = tl.load(grads + i[:, None] * dim + d[None, :], mask=mask, other=0.0)
    acc = tl.load(a_ptr, mask=mask, other=0.0) + g * g
    p = tl.load(p_ptr, mask=mask, other=0.0) - lr * tl.div_rn(g, tl.sqrt_rn(acc) + eps)
    tl.store(p_ptr, p, mask=mask)
    tl.store(a_ptr, acc, mask=mask)


@triton.jit
def _sparse_rowwise_adagrad_kernel(
    param, accum, rows, grads, n_rows, capacity, dim, dim_f, p_s0, p_s1, a_s0, lr, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Whole rows per program: first the mean of g*g over the row, then the update, tile by tile.
    i = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r = tl.load(rows + i, mask=i < n_rows, other=-1)
    row_ok = (i < n_rows) & (r >= 0) & (r < capacity)
    sum_sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = row_ok[:, None] & (d < dim)[None, :]
        g = tl.load(grads + i[:, None] * dim + d[None, :], mask=mask, other=0.0)
        sum_sq += tl.sum(g * g, axis=1)
    a_ptr = accum + r * a_s0
    acc = tl.load(a_ptr, mask=row_ok, other=0.0) + tl.div_rn(sum_sq, dim_f)
    tl.store(a_ptr, acc, mask=row_ok)
    denom = tl.sqrt_rn(acc) + eps
    for start in range(0, dim, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = row_ok[:, None] & (d < dim)[None, :]
        g = tl.load(grads + i[:, None] * dim + d[None, :], mask=mask, other=0.0)
        p_ptr = param + r[:, None] * p_s0 + d[None, :] * p_s1
        p = tl.load(p_ptr, mask=mask, other=0.0) - lr * tl.div_rn(g, denom[:, None])
        tl.store(p_ptr, p, mask=mask)


@triton.jit
def _sparse_sgd_kernel(
    param, rows, grads, n_rows, capacity, dim, p_s0, p_s1, lr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i, r, d, mask = _tile(rows, n_rows, capacity, dim, BLOCK_R, BLOCK_D)
    p_ptr = param + r[:, None] * p_s0 + d[None, :] * p_s1
    g = tl.load(grads + i[:, None] * dim + d[None, :], mask=mask, other=0.0)
    p = tl.load(p_ptr, mask=mask, other=0.0) - lr * g
    tl.store(p_ptr, p, mask=mask)


def _grid(n_rows: int, dim: int) -> tuple[tuple[int, int], int, int]:
    block_r, block_d = _blocks(dim)
    return (triton.cdiv(n_rows, block_r), triton.cdiv(dim, block_d)), block_r, block_d


def sparse_adam_update_triton(
    param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, rows: Tensor, grads: Tensor,
    lr: float, beta1: float, beta2: float, eps: float, decay: float,
    bias_correction1: Tensor, bias_correction2: Tensor,
) -> None:
    """In place, for each i and r = rows[i] in [0, capacity) (rows unique):
    ``p_r *= decay; m_r = beta1 m_r + (1-beta1) g; v_r = beta2 v_r + (1-beta2) g g;
    p_r -= lr sqrt(bias_correction2) / bias_correction1 * m_r / (sqrt(v_r) + eps)``; the bias
    corrections are 0-d float64 tensors on ``param``'s device."""
    n_rows, (capacity, dim) = rows.shape[0], param.shape
    if n_rows == 0 or dim == 0:
        return
    rows, grads = rows.contiguous(), grads.contiguous()
    # Host scalars are folded in float64, as the CPU kernel does, then read as float32; the step
    # size is formed in the kernel, in float64, from lr (a float64 argument) and the
    # bias-correction tensors on the device (no host sync), as the CPU kernel forms it.
    grid, block_r, block_d = _grid(n_rows, dim)
    _sparse_adam_kernel[grid](
        param, exp_avg, exp_avg_sq, rows, grads, n_rows, capacity, dim,
        *param.stride(), *exp_avg.stride(), *exp_avg_sq.stride(),
        decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, lr, bias_correction1, bias_correction2, eps,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )


def sparse_adagrad_update_triton(
    param: Tensor, accum: Tensor, rows: Tensor, grads: Tensor, lr: float, eps: float, rowwise: bool
) -> None:
    """In place: ``acc_r += g*g`` (row-wise: ``+= mean(g*g)``, accum ``[capacity, 1]``);
    ``p_r -= lr * g / (sqrt(acc_r) + eps)``."""
    n_rows, (capacity, dim) = rows.shape[0], param.shape
    if n_rows == 0 or dim == 0:
        return
    rows, grads = rows.contiguous(), grads.contiguous()
    grid, block_r, block_d = _grid(n_rows, dim)
    if rowwise:
        _sparse_rowwise_adagrad_kernel[grid[:1]](
            # dim also as a float: an int argument equal to 1 is specialized into a constant.
            param, accum, rows, grads, n_rows, capacity, dim, float(dim), *param.stride(), accum.stride(0), lr, eps,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=_NUM_WARPS, enable_fp_fusion=False,
        )
    else:
        _sparse_adagrad_kernel[grid](
            param, accum, rows, grads, n_rows, capacity, dim, *param.stride(), *accum.stride(), lr, eps,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=_NUM_WARPS, enable_fp_fusion=False,
        )


def sparse_sgd_update_triton(param: Tensor, rows: Tensor, grads: Tensor, lr: float) -> None:
    """In place: ``p_r -= lr * g``."""
    n_rows, (capacity, dim) = rows.shape[0], param.shape
    if n_rows == 0 or dim == 0:
        return
    rows, grads = rows.contiguous(), grads.contiguous()
    grid, block_r, block_d = _grid(n_rows, dim)
    _sparse_sgd_kernel[grid](
        param, rows, grads, n_rows, capacity, dim, *param.stride(), lr,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )

"""``fxrec::gather_rows`` / ``fxrec::scatter_rows``: read / write rows of a dynamic table's slot
tensors by row number (-1: no row).

``gather_rows(table [R, dim], rows int64 [n]) -> [n, dim]`` (``table``'s dtype): ``table[rows[i]]``,
or a zero row where ``rows[i] == -1`` (an id the table does not hold: eval mode, read-only
admission, SPEC §4.4). What ``HashTable.gather`` reads; no autograd (gradients reach a table
through ``fxrec::table_combine``'s anchor, ``fxrec/ops/combine.py``).

Validation: metadata raises ``TypeError``/``ValueError`` naming the argument on every device; the
CPU kernel also rejects row numbers outside ``[-1, R)``; the CUDA kernel
(``fxrec/ops/triton/gather.py``) does not sync to check them: any row outside ``[0, R)`` reads
as a zero row, and nothing outside the tensors is read. A copy, so both devices agree bit for bit.

``scatter_rows(dst [R, dim], rows int64 [n], src [n, dim])`` (mutates ``dst``): ``dst[rows[i]] =
src[i]``; rows -1 write nothing (the CPU kernel rejects other rows outside ``[0, R)``, the CUDA
kernel skips them); a row given twice gets one of its values. What a table's insert writes
(initial rows, optimizer slots' initial values) — an op rather than ``dst[rows] = src`` because
Inductor (torch 2.11, CUDA) compiles that ``index_put`` with an unbacked row count into a 2-D
kernel whose launch grid divides by zero when no row is new (ZeroDivisionError at run time: a
step that inserts nothing); an opaque op launches nothing for zero rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxrec.ops.triton.gather import gather_rows_triton, scatter_rows_triton

__all__ = ["gather_rows", "scatter_rows"]


def _check(table: Tensor, rows: Tensor) -> None:
    if table.dim() != 2:
        raise ValueError(f"fxrec::gather_rows: table must be 2-D [rows, dim], got shape {tuple(table.shape)}")
    if not table.dtype.is_floating_point:
        raise TypeError(f"fxrec::gather_rows: table must be floating point, got {table.dtype}")
    if rows.dtype != torch.int64 or rows.dim() != 1:
        raise TypeError(f"fxrec::gather_rows: rows must be a 1-D int64 tensor, got {rows.dtype} {tuple(rows.shape)}")
    if rows.device != table.device:
        raise ValueError(f"fxrec::gather_rows: rows are on {rows.device}, table on {table.device}")


@torch.library.custom_op("fxrec::gather_rows", mutates_args=())
def gather_rows(table: Tensor, rows: Tensor) -> Tensor:
    """``[len(rows), dim]``: ``table[rows]``, zero rows for -1 (module docstring)."""
    _check(table, rows)
    if rows.numel() and (int(rows.min()) < -1 or int(rows.max()) >= table.shape[0]):
        raise ValueError(f"fxrec::gather_rows: row numbers must be in [-1, {table.shape[0]}), got "
                         f"[{int(rows.min())}, {int(rows.max())}]")
    if table.shape[0] == 0:  # every row is -1
        return table.new_zeros((rows.shape[0], table.shape[1]))
    found = rows >= 0
    return torch.where(found[:, None], table.index_select(0, rows.clamp_min(0)), 0.0).to(table.dtype)


@gather_rows.register_kernel("cuda")
def _(table: Tensor, rows: Tensor) -> Tensor:
    _check(table, rows)
    return gather_rows_triton(table, rows)


@gather_rows.register_fake
def _(table: Tensor, rows: Tensor) -> Tensor:
    _check(table, rows)
    return table.new_empty((rows.shape[0], table.shape[1]))


def _check_scatter(dst: Tensor, rows: Tensor, src: Tensor) -> None:
    if dst.dim() != 2 or not dst.is_contiguous():
        raise ValueError(f"fxrec::scatter_rows: dst must be a contiguous 2-D [rows, dim] tensor, got shape "
                         f"{tuple(dst.shape)}")
    if rows.dtype != torch.int64 or rows.dim() != 1:
        raise TypeError(f"fxrec::scatter_rows: rows must be a 1-D int64 tensor, got {rows.dtype} {tuple(rows.shape)}")
    if src.dtype != dst.dtype or tuple(src.shape) != (rows.shape[0], dst.shape[1]):
        raise ValueError(f"fxrec::scatter_rows: src must be {dst.dtype} [{rows.shape[0]}, {dst.shape[1]}], got "
                         f"{src.dtype} {tuple(src.shape)}")
    if rows.device != dst.device or src.device != dst.device:
        raise ValueError(f"fxrec::scatter_rows: rows ({rows.device}) and src ({src.device}) must be on dst's device "
                         f"({dst.device})")


@torch.library.custom_op("fxrec::scatter_rows", mutates_args=("dst",))
def scatter_rows(dst: Tensor, rows: Tensor, src: Tensor) -> None:
    """``dst[rows[i]] = src[i]``, rows -1 skipped (module docstring)."""
    _check_scatter(dst, rows, src)
    if rows.numel() and (int(rows.min()) < -1 or int(rows.max()) >= dst.shape[0]):
        raise ValueError(f"fxrec::scatter_rows: row numbers must be in [-1, {dst.shape[0]}), got "
                         f"[{int(rows.min())}, {int(rows.max())}]")
    keep = rows >= 0
    dst[rows[keep]] = src[keep]


@scatter_rows.register_kernel("cuda")
def _(dst: Tensor, rows: Tensor, src: Tensor) -> None:
    _check_scatter(dst, rows, src)
    scatter_rows_triton(dst, rows, src)


@scatter_rows.register_fake
def _(dst: Tensor, rows: Tensor, src: Tensor) -> None:
    _check_scatter(dst, rows, src)

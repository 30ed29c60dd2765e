"""``fxrec::gather_rows``: read rows of a dynamic table's slot tensors by row number (-1: no row).

``gather_rows(table [R, dim], rows int64 [n]) -> [n, dim]`` (``table``'s dtype): ``table[rows[i]]``,
or a zero row where ``rows[i] == -1`` (an id the table does not hold: eval mode, read-only
admission, SPEC §4.4). What ``HashTable.gather`` reads; no autograd (gradients reach a table
through ``fxrec::table_combine``'s anchor, ``fxrec/ops/combine.py``).

Validation: metadata raises ``TypeError``/``ValueError`` naming the argument on every device; the
CPU kernel also rejects row numbers outside ``[-1, R)``; the CUDA kernel
(``fxrec/ops/triton/gather.py``) does not sync to check them: any row outside ``[0, R)`` reads
as a zero row, and nothing outside the tensors is read. A copy, so both devices agree bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxrec.ops.triton.gather import gather_rows_triton

__all__ = ["gather_rows"]


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

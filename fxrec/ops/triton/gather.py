"""Triton kernel of ``fxrec::gather_rows`` (semantics in ``fxrec/ops/gather.py``).

One program per ``BLOCK_N`` output rows; it loads their row numbers, then copies ``BLOCK_D``
columns at a time. A row number outside ``[0, num_table_rows)`` (``-1``: absent) reads nothing
and writes zeros. torch's ``index_select`` / ``F.embedding`` move random 64-byte rows at about a
tenth of this kernel's rate on an H200 (``bench/hashtable.py``).

Launchers work on CUDA tensors and, under ``TRITON_INTERPRET=1``, on CPU tensors.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

__all__ = ["gather_rows_triton"]

_BLOCK_N = 32  # output rows per program (H200 sweep: flat from 32 to 256 rows at dims 8-64)
_MAX_BLOCK_D = 128


@triton.jit
def _gather_rows_kernel(table, rows, out, n, num_table_rows, dim, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = i < n
    row = tl.load(rows + i, mask=in_range, other=-1)
    found = in_range & (row >= 0) & (row < num_table_rows)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < dim
        e = tl.load(table + row[:, None] * dim + d[None, :], mask=found[:, None] & d_ok[None, :], other=0.0)
        tl.store(out + i[:, None] * dim + d[None, :], e, mask=in_range[:, None] & d_ok[None, :])


def gather_rows_triton(table: Tensor, rows: Tensor) -> Tensor:
    """``[len(rows), dim]``: ``table[rows]``, zero rows where a row number is out of range."""
    table, rows = table.contiguous(), rows.contiguous()
    n, dim = rows.shape[0], table.shape[1]
    out = table.new_empty((n, dim))
    if out.numel():
        block_d = min(_MAX_BLOCK_D, triton.next_power_of_2(dim))
        _gather_rows_kernel[(triton.cdiv(n, _BLOCK_N),)](
            table, rows, out, n, table.shape[0], dim, BLOCK_N=_BLOCK_N, BLOCK_D=block_d
        )
    return out

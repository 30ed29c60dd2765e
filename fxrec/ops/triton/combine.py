"""Triton kernels of the embedding combiners (``fxrec::segment_combine`` and its backward
``fxrec::segment_combine_backward``, and ``fxrec::table_combine``, the lookup fused with the
combiner); semantics in ``fxrec/ops/combine.py``.

- sum/mean forward: one program per (row, tile of ``BLOCK_D`` columns); it walks the row's
  items ``BLOCK_N`` at a time, gathers their embedding rows and accumulates ``w * e`` (and, for
  mean, ``w``) in fp32 (fp64 for fp64 embeddings).
- tile forward: one program per (row, block of ``BLOCK_S`` slots): a masked copy, exact.
- Both forward kernels serve both ops through constexpr flags: ``HAS_ROWS`` (table_combine) reads
  item ``i``'s embedding as ``table[rows[index[i]]]`` instead of ``emb[index[i]]`` (one more
  8-byte load per item, no ``[U, dim]`` gather in between), and ``HAS_ANCHOR`` adds
  ``anchor[index[i]]`` read through its strides (the expanded zero anchor a ``HashTable`` hands
  out has strides ``(0, 0)``: it is never materialized). With an anchor the sum is formed in the
  accumulation dtype (the tile "copy" then rounds it once to the output dtype).
- backward: laid out like the forward, so it needs no per-item row ids: sum/mean one program per
  (row, tile of ``BLOCK_D`` columns) that loads the row's gradient once (mean: scaled by
  ``1 / Σ w`` of the row, summed in the same program) and walks the row's items ``BLOCK_N`` at
  a time; tile one program per (row, block of ``BLOCK_S`` slots). Each item adds its (weighted)
  gradient into its embedding row with ``tl.atomic_add`` into a zeroed fp32/fp64 buffer: one
  kernel after the zero fill, nothing computed on the host's side in between. Atomics make the
  summation order, hence the float rounding of duplicated rows, run-dependent on the GPU: the
  result equals the CPU kernel's within rounding, not bit for bit. (table_combine's gradient
  w.r.t. its anchor is this backward, unchanged.) ``segment_combine_backward_multi_triton``:
  several features' backwards into one buffer, one zero fill, one scatter launch per feature.

Nothing here syncs with the host and nothing reads outside the tensors: offsets are clamped to
``[0, N]``, index entries outside ``[0, U)`` are treated like ``-1`` (no embedding), and table
rows outside ``[0, R)`` (``-1``: absent) read as zero rows without touching the table.

Launchers work on CUDA tensors and, under ``TRITON_INTERPRET=1``, on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["segment_combine_triton", "segment_combine_backward_triton", "segment_combine_backward_multi_triton",
           "table_combine_triton"]

_MAX_BLOCK_D = 128
_BLOCK_N = 32  # items per step of a row's loop (sum/mean, forward and backward)
_BLOCK_ELEMENTS = 4096  # elements per program of the tile kernels (forward and backward) for narrow
# rows (dim <= 32): 64-byte rows need many rows per program to keep enough loads in flight; wide
# rows do best with 16 rows per program (H200 sweep: tile copy at dim 16 / 64 / 128 reaches 62% /
# 89% / 91% of the copy bandwidth this way)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_d(dim: int) -> int:
    return min(_MAX_BLOCK_D, triton.next_power_of_2(max(dim, 1)))


def _rows_per_program(block_d: int) -> int:
    """Tile slots per program (see ``_BLOCK_ELEMENTS``)."""
    return _BLOCK_ELEMENTS // block_d if block_d <= 32 else 16


@triton.jit
def _row_bounds(offsets, row, n_items):
    # Clamped so that unvalidated offsets (the CUDA path does not sync to check them) stay in index.
    begin = tl.minimum(tl.maximum(tl.load(offsets + row), 0), n_items)
    end = tl.minimum(tl.maximum(tl.load(offsets + row + 1), begin), n_items)
    return begin, end


@triton.jit
def _item_embedding(emb, rows, anchor, idx, in_batch, d, d_ok, n_unique, n_emb_rows, dim, anchor_s0, anchor_s1,
                    HAS_ROWS: tl.constexpr, HAS_ANCHOR: tl.constexpr, ANCHOR_SCALAR: tl.constexpr, ACC: tl.constexpr):
    """The embeddings of the items whose index entries are ``idx`` (masked by ``in_batch``), columns
    ``d``: ``emb[idx]`` (``HAS_ROWS=False``) or ``emb[rows[idx]]`` (``HAS_ROWS``: ``emb`` is the
    table), plus ``anchor[idx]`` (``HAS_ANCHOR``, any strides: an expanded zero anchor has stride 0).
    An entry outside ``[0, n_unique)`` is no embedding (zeros); a table row outside
    ``[0, n_emb_rows)`` (-1) is a zero row that is never read. In ``ACC`` when ``HAS_ANCHOR``
    (the sum is formed there), else in ``emb``'s dtype (a copy). ``ANCHOR_SCALAR``: both anchor
    strides are 0 (the table's expanded zero anchor): its one value is loaded once, not per item."""
    found = in_batch & (idx >= 0) & (idx < n_unique)
    if HAS_ROWS:
        row = tl.load(rows + idx, mask=found, other=-1)
        hit = found & (row >= 0) & (row < n_emb_rows)
    else:
        row = idx
        hit = found
    e = tl.load(emb + row[:, None] * dim + d[None, :], mask=hit[:, None] & d_ok[None, :], other=0.0)
    if HAS_ANCHOR:
        if ANCHOR_SCALAR:
            a0 = tl.load(anchor + d * 0, mask=d_ok, other=0.0).to(ACC)  # one address, loaded once per column block
            a = tl.where(found[:, None] & d_ok[None, :], a0[None, :], 0.0)
        else:
            a = tl.load(anchor + idx[:, None] * anchor_s0 + d[None, :] * anchor_s1,
                        mask=found[:, None] & d_ok[None, :], other=0.0)
        e = e.to(ACC) + a.to(ACC)
    return e


@triton.jit
def _segment_reduce_kernel(
    emb, rows, anchor, index, offsets, weight, out, n_items, n_unique, n_emb_rows, dim, anchor_s0, anchor_s1,
    HAS_ROWS: tl.constexpr, HAS_ANCHOR: tl.constexpr, ANCHOR_SCALAR: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    MEAN: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < dim
    begin, end = _row_bounds(offsets, row, n_items)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    weight_sum = tl.zeros([BLOCK_N], dtype=ACC)
    for start in range(begin, end, BLOCK_N):
        i = start + tl.arange(0, BLOCK_N)
        in_row = i < end
        idx = tl.load(index + i, mask=in_row, other=-1)
        if HAS_WEIGHT:
            w = tl.load(weight + i, mask=in_row, other=0.0).to(ACC)
        else:
            w = in_row.to(ACC)
        weight_sum += w  # a -1 item's weight counts too (see combine.py)
        e = _item_embedding(emb, rows, anchor, idx, in_row, d, d_ok, n_unique, n_emb_rows, dim, anchor_s0, anchor_s1,
                            HAS_ROWS, HAS_ANCHOR, ANCHOR_SCALAR, ACC)
        acc += tl.sum(e.to(ACC) * w[:, None], axis=0)
    if MEAN:
        total = tl.sum(weight_sum, axis=0)
        acc = tl.where(total != 0, acc / tl.where(total != 0, total, 1.0), 0.0)
    tl.store(out + row * dim + d, acc.to(out.dtype.element_ty), mask=d_ok)


@triton.jit
def _segment_tile_kernel(
    emb, rows, anchor, index, offsets, out, n_items, n_unique, n_emb_rows, dim, tile_len, anchor_s0, anchor_s1,
    HAS_ROWS: tl.constexpr, HAS_ANCHOR: tl.constexpr, ANCHOR_SCALAR: tl.constexpr, ACC: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < tile_len
    begin, end = _row_bounds(offsets, row, n_items)
    present = s_ok & (begin + s < end)
    idx = tl.load(index + begin + s, mask=present, other=-1)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < dim
        e = _item_embedding(emb, rows, anchor, idx, present, d, d_ok, n_unique, n_emb_rows, dim, anchor_s0, anchor_s1,
                            HAS_ROWS, HAS_ANCHOR, ANCHOR_SCALAR, ACC)
        tl.store(out + (row * tile_len + s[:, None]) * dim + d[None, :], e.to(out.dtype.element_ty),
                 mask=s_ok[:, None] & d_ok[None, :])


@triton.jit
def _row_scatter_kernel(
    grad, index, offsets, weight, grad_emb, n_items, n_emb_rows, dim,
    HAS_WEIGHT: tl.constexpr, MEAN: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """sum / mean backward: row ``row``'s gradient (times its items' weights; mean: over the row's
    weight sum, 0 where that is 0) added into each of its items' embedding rows."""
    row = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < dim
    begin, end = _row_bounds(offsets, row, n_items)
    g = tl.load(grad + row * dim + d, mask=d_ok, other=0.0).to(ACC)
    if MEAN:
        weight_sum = tl.zeros([BLOCK_N], dtype=ACC)
        for start in range(begin, end, BLOCK_N):
            i = start + tl.arange(0, BLOCK_N)
            in_row = i < end
            if HAS_WEIGHT:
                weight_sum += tl.load(weight + i, mask=in_row, other=0.0).to(ACC)
            else:
                weight_sum += in_row.to(ACC)  # a -1 item's weight counts too, as in the forward
        total = tl.sum(weight_sum, axis=0)
        g = tl.where(total != 0, g / tl.where(total != 0, total, 1.0), 0.0)
    for start in range(begin, end, BLOCK_N):
        i = start + tl.arange(0, BLOCK_N)
        in_row = i < end
        idx = tl.load(index + i, mask=in_row, other=-1)
        ok = in_row & (idx >= 0) & (idx < n_emb_rows)
        mask = ok[:, None] & d_ok[None, :]
        if HAS_WEIGHT:
            item_grad = g[None, :] * tl.load(weight + i, mask=ok, other=0.0).to(ACC)[:, None]
        else:
            item_grad = tl.broadcast_to(g[None, :], (BLOCK_N, BLOCK_D))
        tl.atomic_add(grad_emb + idx[:, None] * dim + d[None, :], item_grad, mask=mask)


@triton.jit
def _tile_scatter_kernel(
    grad, index, offsets, grad_emb, n_items, n_emb_rows, dim, tile_len,
    ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """tile backward: slot ``s`` of row ``row`` (filled by the row's item ``begin + s``) adds its
    gradient into that item's embedding row."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    begin, end = _row_bounds(offsets, row, n_items)
    present = (s < tile_len) & (begin + s < end)
    idx = tl.load(index + begin + s, mask=present, other=-1)
    ok = present & (idx >= 0) & (idx < n_emb_rows)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = ok[:, None] & (d < dim)[None, :]
        g = tl.load(grad + (row * tile_len + s[:, None]) * dim + d[None, :], mask=mask, other=0.0).to(ACC)
        tl.atomic_add(grad_emb + idx[:, None] * dim + d[None, :], g, mask=mask)


def _combine_launch(
    emb: Tensor, rows: Tensor | None, anchor: Tensor | None, index: Tensor, offsets: Tensor, weight: Tensor | None,
    combiner: str, tile_len: int,
) -> Tensor:
    """The forward of both ops: item ``i``'s embedding is ``emb[index[i]]`` (``rows`` None) or
    ``emb[rows[index[i]]]``, plus ``anchor[index[i]]`` when an anchor is given."""
    emb, index, offsets = emb.contiguous(), index.contiguous(), offsets.contiguous()
    n_rows, dim = offsets.shape[0] - 1, emb.shape[1]
    n_unique = emb.shape[0] if rows is None else rows.shape[0]
    anchor_strides = (0, 0) if anchor is None else anchor.stride()  # any strides: no copy of a broadcast anchor
    # ANCHOR_SCALAR: a stride-0 anchor is one value (an anchor of 0 rows is never read at all)
    anchor_scalar = anchor is not None and anchor_strides == (0, 0) and anchor.numel() > 0
    flags = dict(HAS_ROWS=rows is not None, HAS_ANCHOR=anchor is not None, ANCHOR_SCALAR=anchor_scalar,
                 ACC=_tl_dtype(emb.dtype))
    rows = index if rows is None else rows.contiguous()  # unused pointers when absent
    anchor = emb if anchor is None else anchor
    block_d = _block_d(dim)
    if combiner == "tile":
        out = emb.new_empty((n_rows, tile_len * dim))
        if out.numel():
            block_s = min(_rows_per_program(block_d), triton.next_power_of_2(tile_len))
            grid = (n_rows, triton.cdiv(tile_len, block_s))
            _segment_tile_kernel[grid](
                emb, rows, anchor, index, offsets, out, index.shape[0], n_unique, emb.shape[0], dim, tile_len,
                *anchor_strides, **flags, BLOCK_S=block_s, BLOCK_D=block_d,
            )
        return out
    out = emb.new_empty((n_rows, dim))
    if out.numel():
        weight = weight.contiguous() if weight is not None else None
        _segment_reduce_kernel[(n_rows, triton.cdiv(dim, block_d))](
            emb, rows, anchor, index, offsets, weight if weight is not None else index, out, index.shape[0], n_unique,
            emb.shape[0], dim, *anchor_strides, **flags,
            HAS_WEIGHT=weight is not None, MEAN=combiner == "mean", BLOCK_N=_BLOCK_N, BLOCK_D=block_d,
        )
    return out


def segment_combine_triton(
    emb: Tensor, index: Tensor, offsets: Tensor, weight: Tensor | None, combiner: str, tile_len: int
) -> Tensor:
    """Forward: ``[B, dim]`` (sum/mean) or ``[B, tile_len * dim]`` (tile), in ``emb``'s dtype."""
    return _combine_launch(emb, None, None, index, offsets, weight, combiner, tile_len)


def table_combine_triton(
    table: Tensor, rows: Tensor, anchor: Tensor | None, index: Tensor, offsets: Tensor, weight: Tensor | None,
    combiner: str, tile_len: int,
) -> Tensor:
    """``fxrec::table_combine``'s forward: ``segment_combine_triton`` of ``table[rows] + anchor``
    without materializing it (the kernels read ``table[rows[index[i]]]``)."""
    return _combine_launch(table, rows, anchor, index, offsets, weight, combiner, tile_len)


def segment_combine_backward_triton(
    grad: Tensor, index: Tensor, offsets: Tensor, weight: Tensor | None, combiner: str, tile_len: int, num_rows: int
) -> Tensor:
    """Backward: ``grad_emb [num_rows, dim]`` in ``grad``'s dtype (see the module docstring)."""
    return segment_combine_backward_multi_triton([grad], [index], [offsets], [weight], [combiner], [tile_len], num_rows)


def segment_combine_backward_multi_triton(
    grads: list[Tensor], index: list[Tensor], offsets: list[Tensor], weight: list[Tensor | None],
    combiner: list[str], tile_len: list[int], num_rows: int,
) -> Tensor:
    """The backward of several features' combines into ONE ``grad_emb [num_rows, dim]`` (in the
    grads' dtype): one zero fill, then each feature's scatter kernel adds into the same buffer."""
    dim = grads[0].shape[1] // tile_len[0] if combiner[0] == "tile" else grads[0].shape[1]
    grad_emb = torch.zeros((num_rows, dim), dtype=_accumulate_dtype(grads[0].dtype), device=grads[0].device)
    if grad_emb.numel():
        for args in zip(grads, index, offsets, weight, combiner, tile_len):
            _scatter_launch(grad_emb, *args)
    return grad_emb.to(grads[0].dtype)


def _scatter_launch(grad_emb: Tensor, grad: Tensor, index: Tensor, offsets: Tensor, weight: Tensor | None,
                    combiner: str, tile_len: int) -> None:
    """Adds one feature's combine backward into ``grad_emb`` (fp32 / fp64) with atomics."""
    grad, index, offsets = grad.contiguous(), index.contiguous(), offsets.contiguous()
    n_rows, n_items = offsets.shape[0] - 1, index.shape[0]
    if n_items == 0 or n_rows == 0:
        return
    tile = combiner == "tile"
    num_rows, dim = grad_emb.shape
    block_d = _block_d(dim)
    acc = _tl_dtype(grad.dtype)
    if tile:
        block_s = min(_rows_per_program(block_d), triton.next_power_of_2(tile_len))
        _tile_scatter_kernel[(n_rows, triton.cdiv(tile_len, block_s))](
            grad, index, offsets, grad_emb, n_items, num_rows, dim, tile_len, ACC=acc, BLOCK_S=block_s,
            BLOCK_D=block_d,
        )
    else:
        weight = weight.contiguous() if weight is not None else None
        _row_scatter_kernel[(n_rows, triton.cdiv(dim, block_d))](
            grad, index, offsets, weight if weight is not None else index, grad_emb, n_items, num_rows, dim,
            HAS_WEIGHT=weight is not None, MEAN=combiner == "mean", ACC=acc, BLOCK_N=_BLOCK_N, BLOCK_D=block_d,
        )

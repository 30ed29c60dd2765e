"""Triton kernels of the embedding combiners (``fxrec::segment_combine`` and its backward
``fxrec::segment_combine_backward``, and ``fxrec::table_combine``, the lookup fused with the
combiner); semantics in ``fxrec/ops/combine.py``.

- sum/mean forward: one program per (row, tile of ``BLOCK_D`` columns); it walks the row's
  items ``BLOCK_N`` at a time, gathers their embedding rows and accumulates ``w * e`` (and, for
  mean, ``w``) in fp32 (fp64 for fp64 embeddings).
- tile forward: one program per (row, block of ``BLOCK_S`` slots): a masked copy, exact.
- Both forward kernels serve both ops through constexpr flags: ``ROWS`` (table_combine) reads
  item ``i``'s embedding as ``table[rows[index[i]]]`` instead of ``emb[index[i]]`` (one more
  8-byte load per item, no ``[U, dim]`` gather in between) or, for calls of at least
  ``COMPOSE_MIN_ITEMS`` items of rows of at least ``COMPOSE_MIN_ROW_BYTES`` without a per-row
  anchor, as ``table[item_rows[i]]`` after one pass
  that composes ``item_rows = rows[index]`` (``_compose_rows_kernel``: the combine kernel's load
  chain is a step shorter, for 16 bytes an item and one launch more), and ``HAS_ANCHOR`` adds
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
  w.r.t. its anchor is this backward, unchanged.) The gradient's rows are read through their
  stride: a concatenation's backward hands each feature a column slice of one wide gradient,
  read in place instead of copied.
- multi forward / backward (``table_combine_multi_triton``; ``segment_combine_backward_multi_triton``,
  F features into one buffer after one zero fill): ONE launch for all the features. The programs of
  ``_multi_combine_kernel`` / ``_multi_scatter_kernel`` are the features' programs of the kernels
  above one after another; each finds its feature in a small int64 table (the features' tensor
  addresses, sizes, combiner, tile_len, first program; ``device_table``: one non-blocking
  host-to-device copy, hence the multi ops' ``cudagraph_unsafe`` tag) and runs the sum / mean or tile body for it (runtime branches on the combiner and
  on weights; the one-feature kernels get them as constants).

Nothing here syncs with the host and nothing reads outside the tensors: offsets are clamped to
``[0, N]``, index entries outside ``[0, U)`` are treated like ``-1`` (no embedding), and table
rows outside ``[0, R)`` (``-1``: absent) read as zero rows without touching the table.

Launchers work on CUDA tensors and, under ``TRITON_INTERPRET=1``, on CPU tensors.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxrec.ops.triton import cdiv, next_power_of_2
from fxrec.ops.triton.mod import device_table

__all__ = ["segment_combine_triton", "segment_combine_backward_triton", "segment_combine_backward_multi_triton",
           "table_combine_triton", "table_combine_multi_triton"]

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
    return min(_MAX_BLOCK_D, next_power_of_2(max(dim, 1)))


def _rows_per_program(block_d: int) -> int:
    """Tile slots per program (see ``_BLOCK_ELEMENTS``)."""
    return _BLOCK_ELEMENTS // block_d if block_d <= 32 else 16


# How a forward kernel finds item i's embedding (its ROWS constexpr; see _item_embedding).
_ROWS_NONE, _ROWS_INDIRECT, _ROWS_COMPOSED = 0, 1, 2

# From this many items on (all features of one call together) and rows this wide, table_combine's
# launchers compose each item's table row first. The combine kernels' loads form a chain,
# index -> row -> the row's bytes; a random row behind two dependent loads keeps fewer bytes in
# flight. Composing is one pass of 16 bytes an item and one launch more: smaller calls
# (host-bound) would pay for nothing, and so do 64-byte rows (H200, B=4096 tile: composed rows
# 6% / 11% faster at 256 / 512-byte rows, 1% slower at 64; bench/README.md, "Embedding gather +
# combiners").
COMPOSE_MIN_ITEMS = 1 << 20
COMPOSE_MIN_ROW_BYTES = 256
_COMPOSE_BLOCK = 1024

# The backward's adds only need to be atomic: nothing in the kernel reads what another program
# added, and the launch's end orders them for whoever reads the result. tl.atomic_add's default
# (acq_rel) fences every add; relaxed adds ran 21% / 4% / 8% faster at dim 16 / 64 / 128 (H200,
# B=4096 tile, bench/README.md "Embedding gather + combiners").
_GRAD_SEM = tl.constexpr("relaxed")


@triton.jit
def _compose_rows_kernel(rows, index, item_rows, n_items, n_unique, n_emb_rows, BLOCK: tl.constexpr):
    """``item_rows[i] = rows[index[i]]`` (-1 where that row is outside ``[0, n_emb_rows)``), or -2
    where ``index[i]`` is outside ``[0, n_unique)``: no embedding, not even the anchor's."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = i < n_items
    idx = tl.load(index + i, mask=in_range, other=-1)
    found = (idx >= 0) & (idx < n_unique)
    row = tl.load(rows + idx, mask=in_range & found, other=-1)
    row = tl.where((row >= 0) & (row < n_emb_rows), row, -1)
    tl.store(item_rows + i, tl.where(found, row, -2), mask=in_range)


def _compose_rows(rows: Tensor, index: Tensor, n_emb_rows: int) -> Tensor:
    item_rows = torch.empty_like(index)
    if index.shape[0]:
        _compose_rows_kernel[(cdiv(index.shape[0], _COMPOSE_BLOCK),)](
            rows, index, item_rows, index.shape[0], rows.shape[0], n_emb_rows, BLOCK=_COMPOSE_BLOCK)
    return item_rows


def _composes(table: Tensor, n_items: int, anchor: Tensor | None) -> bool:
    """Whether a table_combine call of ``n_items`` items composes its rows first: a per-row anchor
    is read at ``index[i]``, which composing replaces, so only without an anchor or with a
    stride-0 one (``ANCHOR_SCALAR``: one value, no index needed)."""
    big = n_items >= COMPOSE_MIN_ITEMS and table.shape[1] * table.element_size() >= COMPOSE_MIN_ROW_BYTES
    return big and (anchor is None or _scalar_anchor(anchor))


@triton.jit
def _row_bounds(offsets, row, n_items):
    # Clamped so that unvalidated offsets (the CUDA path does not sync to check them) stay in index.
    begin = tl.minimum(tl.maximum(tl.load(offsets + row), 0), n_items)
    end = tl.minimum(tl.maximum(tl.load(offsets + row + 1), begin), n_items)
    return begin, end


@triton.jit
def _item_embedding(emb, rows, anchor, idx, in_batch, d, d_ok, n_unique, n_emb_rows, dim, anchor_s0, anchor_s1,
                    ROWS: tl.constexpr, HAS_ANCHOR: tl.constexpr, ANCHOR_SCALAR: tl.constexpr, ACC: tl.constexpr):
    """The embeddings of the items whose index entries are ``idx`` (masked by ``in_batch``), columns
    ``d``: ``emb[idx]`` (``ROWS == _ROWS_NONE``), ``emb[rows[idx]]`` (``_ROWS_INDIRECT``: ``emb``
    is the table) or ``emb[idx]`` with ``idx`` the item's table row already composed
    (``_ROWS_COMPOSED``, ``_compose_rows_kernel``: -1 an absent row, -2 no embedding), plus
    ``anchor[idx]`` (``HAS_ANCHOR``, any strides: an expanded zero anchor has stride 0; composed
    rows only with ``ANCHOR_SCALAR``). An entry outside ``[0, n_unique)`` is no embedding (zeros);
    a table row outside ``[0, n_emb_rows)`` (-1) is a zero row that is never read. In ``ACC`` when
    ``HAS_ANCHOR`` (the sum is formed there), else in ``emb``'s dtype (a copy). ``ANCHOR_SCALAR``:
    both anchor strides are 0 (the table's expanded zero anchor): its one value is loaded once,
    not per item."""
    if ROWS == 2:  # _ROWS_COMPOSED
        found = in_batch & (idx >= -1)
        row = idx
        hit = found & (row >= 0) & (row < n_emb_rows)
    elif ROWS == 1:  # _ROWS_INDIRECT
        found = in_batch & (idx >= 0) & (idx < n_unique)
        row = tl.load(rows + idx, mask=found, other=-1)
        hit = found & (row >= 0) & (row < n_emb_rows)
    else:
        found = in_batch & (idx >= 0) & (idx < n_unique)
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
def _segment_reduce(
    emb, rows, anchor, index, offsets, weight, out, row, d_block, n_items, n_unique, n_emb_rows, dim, anchor_s0,
    anchor_s1, mean, ROWS: tl.constexpr, HAS_ANCHOR: tl.constexpr, ANCHOR_SCALAR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """sum / mean forward of row ``row``, columns block ``d_block`` (``mean``: a constant in the
    one-feature kernel, data in the multi one)."""
    d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
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
                            ROWS, HAS_ANCHOR, ANCHOR_SCALAR, ACC)
        acc += tl.sum(e.to(ACC) * w[:, None], axis=0)
    if mean:
        total = tl.sum(weight_sum, axis=0)
        acc = tl.where(total != 0, acc / tl.where(total != 0, total, 1.0), 0.0)
    tl.store(out + row * dim + d, acc.to(out.dtype.element_ty), mask=d_ok)


@triton.jit
def _segment_tile(
    emb, rows, anchor, index, offsets, out, row, s_block, n_items, n_unique, n_emb_rows, dim, tile_len, anchor_s0,
    anchor_s1, ROWS: tl.constexpr, HAS_ANCHOR: tl.constexpr, ANCHOR_SCALAR: tl.constexpr, ACC: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """tile forward of row ``row``, slots block ``s_block``."""
    s = s_block * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < tile_len
    begin, end = _row_bounds(offsets, row, n_items)
    present = s_ok & (begin + s < end)
    idx = tl.load(index + begin + s, mask=present, other=-1)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < dim
        e = _item_embedding(emb, rows, anchor, idx, present, d, d_ok, n_unique, n_emb_rows, dim, anchor_s0, anchor_s1,
                            ROWS, HAS_ANCHOR, ANCHOR_SCALAR, ACC)
        tl.store(out + (row * tile_len + s[:, None]) * dim + d[None, :], e.to(out.dtype.element_ty),
                 mask=s_ok[:, None] & d_ok[None, :])


@triton.jit
def _segment_reduce_kernel(
    emb, rows, anchor, index, offsets, weight, out, n_items, n_unique, n_emb_rows, dim, anchor_s0, anchor_s1,
    ROWS: tl.constexpr, HAS_ANCHOR: tl.constexpr, ANCHOR_SCALAR: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    MEAN: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    _segment_reduce(emb, rows, anchor, index, offsets, weight, out, tl.program_id(0).to(tl.int64),
                    tl.program_id(1).to(tl.int64), n_items, n_unique, n_emb_rows, dim, anchor_s0, anchor_s1, MEAN,
                    ROWS, HAS_ANCHOR, ANCHOR_SCALAR, HAS_WEIGHT, ACC, BLOCK_N, BLOCK_D)


@triton.jit
def _segment_tile_kernel(
    emb, rows, anchor, index, offsets, out, n_items, n_unique, n_emb_rows, dim, tile_len, anchor_s0, anchor_s1,
    ROWS: tl.constexpr, HAS_ANCHOR: tl.constexpr, ANCHOR_SCALAR: tl.constexpr, ACC: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    _segment_tile(emb, rows, anchor, index, offsets, out, tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64),
                  n_items, n_unique, n_emb_rows, dim, tile_len, anchor_s0, anchor_s1, ROWS, HAS_ANCHOR,
                  ANCHOR_SCALAR, ACC, BLOCK_S, BLOCK_D)


@triton.jit
def _row_scatter(
    grad, grad_stride, index, offsets, weight, grad_emb, row, d_block, n_items, n_emb_rows, dim, mean,
    HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """sum / mean backward of row ``row``, columns block ``d_block``: the row's gradient (row
    ``row`` of ``grad``, ``grad_stride`` elements apart) times its items' weights (``mean``: over
    the row's weight sum, 0 where that is 0) added into each of its items' embedding rows. ``mean``
    is a constant in the one-feature kernel, data in the multi one."""
    d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < dim
    begin, end = _row_bounds(offsets, row, n_items)
    g = tl.load(grad + row * grad_stride + d, mask=d_ok, other=0.0).to(ACC)
    if mean:
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
        tl.atomic_add(grad_emb + idx[:, None] * dim + d[None, :], item_grad, mask=mask, sem=_GRAD_SEM)


@triton.jit
def _tile_scatter(
    grad, grad_stride, index, offsets, grad_emb, row, s_block, n_items, n_emb_rows, dim, tile_len,
    ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """tile backward of row ``row`` (of ``grad``, ``grad_stride`` elements apart), slots block
    ``s_block``: slot ``s`` (filled by the row's item ``begin + s``) adds its gradient into that
    item's embedding row."""
    s = s_block * BLOCK_S + tl.arange(0, BLOCK_S)
    begin, end = _row_bounds(offsets, row, n_items)
    present = (s < tile_len) & (begin + s < end)
    idx = tl.load(index + begin + s, mask=present, other=-1)
    ok = present & (idx >= 0) & (idx < n_emb_rows)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = ok[:, None] & (d < dim)[None, :]
        g = tl.load(grad + row * grad_stride + s[:, None] * dim + d[None, :], mask=mask, other=0.0).to(ACC)
        tl.atomic_add(grad_emb + idx[:, None] * dim + d[None, :], g, mask=mask, sem=_GRAD_SEM)


@triton.jit
def _row_scatter_kernel(
    grad, grad_stride, index, offsets, weight, grad_emb, n_items, n_emb_rows, dim,
    HAS_WEIGHT: tl.constexpr, MEAN: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    _row_scatter(grad, grad_stride, index, offsets, weight, grad_emb, tl.program_id(0).to(tl.int64),
                 tl.program_id(1).to(tl.int64), n_items, n_emb_rows, dim, MEAN, HAS_WEIGHT, ACC, BLOCK_N, BLOCK_D)


@triton.jit
def _tile_scatter_kernel(
    grad, grad_stride, index, offsets, grad_emb, n_items, n_emb_rows, dim, tile_len,
    ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    _tile_scatter(grad, grad_stride, index, offsets, grad_emb, tl.program_id(0).to(tl.int64),
                  tl.program_id(1).to(tl.int64), n_items, n_emb_rows, dim, tile_len, ACC, BLOCK_S, BLOCK_D)


# The multi kernels' per-feature table: one row per feature, these columns. "dense": the
# feature's [B, width] tensor, its output (forward) or its output's gradient (backward), whose
# rows lie "dense_stride" elements apart (a gradient is often a column slice of a wider one: a
# concatenation's backward hands out such views).
_FIELDS = ("dense", "dense_stride", "index", "offsets", "weight", "n_items", "kind", "tile_len", "first_program")
_N_FIELDS = tl.constexpr(len(_FIELDS))
_F_DENSE, _F_DENSE_STRIDE, _F_INDEX, _F_OFFSETS, _F_WEIGHT, _F_N_ITEMS, _F_KIND, _F_TILE_LEN, _F_FIRST_PROGRAM = (
    tl.constexpr(i) for i in range(len(_FIELDS)))
_KINDS = {"sum": 0, "mean": 1, "tile": 2}
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


@triton.jit
def _program_feature(features, n_features, DENSE_T: tl.constexpr, WEIGHT_T: tl.constexpr):
    """This program's feature in a multi kernel: ``features [F, _N_FIELDS]`` int64 holds per
    feature (``_FIELDS``) its tensors' addresses (weight 0: none), its dense tensor's row stride,
    item count, combiner, tile_len and first program id; program ``p`` works for the last feature whose first program is <= p,
    on the row and block that feature's own kernel would have given it (tile rows in ``BLOCK_S``
    slot blocks, sum / mean rows in ``BLOCK_D`` column blocks): its ``local`` program id."""
    pid = tl.program_id(0).to(tl.int64)
    f = pid * 0  # an int64 scalar (a loop-carried value)
    for j in range(1, n_features):
        f += (tl.load(features + j * _N_FIELDS + _F_FIRST_PROGRAM) <= pid).to(tl.int64)
    meta = features + f * _N_FIELDS
    dense = tl.load(meta + _F_DENSE).to(tl.pointer_type(DENSE_T), bitcast=True)
    dense_stride = tl.load(meta + _F_DENSE_STRIDE)
    index = tl.load(meta + _F_INDEX).to(tl.pointer_type(tl.int64), bitcast=True)
    offsets = tl.load(meta + _F_OFFSETS).to(tl.pointer_type(tl.int64), bitcast=True)
    weight_address = tl.load(meta + _F_WEIGHT)
    weight = weight_address.to(tl.pointer_type(WEIGHT_T), bitcast=True)
    n_items, kind, tile_len = tl.load(meta + _F_N_ITEMS), tl.load(meta + _F_KIND), tl.load(meta + _F_TILE_LEN)
    local = pid - tl.load(meta + _F_FIRST_PROGRAM)
    return dense, dense_stride, index, offsets, weight_address != 0, weight, n_items, kind, tile_len, local


@triton.jit
def _multi_combine_kernel(
    features, n_features, table, rows, anchor, n_unique, n_emb_rows, dim, anchor_s0, anchor_s1,
    OUT_T: tl.constexpr, WEIGHT_T: tl.constexpr, ROWS: tl.constexpr, HAS_ANCHOR: tl.constexpr,
    ANCHOR_SCALAR: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Every feature's ``table_combine`` forward in one launch (``table_combine_multi_triton``)."""
    out, _, index, offsets, has_weight, weight, n_items, kind, tile_len, local = _program_feature(
        features, n_features, OUT_T, WEIGHT_T)  # (outputs are contiguous)
    # (names differ per branch: Triton merges a name bound in both branches, which needs one type)
    if kind == 2:
        slot_blocks = tl.cdiv(tile_len, BLOCK_S)
        _segment_tile(table, rows, anchor, index, offsets, out, local // slot_blocks, local % slot_blocks, n_items,
                      n_unique, n_emb_rows, dim, tile_len, anchor_s0, anchor_s1, ROWS, HAS_ANCHOR, ANCHOR_SCALAR, ACC,
                      BLOCK_S, BLOCK_D)
    else:
        col_blocks = tl.cdiv(dim, BLOCK_D)
        row, d_block = local // col_blocks, local % col_blocks
        if has_weight:
            _segment_reduce(table, rows, anchor, index, offsets, weight, out, row, d_block, n_items, n_unique,
                            n_emb_rows, dim, anchor_s0, anchor_s1, kind == 1, ROWS, HAS_ANCHOR, ANCHOR_SCALAR, True,
                            ACC, BLOCK_N, BLOCK_D)
        else:
            _segment_reduce(table, rows, anchor, index, offsets, weight, out, row, d_block, n_items, n_unique,
                            n_emb_rows, dim, anchor_s0, anchor_s1, kind == 1, ROWS, HAS_ANCHOR, ANCHOR_SCALAR, False,
                            ACC, BLOCK_N, BLOCK_D)


@triton.jit
def _multi_scatter_kernel(
    features, n_features, grad_emb, n_emb_rows, dim,
    GRAD_T: tl.constexpr, WEIGHT_T: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Every feature's backward in one launch (``segment_combine_backward_multi_triton``)."""
    grad, grad_stride, index, offsets, has_weight, weight, n_items, kind, tile_len, local = _program_feature(
        features, n_features, GRAD_T, WEIGHT_T)
    # (names differ per branch: Triton merges a name bound in both branches, which needs one type)
    if kind == 2:
        slot_blocks = tl.cdiv(tile_len, BLOCK_S)
        _tile_scatter(grad, grad_stride, index, offsets, grad_emb, local // slot_blocks, local % slot_blocks, n_items,
                      n_emb_rows, dim, tile_len, ACC, BLOCK_S, BLOCK_D)
    else:
        col_blocks = tl.cdiv(dim, BLOCK_D)
        row, d_block = local // col_blocks, local % col_blocks
        if has_weight:
            _row_scatter(grad, grad_stride, index, offsets, weight, grad_emb, row, d_block, n_items, n_emb_rows, dim,
                         kind == 1, True, ACC, BLOCK_N, BLOCK_D)
        else:
            _row_scatter(grad, grad_stride, index, offsets, weight, grad_emb, row, d_block, n_items, n_emb_rows, dim,
                         kind == 1, False, ACC, BLOCK_N, BLOCK_D)


def _combine_launch(
    emb: Tensor, rows: Tensor | None, anchor: Tensor | None, index: Tensor, offsets: Tensor, weight: Tensor | None,
    combiner: str, tile_len: int,
) -> Tensor:
    """The forward of both ops: item ``i``'s embedding is ``emb[index[i]]`` (``rows`` None) or
    ``emb[rows[index[i]]]``, plus ``anchor[index[i]]`` when an anchor is given."""
    emb, index, offsets = emb.contiguous(), index.contiguous(), offsets.contiguous()
    n_rows, dim = offsets.shape[0] - 1, emb.shape[1]
    n_unique = emb.shape[0] if rows is None else rows.shape[0]
    mode = _ROWS_NONE if rows is None else _ROWS_INDIRECT
    if rows is not None and _composes(emb, index.shape[0], anchor):
        index, mode = _compose_rows(rows.contiguous(), index, emb.shape[0]), _ROWS_COMPOSED
    anchor, anchor_strides, anchor_flags = _anchor_args(emb, anchor)
    flags = dict(ROWS=mode, **anchor_flags, ACC=_tl_dtype(emb.dtype))
    rows = index if rows is None else rows.contiguous()  # unused pointers when absent
    block_d = _block_d(dim)
    if combiner == "tile":
        out = emb.new_empty((n_rows, tile_len * dim))
        if out.numel():
            block_s = min(_rows_per_program(block_d), next_power_of_2(tile_len))
            grid = (n_rows, cdiv(tile_len, block_s))
            _segment_tile_kernel[grid](
                emb, rows, anchor, index, offsets, out, index.shape[0], n_unique, emb.shape[0], dim, tile_len,
                *anchor_strides, **flags, BLOCK_S=block_s, BLOCK_D=block_d,
            )
        return out
    out = emb.new_empty((n_rows, dim))
    if out.numel():
        weight = weight.contiguous() if weight is not None else None
        _segment_reduce_kernel[(n_rows, cdiv(dim, block_d))](
            emb, rows, anchor, index, offsets, weight if weight is not None else index, out, index.shape[0], n_unique,
            emb.shape[0], dim, *anchor_strides, **flags,
            HAS_WEIGHT=weight is not None, MEAN=combiner == "mean", BLOCK_N=_BLOCK_N, BLOCK_D=block_d,
        )
    return out


def _anchor_args(emb: Tensor, anchor: Tensor | None) -> tuple[Tensor, tuple[int, int], dict]:
    """``(anchor tensor or an unused pointer, its strides, HAS_ANCHOR / ANCHOR_SCALAR)``: read
    through any strides, so a broadcast anchor is never copied; a stride-0 anchor is one value
    (ANCHOR_SCALAR; an anchor of 0 rows is never read at all)."""
    strides = (0, 0) if anchor is None else anchor.stride()
    scalar = anchor is not None and _scalar_anchor(anchor)
    return (emb if anchor is None else anchor), strides, dict(HAS_ANCHOR=anchor is not None, ANCHOR_SCALAR=scalar)


def _scalar_anchor(anchor: Tensor) -> bool:
    """Both strides 0 and at least one element: one value (``ANCHOR_SCALAR``)."""
    return anchor.stride() == (0, 0) and anchor.numel() > 0


def _feature_table(features: list[tuple], dim: int, weight_dtype: torch.dtype, device: torch.device):
    """The multi kernels' launch: ``(table [F, _N_FIELDS] int64 on device, programs, BLOCK_D,
    BLOCK_S, tensors to keep alive until the launch)`` of ``features`` = ``[(dense, index, offsets,
    weight, combiner, tile_len)]`` (``_FIELDS``; weights converted to ``weight_dtype``)."""
    block_d = _block_d(dim)
    tile_lens = [t for *_, c, t in features if c == "tile"]
    block_s = min(_rows_per_program(block_d), next_power_of_2(max(tile_lens))) if tile_lens else 1
    rows, alive, n_programs = [], [], 0
    for dense, index, offsets, weight, combiner, tile_len in features:
        index, offsets = index.contiguous(), offsets.contiguous()
        weight = None if weight is None else weight.to(weight_dtype).contiguous()  # one weight dtype per kernel
        alive += [dense, index, offsets, weight]  # each feature's copies must outlive the loop
        rows.append([dense.data_ptr(), dense.stride(0), index.data_ptr(), offsets.data_ptr(),
                     0 if weight is None else weight.data_ptr(), index.shape[0], _KINDS[combiner], tile_len,
                     n_programs])  # _FIELDS' order
        blocks = cdiv(tile_len, block_s) if combiner == "tile" else cdiv(dim, block_d)
        n_programs += (offsets.shape[0] - 1) * blocks
    table, _ = device_table(rows, device)  # one non-blocking copy
    return table, n_programs, block_d, block_s, alive


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


def table_combine_multi_triton(
    table: Tensor, rows: Tensor, anchor: Tensor | None, index: list[Tensor], offsets: list[Tensor],
    weight: list[Tensor | None], combiner: list[str], tile_len: list[int],
) -> list[Tensor]:
    """``fxrec::table_combine_multi``'s forward: every feature's ``table_combine_triton`` in ONE
    launch (``_multi_combine_kernel``); a single feature with rows launches its own kernels."""
    dim = table.shape[1]
    outs = [table.new_empty((o.shape[0] - 1, (t if c == "tile" else 1) * dim))
            for o, c, t in zip(offsets, combiner, tile_len)]
    features = [f for f in zip(outs, index, offsets, weight, combiner, tile_len) if f[0].numel()]
    if len(features) < 2:
        return [table_combine_triton(table, rows, anchor, *f) for f in zip(index, offsets, weight, combiner, tile_len)]
    acc_dtype = _accumulate_dtype(table.dtype)
    table, rows = table.contiguous(), rows.contiguous()
    mode = _ROWS_INDIRECT
    if _composes(table, sum(f[1].shape[0] for f in features), anchor):
        # one pass over every feature's items: their index entries side by side, then one view each
        item_rows = _compose_rows(rows, torch.cat([f[1].reshape(-1) for f in features]), table.shape[0])
        ends = itertools.accumulate(f[1].shape[0] for f in features)
        features = [(f[0], item_rows[end - f[1].shape[0]:end], *f[2:]) for f, end in zip(features, ends)]
        mode = _ROWS_COMPOSED
    features_table, n_programs, block_d, block_s, alive = _feature_table(features, dim, acc_dtype, table.device)
    anchor, anchor_strides, anchor_flags = _anchor_args(table, anchor)
    _multi_combine_kernel[(n_programs,)](
        features_table, len(features), table, rows, anchor, rows.shape[0], table.shape[0], dim, *anchor_strides,
        OUT_T=_TL_DTYPES[table.dtype], WEIGHT_T=_tl_dtype(acc_dtype), ROWS=mode, **anchor_flags,
        ACC=_tl_dtype(acc_dtype), BLOCK_N=_BLOCK_N, BLOCK_D=block_d, BLOCK_S=block_s,
    )
    del alive
    return outs


def segment_combine_backward_triton(
    grad: Tensor, index: Tensor, offsets: Tensor, weight: Tensor | None, combiner: str, tile_len: int, num_rows: int
) -> Tensor:
    """Backward: ``grad_emb [num_rows, dim]`` in ``grad``'s dtype (see the module docstring)."""
    dim = grad.shape[1] // tile_len if combiner == "tile" else grad.shape[1]
    grad_emb = torch.zeros((num_rows, dim), dtype=_accumulate_dtype(grad.dtype), device=grad.device)
    if grad_emb.numel():
        _scatter_launch(grad_emb, grad, index, offsets, weight, combiner, tile_len)
    return grad_emb.to(grad.dtype)


def segment_combine_backward_multi_triton(
    grads: list[Tensor], index: list[Tensor], offsets: list[Tensor], weight: list[Tensor | None],
    combiner: list[str], tile_len: list[int], num_rows: int,
) -> Tensor:
    """The backward of several features' combines into ONE ``grad_emb [num_rows, dim]`` (in the
    grads' dtype): one zero fill, then ONE scatter launch for every feature
    (``_multi_scatter_kernel``; its table of the features' tensors goes to the device in one
    copy). A single feature with items launches its own kernel (no table to copy)."""
    device, acc_dtype = grads[0].device, _accumulate_dtype(grads[0].dtype)
    dim = grads[0].shape[1] // tile_len[0] if combiner[0] == "tile" else grads[0].shape[1]
    grad_emb = torch.zeros((num_rows, dim), dtype=acc_dtype, device=device)
    features = [f for f in zip(grads, index, offsets, weight, combiner, tile_len)
                if f[1].shape[0] and f[2].shape[0] > 1]  # features without items or rows add nothing
    if grad_emb.numel() == 0 or not features:
        return grad_emb.to(grads[0].dtype)
    if len(features) == 1:
        _scatter_launch(grad_emb, *features[0])
        return grad_emb.to(grads[0].dtype)
    features = [(_unit_column_stride(grad), *rest) for grad, *rest in features]
    features_table, n_programs, block_d, block_s, alive = _feature_table(features, dim, acc_dtype, device)
    _multi_scatter_kernel[(n_programs,)](
        features_table, len(features), grad_emb, num_rows, dim, GRAD_T=_TL_DTYPES[grads[0].dtype],
        WEIGHT_T=_tl_dtype(acc_dtype), ACC=_tl_dtype(acc_dtype), BLOCK_N=_BLOCK_N, BLOCK_D=block_d, BLOCK_S=block_s,
    )
    del alive
    return grad_emb.to(grads[0].dtype)


def _unit_column_stride(grad: Tensor) -> Tensor:
    """``grad`` as the backward kernels read it: rows any distance apart, columns adjacent. A
    column slice of a wider gradient (what a concatenation's backward hands each feature) is read
    in place, not copied (at B = 4096 a tile feature's gradient is 262 MB)."""
    return grad if grad.stride(1) == 1 else grad.contiguous()


def _scatter_launch(grad_emb: Tensor, grad: Tensor, index: Tensor, offsets: Tensor, weight: Tensor | None,
                    combiner: str, tile_len: int) -> None:
    """Adds one feature's combine backward into ``grad_emb`` (fp32 / fp64) with atomics."""
    grad, index, offsets = _unit_column_stride(grad), index.contiguous(), offsets.contiguous()
    n_rows, n_items = offsets.shape[0] - 1, index.shape[0]
    if n_items == 0 or n_rows == 0:
        return
    tile = combiner == "tile"
    num_rows, dim = grad_emb.shape
    block_d = _block_d(dim)
    acc = _tl_dtype(grad.dtype)
    if tile:
        block_s = min(_rows_per_program(block_d), next_power_of_2(tile_len))
        _tile_scatter_kernel[(n_rows, cdiv(tile_len, block_s))](
            grad, grad.stride(0), index, offsets, grad_emb, n_items, num_rows, dim, tile_len, ACC=acc, BLOCK_S=block_s,
            BLOCK_D=block_d,
        )
    else:
        weight = weight.contiguous() if weight is not None else None
        _row_scatter_kernel[(n_rows, cdiv(dim, block_d))](
            grad, grad.stride(0), index, offsets, weight if weight is not None else index, grad_emb, n_items, num_rows,
            dim, HAS_WEIGHT=weight is not None, MEAN=combiner == "mean", ACC=acc, BLOCK_N=_BLOCK_N, BLOCK_D=block_d,
        )

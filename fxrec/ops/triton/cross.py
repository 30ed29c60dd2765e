"""Triton kernel of ``fxrec::feature_cross``: cartesian pair expansion + MurmurHash64A + weight.

The per-row de-duplication happens before (torch ops, see ``fxrec.ops.cross``); this kernel
gets, for every row ``b``, the sorted unique ids of x at ``x_uniq[x_start[b] : x_start[b] +
|uniq x|]`` (same for y, with ``y_count[b] = |uniq y|``) and the output row offsets
``out_offsets`` (``[B + 1]``, starting at 0). One lane per output pair: the lane finds its row
by binary search in ``out_offsets`` (so rows of any length are balanced over programs: there is
no row-length limit), then ``(i, j) = divmod(local, |uniq y|)`` gives x-major, y-minor order.
"""

import torch
import triton
import triton.language as tl

from fxrec.ops.triton.hash import murmur_block, murmur_finish

__all__ = ["cross_pairs_triton", "unique_short_rows_triton"]

# MurmurHash64A's initial state for a 16-byte key and seed 0 (seed ^ len * m).
_MURMUR_H0 = tl.constexpr((16 * 0xC6A4A7935BD1E995) % (1 << 64))
_BLOCK = 1024


@triton.jit
def _cross_pairs_kernel(
    out_offsets_ptr,
    x_uniq_ptr,
    x_start_ptr,
    x_weight_ptr,
    y_uniq_ptr,
    y_start_ptr,
    y_count_ptr,
    y_weight_ptr,
    ids_ptr,
    weight_ptr,
    total,
    num_rows,
    search_steps,
    HAS_X_WEIGHT: tl.constexpr,
    HAS_Y_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = pair < total
    # Largest row b with out_offsets[b] <= pair (rows before it hold fewer pairs; empty rows
    # share their start with the next row, and the largest such b is the non-empty one).
    # Invariant: out_offsets[lo] <= pair < out_offsets[hi]; search_steps halvings reach hi = lo + 1.
    lo = tl.zeros([BLOCK], dtype=tl.int64)
    hi = tl.zeros([BLOCK], dtype=tl.int64) + num_rows
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        below = tl.load(out_offsets_ptr + mid, mask=mask, other=0) <= pair
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    row = lo
    local = pair - tl.load(out_offsets_ptr + row, mask=mask, other=0)
    y_count = tl.load(y_count_ptr + row, mask=mask, other=1)
    i = local // y_count
    x_at = tl.load(x_start_ptr + row, mask=mask, other=0) + i
    y_at = tl.load(y_start_ptr + row, mask=mask, other=0) + (local - i * y_count)

    x = tl.load(x_uniq_ptr + x_at, mask=mask, other=0).to(tl.uint64, bitcast=True)
    y = tl.load(y_uniq_ptr + y_at, mask=mask, other=0).to(tl.uint64, bitcast=True)
    h = tl.zeros([BLOCK], dtype=tl.uint64) + _MURMUR_H0
    h = murmur_finish(murmur_block(murmur_block(h, x), y))
    tl.store(ids_ptr + pair, h.to(tl.int64, bitcast=True), mask=mask)

    # The weights arrive already converted to the output dtype: the product is one IEEE multiply
    # in that dtype, exactly as on CPU; a missing side contributes nothing (not a multiply by 1).
    out_ty = weight_ptr.dtype.element_ty
    if HAS_X_WEIGHT and HAS_Y_WEIGHT:
        w = tl.load(x_weight_ptr + x_at, mask=mask) * tl.load(y_weight_ptr + y_at, mask=mask)
    elif HAS_X_WEIGHT:
        w = tl.load(x_weight_ptr + x_at, mask=mask)
    elif HAS_Y_WEIGHT:
        w = tl.load(y_weight_ptr + y_at, mask=mask)
    else:
        w = tl.full([BLOCK], 1.0, dtype=out_ty)
    tl.store(weight_ptr + pair, w, mask=mask)


def cross_pairs_triton(
    out_offsets: torch.Tensor,
    total: int,
    x_uniq: torch.Tensor,
    x_start: torch.Tensor,
    x_weight: torch.Tensor | None,
    y_uniq: torch.Tensor,
    y_start: torch.Tensor,
    y_count: torch.Tensor,
    y_weight: torch.Tensor | None,
    weight_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expands every row's unique x × unique y into ``(ids [total] int64, weight [total])``.

    ``out_offsets`` [B + 1] (from 0, ``out_offsets[-1] == total``), ``x_start``/``y_start``/
    ``y_count`` [B] int64 index into ``x_uniq``/``y_uniq`` (int64) and into ``x_weight``/
    ``y_weight`` (same layout, already of ``weight_dtype``; ``None`` = no weight on that side,
    the output weight is then the other side's, or 1.0). ``total`` is a host int: the caller
    synced once to size the outputs. Works on CUDA tensors and, under ``TRITON_INTERPRET=1``,
    on CPU tensors.
    """
    ids = torch.empty(total, dtype=torch.int64, device=x_uniq.device)
    weight = torch.empty(total, dtype=weight_dtype, device=x_uniq.device)
    if total == 0:
        return ids, weight
    num_rows = out_offsets.numel() - 1
    _cross_pairs_kernel[(triton.cdiv(total, _BLOCK),)](
        out_offsets,
        x_uniq,
        x_start,
        # Absent weights still need a pointer argument; the constexpr flag keeps it unread.
        weight if x_weight is None else x_weight,
        y_uniq,
        y_start,
        y_count,
        weight if y_weight is None else y_weight,
        ids,
        weight,
        total,
        num_rows,
        num_rows.bit_length(),
        HAS_X_WEIGHT=x_weight is not None,
        HAS_Y_WEIGHT=y_weight is not None,
        BLOCK=_BLOCK,
    )
    return ids, weight


# Rows up to this many items are de-duplicated by one program each, comparing all pairs of the
# row's items in registers (no sort); longer rows take the sort-based torch path.
SHORT_ROW = 64


@triton.jit
def _unique_short_rows_kernel(
    values_ptr,
    num_values,
    offsets_ptr,
    weight_ptr,
    uniq_ptr,
    uniq_weight_ptr,
    count_ptr,
    long_ptr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Row ``b``'s sorted unique ids (each with its first occurrence's weight) written to
    ``uniq[offsets[b] - offsets[0] + rank]``; ``count[b]`` = their number. A row longer than
    BLOCK sets ``long`` and counts 0 (the caller then redoes that side with sorts)."""
    row = tl.program_id(0)
    base = tl.load(offsets_ptr)
    start = tl.load(offsets_ptr + row)
    length = tl.load(offsets_ptr + row + 1) - start
    i = tl.arange(0, BLOCK)
    # Malformed offsets are reported by the caller; until then no read may leave values.
    # A row longer than BLOCK takes no item (a scalar mask would be broadcast; this is the same).
    kept = tl.where(length <= BLOCK, length, 0)
    valid = (i < kept) & (start + i >= 0) & (start + i < num_values)
    v = tl.load(values_ptr + start + i, mask=valid, other=0)
    earlier = i[None, :] < i[:, None]  # [i, j]: j comes before i
    earlier_equal = tl.sum(((v[:, None] == v[None, :]) & earlier & valid[None, :]).to(tl.int32), axis=1)
    first = valid & (earlier_equal == 0)
    # rank of a first occurrence = how many distinct ids of the row are smaller
    rank = tl.sum(((v[None, :] < v[:, None]) & first[None, :]).to(tl.int32), axis=1)
    slot = tl.minimum(tl.maximum(start - base + rank, 0), num_values)
    tl.store(uniq_ptr + slot, v, mask=first)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + start + i, mask=first, other=0)
        tl.store(uniq_weight_ptr + slot, w.to(uniq_weight_ptr.dtype.element_ty), mask=first)
    tl.store(count_ptr + row, tl.sum(first.to(tl.int64), axis=0))
    tl.atomic_max(long_ptr, (length > BLOCK).to(tl.int32))


def unique_short_rows_triton(values, offsets, weight, weight_dtype):
    """Per-row sorted unique ids without sorting, for rows of at most ``SHORT_ROW`` items.

    Returns ``(uniq_ids, uniq_weight or None, start, count, has_long)``: row ``b``'s unique ids
    at ``uniq_ids[start[b] : start[b] + count[b]]`` with ``start[b] = offsets[b] - offsets[0]``;
    ``has_long`` is a 0-d int32 tensor, non-zero if some row is longer than ``SHORT_ROW`` (its
    count is then 0 and the result must not be used). No host sync.
    """
    n, num_rows = values.shape[0], offsets.shape[0] - 1
    uniq = values.new_zeros(n + 1)
    uniq_weight = None if weight is None else torch.zeros(n + 1, dtype=weight_dtype, device=values.device)
    count = torch.zeros(num_rows, dtype=torch.int64, device=values.device)
    has_long = torch.zeros((), dtype=torch.int32, device=values.device)
    if num_rows:
        _unique_short_rows_kernel[(num_rows,)](
            values, n, offsets, uniq if weight is None else weight, uniq, uniq if uniq_weight is None else uniq_weight,
            count, has_long, HAS_WEIGHT=weight is not None, BLOCK=SHORT_ROW, num_warps=4,
        )
    start = offsets[:-1] - offsets[:1]
    return uniq, uniq_weight, start, count, has_long

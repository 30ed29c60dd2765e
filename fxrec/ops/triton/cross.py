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

__all__ = ["cross_pairs_triton"]

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

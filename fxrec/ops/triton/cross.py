"""Triton kernels of ``fxrec::feature_cross``: per-row de-duplication, then cartesian pair
expansion + MurmurHash64A + weight.

``_plan_short_rows_kernel`` (one program per row, rows of at most ``SHORT_ROW`` items; rows of at
most ``_TINY_ROW`` items on both sides compare only that many) writes every row's sorted unique
ids of x at ``x_uniq[x_start[b] : x_start[b] + |uniq x|]`` (same for y, with ``y_count[b] =
|uniq y|``) and its pair count; the last program to finish turns the counts into the output row
offsets ``out_offsets`` (``[B + 1]``, starting at 0). ``_cross_pairs_kernel`` has one lane per
output pair: the lane finds its row by binary search in ``out_offsets`` (so rows of any length
are balanced over programs: there is no row-length limit), then ``(i, j) = divmod(local, |uniq
y|)`` gives x-major, y-minor order. It reads the output length on the device, so both kernels
are queued before the caller's one host sync.
"""

import torch
import triton
import triton.language as tl

from fxrec.ops.triton import cdiv
from fxrec.ops.triton.hash import murmur_block, murmur_finish

__all__ = ["STATUS", "SHORT_ROW", "cross_pairs_triton", "plan_short_rows_triton"]

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
    capacity,
    num_rows,
    num_flags,
    search_steps,
    HAS_X_WEIGHT: tl.constexpr,
    HAS_Y_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # The output length is read here, on the device (out_offsets[num_rows]), so that the kernel
    # can be queued before the host reads it; pairs past ``capacity`` (the outputs' length) are
    # left for the caller's exact relaunch. Any of the ``num_flags`` flags after out_offsets (bad
    # offsets, long rows) means the plan is not valid: nothing is read or written.
    flags = tl.arange(0, 4)
    flagged = tl.sum(tl.load(out_offsets_ptr + num_rows + 1 + flags, mask=flags < num_flags, other=0), 0)
    limit = tl.where(flagged != 0, 0, tl.minimum(tl.load(out_offsets_ptr + num_rows), capacity))
    pair = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = pair < limit
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
    capacity: int,
    num_flags: int,
    x_uniq: torch.Tensor,
    x_start: torch.Tensor,
    x_weight: torch.Tensor | None,
    y_uniq: torch.Tensor,
    y_start: torch.Tensor,
    y_count: torch.Tensor,
    y_weight: torch.Tensor | None,
    weight_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expands every row's unique x × unique y into ``(ids [capacity] int64, weight [capacity])``,
    without reading anything back to the host.

    ``out_offsets`` [B + 1] (from 0; the output length ``total`` is ``out_offsets[-1]``, read by
    the kernel) is followed in memory by ``num_flags`` (0 or 4) int64 flags: when any is set,
    nothing is written. Pairs ``[0, min(total, capacity))`` are written; the caller, once it
    knows ``total``, keeps the first ``total`` items or, if ``total > capacity``, calls again with
    ``capacity = total``. ``x_start``/``y_start``/``y_count`` [B] int64 index into
    ``x_uniq``/``y_uniq`` (int64) and into ``x_weight``/``y_weight`` (same layout, already of
    ``weight_dtype``; ``None`` = no weight on that side, the output weight is then the other
    side's, or 1.0). Works on CUDA tensors and, under ``TRITON_INTERPRET=1``, on CPU tensors.
    """
    ids = torch.empty(capacity, dtype=torch.int64, device=x_uniq.device)
    weight = torch.empty(capacity, dtype=weight_dtype, device=x_uniq.device)
    if capacity == 0:
        return ids, weight
    num_rows = out_offsets.numel() - 1
    _cross_pairs_kernel[(cdiv(capacity, _BLOCK),)](
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
        capacity,
        num_rows,
        num_flags,
        num_rows.bit_length(),
        HAS_X_WEIGHT=x_weight is not None,
        HAS_Y_WEIGHT=y_weight is not None,
        BLOCK=_BLOCK,
    )
    return ids, weight


# Rows up to this many items are de-duplicated by one program each, comparing all pairs of the
# row's items in registers (no sort); longer rows take the sort-based torch path.
SHORT_ROW = 64
# A row whose x and y sides both have at most this many items is de-duplicated comparing that
# many items (the same result as SHORT_ROW's comparisons, a fraction of the work).
_TINY_ROW = 8
# Pair counts summed per step of the plan kernel's final scan.
_SCAN_BLOCK = 1024

# Entries of the status block that follows the output offsets (see ``plan_short_rows_triton``).
STATUS = ("total", "x_bad", "y_bad", "x_long", "y_long")


@triton.jit
def _unique_short_row(values_ptr, num_values, offsets_ptr, weight_ptr, uniq_ptr, uniq_weight_ptr, start_ptr,
                      count_ptr, row, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``row``'s sorted unique ids (each with its first occurrence's weight) written to
    ``uniq[offsets[row] - offsets[0] + rank]``, its start and number of unique ids to
    ``start[row]`` and ``count[row]``. Returns (that number, row longer than BLOCK, offsets bad
    at this row); a long or bad row counts 0."""
    base = tl.load(offsets_ptr)
    start = tl.load(offsets_ptr + row)
    end = tl.load(offsets_ptr + row + 1)
    length = end - start
    bad = (length < 0) | (start < 0) | (end > num_values)
    too_long = length > BLOCK
    i = tl.arange(0, BLOCK)
    # Until the caller reports bad offsets no read may leave values; a long row takes no item
    # (a scalar mask would be broadcast; this is the same).
    kept = tl.where(too_long | bad, 0, length)
    valid = i < kept
    v = tl.load(values_ptr + start + i, mask=valid, other=0)
    earlier = i[None, :] < i[:, None]  # [i, j]: j comes before i
    earlier_equal = tl.sum(((v[:, None] == v[None, :]) & earlier & valid[None, :]).to(tl.int32), axis=1)
    first = valid & (earlier_equal == 0)
    # rank of a first occurrence = how many distinct ids of the row are smaller
    rank = tl.sum(((v[None, :] < v[:, None]) & first[None, :]).to(tl.int32), axis=1)
    # Clamped: with a bad offsets[0], a good row's slot could leave the buffer (then reported).
    slot = tl.minimum(tl.maximum(start - base + rank, 0), num_values)
    tl.store(uniq_ptr + slot, v, mask=first)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + start + i, mask=first, other=0)
        tl.store(uniq_weight_ptr + slot, w.to(uniq_weight_ptr.dtype.element_ty), mask=first)
    count = tl.sum(first.to(tl.int64), axis=0)
    tl.store(start_ptr + row, start - base)
    tl.store(count_ptr + row, count)
    return count, too_long, bad


@triton.jit
def _plan_row(
    x_values_ptr, x_num_values, x_offsets_ptr, x_weight_ptr, x_uniq_ptr, x_uniq_weight_ptr, x_start_ptr, x_count_ptr,
    y_values_ptr, y_num_values, y_offsets_ptr, y_weight_ptr, y_uniq_ptr, y_uniq_weight_ptr, y_start_ptr, y_count_ptr,
    pairs_ptr, status_ptr, row, HAS_X_WEIGHT: tl.constexpr, HAS_Y_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):
    """Row ``row`` of x and of y de-duplicated (rows of at most BLOCK items), its pair count
    |uniq x_b| * |uniq y_b| written to ``pairs[row]``, its flags set in ``status[1:5]`` (x_bad,
    y_bad, x_long, y_long)."""
    x_count, x_long, x_bad = _unique_short_row(
        x_values_ptr, x_num_values, x_offsets_ptr, x_weight_ptr, x_uniq_ptr, x_uniq_weight_ptr, x_start_ptr,
        x_count_ptr, row, HAS_X_WEIGHT, BLOCK)
    y_count, y_long, y_bad = _unique_short_row(
        y_values_ptr, y_num_values, y_offsets_ptr, y_weight_ptr, y_uniq_ptr, y_uniq_weight_ptr, y_start_ptr,
        y_count_ptr, row, HAS_Y_WEIGHT, BLOCK)
    tl.store(pairs_ptr + row, x_count * y_count)
    # Plain stores of 1 (every writer writes the same value): no atomics needed.
    if x_bad:
        tl.store(status_ptr + 1, 1)
    if y_bad:
        tl.store(status_ptr + 2, 1)
    if x_long:
        tl.store(status_ptr + 3, 1)
    if y_long:
        tl.store(status_ptr + 4, 1)


@triton.jit
def _plan_short_rows_kernel(
    x_values_ptr, x_num_values, x_offsets_ptr, x_weight_ptr, x_uniq_ptr, x_uniq_weight_ptr, x_start_ptr, x_count_ptr,
    y_values_ptr, y_num_values, y_offsets_ptr, y_weight_ptr, y_uniq_ptr, y_uniq_weight_ptr, y_start_ptr, y_count_ptr,
    pairs_ptr, out_offsets_ptr, num_rows,
    HAS_X_WEIGHT: tl.constexpr, HAS_Y_WEIGHT: tl.constexpr, TINY: tl.constexpr, BLOCK: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
):
    """Program ``b`` de-duplicates row ``b`` of x and of y and writes its pair count
    |uniq x_b| * |uniq y_b| to ``pairs[b]``. ``out_offsets_ptr`` is the zeroed buffer
    [out_offsets (B + 1) | flags (4) | arrival counter]: flags (bad offsets, rows longer than
    BLOCK) are set there, and the last program to finish writes the cumsum of ``pairs`` to
    out_offsets[1:] (so no torch cumsum launch), its last entry being the output length."""
    row = tl.program_id(0)
    status_ptr = out_offsets_ptr + num_rows
    if row < num_rows:
        x_length = tl.load(x_offsets_ptr + row + 1) - tl.load(x_offsets_ptr + row)
        y_length = tl.load(y_offsets_ptr + row + 1) - tl.load(y_offsets_ptr + row)
        # Rows of TINY items or fewer (one id per row in the tutorial) compare TINY x TINY items,
        # not BLOCK x BLOCK: the same result, a fraction of the work.
        if (x_length <= TINY) & (y_length <= TINY):
            _plan_row(x_values_ptr, x_num_values, x_offsets_ptr, x_weight_ptr, x_uniq_ptr, x_uniq_weight_ptr,
                      x_start_ptr, x_count_ptr, y_values_ptr, y_num_values, y_offsets_ptr, y_weight_ptr, y_uniq_ptr,
                      y_uniq_weight_ptr, y_start_ptr, y_count_ptr, pairs_ptr, status_ptr, row, HAS_X_WEIGHT,
                      HAS_Y_WEIGHT, TINY)
        else:
            _plan_row(x_values_ptr, x_num_values, x_offsets_ptr, x_weight_ptr, x_uniq_ptr, x_uniq_weight_ptr,
                      x_start_ptr, x_count_ptr, y_values_ptr, y_num_values, y_offsets_ptr, y_weight_ptr, y_uniq_ptr,
                      y_uniq_weight_ptr, y_start_ptr, y_count_ptr, pairs_ptr, status_ptr, row, HAS_X_WEIGHT,
                      HAS_Y_WEIGHT, BLOCK)
    else:  # no rows: the offsets' one entry must still lie within values
        x_base = tl.load(x_offsets_ptr)
        y_base = tl.load(y_offsets_ptr)
        if (x_base < 0) | (x_base > x_num_values):
            tl.store(status_ptr + 1, 1)
        if (y_base < 0) | (y_base > y_num_values):
            tl.store(status_ptr + 2, 1)
    # The last program to arrive scans every row's pair count. The barrier orders this program's
    # stores before its release; the acquire makes every earlier program's stores visible here
    # (the loads bypass L1, which is not coherent across SMs).
    tl.debug_barrier()
    arrived = tl.atomic_add(status_ptr + 5, 1, sem="acq_rel")
    if arrived == tl.num_programs(0) - 1:
        tl.debug_barrier()
        done = tl.zeros([], dtype=tl.int64)
        for start in range(0, num_rows, SCAN_BLOCK):
            i = start + tl.arange(0, SCAN_BLOCK)
            counts = tl.load(pairs_ptr + i, mask=i < num_rows, other=0, cache_modifier=".cg")
            tl.store(out_offsets_ptr + 1 + i, done + tl.cumsum(counts, 0), mask=i < num_rows)
            done += tl.sum(counts, 0)


def plan_short_rows_triton(x_values, x_offsets, x_weight, y_values, y_offsets, y_weight, weight_dtype):
    """Both sides' per-row sorted unique ids and the output offsets, in two launches (a zero-fill
    and one kernel), no host sync.

    Returns ``(x, y, out_offsets, status)``. ``x`` is ``(uniq, uniq_weight, start, count)``: row
    ``b``'s unique x ids at ``uniq[start[b] : start[b] + count[b]]`` with ``start[b] =
    x_offsets[b] - x_offsets[0]``, their weights (of ``weight_dtype``, or None) in the same
    layout; ``y`` likewise. ``out_offsets`` (``[B + 1]``, from 0) holds the cumulative pair
    counts; ``status`` (int64 ``[5]``, entries named by ``STATUS``) the output length and the
    flags. ``out_offsets`` and ``status`` are adjacent views of one buffer (``status[0]`` is
    ``out_offsets[-1]``), so one read brings the length and the flags to the host. Results are
    valid only where every flag is 0 (a long row counts 0 unique ids).
    """
    device = x_values.device
    num_rows = x_offsets.shape[0] - 1

    def side(values, weight):
        n = values.shape[0]
        return (
            torch.empty(n + 1, dtype=torch.int64, device=device),
            None if weight is None else torch.empty(n + 1, dtype=weight_dtype, device=device),
            torch.empty(num_rows, dtype=torch.int64, device=device),
            torch.empty(num_rows, dtype=torch.int64, device=device),
        )

    x, y = side(x_values, x_weight), side(y_values, y_weight)
    pairs = torch.empty(num_rows, dtype=torch.int64, device=device)
    # [out_offsets (B + 1) | flags (4) | arrival counter]: the zeros are out_offsets[0], the
    # cleared flags and the counter.
    buffer = torch.zeros(num_rows + len(STATUS) + 1, dtype=torch.int64, device=device)
    out_offsets, status = buffer[: num_rows + 1], buffer[num_rows: num_rows + len(STATUS)]
    # An absent weight still needs a pointer argument; the constexpr flags keep it unread.
    _plan_short_rows_kernel[(max(num_rows, 1),)](
        x_values, x_values.shape[0], x_offsets, x_values if x_weight is None else x_weight, *x[:1],
        x[0] if x[1] is None else x[1], *x[2:],
        y_values, y_values.shape[0], y_offsets, y_values if y_weight is None else y_weight, *y[:1],
        y[0] if y[1] is None else y[1], *y[2:],
        pairs, buffer, num_rows,
        HAS_X_WEIGHT=x_weight is not None, HAS_Y_WEIGHT=y_weight is not None, TINY=_TINY_ROW, BLOCK=SHORT_ROW,
        SCAN_BLOCK=_SCAN_BLOCK, num_warps=4,
    )
    return x, y, out_offsets, status

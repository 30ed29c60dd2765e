"""Triton kernels for sequence truncation (``fxrec::sequence_truncate``, ``_multi``, ``_3d``).

The scan that places each row's kept items needs no torch launch: the rows kernel writes, per
block of ``_ROWS_BLOCK`` rows, the inclusive cumsum of the kept lengths within the block and the
block's total; the copy kernel adds the totals of the blocks before a row's block (a few loads:
a batch of 4096 rows has 4 blocks).

2-D (``sequence_truncate``, ``_multi``): every feature goes through every step together, so the
launch count does not depend on the number of features N. A feature keeps at most
``min(len(values), rows * seq_len)`` items, a bound the host knows, so its outputs are allocated
at that bound BEFORE the size is read and every launch is queued before the one sync:

1. One non-blocking copy of one pinned table: the features (rows kernel), the copy jobs (copy
   kernel) and the zeroed status entries (totals, bad-offsets flags).
2. ``_rows_kernel``: per row, the kept length (block-local cumsum) and the source start of the
   kept items; per block, its total; per feature, its total (atomic add) and bad-offsets flag.
3. ``_segment_copy_kernel``: copies the kept items of every values and weight tensor (addressed
   through the table's data pointers) and writes each feature's output offsets. Items are copied
   as integer words (see :func:`fxrec.ops.triton.dense.word_size`), so any dtype and trailing
   dims work, bit-exact. Writes stop at the allocated bound (only malformed offsets, reported at
   the sync, could reach it).
4. The one host sync: ``status.tolist()`` reads every total and flag at once; the outputs are
   the first ``total`` items of the bound-sized buffers (views: the storage is at most the
   input's size).

Per 2-D call: 2 Triton kernels, 1 table copy, 1 sync, no torch kernel, whatever N is.

3-D (``sequence_truncate_3d``): the same steps over slots (row x seq_len) instead of rows, with the
bound ``len(values)``, which holds unless kept inner lists overlap (inner offsets decreasing
between kept lists); then, after the same sync, a second table copy and copy launch fill outputs
of the exact size. Per call: 2 Triton kernels, ``arange`` (the outer offsets), 1 table copy,
1 sync.

Launchers work on CUDA tensors and, under ``TRITON_INTERPRET=1``, on CPU tensors.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxrec.ops.triton import cdiv, next_power_of_2
from fxrec.ops.triton.dense import word_size
from fxrec.ops.triton.mod import device_table

__all__ = ["truncate_triton", "truncate_multi_triton", "truncate_3d_triton"]

# Rows (3-D: slots) per program of the rows kernels, and so per block of the block-local cumsum.
_ROWS_BLOCK = 1024

# Feature table columns (int64): read by _rows_kernel.
_F_ROW_BASE = tl.constexpr(0)  # first row of the feature in the concatenated per-row arrays
_F_BLOCK_BASE = tl.constexpr(1)  # first block of the feature in the per-block totals
_F_N_ROWS = tl.constexpr(2)
_F_OFFSETS = tl.constexpr(3)  # address of the input offsets
_F_N_VALUES = tl.constexpr(4)
_F_SEQ_LEN = tl.constexpr(5)
_F_KEEP_LAST = tl.constexpr(6)
_F_COLS = tl.constexpr(7)

# Copy-job table columns (int64): read by _segment_copy_kernel. One job per output tensor.
_J_N_SEGS = tl.constexpr(0)
_J_SEG_BASE = tl.constexpr(1)  # first segment of the job in the per-segment arrays (starts, cum)
_J_BLOCK_BASE = tl.constexpr(2)  # first block of the job's segments in the per-block totals
_J_OUT_OFFSETS = tl.constexpr(3)  # address of the output offsets the job writes, 0 for none
_J_SRC = tl.constexpr(4)  # address of the source tensor
_J_DST = tl.constexpr(5)  # address of the output tensor
_J_CAPACITY = tl.constexpr(6)  # items the output holds: writes stop there
_J_ROW_WORDS = tl.constexpr(7)  # words per item
_J_WORD_BYTES = tl.constexpr(8)
_J_COLS = tl.constexpr(9)


@triton.jit
def _kept_range(offsets, row, mask, limit, seq_len, keep_last):
    """(number kept, first kept index, offsets bad) of each masked row of ``offsets``: its first or
    last ``seq_len`` entries; a row whose offsets decrease or leave ``[0, limit]`` keeps none."""
    begin = tl.load(offsets + row, mask=mask, other=0)
    end = tl.load(offsets + row + 1, mask=mask, other=0)
    length = end - begin
    bad = mask & ((length < 0) | (begin < 0) | (end > limit))
    kept = tl.where(bad, 0, tl.minimum(length, seq_len))
    return kept, tl.where(keep_last != 0, end - kept, begin), bad


@triton.jit
def _rows_kernel(features, cum_out, start_out, block_totals, status, n_features, BLOCK: tl.constexpr):
    feature = features + tl.program_id(1) * _F_COLS
    block = tl.program_id(0).to(tl.int64)
    n_rows = tl.load(feature + _F_N_ROWS)
    if block * BLOCK < n_rows:
        row = block * BLOCK + tl.arange(0, BLOCK)
        row_base = tl.load(feature + _F_ROW_BASE)
        offsets = tl.load(feature + _F_OFFSETS).to(tl.pointer_type(tl.int64))
        n_values = tl.load(feature + _F_N_VALUES)
        seq_len = tl.load(feature + _F_SEQ_LEN)
        keep_last = tl.load(feature + _F_KEEP_LAST)
        mask = row < n_rows
        kept, start, bad = _kept_range(offsets, row, mask, n_values, seq_len, keep_last)
        tl.store(cum_out + row_base + row, tl.cumsum(kept, 0), mask=mask)
        tl.store(start_out + row_base + row, start, mask=mask)
        total = tl.sum(kept, 0)
        tl.store(block_totals + tl.load(feature + _F_BLOCK_BASE) + block, total)
        tl.atomic_add(status + tl.program_id(1), total)
        tl.atomic_max(status + n_features + tl.program_id(1), tl.max(bad.to(tl.int64), 0))


@triton.jit
def _slots_kernel(
    outer, inner, cum_out, start_out, block_totals, status, n_slots, n_lists, n_values, seq_len, keep_last,
    BLOCK: tl.constexpr,
):
    # Slot s of row r is the s-th kept inner list of r, or an empty pad slot.
    slot = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = slot < n_slots
    row = slot // seq_len
    s = slot % seq_len
    kept_lists, first, row_bad = _kept_range(outer, row, in_range, n_lists, seq_len, keep_last)
    valid = in_range & (s < kept_lists)
    begin = tl.load(inner + first + s, mask=valid, other=0)
    end = tl.load(inner + first + s + 1, mask=valid, other=0)
    bad = row_bad | (valid & ((end < begin) | (begin < 0) | (end > n_values)))
    slot_len = tl.where(valid & ~bad, end - begin, 0)
    tl.store(cum_out + slot, tl.cumsum(slot_len, 0), mask=in_range)
    tl.store(start_out + slot, begin, mask=in_range)
    total = tl.sum(slot_len, 0)
    tl.store(block_totals + tl.program_id(0), total)
    tl.atomic_add(status, total)
    tl.atomic_max(status + 1, tl.max(bad.to(tl.int64), 0))


@triton.jit
def _copy_words(src, dst, n, BLOCK: tl.constexpr):
    for k in range(0, n, BLOCK):
        w = k + tl.arange(0, BLOCK)
        tl.store(dst + w, tl.load(src + w, mask=w < n), mask=w < n)


@triton.jit
def _segment_copy_kernel(
    jobs, seg_starts, cum, block_totals, SEG_BLOCK: tl.constexpr, MAX_BLOCKS: tl.constexpr, BLOCK: tl.constexpr
):
    # Program (s, j) copies segment s of job j: items [start, start + len) of the source to
    # [begin, end) of the output, and writes end to the job's output offsets (if any). The job's
    # segments are entries [base, base + n_segs) of the per-segment arrays: ``seg_starts`` and
    # ``cum``, the inclusive cumsum of the segment lengths within each block of SEG_BLOCK
    # segments; the block totals (``block_totals`` from the job's block base on) before segment
    # s's block turn that into its place in the output (MAX_BLOCKS: a power of two >= any job's
    # number of blocks; a batch of 4096 rows has 4).
    seg = tl.program_id(0).to(tl.int64)
    job = jobs + tl.program_id(1) * _J_COLS
    n_segs = tl.load(job + _J_N_SEGS)
    out_offsets = tl.load(job + _J_OUT_OFFSETS)
    if seg < n_segs:
        base = tl.load(job + _J_SEG_BASE)
        totals = block_totals + tl.load(job + _J_BLOCK_BASE)
        b = tl.arange(0, MAX_BLOCKS)
        before = tl.sum(tl.load(totals + b, mask=b < seg // SEG_BLOCK, other=0), 0)
        dst_begin = before + tl.load(cum + base + seg - 1, mask=seg % SEG_BLOCK != 0, other=0)
        dst_end = before + tl.load(cum + base + seg)
        if out_offsets != 0:
            tl.store(out_offsets.to(tl.pointer_type(tl.int64)) + seg + 1, dst_end)
            if seg == 0:
                tl.store(out_offsets.to(tl.pointer_type(tl.int64)), 0)
        capacity = tl.load(job + _J_CAPACITY)
        row_words = tl.load(job + _J_ROW_WORDS)
        word_bytes = tl.load(job + _J_WORD_BYTES)
        src = tl.load(job + _J_SRC)
        dst = tl.load(job + _J_DST)
        n = (tl.minimum(dst_end, capacity) - tl.minimum(dst_begin, capacity)) * row_words
        src_word = tl.load(seg_starts + base + seg) * row_words
        dst_word = dst_begin * row_words
        if word_bytes == 8:
            _copy_words(src.to(tl.pointer_type(tl.int64)) + src_word,
                        dst.to(tl.pointer_type(tl.int64)) + dst_word, n, BLOCK)
        elif word_bytes == 4:
            _copy_words(src.to(tl.pointer_type(tl.int32)) + src_word,
                        dst.to(tl.pointer_type(tl.int32)) + dst_word, n, BLOCK)
        elif word_bytes == 2:
            _copy_words(src.to(tl.pointer_type(tl.int16)) + src_word,
                        dst.to(tl.pointer_type(tl.int16)) + dst_word, n, BLOCK)
        else:
            _copy_words(src.to(tl.pointer_type(tl.int8)) + src_word,
                        dst.to(tl.pointer_type(tl.int8)) + dst_word, n, BLOCK)
    elif (seg == 0) & (out_offsets != 0):  # no segments: the output offsets are [0]
        tl.store(out_offsets.to(tl.pointer_type(tl.int64)), 0)


def _item_bytes(t: Tensor) -> int:
    return math.prod(t.shape[1:]) * t.element_size()


def _copy_jobs(copies) -> tuple[list[list[int]], int]:
    """Copy-job table rows for ``_segment_copy_kernel`` and the most words per item.

    ``copies``: (n_segs, seg_base, block_base, out_offsets or None, src, dst) per output tensor;
    segment s starts at source item ``seg_starts[seg_base + s]`` and its end in the output is its
    block-local cumsum entry ``cum[seg_base + s]`` plus the block totals from ``block_base`` on
    before its block; ``out_offsets`` (int64, n_segs + 1), when given, receives the output
    boundaries of the segments. Writes stop at ``dst``'s length.
    """
    jobs, max_row_words = [], 1
    for n_segs, seg_base, block_base, out_offsets, src, dst in copies:
        if dst.numel() == 0 and out_offsets is None:  # nothing to copy (no items, or empty items)
            continue
        row_bytes = _item_bytes(src)
        word = word_size(row_bytes, src, dst)
        max_row_words = max(max_row_words, row_bytes // word)
        out_offsets_address = 0 if out_offsets is None else out_offsets.data_ptr()
        jobs.append([n_segs, seg_base, block_base, out_offsets_address, src.data_ptr(), dst.data_ptr(), dst.shape[0],
                     row_bytes // word, word])
    return jobs, max_row_words


def _launch_copy(jobs: Tensor, n_jobs: int, max_segs: int, seg_starts: Tensor, cum: Tensor, block_totals: Tensor,
                 items_per_seg: int, max_row_words: int) -> None:
    """One launch of ``_segment_copy_kernel`` over the ``n_jobs`` rows of ``jobs`` (on the device).
    ``items_per_seg`` (a typical segment length) sizes the block; longer segments loop."""
    block = min(1024, max(128, next_power_of_2(max(items_per_seg * max_row_words, 1))))
    _segment_copy_kernel[(max(1, max_segs), n_jobs)](
        jobs, seg_starts, cum, block_totals, SEG_BLOCK=_ROWS_BLOCK,
        MAX_BLOCKS=next_power_of_2(cdiv(max(1, max_segs), _ROWS_BLOCK)), BLOCK=block,
        num_warps=max(1, block // 256),
    )


def _empty_weight(values: Tensor) -> Tensor:
    return torch.empty(0, dtype=torch.float32, device=values.device)


def truncate_multi_triton(
    values: list[Tensor],
    offsets: list[Tensor],
    weights: list[Tensor | None],
    seq_lens: list[int],
    keep_last: list[bool],
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """N 2-D truncations (see ``fxrec::sequence_truncate``) with a launch count independent of N.

    Syncs once (``status.tolist()``, after every launch): the output lengths are data-dependent.
    Raises ``ValueError`` naming ``offsets[f]`` when a feature's offsets decrease or leave its
    values.
    """
    n_features = len(values)
    if n_features == 0:
        return [], [], []
    device = values[0].device
    # Kept in these lists until the sync: the kernels read them through the table's addresses.
    values = [v.contiguous() for v in values]
    offsets = [o.contiguous() for o in offsets]
    weights = [None if w is None else w.contiguous() for w in weights]
    features, copies, out_values, out_offsets, out_weights = [], [], [], [], []
    total_rows = total_blocks = max_rows = items_per_seg = 0
    for f in range(n_features):
        v, o, w, seq_len = values[f], offsets[f], weights[f], seq_lens[f]
        n_rows, n_values = o.shape[0] - 1, v.shape[0]
        # With valid offsets the rows are disjoint ranges of values: the feature keeps at most this.
        bound = min(n_values, n_rows * seq_len)
        out_values.append(v.new_empty((bound, *v.shape[1:])))
        out_offsets.append(o.new_empty(n_rows + 1))
        features.append([total_rows, total_blocks, n_rows, o.data_ptr(), n_values, seq_len, int(keep_last[f])])
        copies.append((n_rows, total_rows, total_blocks, out_offsets[f], v, out_values[f]))
        if w is None:
            out_weights.append(_empty_weight(v))
        else:
            out_weights.append(w.new_empty((bound, *w.shape[1:])))
            copies.append((n_rows, total_rows, total_blocks, None, w, out_weights[f]))
        total_rows += n_rows
        total_blocks += cdiv(n_rows, _ROWS_BLOCK)
        max_rows = max(max_rows, n_rows)
        items_per_seg = max(items_per_seg, min(seq_len, cdiv(n_values, max(n_rows, 1))))
    jobs, max_row_words = _copy_jobs(copies)
    table, status = device_table(features + jobs, device, status_entries=2 * n_features)  # status: totals, flags
    cum = torch.empty(total_rows, dtype=torch.int64, device=device)
    starts = torch.empty(total_rows, dtype=torch.int64, device=device)
    block_totals = torch.empty(total_blocks, dtype=torch.int64, device=device)
    if total_rows > 0:
        _rows_kernel[(cdiv(max_rows, _ROWS_BLOCK), n_features)](
            table, cum, starts, block_totals, status, n_features, BLOCK=_ROWS_BLOCK
        )
    _launch_copy(table[n_features * _F_COLS.value:], len(jobs), max_rows, starts, cum, block_totals, items_per_seg,
                 max_row_words)
    status = status.tolist()  # the one host sync, after every launch
    totals, bad = status[:n_features], status[n_features:]
    for f in range(n_features):
        if bad[f]:
            raise ValueError(
                f"fxrec::sequence_truncate: offsets[{f}] must be non-decreasing within "
                f"[0, {values[f].shape[0]}] (values' length)"
            )
    return ([v[:t] for v, t in zip(out_values, totals)], out_offsets,
            [w if weights[f] is None else w[:t] for f, (w, t) in enumerate(zip(out_weights, totals))])


def truncate_triton(
    values: Tensor, offsets: Tensor, weight: Tensor | None, seq_len: int, keep_last: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """One 2-D truncation: :func:`truncate_multi_triton` with N = 1."""
    (out_values,), (out_offsets,), (out_weight,) = truncate_multi_triton(
        [values], [offsets], [weight], [seq_len], [keep_last]
    )
    return out_values, out_offsets, out_weight


def truncate_3d_triton(
    values: Tensor,
    outer_offsets: Tensor,
    inner_offsets: Tensor,
    weight: Tensor | None,
    seq_len: int,
    keep_last: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """3-D truncation (see ``fxrec::sequence_truncate_3d``). Syncs once (``status.tolist()``).

    Kept inner lists of valid outer offsets are distinct lists, so with non-decreasing inner
    offsets they keep at most ``len(values)`` items: the outputs are allocated at that bound and
    every launch is queued before the sync. Only inner offsets that decrease between kept lists
    (overlapping lists, which the op accepts: it checks the kept lists) can keep more; then the
    copy runs again into outputs of the exact size, after the same one sync.
    """
    device = values.device
    values, outer_offsets, inner_offsets = values.contiguous(), outer_offsets.contiguous(), inner_offsets.contiguous()
    weight = None if weight is None else weight.contiguous()
    n_rows = outer_offsets.numel() - 1
    n_slots = n_rows * seq_len
    n_blocks = cdiv(n_slots, _ROWS_BLOCK)
    cum = torch.empty(n_slots, dtype=torch.int64, device=device)
    starts = torch.empty(n_slots, dtype=torch.int64, device=device)
    block_totals = torch.empty(n_blocks, dtype=torch.int64, device=device)
    out_inner = torch.empty(n_slots + 1, dtype=torch.int64, device=device)

    def outputs_and_jobs(n_items: int):
        """Outputs of ``n_items`` items and the copy-job table rows that fill them."""
        out_values = values.new_empty((n_items, *values.shape[1:]))
        out_weight = _empty_weight(values) if weight is None else weight.new_empty((n_items, *weight.shape[1:]))
        copies = [(n_slots, 0, 0, out_inner, values, out_values)]
        if weight is not None:
            copies.append((n_slots, 0, 0, None, weight, out_weight))
        return out_values, out_weight, *_copy_jobs(copies)

    def launch_copy(jobs: list[list[int]], table: Tensor, max_row_words: int, n_items: int) -> None:
        _launch_copy(table, len(jobs), n_slots, starts, cum, block_totals, cdiv(n_items, max(n_slots, 1)),
                     max_row_words)

    bound = values.shape[0]
    out_values, out_weight, jobs, max_row_words = outputs_and_jobs(bound)
    table, status = device_table(jobs, device, status_entries=2)  # status: [total, bad flag]
    if n_slots > 0:
        _slots_kernel[(n_blocks,)](
            outer_offsets, inner_offsets, cum, starts, block_totals, status, n_slots, inner_offsets.numel() - 1,
            values.shape[0], seq_len, int(keep_last), BLOCK=_ROWS_BLOCK,
        )
    launch_copy(jobs, table, max_row_words, bound)
    out_outer = torch.arange(0, (n_rows + 1) * seq_len, seq_len, dtype=torch.int64, device=device)
    total, bad = status.tolist()  # the one host sync, after every launch
    if bad:
        raise ValueError(
            f"fxrec::sequence_truncate_3d: outer_offsets must be non-decreasing within "
            f"[0, {inner_offsets.numel() - 1}] and the kept inner_offsets within [0, {values.shape[0]}]"
        )
    if total > bound:  # overlapping kept lists: the copy above stopped at the bound
        out_values, out_weight, jobs, max_row_words = outputs_and_jobs(total)
        launch_copy(jobs, device_table(jobs, device)[0], max_row_words, total)
        return out_values, out_outer, out_inner, out_weight
    return out_values[:total], out_outer, out_inner, out_weight if weight is None else out_weight[:total]

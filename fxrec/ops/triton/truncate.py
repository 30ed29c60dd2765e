"""Triton kernels for sequence truncation (``fxrec::sequence_truncate``, ``_multi``, ``_3d``).

All features of a multi call go through every step together, so the launch count does not
depend on the number of features N:

0. One non-blocking copy of the feature table from pinned memory; the zeroed status entries
   (totals, bad-offsets flags) ride in the same buffer, so no zero-fill launch.
1. ``_rows_kernel`` (2-D) / ``_slots_kernel`` (3-D): per row (per slot), the kept length and
   the source start of the kept items; each feature's total (atomic add) and bad-offsets flag.
2. ``torch.cumsum`` over the kept lengths of every feature at once (queued before the sync).
3. Host sync: ``status.tolist()`` reads every total and flag at once (the output sizes are
   data-dependent). This is the only sync.
4. ``_segment_copy_kernel``: one launch (after a second non-blocking table copy) copies the kept
   items of every values and weight tensor, addressed through a table of data pointers, and
   writes each feature's output offsets (the cumsum minus its value before the feature). Items
   are copied as integer words (see :func:`fxrec.ops.triton.dense.word_size`), so any dtype and
   trailing dims work, bit-exact.

Per 2-D call: 3 kernels, 2 table copies, 1 sync, whatever N is (3-D: a zero-fill instead of the
first table copy). Launchers work on CUDA tensors and, under ``TRITON_INTERPRET=1``, on CPU
tensors.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxrec.ops.triton.dense import word_size
from fxrec.ops.triton.mod import device_table

__all__ = ["truncate_triton", "truncate_multi_triton", "truncate_3d_triton"]

_ROWS_BLOCK = 1024

# Feature table columns (int64): read by _rows_kernel.
_F_ROW_BASE = tl.constexpr(0)  # first row of the feature in the concatenated per-row arrays
_F_N_ROWS = tl.constexpr(1)
_F_OFFSETS = tl.constexpr(2)  # address of the input offsets
_F_N_VALUES = tl.constexpr(3)
_F_SEQ_LEN = tl.constexpr(4)
_F_KEEP_LAST = tl.constexpr(5)
_F_COLS = tl.constexpr(6)

# Copy-job table columns (int64): read by _segment_copy_kernel. One job per output tensor.
_J_N_SEGS = tl.constexpr(0)
_J_SEG_BASE = tl.constexpr(1)  # first segment of the job in the per-segment arrays (starts, cumsum)
_J_OUT_OFFSETS = tl.constexpr(2)  # address of the output offsets the job writes, 0 for none
_J_SRC = tl.constexpr(3)  # address of the source tensor
_J_DST = tl.constexpr(4)  # address of the output tensor
_J_ROW_WORDS = tl.constexpr(5)  # words per item
_J_WORD_BYTES = tl.constexpr(6)
_J_COLS = tl.constexpr(7)


@triton.jit
def _rows_kernel(features, kept_out, start_out, status, n_features, BLOCK: tl.constexpr):
    feature = features + tl.program_id(1) * _F_COLS
    row = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_base = tl.load(feature + _F_ROW_BASE)
    n_rows = tl.load(feature + _F_N_ROWS)
    offsets = tl.load(feature + _F_OFFSETS).to(tl.pointer_type(tl.int64))
    n_values = tl.load(feature + _F_N_VALUES)
    seq_len = tl.load(feature + _F_SEQ_LEN)
    keep_last = tl.load(feature + _F_KEEP_LAST)
    mask = row < n_rows
    begin = tl.load(offsets + row, mask=mask, other=0)
    end = tl.load(offsets + row + 1, mask=mask, other=0)
    length = end - begin
    bad = mask & ((length < 0) | (begin < 0) | (end > n_values))
    kept = tl.where(bad, 0, tl.minimum(length, seq_len))
    start = tl.where(keep_last != 0, end - kept, begin)
    tl.store(kept_out + row_base + row, kept, mask=mask)
    tl.store(start_out + row_base + row, start, mask=mask)
    tl.atomic_add(status + tl.program_id(1), tl.sum(kept, 0))
    tl.atomic_max(status + n_features + tl.program_id(1), tl.max(bad.to(tl.int64), 0))


@triton.jit
def _slots_kernel(
    outer, inner, kept_out, start_out, status, n_slots, n_lists, n_values, seq_len, keep_last,
    BLOCK: tl.constexpr,
):
    # Slot s of row r is the s-th kept inner list of r, or an empty pad slot.
    slot = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = slot < n_slots
    row = slot // seq_len
    s = slot % seq_len
    row_begin = tl.load(outer + row, mask=in_range, other=0)
    row_end = tl.load(outer + row + 1, mask=in_range, other=0)
    n_row_lists = row_end - row_begin
    row_bad = in_range & ((n_row_lists < 0) | (row_begin < 0) | (row_end > n_lists))
    kept_lists = tl.where(row_bad, 0, tl.minimum(n_row_lists, seq_len))
    first = tl.where(keep_last != 0, row_end - kept_lists, row_begin)
    valid = in_range & (s < kept_lists)
    begin = tl.load(inner + first + s, mask=valid, other=0)
    end = tl.load(inner + first + s + 1, mask=valid, other=0)
    bad = row_bad | (valid & ((end < begin) | (begin < 0) | (end > n_values)))
    slot_len = tl.where(valid & ~bad, end - begin, 0)
    tl.store(kept_out + slot, slot_len, mask=in_range)
    tl.store(start_out + slot, begin, mask=in_range)
    tl.atomic_add(status, tl.sum(slot_len, 0))
    tl.atomic_max(status + 1, tl.max(bad.to(tl.int64), 0))


@triton.jit
def _copy_words(src, dst, n, BLOCK: tl.constexpr):
    for k in range(0, n, BLOCK):
        w = k + tl.arange(0, BLOCK)
        tl.store(dst + w, tl.load(src + w, mask=w < n), mask=w < n)


@triton.jit
def _segment_copy_kernel(jobs, seg_starts, cum, BLOCK: tl.constexpr):
    # Program (s, j) copies segment s of job j: items [start, start + len) of the source to
    # [begin, end) of the output, and writes end to the job's output offsets (if any). The job's
    # segments are entries [base, base + n_segs) of the per-segment arrays: ``seg_starts`` and
    # ``cum``, the inclusive cumsum of every segment length, so begin / end are cum[base + s - 1]
    # / cum[base + s] minus cum[base - 1] (0 before the first segment).
    seg = tl.program_id(0).to(tl.int64)
    job = jobs + tl.program_id(1) * _J_COLS
    n_segs = tl.load(job + _J_N_SEGS)
    base = tl.load(job + _J_SEG_BASE)
    out_offsets = tl.load(job + _J_OUT_OFFSETS)
    if seg < n_segs:
        before = tl.load(cum + base - 1, mask=base > 0, other=0)
        dst_begin = tl.load(cum + base + seg - 1, mask=base + seg > 0, other=0) - before
        dst_end = tl.load(cum + base + seg) - before
        if out_offsets != 0:
            tl.store(out_offsets.to(tl.pointer_type(tl.int64)) + seg + 1, dst_end)
            if seg == 0:
                tl.store(out_offsets.to(tl.pointer_type(tl.int64)), 0)
        row_words = tl.load(job + _J_ROW_WORDS)
        word_bytes = tl.load(job + _J_WORD_BYTES)
        src = tl.load(job + _J_SRC)
        dst = tl.load(job + _J_DST)
        n = (dst_end - dst_begin) * row_words
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


def _copy_segments(copies, seg_starts: Tensor, cum: Tensor, items_per_seg: int) -> None:
    """One launch of ``_segment_copy_kernel``.

    ``copies``: (n_segs, seg_base, out_offsets or None, src, dst) per output tensor; segment s
    starts at source item ``seg_starts[seg_base + s]`` and its length is the step of ``cum``
    (inclusive cumsum of every segment length) at ``seg_base + s``; ``out_offsets`` (int64,
    n_segs + 1), when given, receives the output boundaries of the segments. ``items_per_seg``
    (a typical segment length) sizes the block; longer segments loop.
    """
    jobs, max_row_words = [], 1
    for n_segs, seg_base, out_offsets, src, dst in copies:
        if dst.numel() == 0 and out_offsets is None:  # nothing to copy (no items, or empty items)
            continue
        row_bytes = _item_bytes(src)
        word = word_size(row_bytes, src, dst)
        max_row_words = max(max_row_words, row_bytes // word)
        out_offsets_address = 0 if out_offsets is None else out_offsets.data_ptr()
        jobs.append([n_segs, seg_base, out_offsets_address, src.data_ptr(), dst.data_ptr(), row_bytes // word, word])
    if not jobs:
        return
    block = min(1024, max(128, triton.next_power_of_2(max(items_per_seg * max_row_words, 1))))
    grid = (max(1, max(job[0] for job in jobs)), len(jobs))
    table, _ = device_table(jobs, seg_starts.device)
    _segment_copy_kernel[grid](table, seg_starts, cum, BLOCK=block, num_warps=max(1, block // 256))


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

    Syncs once (``status.tolist()``): the output lengths are data-dependent. Raises
    ``ValueError`` naming ``offsets[f]`` when a feature's offsets decrease or leave its values.
    """
    n_features = len(values)
    if n_features == 0:
        return [], [], []
    device = values[0].device
    values = [v.contiguous() for v in values]
    offsets = [o.contiguous() for o in offsets]
    weights = [None if w is None else w.contiguous() for w in weights]
    n_rows = [o.numel() - 1 for o in offsets]
    row_base = [sum(n_rows[:f]) for f in range(n_features)]
    out_offsets = [torch.empty(r + 1, dtype=torch.int64, device=device) for r in n_rows]
    features, status = device_table(  # status: [totals, bad flags]
        [
            [row_base[f], n_rows[f], offsets[f].data_ptr(), values[f].shape[0], seq_lens[f], int(keep_last[f])]
            for f in range(n_features)
        ],
        device,
        status_entries=2 * n_features,
    )
    total_rows = sum(n_rows)
    kept = torch.empty(total_rows, dtype=torch.int64, device=device)
    starts = torch.empty(total_rows, dtype=torch.int64, device=device)
    if total_rows > 0:
        grid = (triton.cdiv(max(n_rows), _ROWS_BLOCK), n_features)
        _rows_kernel[grid](features, kept, starts, status, n_features, BLOCK=_ROWS_BLOCK)
    cum = torch.cumsum(kept, 0)  # queued before the sync: it runs while the host waits
    status = status.tolist()  # the one host sync
    totals, bad = status[:n_features], status[n_features:]
    for f in range(n_features):
        if bad[f]:
            raise ValueError(
                f"fxrec::sequence_truncate: offsets[{f}] must be non-decreasing within "
                f"[0, {values[f].shape[0]}] (values' length)"
            )
    out_values = [v.new_empty((t, *v.shape[1:])) for v, t in zip(values, totals)]
    out_weights = [_empty_weight(v) if w is None else w.new_empty((t, *w.shape[1:]))
                   for v, w, t in zip(values, weights, totals)]
    copies = []
    for f in range(n_features):
        copies.append((n_rows[f], row_base[f], out_offsets[f], values[f], out_values[f]))
        if weights[f] is not None:
            copies.append((n_rows[f], row_base[f], None, weights[f], out_weights[f]))
    _copy_segments(copies, starts, cum, max(min(s, t) for s, t in zip(seq_lens, totals)))
    return out_values, out_offsets, out_weights


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
    """3-D truncation (see ``fxrec::sequence_truncate_3d``). Syncs once (``status.tolist()``)."""
    device = values.device
    values, outer_offsets, inner_offsets = values.contiguous(), outer_offsets.contiguous(), inner_offsets.contiguous()
    weight = None if weight is None else weight.contiguous()
    n_rows = outer_offsets.numel() - 1
    n_slots = n_rows * seq_len
    slot_len = torch.empty(n_slots, dtype=torch.int64, device=device)
    starts = torch.empty(n_slots, dtype=torch.int64, device=device)
    status = torch.zeros(2, dtype=torch.int64, device=device)  # [total, bad flag]
    if n_slots > 0:
        _slots_kernel[(triton.cdiv(n_slots, _ROWS_BLOCK),)](
            outer_offsets, inner_offsets, slot_len, starts, status, n_slots, inner_offsets.numel() - 1,
            values.shape[0], seq_len, int(keep_last), BLOCK=_ROWS_BLOCK,
        )
    cum = torch.cumsum(slot_len, 0)  # queued before the sync: it runs while the host waits
    total, bad = status.tolist()  # the one host sync
    if bad:
        raise ValueError(
            f"fxrec::sequence_truncate_3d: outer_offsets must be non-decreasing within "
            f"[0, {inner_offsets.numel() - 1}] and the kept inner_offsets within [0, {values.shape[0]}]"
        )
    out_values = values.new_empty((total, *values.shape[1:]))
    out_weight = _empty_weight(values) if weight is None else weight.new_empty((total, *weight.shape[1:]))
    out_inner = torch.empty(n_slots + 1, dtype=torch.int64, device=device)
    copies = [(n_slots, 0, out_inner, values, out_values)]
    if weight is not None:
        copies.append((n_slots, 0, None, weight, out_weight))
    _copy_segments(copies, starts, cum, triton.cdiv(total, max(n_slots, 1)))
    out_outer = torch.arange(n_rows + 1, dtype=torch.int64, device=device) * seq_len
    return out_values, out_outer, out_inner, out_weight

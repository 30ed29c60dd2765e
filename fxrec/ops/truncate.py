"""Sequence truncation ops (SPEC §3.6): ``fxrec::sequence_truncate``, ``fxrec::sequence_truncate_3d``,
``fxrec::sequence_truncate_multi``.

A ragged level is ``values [N, *]`` (any dtype, trailing item dims allowed) plus int64 offsets
``[B + 1]``; ``offsets[0]`` need not be 0 (rows may index into a larger values buffer). An
optional float ``weight`` (one entry per item) follows the items.

- ``sequence_truncate(values, offsets, weight, seq_len, keep_last)``: row ``i`` keeps
  ``min(len_i, seq_len)`` items: the first ones (``keep_last=False``, SPEC's ``"right"``) or
  the last ones (``keep_last=True``, SPEC's ``"left"``). Returns ``(values, offsets from 0,
  weight)``; the weight is a 0-element float32 tensor when none was passed.
- ``sequence_truncate_3d(values, outer_offsets, inner_offsets, weight, seq_len, keep_last)``:
  ``outer_offsets`` indexes inner lists (``inner_offsets`` indexes values); each row keeps
  ``seq_len`` inner lists (first or last, as above; each kept list keeps all its items), then
  gets empty inner lists up to exactly ``seq_len``. Returns ``(values, arange(B + 1) * seq_len,
  inner offsets [B * seq_len + 1] from 0, weight)``.
- ``sequence_truncate_multi(values[], offsets[], weights[], seq_lens[], keep_last[])``: N 2-D
  truncations, equal to N single calls; ``weights`` entries may be None. On CUDA every step
  handles all N features at once (a constant number of launches, one gather launch).

``seq_len <= 0`` raises ``ValueError``; so do offsets that decrease or leave their target (CPU:
checked before gathering; CUDA: flagged by the rows kernel and reported at the sync). Output
lengths are data-dependent: the CUDA kernels sync once per call (``status.tolist()`` in
``fxrec/ops/triton/truncate.py``; the 2-D ops queue every launch before it, into values and
weight buffers of the host-known bound ``min(len(values), rows * seq_len)`` whose first ``total``
items they return as views), the fake kernels use ``new_dynamic_size()``. The torch kernels read
the data once (the output length with the offsets check). CPU and CUDA results are bit-identical
(items are copied, never converted).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxrec.ops.dense import check_ragged, offsets_from_lengths
from fxrec.ops.triton.truncate import truncate_3d_triton, truncate_multi_triton, truncate_triton

__all__ = [
    "sequence_truncate", "sequence_truncate_3d", "sequence_truncate_3d_torch", "sequence_truncate_multi",
    "sequence_truncate_torch",
]


def _check_seq_len(op: str, seq_len: int, name: str = "seq_len") -> None:
    if seq_len <= 0:
        raise ValueError(f"fxrec::{op}: {name} must be positive, got {seq_len}")


def _empty_weight(values: Tensor) -> Tensor:
    return torch.empty(0, dtype=torch.float32, device=values.device)


def _segment_index(starts: Tensor, lengths: Tensor, out_offsets: Tensor, total: int) -> Tensor:
    """Source index of every output item: segment s copies ``lengths[s]`` items from ``starts[s]``
    to ``out_offsets[s]``; ``total`` is ``out_offsets[-1]``, already on the host."""
    shift = torch.repeat_interleave(starts - out_offsets[:-1], lengths, output_size=total)
    return torch.arange(total, device=starts.device) + shift


def _checked_total(op: str, message: str, bad: Tensor, out_offsets: Tensor) -> int:
    """``out_offsets[-1]`` read to the host together with the 0-d ``bad`` flag: ONE read (a host
    sync when the torch kernels run on a GPU). Raises ``ValueError(f"fxrec::{op}: {message}")``
    when ``bad``."""
    total = int(torch.where(bad, -1, out_offsets[-1]))
    if total < 0:
        raise ValueError(f"fxrec::{op}: {message}")
    return total


def sequence_truncate_torch(values: Tensor, offsets: Tensor, weight: Tensor | None, seq_len: int, keep_last: bool,
                  offsets_name: str = "offsets") -> tuple[Tensor, Tensor, Tensor]:
    """The op in plain torch on any device: the CPU kernel, and the reference for the Triton path.
    Reads the data once (the output length with the offsets check)."""
    n_values = values.shape[0]
    begin, end = offsets[:-1], offsets[1:]
    lengths = end - begin
    bad = ((lengths < 0) | (begin < 0) | (end > n_values)).any()
    kept = lengths.clamp(max=seq_len)
    starts = end - kept if keep_last else begin
    out_offsets = offsets_from_lengths(kept)
    total = _checked_total("sequence_truncate", f"{offsets_name} must be non-decreasing within [0, {n_values}]",
                           bad, out_offsets)
    index = _segment_index(starts, kept, out_offsets, total)
    out_weight = _empty_weight(values) if weight is None else weight.index_select(0, index)
    return values.index_select(0, index), out_offsets, out_weight


def _truncate_fake(values: Tensor, offsets: Tensor, weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    n_kept = torch.library.get_ctx().new_dynamic_size()
    out_weight = _empty_weight(values) if weight is None else weight.new_empty((n_kept, *weight.shape[1:]))
    return values.new_empty((n_kept, *values.shape[1:])), offsets.new_empty(offsets.shape), out_weight


# -- sequence_truncate ---------------------------------------------------------------------------

def _check_truncate(values: Tensor, offsets: Tensor, weight: Tensor | None, seq_len: int) -> None:
    check_ragged("sequence_truncate", values, offsets, weight)
    _check_seq_len("sequence_truncate", seq_len)


@torch.library.custom_op(
    "fxrec::sequence_truncate",
    mutates_args=(),
    schema="(Tensor values, Tensor offsets, Tensor? weight, int seq_len, bool keep_last) -> (Tensor, Tensor, Tensor)",
)
def sequence_truncate(values: Tensor, offsets: Tensor, weight: Tensor | None, seq_len: int,
                      keep_last: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Each row keeps its first (``keep_last=False``) or last ``seq_len`` items."""
    _check_truncate(values, offsets, weight, seq_len)
    return sequence_truncate_torch(values, offsets, weight, seq_len, keep_last)


@sequence_truncate.register_kernel("cuda")
def _(values, offsets, weight, seq_len, keep_last):
    _check_truncate(values, offsets, weight, seq_len)
    return truncate_triton(values, offsets, weight, seq_len, keep_last)


@sequence_truncate.register_fake
def _(values, offsets, weight, seq_len, keep_last):
    _check_truncate(values, offsets, weight, seq_len)
    return _truncate_fake(values, offsets, weight)


# -- sequence_truncate_multi ---------------------------------------------------------------------

def _check_multi(values: list[Tensor], offsets: list[Tensor], weights: list[Tensor | None],
                 seq_lens: list[int], keep_last: list[bool]) -> None:
    op = "sequence_truncate_multi"
    n = len(values)
    for name, arg in (("offsets", offsets), ("weights", weights), ("seq_lens", seq_lens), ("keep_last", keep_last)):
        if len(arg) != n:
            raise ValueError(f"fxrec::{op}: {name} has {len(arg)} entries but values has {n}")
    for f in range(n):
        check_ragged(op, values[f], offsets[f], weights[f], suffix=f"[{f}]")
        _check_seq_len(op, seq_lens[f], f"seq_lens[{f}]")
        if values[f].device != values[0].device:
            raise ValueError(f"fxrec::{op}: values[{f}] is on {values[f].device} but values[0] on {values[0].device}")


@torch.library.custom_op(
    "fxrec::sequence_truncate_multi",
    mutates_args=(),
    schema="(Tensor[] values, Tensor[] offsets, Tensor?[] weights, int[] seq_lens, bool[] keep_last) "
           "-> (Tensor[], Tensor[], Tensor[])",
)
def sequence_truncate_multi(values: list[Tensor], offsets: list[Tensor], weights: list[Tensor | None],
                            seq_lens: list[int], keep_last: list[bool]):
    """N ``sequence_truncate`` calls in one; outputs are lists in feature order."""
    _check_multi(values, offsets, weights, seq_lens, keep_last)
    outs = [
        sequence_truncate_torch(v, o, w, s, k, offsets_name=f"offsets[{f}]")
        for f, (v, o, w, s, k) in enumerate(zip(values, offsets, weights, seq_lens, keep_last))
    ]
    return [out[0] for out in outs], [out[1] for out in outs], [out[2] for out in outs]


@sequence_truncate_multi.register_kernel("cuda")
def _(values, offsets, weights, seq_lens, keep_last):
    _check_multi(values, offsets, weights, seq_lens, keep_last)
    return truncate_multi_triton(values, offsets, weights, seq_lens, keep_last)


@sequence_truncate_multi.register_fake
def _(values, offsets, weights, seq_lens, keep_last):
    _check_multi(values, offsets, weights, seq_lens, keep_last)
    outs = [_truncate_fake(v, o, w) for v, o, w in zip(values, offsets, weights)]
    return [out[0] for out in outs], [out[1] for out in outs], [out[2] for out in outs]


# -- sequence_truncate_3d ------------------------------------------------------------------------

def _check_truncate_3d(values: Tensor, outer_offsets: Tensor, inner_offsets: Tensor, weight: Tensor | None,
                       seq_len: int) -> None:
    op = "sequence_truncate_3d"
    check_ragged(op, values, inner_offsets, weight, offsets_name="inner_offsets")
    check_ragged(op, values, outer_offsets, offsets_name="outer_offsets")
    _check_seq_len(op, seq_len)


@torch.library.custom_op(
    "fxrec::sequence_truncate_3d",
    mutates_args=(),
    schema="(Tensor values, Tensor outer_offsets, Tensor inner_offsets, Tensor? weight, int seq_len, "
           "bool keep_last) -> (Tensor, Tensor, Tensor, Tensor)",
)
def sequence_truncate_3d(values: Tensor, outer_offsets: Tensor, inner_offsets: Tensor, weight: Tensor | None,
                         seq_len: int, keep_last: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each row keeps its first/last ``seq_len`` inner lists, padded with empty ones to ``seq_len``."""
    _check_truncate_3d(values, outer_offsets, inner_offsets, weight, seq_len)
    return sequence_truncate_3d_torch(values, outer_offsets, inner_offsets, weight, seq_len, keep_last)


def sequence_truncate_3d_torch(values: Tensor, outer_offsets: Tensor, inner_offsets: Tensor, weight: Tensor | None,
                               seq_len: int, keep_last: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The 3-D op in plain torch on any device (its CPU kernel). Reads the data once."""
    op = "sequence_truncate_3d"
    n_lists = inner_offsets.shape[0] - 1
    row_begin, row_end = outer_offsets[:-1], outer_offsets[1:]
    list_counts = row_end - row_begin
    rows_bad = (list_counts < 0) | (row_begin < 0) | (row_end > n_lists)
    kept_lists = torch.where(rows_bad, 0, list_counts.clamp(max=seq_len))
    first = row_end - kept_lists if keep_last else row_begin
    slot = torch.arange(seq_len, device=values.device)
    valid = slot < kept_lists[:, None]  # [B, seq_len]: slot holds a kept list (else: empty pad)
    lists = torch.where(valid, first[:, None] + slot, 0)
    begin = inner_offsets[lists]
    end = inner_offsets[lists + valid.long()]  # pad slots read inner_offsets[0] twice: length 0
    bad = rows_bad.any() | (valid & ((end < begin) | (begin < 0) | (end > values.shape[0]))).any()
    slot_len = (end - begin).reshape(-1)
    out_inner = offsets_from_lengths(slot_len)
    total = _checked_total(op, f"outer_offsets must be non-decreasing within [0, {n_lists}] and the kept "
                               f"inner_offsets within [0, {values.shape[0]}]", bad, out_inner)
    index = _segment_index(begin.reshape(-1), slot_len, out_inner, total)
    out_weight = _empty_weight(values) if weight is None else weight.index_select(0, index)
    out_outer = torch.arange(0, (list_counts.shape[0] + 1) * seq_len, seq_len, device=values.device)
    return values.index_select(0, index), out_outer, out_inner, out_weight


@sequence_truncate_3d.register_kernel("cuda")
def _(values, outer_offsets, inner_offsets, weight, seq_len, keep_last):
    _check_truncate_3d(values, outer_offsets, inner_offsets, weight, seq_len)
    return truncate_3d_triton(values, outer_offsets, inner_offsets, weight, seq_len, keep_last)


@sequence_truncate_3d.register_fake
def _(values, outer_offsets, inner_offsets, weight, seq_len, keep_last):
    _check_truncate_3d(values, outer_offsets, inner_offsets, weight, seq_len)
    out_values, _, out_weight = _truncate_fake(values, inner_offsets, weight)
    n_slots = (outer_offsets.shape[0] - 1) * seq_len
    return (out_values, outer_offsets.new_empty(outer_offsets.shape),
            inner_offsets.new_empty(n_slots + 1), out_weight)

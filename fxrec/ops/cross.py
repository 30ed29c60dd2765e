"""``fxrec::feature_cross``: the cartesian cross of two ragged int64 features (SPEC §3.5).

Schema::

    feature_cross(Tensor x_values, Tensor x_offsets, Tensor? x_weight,
                  Tensor y_values, Tensor y_offsets, Tensor? y_weight)
        -> (Tensor values, Tensor offsets, Tensor weight)

Inputs: two ragged features with the same number of rows ``B``: ``values`` int64 ``[N]``,
``offsets`` int64 ``[B + 1]`` (row ``b`` is ``values[offsets[b]:offsets[b + 1]]``;
``offsets[0]`` may be non-zero, items outside ``[offsets[0], offsets[-1])`` belong to no row),
optional floating ``weight`` ``[N]``.

Per row: de-duplicate x and y, each id keeping the weight of its first occurrence in the row;
take the cartesian product in x-ascending, then y-ascending order (signed int64 order); each pair
becomes ``id = int64(MurmurHash64A(le64(x) ‖ le64(y), seed 0))`` over the 16 bytes and
``weight = wx * wy`` (a missing weight counts as 1.0). Row ``b`` of the output has
``|uniq x_b| * |uniq y_b|`` items (an empty x or y row gives an empty row); output offsets start
at 0.

Decisions:
- The output weight is always materialized (all 1.0 when neither input has one), so callers see
  one output type whatever they pass.
- Output weight dtype: float64 if either input weight is float64, else float32 (also for
  float16/bfloat16 inputs). Both weights are converted to that dtype (exactly: widening) before
  the one multiply, so CPU and CUDA give the same bits.
- Not differentiable: ids are integers and weights are data, not parameters (no autograd).
- Validation: dtype/shape errors raise TypeError/ValueError naming the argument; a row-count
  mismatch raises ValueError with both counts. Malformed offsets (decreasing, negative start, or
  past the end of values) raise ValueError; on CUDA that check rides on the op's one host sync.

Kernels: the CPU kernel is vectorized torch (no per-row Python loop) and reads the data once
(the output length together with the offsets check). The CUDA kernel (``fxrec.ops.triton.cross``)
queues everything before its ONE host sync: a zero-fill, one Triton launch that de-duplicates
both sides' rows (rows of at most ``SHORT_ROW`` items, sort free; its last program writes the
output offsets, so no cumsum launch) and the pair kernel (expands pairs, hashes, multiplies
weights) into outputs of ``max(len(x_values), len(y_values))`` items, which the output fits
whenever one side has at most one distinct id per row (a longer output relaunches the pair kernel
at its size after the sync); then the sync reads the output length with the offsets check and
long-row flags. 3 launches and 1 sync (it was 4 and 1; ~33 before that). A side with a longer
row is redone with torch sorts (a second sync). The fake kernel sizes the outputs with an
unbacked symbol.
"""

from typing import NamedTuple

import torch

from fxrec.ops.hash import murmur_block, murmur_finish
from fxrec.ops.uint64 import as_int64
from fxrec.ops.triton.cross import STATUS, cross_pairs_triton, plan_short_rows_triton

__all__ = ["feature_cross", "feature_cross_torch", "feature_cross_with_triton"]

# MurmurHash64A over a 16-byte key, seed 0: the key length is folded into the initial state.
_MURMUR_H0 = as_int64(16 * 0xC6A4A7935BD1E995)  # seed 0 ^ (len * m)


def _murmur_pair(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MurmurHash64A(le64(x) ‖ le64(y), seed 0) as int64, elementwise."""
    return murmur_finish(murmur_block(murmur_block(torch.full_like(x, _MURMUR_H0), x), y))


def _weight_dtype(x_weight: torch.Tensor | None, y_weight: torch.Tensor | None) -> torch.dtype:
    float64 = any(w is not None and w.dtype == torch.float64 for w in (x_weight, y_weight))
    return torch.float64 if float64 else torch.float32


def _check_feature(side: str, values, offsets, weight) -> None:
    for name, t in ((f"{side}_values", values), (f"{side}_offsets", offsets)):
        if t.dtype != torch.int64:
            raise TypeError(f"feature_cross: {name} must be int64, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"feature_cross: {name} must be 1-D, got shape {tuple(t.shape)}")
    torch._check_value(
        offsets.shape[0] >= 1,
        lambda: f"feature_cross: {side}_offsets needs at least one element (rows + 1), got 0",
    )
    if weight is None:
        return
    if not weight.dtype.is_floating_point:
        raise TypeError(f"feature_cross: {side}_weight must be floating point, got {weight.dtype}")
    if weight.dim() != 1:
        raise ValueError(f"feature_cross: {side}_weight must be 1-D, got shape {tuple(weight.shape)}")
    torch._check_value(
        weight.shape[0] == values.shape[0],
        lambda: f"feature_cross: {side}_weight has {weight.shape[0]} items but "
        f"{side}_values has {values.shape[0]}",
    )


def _check_args(x_values, x_offsets, x_weight, y_values, y_offsets, y_weight) -> None:
    """Dtype/shape checks only (no tensor data is read: safe under fake tensors and on CUDA)."""
    _check_feature("x", x_values, x_offsets, x_weight)
    _check_feature("y", y_values, y_offsets, y_weight)
    torch._check_value(
        x_offsets.shape[0] == y_offsets.shape[0],
        lambda: f"feature_cross: x has {x_offsets.shape[0] - 1} rows but y has "
        f"{y_offsets.shape[0] - 1} rows; both features must have the same number of rows",
    )
    tensors = [t for t in (x_values, x_offsets, x_weight, y_values, y_offsets, y_weight) if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"feature_cross: all inputs must be on one device, got {[str(t.device) for t in tensors]}")


def _offsets_ok(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: offsets are non-decreasing and lie within ``[0, len(values)]``."""
    return (offsets[0] >= 0) & (offsets[-1] <= values.shape[0]) & (offsets[1:] >= offsets[:-1]).all()


def _offsets_error(side: str, values: torch.Tensor) -> ValueError:
    return ValueError(
        f"feature_cross: {side}_offsets must be non-decreasing with 0 <= {side}_offsets[0] and "
        f"{side}_offsets[-1] <= len({side}_values) = {values.shape[0]}"
    )


class _UniqueRows(NamedTuple):
    """Each row's sorted unique ids, packed row after row into a buffer of ``len(values) + 1``."""

    ids: torch.Tensor  # int64; row b at [start[b], start[b] + count[b]); the tail is scratch
    weight: torch.Tensor | None  # the weight of each id's first occurrence, same layout
    start: torch.Tensor  # [B] int64
    count: torch.Tensor  # [B] int64


def _unique_rows(values, offsets, weight, weight_dtype) -> _UniqueRows:
    """Segmented sort + keep-first de-duplication of every row, in torch ops without host sync."""
    n = values.shape[0]
    num_rows = offsets.shape[0] - 1
    # Row of every item; items outside [offsets[0], offsets[-1]) get the scratch row num_rows.
    row = torch.searchsorted(offsets, torch.arange(n, device=values.device), right=True) - 1
    row = torch.where(row < 0, num_rows, row)
    # Sort by (row, id): stable sort by id, then stable sort by row. Stability keeps equal ids of
    # a row in their original order, so the first of a run is the id's first occurrence.
    by_id = torch.sort(values, stable=True).indices
    order = by_id[torch.sort(row[by_id], stable=True).indices]
    ids, row = values[order], row[order]
    first = torch.ones(n, dtype=torch.bool, device=values.device)
    first[1:] = (ids[1:] != ids[:-1]) | (row[1:] != row[:-1])
    first &= row < num_rows
    # Compact the first occurrences to the front (scratch slot n takes the rest): a scatter
    # rather than a boolean mask, whose data-dependent size would sync on CUDA.
    seen = torch.cumsum(first, 0)
    slot = torch.where(first, seen - 1, n)
    uniq_ids = values.new_zeros(n + 1).scatter_(0, slot, ids)
    uniq_weight = None
    if weight is not None:
        uniq_weight = weight.new_zeros(n + 1, dtype=weight_dtype).scatter_(0, slot, weight[order].to(weight_dtype))
    # Sorted by row, row b's items sit at [offsets[b], offsets[b + 1]) - offsets[0]; the number of
    # first occurrences before a bound is its unique start. Clamped so malformed offsets (rejected
    # afterwards) cannot index out of range first.
    seen = torch.cat([seen.new_zeros(1), seen])
    bounds = seen[(offsets - offsets[0]).clamp(0, n)]
    return _UniqueRows(uniq_ids, uniq_weight, bounds[:-1], bounds[1:] - bounds[:-1])


def _expand_pairs_torch(out_offsets, total: int, x: _UniqueRows, y: _UniqueRows, weight_dtype):
    num_rows = out_offsets.shape[0] - 1
    device = out_offsets.device
    row = torch.repeat_interleave(
        torch.arange(num_rows, device=device), out_offsets.diff(), output_size=total
    )
    local = torch.arange(total, device=device) - out_offsets[row]
    y_count = y.count[row]
    i = local // y_count
    x_at = x.start[row] + i
    y_at = y.start[row] + (local - i * y_count)
    ids = _murmur_pair(x.ids[x_at], y.ids[y_at])
    if x.weight is not None and y.weight is not None:
        weight = x.weight[x_at] * y.weight[y_at]
    elif x.weight is not None:
        weight = x.weight[x_at]
    elif y.weight is not None:
        weight = y.weight[y_at]
    else:
        weight = torch.ones(total, dtype=weight_dtype, device=device)
    return ids, weight


def _plan(x_values, x_offsets, x_weight, y_values, y_offsets, y_weight):
    """De-duplicated rows of both sides and the output offsets (torch ops, no host sync)."""
    weight_dtype = _weight_dtype(x_weight, y_weight)
    x = _unique_rows(x_values, x_offsets, x_weight, weight_dtype)
    y = _unique_rows(y_values, y_offsets, y_weight, weight_dtype)
    out_offsets = torch.cat([x_offsets.new_zeros(1), torch.cumsum(x.count * y.count, 0)])
    return x, y, out_offsets, weight_dtype


def feature_cross_torch(x_values, x_offsets, x_weight, y_values, y_offsets, y_weight):
    """The op in plain torch on any device: the CPU kernel, and the reference the Triton path meets."""
    _check_args(x_values, x_offsets, x_weight, y_values, y_offsets, y_weight)
    x, y, out_offsets, weight_dtype = _plan(x_values, x_offsets, x_weight, y_values, y_offsets, y_weight)
    # ONE read (a host sync when this runs on a GPU): the output length, or -1 / -2 for bad x / y
    # offsets (the plan never indexes out of range with them).
    total = int(torch.where(_offsets_ok(x_values, x_offsets),
                            torch.where(_offsets_ok(y_values, y_offsets), out_offsets[-1], -2), -1))
    if total < 0:
        raise _offsets_error("x" if total == -1 else "y", x_values if total == -1 else y_values)
    ids, weight = _expand_pairs_torch(out_offsets, total, x, y, weight_dtype)
    return ids, out_offsets, weight


@torch.library.custom_op("fxrec::feature_cross", mutates_args=())
def feature_cross(
    x_values: torch.Tensor,
    x_offsets: torch.Tensor,
    x_weight: torch.Tensor | None,
    y_values: torch.Tensor,
    y_offsets: torch.Tensor,
    y_weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cartesian cross of two ragged int64 features; see the module docstring. CPU kernel."""
    return feature_cross_torch(x_values, x_offsets, x_weight, y_values, y_offsets, y_weight)


@feature_cross.register_kernel("cuda")
def feature_cross_with_triton(x_values, x_offsets, x_weight, y_values, y_offsets, y_weight):
    """The op with Triton kernels: the CUDA kernel (also runs on CPU tensors under
    ``TRITON_INTERPRET=1``). Rows of at most ``triton.cross.SHORT_ROW`` items are de-duplicated by a
    sort-free kernel; a side with a longer row is redone with the torch sorts.

    Launches (short rows), all queued before the ONE host sync that reads the output length and
    the flags together: zero-fill, de-duplication of both sides (its last program writes the
    output offsets), and the pair kernel into outputs of ``max(len(x_values), len(y_values))``
    items, enough whenever one side has at most one distinct id per row (the tutorial's crosses).
    A longer output is relaunched at its size (no second sync); rows longer than ``SHORT_ROW``
    add the torch sorts and a second sync."""
    _check_args(x_values, x_offsets, x_weight, y_values, y_offsets, y_weight)
    # The kernels address items by index: strided views (e.g. every other id) must be made dense.
    x_values, x_offsets, y_values, y_offsets = (t.contiguous() for t in (x_values, x_offsets, y_values, y_offsets))
    x_weight, y_weight = (None if w is None else w.contiguous() for w in (x_weight, y_weight))
    weight_dtype = _weight_dtype(x_weight, y_weight)
    x, y, out_offsets, status = plan_short_rows_triton(
        x_values, x_offsets, x_weight, y_values, y_offsets, y_weight, weight_dtype
    )
    x, y = _UniqueRows(*x), _UniqueRows(*y)
    capacity = max(x_values.shape[0], y_values.shape[0])
    ids, weight = cross_pairs_triton(out_offsets, capacity, len(STATUS) - 1, x.ids, x.start, x.weight, y.ids, y.start,
                                     y.count, y.weight, weight_dtype)
    total, x_bad, y_bad, x_long, y_long = status.tolist()  # the one host sync
    for side, values, bad in (("x", x_values, x_bad), ("y", y_values, y_bad)):
        if bad:
            raise _offsets_error(side, values)
    if x_long or y_long:
        if x_long:
            x = _unique_rows(x_values, x_offsets, x_weight, weight_dtype)
        if y_long:
            y = _unique_rows(y_values, y_offsets, y_weight, weight_dtype)
        out_offsets = torch.cat([x_offsets.new_zeros(1), torch.cumsum(x.count * y.count, 0)])
        total = int(out_offsets[-1])
        capacity = 0  # the outputs above were not written
    if total > capacity:
        ids, weight = cross_pairs_triton(out_offsets, total, 0, x.ids, x.start, x.weight, y.ids, y.start, y.count,
                                         y.weight, weight_dtype)
    return ids[:total], out_offsets, weight[:total]


@feature_cross.register_fake
def _(x_values, x_offsets, x_weight, y_values, y_offsets, y_weight):
    _check_args(x_values, x_offsets, x_weight, y_values, y_offsets, y_weight)
    total = torch.library.get_ctx().new_dynamic_size()
    ids = x_values.new_empty(total)
    out_offsets = x_offsets.new_empty(x_offsets.shape[0])
    weight = x_values.new_empty(total, dtype=_weight_dtype(x_weight, y_weight))
    return ids, out_offsets, weight

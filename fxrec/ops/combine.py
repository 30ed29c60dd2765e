"""Embedding combiners over ragged rows (SPEC §4.2): ``fxrec::segment_combine``, its backward
``fxrec::segment_combine_backward``, ``fxrec::table_combine``, the table lookup fused with the
combiner (what the embedding layer runs, one op per table lookup), and ``fxrec::table_combine_multi``
with its backward ``fxrec::segment_combine_backward_multi``: every feature of one shared lookup
in one op, one ``[U, dim]`` gradient (what the ``combine_fusion`` pass makes of the former).

``segment_combine(emb, index, offsets, weight, combiner, tile_len)`` combines rows of a given
``emb [U, dim]``:

- ``index`` int64 ``[N]``: item ``i``'s row in ``emb``; ``-1`` means "no embedding" (an id unseen
  in eval / read-only mode, SPEC §4.4): it contributes a zero vector and gets no gradient, but it
  is still an item of its row (mean: its weight stays in the denominator; tile: a zero slot).
- ``offsets`` int64 ``[B + 1]``: row ``b`` is the items ``offsets[b]:offsets[b + 1]``;
  ``offsets[0]`` need not be 0 (items outside every row are ignored).
- ``weight``: optional float ``[N]`` (None: every weight is 1).
- ``combiner``:
    ``"sum"``:  ``out[b] = Σ w_i emb[index_i]``; an empty row gives 0.          -> ``[B, dim]``
    ``"mean"``: ``Σ w_i emb[index_i] / Σ w_i``; 0 where the row is empty or ``Σ w_i == 0`` (SPEC's
                one rule).                                                        -> ``[B, dim]``
    ``"tile"``: the row's first ``tile_len`` items, each its own embedding, zeros after the row's
                end; weights are ignored.                                         -> ``[B, tile_len * dim]``
  ``tile_len`` (>= 1) is read only by ``"tile"``.

Backward: ``segment_combine_backward(grad, index, offsets, weight, combiner, tile_len, num_rows)``
gives ``grad_emb [num_rows = U, dim]``: each item adds its row's gradient (times ``w_i`` for sum,
``w_i / Σ w`` for mean, its slot's gradient for tile) into its unique row (SPEC §4.5: a row's
gradient is the sum over its occurrences); ``-1`` items add nothing. The backward is linear in
``grad``, so its own gradient is ``segment_combine`` again (double backward works).

``table_combine(table, rows, anchor, index, offsets, weight, combiner, tile_len)`` is exactly

    segment_combine(gather_rows(table, rows) + anchor, index, offsets, weight, combiner, tile_len)

(``table [R, dim]``; ``rows`` int64 ``[U]``, each in ``[-1, R)``, ``-1`` a zero row; ``anchor``
``[U, dim]`` of ``table``'s dtype, or None for 0) computed without the ``[U, dim]`` gather: the
kernels read ``table[rows[index[i]]] + anchor[index[i]]`` per item; a row ``-1`` contributes no
table value (its item is ``anchor[index[i]]`` alone; the CUDA kernels do not even load it).
The embedding layer deduplicates a feature's ids into ``U`` unique ids, finds their table rows
``rows`` and calls it with ``index`` = each item's unique id.

Autograd of ``table_combine``: the gradient w.r.t. ``anchor`` is
``segment_combine_backward(grad, index, offsets, weight, combiner, tile_len, U)`` (the op above);
``table`` (a buffer of the dynamic table) gets none, nor does ``weight``. The anchor is how sparse
gradients reach a table without a dense ``[R, dim]`` gradient (DESIGN.md): ``HashTable`` hands
out an all-zero anchor ``zeros(()).expand(U, dim)`` (strides ``(0, 0)``: no memory) that requires
grad; its ``.grad`` is the ``[U, dim]`` gradient of the touched rows, which the sparse optimizer
takes. The kernels read the anchor through its strides, so it is never materialized.

``table_combine_multi(table, rows, anchor, index[], offsets[], weight[], combiner[], tile_len[])``
(F >= 1 features, one list entry each) returns ``[table_combine(table, rows, anchor, index[f],
offsets[f], weight[f], combiner[f], tile_len[f]) for f]``: the same computation per feature, in
one op (CUDA: ONE launch for all the features, the per-feature kernels' bodies). Its autograd is ONE ``[U, dim]`` gradient for the anchor,
``segment_combine_backward_multi(grad[], index[], offsets[], weight[], combiner[], tile_len[], U)``
= ``Σ_f segment_combine_backward(grad[f], ...)``: one zero-filled accumulation buffer that every
feature's scatter adds into (CPU ``index_add_``; CUDA ONE atomic scatter launch for all the
features), one cast. Per-feature ``table_combine`` nodes reading one anchor instead give
F zero fills, F scatters and F - 1 adds of ``[U, dim]`` by autograd, and F autograd nodes. An
unused output's gradient reaches the backward as zeros (autograd materializes it, eager and
compiled alike) and adds nothing. The sum runs in another order than
autograd's sum of per-feature gradients: equal within float rounding (float16 / bfloat16 round
once, not once per feature). Double backward works (the backward is linear in each ``grad[f]``).

Decisions:
- ``table_combine`` is one op (not ``gather_rows`` then ``segment_combine``) so that the ``[U, dim]``
  gathered rows are neither written nor read back, nor kept alive for the backward: the forward
  moves the same bytes as ``segment_combine`` plus 8 B of ``rows`` per item.
- Backward through ``table_combine`` whose ``table`` requires grad raises ``RuntimeError`` (the
  table is updated by the sparse optimizer through the anchor's gradient, never by autograd).
- With an anchor, ``table[r] + anchor[u]`` is formed in the accumulation dtype; for float32 /
  float64 this is exactly the composition above, for float16 / bfloat16 it rounds once less
  (tile: once, like torch's half add).
- Weights are data (RecIS's id weights): they get no gradient. Backward through an op whose
  ``weight`` requires grad raises ``RuntimeError`` rather than silently returning zeros.
- dtypes: ``emb`` float16/bfloat16/float32/float64, ``weight`` any float dtype; sums accumulate in
  float32 (float64 for float64 ``emb``) and the result has ``emb``'s dtype. Tile copies exactly.
- Validation: metadata (dtypes, ranks, lengths, devices, combiner, tile_len) raises
  ``TypeError``/``ValueError`` naming the argument, on every device. The CPU kernel also checks the
  contents (offsets non-decreasing within ``[0, N]``; every index entry in ``[-1, U)``; every
  table row in ``[-1, R)``); the CUDA kernels do not sync to check them: they clamp offsets into
  ``[0, N]`` and treat index entries outside ``[0, U)`` as ``-1`` and table rows outside
  ``[0, R)`` as zero rows, so they never read or write outside the tensors.
- CPU kernels are vectorized torch (gather + ``index_add_``; both forwards share one reduction,
  ``_combine_items``, given each item's embedding); CUDA kernels are Triton
  (``fxrec/ops/triton/combine.py``; each forward kernel serves both ops). Sums run in a different
  order on the two devices and the CUDA backward uses atomics (run-dependent order): the devices
  agree within float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from fxrec.ops.dense import check_offsets_content
from fxrec.ops.triton.combine import (
    segment_combine_backward_multi_triton, segment_combine_backward_triton, segment_combine_triton,
    table_combine_multi_triton, table_combine_triton,
)

__all__ = ["segment_combine", "segment_combine_backward", "segment_combine_backward_multi", "table_combine",
           "table_combine_multi", "COMBINERS"]

COMBINERS = ("sum", "mean", "tile")
_EMB_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# -- validation (metadata only: no host sync) ----------------------------------------------------

def _check_common(op: str, values_name: str, values: Tensor, index: Tensor, offsets: Tensor,
                  weight: Tensor | None, combiner: str, tile_len: int) -> None:
    if combiner not in COMBINERS:
        raise ValueError(f"fxrec::{op}: combiner must be one of {COMBINERS}, got {combiner!r}")
    if combiner == "tile" and tile_len < 1:
        raise ValueError(f"fxrec::{op}: tile_len must be >= 1 for the tile combiner, got {tile_len}")
    if values.dtype not in _EMB_DTYPES:
        raise TypeError(f"fxrec::{op}: {values_name} must be float16/bfloat16/float32/float64, got {values.dtype}")
    if values.dim() != 2:
        raise ValueError(f"fxrec::{op}: {values_name} must be 2-D, got shape {tuple(values.shape)}")
    if index.dtype != torch.int64:
        raise TypeError(f"fxrec::{op}: index must be int64, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"fxrec::{op}: index must be 1-D [N], got shape {tuple(index.shape)}")
    if offsets.dtype != torch.int64:
        raise TypeError(f"fxrec::{op}: offsets must be int64, got {offsets.dtype}")
    if offsets.dim() != 1 or guard_or_false(offsets.shape[0] == 0):
        raise ValueError(f"fxrec::{op}: offsets must be 1-D [B + 1], got shape {tuple(offsets.shape)}")
    tensors = {"index": index, "offsets": offsets}
    if weight is not None:
        if not weight.dtype.is_floating_point:
            raise TypeError(f"fxrec::{op}: weight must be floating point, got {weight.dtype}")
        if weight.dim() != 1 or guard_or_false(weight.shape[0] != index.shape[0]):
            raise ValueError(
                f"fxrec::{op}: weight must be 1-D with one entry per index entry ({index.shape[0]}), "
                f"got shape {tuple(weight.shape)}"
            )
        tensors["weight"] = weight
    for name, t in tensors.items():
        if t.device != values.device:
            raise ValueError(f"fxrec::{op}: {name} is on {t.device} but {values_name} on {values.device}")


def _check_forward(emb: Tensor, index: Tensor, offsets: Tensor, weight: Tensor | None, combiner: str,
                   tile_len: int) -> None:
    _check_common("segment_combine", "emb", emb, index, offsets, weight, combiner, tile_len)
    if guard_or_false(emb.shape[1] == 0):
        raise ValueError(f"fxrec::segment_combine: emb must be [U, dim] with dim >= 1, got shape {tuple(emb.shape)}")


def _check_backward(grad: Tensor, index: Tensor, offsets: Tensor, weight: Tensor | None, combiner: str,
                    tile_len: int, num_rows: int, op: str = "segment_combine_backward") -> None:
    _check_common(op, "grad", grad, index, offsets, weight, combiner, tile_len)
    if guard_or_false(grad.shape[0] != offsets.shape[0] - 1):
        raise ValueError(
            f"fxrec::{op}: grad must have one row per offsets row ({offsets.shape[0] - 1}), "
            f"got shape {tuple(grad.shape)}"
        )
    if combiner == "tile" and guard_or_false(grad.shape[1] % tile_len != 0):
        raise ValueError(
            f"fxrec::{op}: grad must be [B, tile_len * dim] (tile_len {tile_len}), got {tuple(grad.shape)}"
        )
    if num_rows < 0:
        raise ValueError(f"fxrec::{op}: num_rows must be >= 0, got {num_rows}")


def _check_table_forward(table: Tensor, rows: Tensor, anchor: Tensor | None, index: Tensor, offsets: Tensor,
                         weight: Tensor | None, combiner: str, tile_len: int, op: str = "table_combine") -> None:
    _check_common(op, "table", table, index, offsets, weight, combiner, tile_len)
    if guard_or_false(table.shape[1] == 0):
        raise ValueError(f"fxrec::{op}: table must be [R, dim] with dim >= 1, got shape {tuple(table.shape)}")
    if rows.dtype != torch.int64:
        raise TypeError(f"fxrec::{op}: rows must be int64, got {rows.dtype}")
    if rows.dim() != 1:
        raise ValueError(f"fxrec::{op}: rows must be 1-D [U], got shape {tuple(rows.shape)}")
    if rows.device != table.device:
        raise ValueError(f"fxrec::{op}: rows is on {rows.device} but table on {table.device}")
    if anchor is None:
        return
    if anchor.dtype != table.dtype:
        raise TypeError(f"fxrec::{op}: anchor must have table's dtype {table.dtype}, got {anchor.dtype}")
    if anchor.dim() != 2 or guard_or_false(anchor.shape[0] != rows.shape[0]) or guard_or_false(
        anchor.shape[1] != table.shape[1]
    ):
        raise ValueError(
            f"fxrec::{op}: anchor must be [U, dim] = [{rows.shape[0]}, {table.shape[1]}] (one row per rows entry), "
            f"got shape {tuple(anchor.shape)}"
        )
    if anchor.device != table.device:
        raise ValueError(f"fxrec::{op}: anchor is on {anchor.device} but table on {table.device}")


def _check_contents(op: str, index: Tensor, offsets: Tensor, num_rows: int) -> Tensor:
    """CPU kernels only (reads the data). Returns the row lengths."""
    lengths = check_offsets_content(op, "offsets", offsets, index.shape[0])
    if index.numel() and (bool((index < -1).any()) or bool((index >= num_rows).any())):
        raise ValueError(f"fxrec::{op}: index entries must lie in [-1, {num_rows}) (-1: no embedding)")
    return lengths


def _refuse_grads(op: str, table: bool = False, weight: bool = False) -> None:
    """Backward through an op whose table or weights require grad raises (module docstring's
    decisions) rather than silently returning no gradient for them."""
    if table:
        raise RuntimeError(f"fxrec::{op}: the table gets no gradient (sparse gradients reach it through anchor); "
                           "pass table.detach()")
    if weight:
        raise RuntimeError(f"fxrec::{op}: weights are data and get no gradient; pass weight.detach()")


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- CPU building blocks -------------------------------------------------------------------------

def _items(offsets: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """(row of each item, its position in index), items in row order."""
    rows = torch.repeat_interleave(torch.arange(lengths.shape[0], device=offsets.device), lengths)
    return rows, offsets[0] + torch.arange(rows.shape[0], device=offsets.device)


def _tile_slots(offsets: Tensor, lengths: Tensor, tile_len: int) -> tuple[Tensor, Tensor]:
    """``[B, tile_len]`` mask of the filled slots and (row-major) each one's position in index."""
    slots = torch.arange(tile_len, device=offsets.device)
    mask = slots < lengths[:, None]
    return mask, (offsets[:-1, None] + slots)[mask]


def _row_weight(rows: Tensor, item_weight: Tensor, n_rows: int) -> Tensor:
    """``Σ w`` per row, ``[B, 1]``."""
    return item_weight.new_zeros(n_rows).index_add_(0, rows, item_weight)[:, None]


def _gather(emb: Tensor, idx: Tensor, dtype: torch.dtype) -> Tensor:
    """``emb[idx]`` in ``dtype``, zero rows where ``idx == -1`` (also for an empty ``emb``)."""
    if emb.shape[0] == 0:  # every idx is -1
        return torch.zeros((idx.shape[0], emb.shape[1]), dtype=dtype, device=emb.device)
    return torch.where((idx >= 0)[:, None], emb.index_select(0, idx.clamp_min(0)).to(dtype), 0)


def _item_weight(weight: Tensor | None, positions: Tensor, dtype: torch.dtype) -> Tensor:
    if weight is None:
        return torch.ones(positions.shape[0], dtype=dtype, device=positions.device)
    return weight[positions].to(dtype)


def _combine_items(items, index: Tensor, offsets: Tensor, lengths: Tensor, weight: Tensor | None, combiner: str,
                   tile_len: int, dim: int, dtype: torch.dtype) -> Tensor:
    """The forward of both ops on CPU, given ``items(idx, dtype) -> [len(idx), dim]``: the
    embeddings (in ``dtype``) of the items whose index entries are ``idx``, zero rows for -1."""
    n_rows = lengths.shape[0]
    if combiner == "tile":
        out = torch.zeros((n_rows, tile_len, dim), dtype=dtype, device=offsets.device)
        mask, positions = _tile_slots(offsets, lengths, tile_len)
        out[mask] = items(index[positions], dtype)
        return out.view(n_rows, tile_len * dim)
    acc_dtype = _accumulate_dtype(dtype)
    rows, positions = _items(offsets, lengths)
    w = _item_weight(weight, positions, acc_dtype)
    e = items(index[positions], acc_dtype)  # a -1 item adds 0 * w, like the Triton kernel
    out = e.new_zeros((n_rows, dim)).index_add_(0, rows, e * w[:, None])
    if combiner == "mean":
        total = _row_weight(rows, w, n_rows)
        out = torch.where(total != 0, out / total, 0.0)
    return out.to(dtype)


def _gather_through(table: Tensor, rows: Tensor, anchor: Tensor | None, idx: Tensor, dtype: torch.dtype) -> Tensor:
    """``table[rows[idx]] + anchor[idx]`` in ``dtype``: zero rows where ``idx == -1``; where
    ``rows[idx] == -1`` the table row is zero (the anchor's row alone)."""
    if rows.shape[0] == 0:  # every idx is -1
        return torch.zeros((idx.shape[0], table.shape[1]), dtype=dtype, device=table.device)
    found = idx >= 0
    u = idx.clamp_min(0)
    e = _gather(table, torch.where(found, rows.index_select(0, u), -1), dtype)
    if anchor is None:
        return e
    if anchor.stride(0) == 0:  # one row for every unique id (HashTable's zero anchor): no [n, dim] gather
        return e + torch.where(found[:, None], anchor[0].to(dtype), 0)
    return e + torch.where(found[:, None], anchor.index_select(0, u).to(dtype), 0)


# -- segment_combine -----------------------------------------------------------------------------

@torch.library.custom_op(
    "fxrec::segment_combine",
    mutates_args=(),
    schema="(Tensor emb, Tensor index, Tensor offsets, Tensor? weight, str combiner, int tile_len) -> Tensor",
)
def segment_combine(emb: Tensor, index: Tensor, offsets: Tensor, weight: Tensor | None, combiner: str,
                    tile_len: int) -> Tensor:
    """Combine each row's embeddings (see the module docstring)."""
    _check_forward(emb, index, offsets, weight, combiner, tile_len)
    lengths = _check_contents("segment_combine", index, offsets, emb.shape[0])
    return _combine_items(lambda idx, dtype: _gather(emb, idx, dtype), index, offsets, lengths, weight, combiner,
                          tile_len, emb.shape[1], emb.dtype)


@segment_combine.register_kernel("cuda")
def _(emb, index, offsets, weight, combiner, tile_len):
    _check_forward(emb, index, offsets, weight, combiner, tile_len)
    return segment_combine_triton(emb, index, offsets, weight, combiner, tile_len)


def _combined_width(combiner: str, tile_len: int, dim: int) -> int:
    """Columns of a combined output: ``tile_len`` rows side by side for tile, else one row."""
    return tile_len * dim if combiner == "tile" else dim


def _row_dim(combiner: str, tile_len: int, width: int) -> int:
    """The embedding dim behind a combined output's (its gradient's) ``width`` columns."""
    return width // tile_len if combiner == "tile" else width


@segment_combine.register_fake
def _(emb, index, offsets, weight, combiner, tile_len):
    _check_forward(emb, index, offsets, weight, combiner, tile_len)
    return emb.new_empty((offsets.shape[0] - 1, _combined_width(combiner, tile_len, emb.shape[1])))


def _combine_setup(ctx, inputs, output) -> None:
    emb, index, offsets, weight, combiner, tile_len = inputs
    ctx.save_for_backward(index, offsets, weight)
    ctx.combiner, ctx.tile_len, ctx.num_rows = combiner, tile_len, emb.shape[0]


def _combine_grad(ctx, grad: Tensor):
    _refuse_grads("segment_combine", weight=ctx.needs_input_grad[3])
    index, offsets, weight = ctx.saved_tensors
    grad_emb = torch.ops.fxrec.segment_combine_backward(
        grad, index, offsets, weight, ctx.combiner, ctx.tile_len, ctx.num_rows
    )
    return grad_emb, None, None, None, None, None


segment_combine.register_autograd(_combine_grad, setup_context=_combine_setup)


# -- segment_combine_backward --------------------------------------------------------------------

@torch.library.custom_op(
    "fxrec::segment_combine_backward",
    mutates_args=(),
    schema=(
        "(Tensor grad, Tensor index, Tensor offsets, Tensor? weight, str combiner, int tile_len, "
        "SymInt num_rows) -> Tensor"
    ),
)
def segment_combine_backward(grad: Tensor, index: Tensor, offsets: Tensor, weight: Tensor | None, combiner: str,
                             tile_len: int, num_rows: int) -> Tensor:
    """Gradient of ``segment_combine`` w.r.t. ``emb``: ``[num_rows, dim]`` (module docstring)."""
    _check_backward(grad, index, offsets, weight, combiner, tile_len, num_rows)
    dim = _row_dim(combiner, tile_len, grad.shape[1])
    grad_emb = torch.zeros((num_rows, dim), dtype=_accumulate_dtype(grad.dtype), device=grad.device)
    _scatter_grad_into(grad_emb, "segment_combine_backward", grad, index, offsets, weight, combiner, tile_len)
    return grad_emb.to(grad.dtype)


def _scatter_grad_into(grad_emb: Tensor, op: str, grad: Tensor, index: Tensor, offsets: Tensor,
                       weight: Tensor | None, combiner: str, tile_len: int) -> None:
    """CPU: adds the combine backward of ``grad`` into ``grad_emb [U, dim]`` (accumulation dtype)."""
    lengths = _check_contents(op, index, offsets, grad_emb.shape[0])
    n_rows = lengths.shape[0]
    acc_dtype = grad_emb.dtype
    if combiner == "tile":
        dim = grad.shape[1] // tile_len
        mask, positions = _tile_slots(offsets, lengths, tile_len)
        item_grad = grad.reshape(n_rows, tile_len, dim)[mask].to(acc_dtype)
    else:
        dim = grad.shape[1]
        rows, positions = _items(offsets, lengths)
        w = _item_weight(weight, positions, acc_dtype)
        row_grad = grad.to(acc_dtype)
        if combiner == "mean":
            total = _row_weight(rows, w, n_rows)
            row_grad = torch.where(total != 0, row_grad / total, 0.0)
        item_grad = row_grad[rows] * w[:, None]
    idx = index[positions]
    found = idx >= 0
    grad_emb.index_add_(0, idx[found], item_grad[found])


@segment_combine_backward.register_kernel("cuda")
def _(grad, index, offsets, weight, combiner, tile_len, num_rows):
    _check_backward(grad, index, offsets, weight, combiner, tile_len, num_rows)
    return segment_combine_backward_triton(grad, index, offsets, weight, combiner, tile_len, num_rows)


@segment_combine_backward.register_fake
def _(grad, index, offsets, weight, combiner, tile_len, num_rows):
    _check_backward(grad, index, offsets, weight, combiner, tile_len, num_rows)
    dim = _row_dim(combiner, tile_len, grad.shape[1])
    return grad.new_empty((num_rows, dim))


def _backward_setup(ctx, inputs, output) -> None:
    _, index, offsets, weight, combiner, tile_len, _ = inputs
    ctx.save_for_backward(index, offsets, weight)
    ctx.combiner, ctx.tile_len = combiner, tile_len


def _backward_grad(ctx, grad_grad_emb: Tensor):
    # The backward is linear in grad (grad_emb = Aᵀ grad): its gradient is the forward, A grad_grad_emb.
    _refuse_grads("segment_combine_backward", weight=ctx.needs_input_grad[3])
    index, offsets, weight = ctx.saved_tensors
    grad = torch.ops.fxrec.segment_combine(grad_grad_emb, index, offsets, weight, ctx.combiner, ctx.tile_len)
    return grad, None, None, None, None, None, None


segment_combine_backward.register_autograd(_backward_grad, setup_context=_backward_setup)


# -- table_combine -------------------------------------------------------------------------------

@torch.library.custom_op(
    "fxrec::table_combine",
    mutates_args=(),
    schema=(
        "(Tensor table, Tensor rows, Tensor? anchor, Tensor index, Tensor offsets, Tensor? weight, str combiner, "
        "int tile_len) -> Tensor"
    ),
)
def table_combine(table: Tensor, rows: Tensor, anchor: Tensor | None, index: Tensor, offsets: Tensor,
                  weight: Tensor | None, combiner: str, tile_len: int) -> Tensor:
    """``segment_combine(gather_rows(table, rows) + anchor, index, offsets, weight, combiner,
    tile_len)`` without the ``[U, dim]`` gather (module docstring)."""
    _check_table_forward(table, rows, anchor, index, offsets, weight, combiner, tile_len)
    _check_rows_content("table_combine", table, rows)
    return _table_combine_cpu("table_combine", table, rows, anchor, index, offsets, weight, combiner, tile_len)


def _check_rows_content(op: str, table: Tensor, rows: Tensor) -> None:
    """CPU kernels only (reads the data)."""
    if rows.numel() and (bool((rows < -1).any()) or bool((rows >= table.shape[0]).any())):
        raise ValueError(f"fxrec::{op}: rows entries must lie in [-1, {table.shape[0]}) (-1: no table row)")


def _table_combine_cpu(op: str, table: Tensor, rows: Tensor, anchor: Tensor | None, index: Tensor, offsets: Tensor,
                       weight: Tensor | None, combiner: str, tile_len: int) -> Tensor:
    lengths = _check_contents(op, index, offsets, rows.shape[0])
    return _combine_items(lambda idx, dtype: _gather_through(table, rows, anchor, idx, dtype), index, offsets,
                          lengths, weight, combiner, tile_len, table.shape[1], table.dtype)


@table_combine.register_kernel("cuda")
def _(table, rows, anchor, index, offsets, weight, combiner, tile_len):
    _check_table_forward(table, rows, anchor, index, offsets, weight, combiner, tile_len)
    return table_combine_triton(table, rows, anchor, index, offsets, weight, combiner, tile_len)


@table_combine.register_fake
def _(table, rows, anchor, index, offsets, weight, combiner, tile_len):
    _check_table_forward(table, rows, anchor, index, offsets, weight, combiner, tile_len)
    return table.new_empty((offsets.shape[0] - 1, _combined_width(combiner, tile_len, table.shape[1])))


def _table_combine_setup(ctx, inputs, output) -> None:
    table, rows, anchor, index, offsets, weight, combiner, tile_len = inputs
    ctx.save_for_backward(index, offsets, weight)
    ctx.combiner, ctx.tile_len, ctx.num_rows = combiner, tile_len, rows.shape[0]


def _table_combine_grad(ctx, grad: Tensor):
    _refuse_grads("table_combine", table=ctx.needs_input_grad[0], weight=ctx.needs_input_grad[5])
    grad_anchor = None
    if ctx.needs_input_grad[2]:
        index, offsets, weight = ctx.saved_tensors
        grad_anchor = torch.ops.fxrec.segment_combine_backward(
            grad, index, offsets, weight, ctx.combiner, ctx.tile_len, ctx.num_rows
        )
    return None, None, grad_anchor, None, None, None, None, None


table_combine.register_autograd(_table_combine_grad, setup_context=_table_combine_setup)


# -- table_combine_multi: every feature that reads one (table, rows, anchor) -------------------------

def _check_lists(op: str, n: int, **lists: list) -> None:
    if n == 0:
        raise ValueError(f"fxrec::{op}: needs at least one feature, got none")
    for name, values in lists.items():
        if len(values) != n:
            raise ValueError(f"fxrec::{op}: {name} has {len(values)} entries for {n} features (one per feature)")


def _check_table_multi(table: Tensor, rows: Tensor, anchor: Tensor | None, index: list[Tensor], offsets: list[Tensor],
                       weight: list[Tensor | None], combiner: list[str], tile_len: list[int]) -> None:
    _check_lists("table_combine_multi", len(index), offsets=offsets, weight=weight, combiner=combiner,
                 tile_len=tile_len)
    for f, args in enumerate(zip(index, offsets, weight, combiner, tile_len)):
        _check_table_forward(table, rows, anchor, *args, op=f"table_combine_multi (feature {f})")


# The multi ops are cudagraph_unsafe: their CUDA kernels read a table of the features' tensors
# copied from host memory that lives only for the call (fxrec/ops/triton/combine.py).
@torch.library.custom_op(
    "fxrec::table_combine_multi",
    mutates_args=(),
    tags=(torch.Tag.cudagraph_unsafe,),
    schema=(
        "(Tensor table, Tensor rows, Tensor? anchor, Tensor[] index, Tensor[] offsets, Tensor?[] weight, "
        "str[] combiner, int[] tile_len) -> Tensor[]"
    ),
)
def table_combine_multi(table: Tensor, rows: Tensor, anchor: Tensor | None, index: list[Tensor],
                        offsets: list[Tensor], weight: list[Tensor | None], combiner: list[str],
                        tile_len: list[int]) -> list[Tensor]:
    """``[table_combine(table, rows, anchor, index[f], offsets[f], weight[f], combiner[f],
    tile_len[f]) for f]`` (module docstring): one op for every feature of one lookup."""
    _check_table_multi(table, rows, anchor, index, offsets, weight, combiner, tile_len)
    _check_rows_content("table_combine_multi", table, rows)
    return [_table_combine_cpu(f"table_combine_multi (feature {f})", table, rows, anchor, *args)
            for f, args in enumerate(zip(index, offsets, weight, combiner, tile_len))]


@table_combine_multi.register_kernel("cuda")
def _(table, rows, anchor, index, offsets, weight, combiner, tile_len):
    _check_table_multi(table, rows, anchor, index, offsets, weight, combiner, tile_len)
    return table_combine_multi_triton(table, rows, anchor, index, offsets, weight, combiner, tile_len)


@table_combine_multi.register_fake
def _(table, rows, anchor, index, offsets, weight, combiner, tile_len):
    _check_table_multi(table, rows, anchor, index, offsets, weight, combiner, tile_len)
    return [table.new_empty((o.shape[0] - 1, _combined_width(c, t, table.shape[1])))
            for o, c, t in zip(offsets, combiner, tile_len)]


def _table_combine_multi_setup(ctx, inputs, output) -> None:
    table, rows, anchor, index, offsets, weight, combiner, tile_len = inputs
    ctx.n_features = len(index)
    ctx.save_for_backward(*index, *offsets, *weight)
    ctx.combiner, ctx.tile_len, ctx.num_rows = combiner, tile_len, rows.shape[0]
    ctx.weight_requires_grad, ctx.no_weight_grads = _requires_grad(weight), _no_grads(weight)


def _requires_grad(tensors: list[Tensor | None]) -> bool:
    # A Tensor?[] argument holding a None is one autograd input (needs_input_grad has a single
    # bool for it, False): whether a weight requires grad is read here, in setup_context.
    return any(t is not None and t.requires_grad for t in tensors)


def _no_grads(tensors: list[Tensor | None]) -> list[None] | None:
    """The backward's "no gradient" for a list argument, in its autograd structure: a list of
    Tensors is one input per entry (a list of Nones), a list holding a None one input (None)."""
    return [None] * len(tensors) if all(isinstance(t, Tensor) for t in tensors) else None


def _table_combine_multi_grad(ctx, grads: list[Tensor | None]):
    _refuse_grads("table_combine_multi", table=ctx.needs_input_grad[0], weight=ctx.weight_requires_grad)
    n = ctx.n_features
    grad_anchor = None
    if ctx.needs_input_grad[2]:
        saved = ctx.saved_tensors
        grad_anchor = torch.ops.fxrec.segment_combine_backward_multi(
            list(grads), list(saved[:n]), list(saved[n:2 * n]), list(saved[2 * n:]), ctx.combiner, ctx.tile_len,
            ctx.num_rows,
        )
    return None, None, grad_anchor, [None] * n, [None] * n, ctx.no_weight_grads, None, None


table_combine_multi.register_autograd(_table_combine_multi_grad, setup_context=_table_combine_multi_setup)


# -- segment_combine_backward_multi: the features' gradients summed into one [U, dim] --------------

def _check_backward_multi(grads: list[Tensor], index: list[Tensor], offsets: list[Tensor],
                          weight: list[Tensor | None], combiner: list[str], tile_len: list[int],
                          num_rows: int) -> None:
    op = "segment_combine_backward_multi"
    _check_lists(op, len(grads), index=index, offsets=offsets, weight=weight, combiner=combiner, tile_len=tile_len)
    for f, args in enumerate(zip(grads, index, offsets, weight, combiner, tile_len)):
        _check_backward(*args, num_rows, op=f"{op} (feature {f})")
    dims = [_row_dim(c, t, g.shape[1]) for g, c, t in zip(grads, combiner, tile_len)]
    if any(guard_or_false(d != dims[0]) for d in dims) or any(g.dtype != grads[0].dtype for g in grads):
        raise ValueError(f"fxrec::{op}: every feature's grad must have one dtype and one embedding dim, got "
                         f"{[(tuple(g.shape), g.dtype) for g in grads]} (combiners {list(combiner)})")
    if any(g.device != grads[0].device for g in grads):
        raise ValueError(f"fxrec::{op}: every feature's grad must be on one device, got {[g.device for g in grads]}")


@torch.library.custom_op(
    "fxrec::segment_combine_backward_multi",
    mutates_args=(),
    tags=(torch.Tag.cudagraph_unsafe,),
    schema=(
        "(Tensor[] grad, Tensor[] index, Tensor[] offsets, Tensor?[] weight, str[] combiner, int[] tile_len, "
        "SymInt num_rows) -> Tensor"
    ),
)
def segment_combine_backward_multi(grad: list[Tensor], index: list[Tensor], offsets: list[Tensor],
                                   weight: list[Tensor | None], combiner: list[str], tile_len: list[int],
                                   num_rows: int) -> Tensor:
    """``Σ_f segment_combine_backward(grad[f], index[f], offsets[f], weight[f], combiner[f],
    tile_len[f], num_rows)``, ``[num_rows, dim]``, summed in one accumulation buffer."""
    _check_backward_multi(grad, index, offsets, weight, combiner, tile_len, num_rows)
    dim = _row_dim(combiner[0], tile_len[0], grad[0].shape[1])
    grad_emb = torch.zeros((num_rows, dim), dtype=_accumulate_dtype(grad[0].dtype), device=grad[0].device)
    for f, args in enumerate(zip(grad, index, offsets, weight, combiner, tile_len)):
        _scatter_grad_into(grad_emb, f"segment_combine_backward_multi (feature {f})", *args)
    return grad_emb.to(grad[0].dtype)


@segment_combine_backward_multi.register_kernel("cuda")
def _(grad, index, offsets, weight, combiner, tile_len, num_rows):
    _check_backward_multi(grad, index, offsets, weight, combiner, tile_len, num_rows)
    return segment_combine_backward_multi_triton(grad, index, offsets, weight, combiner, tile_len, num_rows)


@segment_combine_backward_multi.register_fake
def _(grad, index, offsets, weight, combiner, tile_len, num_rows):
    _check_backward_multi(grad, index, offsets, weight, combiner, tile_len, num_rows)
    dim = _row_dim(combiner[0], tile_len[0], grad[0].shape[1])
    return grad[0].new_empty((num_rows, dim))


def _backward_multi_setup(ctx, inputs, output) -> None:
    _, index, offsets, weight, combiner, tile_len, _ = inputs
    ctx.n_features = len(index)
    ctx.save_for_backward(*index, *offsets, *weight)
    ctx.combiner, ctx.tile_len = combiner, tile_len
    ctx.weight_requires_grad, ctx.no_weight_grads = _requires_grad(weight), _no_grads(weight)


def _backward_multi_grad(ctx, grad_grad_emb: Tensor):
    # Linear in every grad[f]: grad[f]'s gradient is feature f's forward of grad_grad_emb.
    _refuse_grads("segment_combine_backward_multi", weight=ctx.weight_requires_grad)
    n = ctx.n_features
    saved = ctx.saved_tensors
    grads = [
        torch.ops.fxrec.segment_combine(grad_grad_emb, i, o, w, c, t)
        for i, o, w, c, t in zip(saved[:n], saved[n:2 * n], saved[2 * n:], ctx.combiner, ctx.tile_len)
    ]
    return grads, [None] * n, [None] * n, ctx.no_weight_grads, None, None, None


segment_combine_backward_multi.register_autograd(_backward_multi_grad, setup_context=_backward_multi_setup)

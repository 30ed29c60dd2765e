"""Ragged <-> dense ops: ``fxrec::ragged_to_dense``, ``fxrec::dense_to_ragged`` (and the
backward of the former, ``fxrec::ragged_to_dense_backward``).

One ragged level is ``values [N, *]`` (any dtype, trailing item dims allowed) plus int64
``offsets [B + 1]``: row ``i`` is ``values[offsets[i]:offsets[i + 1]]``. ``offsets[0]`` need not be
0 (rows may index into a larger values buffer); offsets must be non-decreasing within
``[0, N]``. ``RaggedTensor.to_dense`` / ``from_dense`` (``fxrec/ragged.py``) call these ops.

Decisions:
- ``ragged_to_dense(values, offsets, width, default)``: ``width = -1`` pads to the longest row
  (a data-dependent size; 0 for an empty batch); ``width >= 0`` keeps each row's first ``width``
  items and pads to ``width``. ``width`` is a ``SymInt`` in the schema (a python int works the
  same) so that compiled graphs can pass a symbolic width: the backward of ``dense_to_ragged``
  and the double backward pass the width of a tensor, which is symbolic under dynamic shapes.
  ``default`` is converted like ``torch.full`` does; for integer and bool values it must be an
  integer in the dtype's range (bool: 0 or 1), for float values finite defaults must not
  overflow the dtype, else ``ValueError`` (the schema carries it as a float, so int64 defaults
  beyond 2**53 are not exact).
  Differentiable w.r.t. float values: the gradient of each kept item is the gradient of its
  dense position; truncated items and values outside every row get 0.
- ``dense_to_ragged(dense)``: ``[B, L]`` -> (values, offsets from 0); each row loses its trailing
  zeros (``x == 0``: -0.0 is a zero, NaN is not); zeros before the last non-zero stay; an
  all-zero row becomes empty. Differentiable w.r.t. float ``dense`` (stripped zeros get 0).
- Offsets contents are validated (``ValueError``) on CPU and on CUDA wherever the kernel syncs
  anyway (``width = -1``); the no-sync CUDA path (``width >= 0``) masks its reads to values'
  bounds instead, so bad offsets never read outside ``values``.
- CUDA kernels (``fxrec/ops/triton/dense.py``) copy items as integer words: bit-identical to
  the CPU kernels. Host syncs on CUDA: ``ragged_to_dense`` with ``width = -1`` (the longest
  row), ``dense_to_ragged`` (the total length); none elsewhere.
"""

from __future__ import annotations

import math

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch import Tensor

from fxrec.ops.triton.dense import dense_to_ragged_triton, ragged_to_dense_backward_triton, ragged_to_dense_triton

__all__ = [
    "ragged_to_dense",
    "ragged_to_dense_backward",
    "dense_to_ragged",
    "check_ragged",
    "check_offsets_content",
    "offsets_from_lengths",
]

_COMPARABLE_DTYPES = (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
)


# -- shared helpers (also used by fxrec.ops.truncate) ------------------------------------------

def check_ragged(op: str, values: Tensor, offsets: Tensor, weight: Tensor | None = None, *,
                 offsets_name: str = "offsets", suffix: str = "") -> None:
    """Metadata checks of one ragged level (never reads tensor data: no sync)."""
    if values.dim() < 1:
        raise ValueError(f"fxrec::{op}: values{suffix} must have at least 1 dim ([N, *]), got a scalar")
    if offsets.dtype != torch.int64:
        raise TypeError(f"fxrec::{op}: {offsets_name}{suffix} must be int64, got {offsets.dtype}")
    # Sizes may be unbacked symbols under torch.compile: check what is known, skip the rest.
    if offsets.dim() != 1 or guard_or_false(offsets.shape[0] == 0):
        raise ValueError(
            f"fxrec::{op}: {offsets_name}{suffix} must be 1-D with rows + 1 >= 1 elements, "
            f"got shape {tuple(offsets.shape)}"
        )
    if offsets.device != values.device:
        raise ValueError(
            f"fxrec::{op}: {offsets_name}{suffix} is on {offsets.device} but values{suffix} on {values.device}"
        )
    if weight is None:
        return
    name = f"weight{suffix}" if not suffix else f"weights{suffix}"
    if not weight.dtype.is_floating_point:
        raise TypeError(f"fxrec::{op}: {name} must be floating point, got {weight.dtype}")
    if weight.dim() < 1 or guard_or_false(weight.shape[0] != values.shape[0]):
        raise ValueError(
            f"fxrec::{op}: {name} must have one entry per item of values{suffix} ({values.shape[0]}), "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.device != values.device:
        raise ValueError(f"fxrec::{op}: {name} is on {weight.device} but values{suffix} on {values.device}")


def check_offsets_content(op: str, name: str, offsets: Tensor, limit: int) -> Tensor:
    """Row lengths, after checking ``offsets`` is non-decreasing within ``[0, limit]``.

    Reads the data: CPU kernels only (CUDA kernels check inside the kernel and report with their
    one sync).
    """
    lengths = offsets[1:] - offsets[:-1]
    if lengths.numel() and (bool((lengths < 0).any()) or int(offsets[0]) < 0 or int(offsets[-1]) > limit):
        raise ValueError(f"fxrec::{op}: {name} must be non-decreasing within [0, {limit}]")
    return lengths


def offsets_from_lengths(lengths: Tensor) -> Tensor:
    """``[0, cumsum(lengths)...]``: int64 offsets from 0."""
    offsets = lengths.new_zeros(lengths.shape[0] + 1)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return offsets


def _fill_value(default: float, dtype: torch.dtype) -> int | float | bool:
    """``default`` as the python number ``torch.full`` gets for ``dtype`` (ValueError if lossy)."""
    if dtype.is_complex:
        return default
    if dtype.is_floating_point:
        if math.isfinite(default) and abs(default) > torch.finfo(dtype).max:
            raise ValueError(
                f"fxrec::ragged_to_dense: default {default} overflows {dtype} (max {torch.finfo(dtype).max})"
            )
        return default
    if dtype == torch.bool:
        if default not in (0.0, 1.0):
            raise ValueError(f"fxrec::ragged_to_dense: default must be 0 or 1 for bool values, got {default}")
        return bool(default)
    info = torch.iinfo(dtype)
    if not float(default).is_integer() or not info.min <= int(default) <= info.max:
        raise ValueError(
            f"fxrec::ragged_to_dense: default must be an integer in [{info.min}, {info.max}] for "
            f"{dtype} values, got {default}"
        )
    return int(default)


def _check_ragged_to_dense(values: Tensor, offsets: Tensor, width: int, default: float) -> int | float | bool:
    check_ragged("ragged_to_dense", values, offsets)
    if width < -1:
        raise ValueError(f"fxrec::ragged_to_dense: width must be -1 (longest row) or >= 0, got {width}")
    return _fill_value(default, values.dtype)


def _kept_positions(offsets: Tensor, lengths: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """``[B, width]`` mask of the dense positions that hold an item, and (row-major) the values
    index of each."""
    cols = torch.arange(width, device=offsets.device)
    mask = cols < lengths[:, None]
    return mask, (offsets[:-1, None] + cols)[mask]


# -- ragged_to_dense -----------------------------------------------------------------------------

@torch.library.custom_op(
    "fxrec::ragged_to_dense",
    mutates_args=(),
    schema="(Tensor values, Tensor offsets, SymInt width, float default) -> Tensor",
)
def ragged_to_dense(values: Tensor, offsets: Tensor, width: int, default: float) -> Tensor:
    """Rows of ``values`` -> ``[B, W, *]`` padded with ``default`` (see the module docstring)."""
    fill = _check_ragged_to_dense(values, offsets, width, default)
    lengths = check_offsets_content("ragged_to_dense", "offsets", offsets, values.shape[0])
    if width < 0:
        width = int(lengths.max()) if lengths.numel() else 0
    out = values.new_full((lengths.shape[0], width, *values.shape[1:]), fill)
    mask, index = _kept_positions(offsets, lengths, width)
    out[mask] = values[index]
    return out


@ragged_to_dense.register_kernel("cuda")
def _(values: Tensor, offsets: Tensor, width: int, default: float) -> Tensor:
    fill = _check_ragged_to_dense(values, offsets, width, default)
    return ragged_to_dense_triton(values, offsets, width, fill)


@ragged_to_dense.register_fake
def _(values: Tensor, offsets: Tensor, width: int, default: float) -> Tensor:
    _check_ragged_to_dense(values, offsets, width, default)
    if width < 0:
        width = torch.library.get_ctx().new_dynamic_size()
    return values.new_empty((offsets.shape[0] - 1, width, *values.shape[1:]))


def _ragged_to_dense_setup(ctx, inputs, output) -> None:
    values, offsets, _, _ = inputs
    ctx.save_for_backward(offsets)
    ctx.num_values = values.shape[0]


def _ragged_to_dense_grad(ctx, grad: Tensor):
    (offsets,) = ctx.saved_tensors
    return torch.ops.fxrec.ragged_to_dense_backward(grad, offsets, ctx.num_values), None, None, None


ragged_to_dense.register_autograd(_ragged_to_dense_grad, setup_context=_ragged_to_dense_setup)


# -- ragged_to_dense_backward --------------------------------------------------------------------

def _check_backward(grad: Tensor, offsets: Tensor, num_values: int) -> None:
    if grad.dim() < 2 or grad.shape[0] != offsets.shape[0] - 1:
        raise ValueError(
            f"fxrec::ragged_to_dense_backward: grad must be [B, W, *] with B = offsets' rows "
            f"({offsets.shape[0] - 1}), got shape {tuple(grad.shape)}"
        )
    check_ragged("ragged_to_dense_backward", grad, offsets)
    if num_values < 0:
        raise ValueError(f"fxrec::ragged_to_dense_backward: num_values must be >= 0, got {num_values}")


@torch.library.custom_op(
    "fxrec::ragged_to_dense_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor offsets, SymInt num_values) -> Tensor",
)
def ragged_to_dense_backward(grad: Tensor, offsets: Tensor, num_values: int) -> Tensor:
    """Gradient of ``ragged_to_dense`` w.r.t. its values: ``[B, W, *]`` -> ``[num_values, *]``.

    The items ``ragged_to_dense`` placed (each row's first ``W``) get their dense position's
    gradient; every other values position gets 0. The output size is static (no sync).
    """
    _check_backward(grad, offsets, num_values)
    out = grad.new_zeros((num_values, *grad.shape[2:]))
    mask, index = _kept_positions(offsets, offsets[1:] - offsets[:-1], grad.shape[1])
    out[index] = grad[mask]
    return out


@ragged_to_dense_backward.register_kernel("cuda")
def _(grad: Tensor, offsets: Tensor, num_values: int) -> Tensor:
    _check_backward(grad, offsets, num_values)
    return ragged_to_dense_backward_triton(grad, offsets, num_values)


@ragged_to_dense_backward.register_fake
def _(grad: Tensor, offsets: Tensor, num_values: int) -> Tensor:
    _check_backward(grad, offsets, num_values)
    return grad.new_empty((num_values, *grad.shape[2:]))


def _backward_setup(ctx, inputs, output) -> None:
    grad, offsets, _ = inputs
    ctx.save_for_backward(offsets)
    ctx.width = grad.shape[1]


def _backward_grad(ctx, grad_values: Tensor):
    # The backward is linear in grad: its own gradient is ragged_to_dense with zero padding.
    (offsets,) = ctx.saved_tensors
    return torch.ops.fxrec.ragged_to_dense(grad_values, offsets, ctx.width, 0.0), None, None


ragged_to_dense_backward.register_autograd(_backward_grad, setup_context=_backward_setup)


# -- dense_to_ragged -----------------------------------------------------------------------------

def _check_dense_to_ragged(dense: Tensor) -> None:
    if dense.dim() != 2:
        raise ValueError(f"fxrec::dense_to_ragged: dense must be 2-D [B, L], got shape {tuple(dense.shape)}")
    if dense.dtype not in _COMPARABLE_DTYPES:
        raise TypeError(f"fxrec::dense_to_ragged: unsupported dtype {dense.dtype} (bool, integers up to "
                        "64 bits, float16/bfloat16/float32/float64)")


@torch.library.custom_op("fxrec::dense_to_ragged", mutates_args=(), schema="(Tensor dense) -> (Tensor, Tensor)")
def dense_to_ragged(dense: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, L]`` -> (values, offsets from 0): each row without its trailing zeros."""
    _check_dense_to_ragged(dense)
    n_rows, width = dense.shape
    cols = torch.arange(width, device=dense.device)
    if width > 0:
        lengths = torch.where(dense != 0, cols + 1, 0).amax(dim=1)
    else:
        lengths = torch.zeros(n_rows, dtype=torch.int64, device=dense.device)
    return dense[cols < lengths[:, None]], offsets_from_lengths(lengths)


@dense_to_ragged.register_kernel("cuda")
def _(dense: Tensor) -> tuple[Tensor, Tensor]:
    _check_dense_to_ragged(dense)
    return dense_to_ragged_triton(dense)


@dense_to_ragged.register_fake
def _(dense: Tensor) -> tuple[Tensor, Tensor]:
    _check_dense_to_ragged(dense)
    n_values = torch.library.get_ctx().new_dynamic_size()
    return dense.new_empty(n_values), dense.new_empty(dense.shape[0] + 1, dtype=torch.int64)


def _dense_to_ragged_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])
    ctx.width = inputs[0].shape[1]


def _dense_to_ragged_grad(ctx, grad_values: Tensor, _grad_offsets):
    # Each kept item's gradient goes back to its dense position; stripped zeros get 0.
    (offsets,) = ctx.saved_tensors
    return torch.ops.fxrec.ragged_to_dense(grad_values, offsets, ctx.width, 0.0)


dense_to_ragged.register_autograd(_dense_to_ragged_grad, setup_context=_dense_to_ragged_setup)

"""``fxrec::bucketize`` and ``fxrec::bucketize_multi``: bucket ids of numeric values.

``bucketize(values, boundaries)[i] = #{b in boundaries : b <= values[i]}`` (int64, same shape as
``values``), i.e. ``torch.bucketize(values, boundaries, right=True)``:

- a value equal to a boundary goes to the upper bucket; ``+inf`` -> ``len(boundaries)``,
  ``-inf`` -> 0, NaN -> ``len(boundaries)`` (as RecIS);
- ``values``: float64, float32, float16, bfloat16 or int64, any shape (dense, or the flat values
  of a ragged tensor); ``boundaries``: 1-D float64, strictly increasing, on the device of
  ``values`` (``len(boundaries) + 1`` buckets; empty boundaries put everything in bucket 0);
- comparisons are exact in float64: each value is converted to float64 first (exact for every
  float dtype). int64 values beyond 2**53 compare as their float64 rounding (round to nearest
  even), e.g. 2**53 + 1 lands in the bucket of 2**53: boundaries are float64 anyway, so a
  boundary cannot tell such neighbours apart.

Boundaries are validated where ``Bucketize`` is configured; the op re-checks them on CPU eager
(cheap) but never reads CUDA data (no host sync).

- ``bucketize`` is a ``torch.library.triton_op``: CUDA launches ``fxrec.ops.triton.bucketize``
  through ``wrap_triton``, other devices run torch ops, so Inductor sees it under torch.compile.
- ``bucketize_multi(values[], boundaries[])`` equals N single calls and runs ONE launch on CUDA
  through a table of data pointers: an opaque ``custom_op`` tagged ``cudagraph_unsafe``, for the
  reasons given in ``fxrec.ops.mod``.
"""

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from fxrec.ops.triton.bucketize import VALUE_DTYPES, bucketize_multi_triton, bucketize_triton

__all__ = ["bucketize", "bucketize_multi", "bucketize_torch"]


def _check_bucketize_args(op: str, values: Tensor, boundaries: Tensor, suffix: str = "") -> None:
    if values.dtype not in VALUE_DTYPES:
        allowed = ", ".join(str(d) for d in VALUE_DTYPES)
        raise TypeError(f"fxrec::{op}: values{suffix} must be one of {allowed}, got {values.dtype}")
    if boundaries.dtype != torch.float64:
        raise TypeError(f"fxrec::{op}: boundaries{suffix} must be float64, got {boundaries.dtype}")
    if boundaries.dim() != 1:
        raise ValueError(f"fxrec::{op}: boundaries{suffix} must be 1-D, got shape {tuple(boundaries.shape)}")
    if boundaries.device != values.device:
        raise ValueError(
            f"fxrec::{op}: boundaries{suffix} is on {boundaries.device}, values{suffix} on {values.device}"
        )
    # Reading data is free on CPU and impossible on fake tensors (tracing, fake kernels).
    if boundaries.device.type == "cpu" and not is_fake(boundaries):
        if bool(boundaries.isnan().any()) or not bool((boundaries[1:] > boundaries[:-1]).all()):
            raise ValueError(f"fxrec::{op}: boundaries{suffix} must be strictly increasing (and not NaN)")


def bucketize_torch(values: Tensor, boundaries: Tensor) -> Tensor:
    """The reference kernel in torch ops."""
    v = values.contiguous().to(torch.float64)  # exact for floats; int64 rounds to nearest
    buckets = torch.bucketize(v, boundaries, right=True)
    return torch.where(v.isnan(), boundaries.numel(), buckets)


@torch.library.triton_op("fxrec::bucketize", mutates_args=())
def bucketize(values: Tensor, boundaries: Tensor) -> Tensor:
    """``#{b in boundaries : b <= float64(v)}`` per value, NaN -> ``len(boundaries)``; int64."""
    _check_bucketize_args("bucketize", values, boundaries)
    if values.device.type == "cuda":
        return bucketize_triton(values, boundaries)
    return bucketize_torch(values, boundaries)


def _check_bucketize_multi_args(values: list[Tensor], boundaries: list[Tensor]) -> None:
    if len(values) != len(boundaries):
        raise ValueError(
            f"fxrec::bucketize_multi: got {len(values)} values tensors but {len(boundaries)} boundaries"
        )
    for i, (v, b) in enumerate(zip(values, boundaries)):
        _check_bucketize_args("bucketize_multi", v, b, suffix=f"[{i}]")
        if v.device != values[0].device:
            raise ValueError(
                f"fxrec::bucketize_multi: values[{i}] is on {v.device}, values[0] on {values[0].device}"
            )


@torch.library.custom_op("fxrec::bucketize_multi", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def bucketize_multi(values: list[Tensor], boundaries: list[Tensor]) -> list[Tensor]:
    """``[bucketize(v, b) for v, b in zip(values, boundaries)]``; one launch on CUDA."""
    _check_bucketize_multi_args(values, boundaries)
    return [bucketize_torch(v, b) for v, b in zip(values, boundaries)]


@bucketize_multi.register_kernel("cuda")
def _bucketize_multi_cuda(values: list[Tensor], boundaries: list[Tensor]) -> list[Tensor]:
    _check_bucketize_multi_args(values, boundaries)
    return bucketize_multi_triton(values, boundaries)


@bucketize_multi.register_fake
def _bucketize_multi_fake(values: list[Tensor], boundaries: list[Tensor]) -> list[Tensor]:
    _check_bucketize_multi_args(values, boundaries)
    return [torch.empty(v.shape, dtype=torch.int64, device=v.device) for v in values]

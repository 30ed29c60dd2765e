"""``fxrec::mod`` and ``fxrec::mod_multi``: ids modulo a table size, with uint64 semantics.

``mod(values, mod_value) = int64(uint64(values) % uint64(mod_value))`` elementwise on int64
values of any shape (dense ids, or the flat values of a ragged tensor), so negative ids map like
their unsigned bit patterns: ``mod(-1, 10000) == 1615`` (2**64 - 1 = 1615 mod 10000), as RecIS.
``1 <= mod_value <= 2**63 - 1`` (the schema's ``int`` is int64; ``mod_value <= 0``: ValueError).

- ``mod`` is a ``torch.library.triton_op``: CUDA launches ``fxrec.ops.triton.mod`` through
  ``wrap_triton``, other devices run torch ops, so under ``torch.compile`` Inductor sees the
  kernel on CUDA and fuses the torch ops on CPU.
- ``mod_multi(values[], mod_values[])`` equals ``[mod(v, m) for v, m in zip(...)]`` and runs ONE
  kernel launch on CUDA. Its kernel addresses each feature through a table of data pointers,
  which cannot be traced with fake tensors, so it is an opaque ``custom_op`` (the horizontal
  fusion pass emits it to cut launches, there is nothing left for Inductor to fuse) and is tagged
  ``cudagraph_unsafe`` (the table is copied from host memory that lives only for the call).
"""

import torch
from torch import Tensor

from fxrec.ops.triton.mod import mod_multi_triton, mod_triton

__all__ = ["mod", "mod_multi", "mod_torch"]


def _check_mod_args(op: str, values: Tensor, mod_value: int, name: str = "values") -> None:
    if values.dtype != torch.int64:
        raise TypeError(f"fxrec::{op}: {name} must be int64, got {values.dtype}")
    if mod_value <= 0:
        raise ValueError(f"fxrec::{op}: mod_value must be positive, got {mod_value} (for {name})")


def mod_torch(values: Tensor, mod_value: int) -> Tensor:
    """The reference kernel in int64 torch ops (torch has no uint64 remainder on CPU).

    For x < 0, uint64(x) = x + 2**64, so uint64(x) % m = (x mod m + 2**64 mod m) mod m. Both
    terms lie in [0, m) and m can be 2**63 - 1, so their sum would overflow int64: subtract
    m - (2**64 mod m) instead and add m back when negative; every intermediate lies in (-m, m).
    """
    values = values.contiguous()  # contiguous out on every device (the fake kernels say so)
    r = torch.remainder(values, mod_value)  # x mod m in [0, m), also for negative x
    shift = mod_value - (1 << 64) % mod_value  # in [1, m]
    t = r - (values < 0) * shift
    return t + (t < 0) * mod_value


@torch.library.triton_op("fxrec::mod", mutates_args=())
def mod(values: Tensor, mod_value: int) -> Tensor:
    """``int64(uint64(values) % uint64(mod_value))``: int64 in, int64 out, same shape."""
    _check_mod_args("mod", values, mod_value)
    if values.device.type == "cuda":
        return mod_triton(values, mod_value)
    return mod_torch(values, mod_value)


def _check_mod_multi_args(values: list[Tensor], mod_values: list[int]) -> None:
    if len(values) != len(mod_values):
        raise ValueError(
            f"fxrec::mod_multi: got {len(values)} values tensors but {len(mod_values)} mod_values"
        )
    for i, (v, m) in enumerate(zip(values, mod_values)):
        _check_mod_args("mod_multi", v, m, name=f"values[{i}]")
        if v.device != values[0].device:
            raise ValueError(
                f"fxrec::mod_multi: values[{i}] is on {v.device}, values[0] on {values[0].device}"
            )


@torch.library.custom_op("fxrec::mod_multi", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def mod_multi(values: list[Tensor], mod_values: list[int]) -> list[Tensor]:
    """``[mod(v, m) for v, m in zip(values, mod_values)]``; one launch on CUDA."""
    _check_mod_multi_args(values, mod_values)
    return [mod_torch(v, m) for v, m in zip(values, mod_values)]


@mod_multi.register_kernel("cuda")
def _mod_multi_cuda(values: list[Tensor], mod_values: list[int]) -> list[Tensor]:
    _check_mod_multi_args(values, mod_values)
    return mod_multi_triton(values, mod_values)


@mod_multi.register_fake
def _mod_multi_fake(values: list[Tensor], mod_values: list[int]) -> list[Tensor]:
    _check_mod_multi_args(values, mod_values)
    return [torch.empty(v.shape, dtype=torch.int64, device=v.device) for v in values]

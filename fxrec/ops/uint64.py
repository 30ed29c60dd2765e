"""uint64 arithmetic on int64 tensors, for the CPU kernels (torch has no general uint64 math).

int64 add / multiply / xor wrap exactly as uint64 would; ``>>`` on int64 is arithmetic, so a
logical shift masks the copied sign bits away. ``mix64`` is splitmix64's finalizer, used to
spread ids (initializer streams, hash-table slots).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["GAMMA", "MIX_1", "MIX_2", "as_int64", "shr", "mix64", "mix64_int"]

# splitmix64: the stream increment and the finalizer's multipliers (as uint64 values).
GAMMA, MIX_1, MIX_2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def as_int64(u: int) -> int:
    """The int64 whose bits are ``u mod 2**64`` (so Python-side constants match the C code)."""
    u &= (1 << 64) - 1
    return u - (1 << 64) if u >> 63 else u


def shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bits by a constant ``0 < s < 64``."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(z: Tensor) -> Tensor:
    """splitmix64's finalizer on the uint64 bits of an int64 tensor."""
    z = (z ^ shr(z, 30)) * as_int64(MIX_1)
    z = (z ^ shr(z, 27)) * as_int64(MIX_2)
    return z ^ shr(z, 31)


def mix64_int(z: int) -> int:
    """``mix64`` of one uint64 on the host (a Python int, taken mod 2**64; the uint64 result): host
    constants derived without tensor work."""
    mask = (1 << 64) - 1
    z &= mask
    z = ((z ^ (z >> 30)) * MIX_1) & mask
    z = ((z ^ (z >> 27)) * MIX_2) & mask
    return z ^ (z >> 31)

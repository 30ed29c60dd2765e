"""uint64 helpers shared by Triton kernels (the CPU twins are in ``fxrec.ops.uint64``)."""

import triton
import triton.language as tl

from fxrec.ops.uint64 import MIX_1, MIX_2

_MIX_1, _MIX_2 = tl.constexpr(MIX_1), tl.constexpr(MIX_2)


@triton.jit
def mix64(z):
    """splitmix64's finalizer on uint64 ``z``."""
    z = (z ^ (z >> 30)) * _MIX_1
    z = (z ^ (z >> 27)) * _MIX_2
    return z ^ (z >> 31)

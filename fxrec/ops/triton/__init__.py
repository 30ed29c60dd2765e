"""Triton kernels of fxrec's custom ops, and host-side helpers their launchers share."""


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` of python ints. ``triton.cdiv`` computes the same through Triton's
    ``ConstexprFunction`` wrapper, which costs ~3-4 µs of host time per call (Triton 3.6, 3.9):
    a launcher pays it on every op call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (``n >= 1``): ``triton.next_power_of_2`` without its
    wrapper's host cost (see :func:`cdiv`)."""
    return 1 << (n - 1).bit_length()

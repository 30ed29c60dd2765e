"""Read-time hashing of string columns (``varlen_feature(..., hash_type=..., hash_bucket=...)``).

The same functions as the ``Hash`` feature op (``torch.ops.fxrec.hash_bytes``: farm = farmhash
Fingerprint64, murmur = MurmurHash64A seed 0), straight from the Arrow string buffers. Then, as in
RecIS (SPEC §2): ``hash_bucket == 0`` keeps the hash with bit 63 cleared (a non-negative id);
``hash_bucket > 0`` gives ``uint64(h) % hash_bucket``, computed in unsigned arithmetic so a
negative ``h`` buckets as its unsigned value does.

A pack thread hashes each decoded record batch's strings in one call of a C loop
(``hash_strings.c``, built on first use: ``fxrec.utils.native``) straight into the batch's
memory; the loop reads each string once and releases the GIL, so pack threads hash in
parallel. The op's vectorized torch kernel makes ~100 passes over the strings, ~40 M strings
per CPU-second: twice what decoding them costs (bench/README.md, "Reading"). Where no C compiler is available the op's CPU kernel does the hashing (same ids,
slower), with one warning.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from pathlib import Path

import numpy as np
import torch

from fxrec.utils.native import NativeUnavailable, load_library

__all__ = ["HASH_TYPES", "hash_strings"]

HASH_TYPES = ("farm", "murmur")

_CLEAR_BIT_63 = np.int64(0x7FFF_FFFF_FFFF_FFFF)


@functools.cache
def _native_kernels() -> dict[np.dtype, ctypes._CFuncPtr] | None:
    """The C loop for int32 and int64 Arrow offsets, or None (with a warning) where it can't be built."""
    try:
        library = load_library(Path(__file__).with_name("hash_strings.c"))
    except NativeUnavailable as error:
        warnings.warn(f"read-time hashing falls back to the Hash op's torch kernel (slower): {error}", RuntimeWarning)
        return None
    kernels = {}
    for dtype, name in ((np.dtype(np.int32), "fxrec_hash_strings_i32"), (np.dtype(np.int64), "fxrec_hash_strings_i64")):
        fn = getattr(library, name)
        # data, nbytes, offsets, n, hash_type, bucket, out -> -1 or the first bad string's index
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_uint64, ctypes.c_void_p]
        fn.restype = ctypes.c_int64
        kernels[dtype] = fn
    return kernels


def _hash_native(kernel, data: np.ndarray, string_offsets: np.ndarray, hash_type: str, hash_bucket: int,
                 out: np.ndarray) -> None:
    offsets = np.ascontiguousarray(string_offsets)
    data = np.ascontiguousarray(data)
    bad = kernel(data.ctypes.data, data.size, offsets.ctypes.data, out.size, HASH_TYPES.index(hash_type), hash_bucket, out.ctypes.data)
    if bad >= 0:
        raise ValueError(
            f"string {bad}'s offsets {offsets[bad]}..{offsets[bad + 1]} are decreasing or outside the "
            f"{data.size}-byte data buffer (first offset {offsets[0]}, last {offsets[-1]})"
        )


def _hash_with_op(data: np.ndarray, string_offsets: np.ndarray, hash_type: str, hash_bucket: int,
                  out: np.ndarray) -> None:
    # Arrow-allocated buffers are writable; a read-only one (e.g. from a memory map) is copied
    # so torch never holds a tensor over memory it must not write.
    values = torch.from_numpy(data if data.flags.writeable else data.copy())
    offsets = torch.from_numpy(string_offsets.astype(np.int64))
    hashes = torch.ops.fxrec.hash_bytes(values, offsets, hash_type).numpy()
    if hash_bucket == 0:
        np.bitwise_and(hashes, _CLEAR_BIT_63, out=out)
    else:
        np.remainder(hashes.view(np.uint64), np.uint64(hash_bucket), out=out.view(np.uint64))


def hash_strings(data: np.ndarray, string_offsets: np.ndarray, hash_type: str, hash_bucket: int,
                 out: np.ndarray | None = None) -> np.ndarray:
    """int64 ids of the strings ``data[string_offsets[i]:string_offsets[i + 1]]``, written into
    ``out`` (a contiguous int64 array of n entries, e.g. a batch's memory) or a fresh array.

    ``data``: int8 bytes; ``string_offsets``: int32 or int64 absolute positions into ``data``
    (n + 1 entries). Offsets out of order or outside ``data`` raise ValueError.
    """
    n = len(string_offsets) - 1
    if out is None:
        out = np.empty(n, np.int64)
    elif out.dtype != np.int64 or out.shape != (n,) or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writable contiguous int64 array of {n} entries, got {out.dtype} {out.shape}")
    kernels = _native_kernels()
    if kernels is None:
        _hash_with_op(data, string_offsets, hash_type, hash_bucket, out)
    else:
        _hash_native(kernels[string_offsets.dtype], data, string_offsets, hash_type, hash_bucket, out)
    return out

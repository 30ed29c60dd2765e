"""Read-time hashing of string columns (``varlen_feature(..., hash_type=..., hash_bucket=...)``).

Strings are hashed with ``torch.ops.fxrec.hash_bytes``, the same vectorized kernel as the ``Hash``
feature op (farm = farmhash Fingerprint64, murmur = MurmurHash64A seed 0), straight from the
Arrow string buffers. Then, as in RecIS (SPEC §2): ``hash_bucket == 0`` keeps the hash with bit 63
cleared (a non-negative id); ``hash_bucket > 0`` gives ``uint64(h) % hash_bucket``, computed in
unsigned arithmetic so a negative ``h`` buckets as its unsigned value does.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["HASH_TYPES", "hash_strings"]

HASH_TYPES = ("farm", "murmur")

_CLEAR_BIT_63 = np.int64(0x7FFF_FFFF_FFFF_FFFF)


def _tensor(array: np.ndarray) -> torch.Tensor:
    # Arrow-allocated buffers are writable; a read-only one (e.g. from a memory map) is copied
    # so torch never holds a tensor over memory it must not write.
    return torch.from_numpy(array if array.flags.writeable else array.copy())


# Strings per hash_bytes call. Small blocks keep the kernel's temporaries in cache (one call over
# a 2M-string stripe was 2-3x slower per string) and keep its elementwise ops under torch's
# intra-op grain size (32768), so hashing on reader threads does not also start OpenMP teams
# that fight those threads for cores (measured on 2 cores: 1-10 s per pass with 128K-string
# blocks, a steady ~1 s with 32K). Parallelism comes from read_threads_num instead.
_BLOCK = 1 << 15


def hash_strings(data: np.ndarray, string_offsets: np.ndarray, hash_type: str, hash_bucket: int) -> np.ndarray:
    """int64 ids of the strings ``data[string_offsets[i]:string_offsets[i + 1]]``.

    ``data``: int8 bytes; ``string_offsets``: absolute positions into ``data`` (n + 1 entries).
    """
    values = _tensor(data)
    offsets = torch.from_numpy(string_offsets.astype(np.int64))
    num = len(string_offsets) - 1
    hashes = np.empty(num, np.int64)
    for start in range(0, num, _BLOCK):
        stop = min(start + _BLOCK, num)
        hashes[start:stop] = torch.ops.fxrec.hash_bytes(values, offsets[start : stop + 1], hash_type).numpy()
    if hash_bucket == 0:
        return np.bitwise_and(hashes, _CLEAR_BIT_63, out=hashes)
    return (hashes.view(np.uint64) % np.uint64(hash_bucket)).view(np.int64)

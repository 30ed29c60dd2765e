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


def hash_strings(data: np.ndarray, string_offsets: np.ndarray, hash_type: str, hash_bucket: int) -> np.ndarray:
    """int64 ids of the strings ``data[string_offsets[i]:string_offsets[i + 1]]``.

    ``data``: int8 bytes; ``string_offsets``: absolute positions into ``data`` (n + 1 entries).
    """
    # One call: fxrec.io's threads run torch ops on one core each (fxrec.io.threads), so the
    # kernel's ops may be as large as it likes (few ops per string: little time under the GIL).
    offsets = torch.from_numpy(string_offsets.astype(np.int64))
    hashes = torch.ops.fxrec.hash_bytes(_tensor(data), offsets, hash_type).numpy()
    if hash_bucket == 0:
        return np.bitwise_and(hashes, _CLEAR_BIT_63, out=hashes)
    return (hashes.view(np.uint64) % np.uint64(hash_bucket)).view(np.int64)

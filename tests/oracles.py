"""Independent pure-Python references for fxrec's feature ops, on lists of rows.

They are deliberately naive (one row, one item at a time) and share no code with fxrec.
"""

from __future__ import annotations

import bisect
import math
import struct

import farmhash

MASK64 = (1 << 64) - 1


def to_int64(u: int) -> int:
    u &= MASK64
    return u - (1 << 64) if u >= 1 << 63 else u


def mix64(x: int) -> int:
    """splitmix64's finalizer on a Python int (as uint64)."""
    z = x & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def murmur64a(data: bytes, seed: int = 0) -> int:
    """MurmurHash64A as an int64."""
    m, r = 0xC6A4A7935BD1E995, 47
    h = (seed ^ (len(data) * m)) & MASK64
    nblocks = len(data) // 8
    for i in range(nblocks):
        (k,) = struct.unpack_from("<Q", data, 8 * i)
        k = (k * m) & MASK64
        k ^= k >> r
        k = (k * m) & MASK64
        h ^= k
        h = (h * m) & MASK64
    tail = data[8 * nblocks:]
    if tail:
        for i, byte in enumerate(tail):
            h ^= byte << (8 * i)
        h = (h * m) & MASK64
    h ^= h >> r
    h = (h * m) & MASK64
    h ^= h >> r
    return to_int64(h)


def farm64(data: bytes) -> int:
    return to_int64(farmhash.fingerprint64(data))


def hash_string(data: bytes, hash_type: str) -> int:
    return farm64(data) if hash_type == "farm" else murmur64a(data)


def hash_id(x: int, hash_type: str) -> int:
    return hash_string(struct.pack("<q", x), hash_type)


def mod(x: int, m: int) -> int:
    return (x & MASK64) % m


def bucketize(v: float, boundaries: list[float]) -> int:
    if isinstance(v, float) and math.isnan(v):
        return len(boundaries)
    return bisect.bisect_right(boundaries, v)


def cross_row(xs, ys, xw=None, yw=None):
    """One row of FeatureCross: (ids, weights)."""
    def first(ids, ws):
        seen = {}
        for i, x in enumerate(ids):
            seen.setdefault(x, 1.0 if ws is None else ws[i])
        return seen

    ux, uy = first(xs, xw), first(ys, yw)
    ids, weights = [], []
    for a in sorted(ux):
        for b in sorted(uy):
            ids.append(murmur64a(struct.pack("<qq", a, b)))
            weights.append(ux[a] * uy[b])
    return ids, weights


def truncate_row(row, seq_len: int, keep_last: bool):
    return row[-seq_len:] if keep_last else row[:seq_len]

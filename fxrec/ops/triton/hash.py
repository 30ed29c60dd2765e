"""Triton kernels for ``fxrec::hash_bytes`` / ``hash_int64`` (+ ``_multi``): farmhash Fingerprint64
and MurmurHash64A (seed 0), bit-identical to the CPU kernels in ``fxrec.ops.hash``.

String kernels run one lane per string, ``BLOCK`` strings per program, in uint64 arithmetic. Bytes
are loaded one by one (masked to the string) and assembled into little-endian words, so no load is
misaligned or outside a string. A block evaluates the formula of each farmhash length class that
some lane of it has (loads masked to that class's lanes; each lane keeps its own class's result),
so a block of 10-byte strings runs the 8-16 byte formula only; loops over
64-byte chunks (farm, > 64 bytes) and 8-byte blocks (murmur) run up to the longest string of the
program, masked per lane.

The ``_multi`` launchers hash F features in ONE launch: a device table (copied from pinned memory
without blocking the host) holds, per feature, the data pointers of its inputs and output, its
size, its hash type and its first program id; each program finds its feature by counting the
first-program ids <= its own.

Launchers take validated arguments (``fxrec.ops.hash`` checks them) and work on CUDA tensors, or
on CPU tensors under ``TRITON_INTERPRET=1``.
"""

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxrec.ops.triton.mod import device_table

_HASH_CODES = {"farm": 0, "murmur": 1}
_MURMUR = tl.constexpr(_HASH_CODES["murmur"])


def _farm_long_init() -> tuple[int, int, int]:
    """x, y, z of farmhashna::Hash64's long-string state before the first word (uint64)."""
    mask = (1 << 64) - 1
    k1, k2, seed = 0xB492B66FBE98F273, 0x9AE16A3B2F90404F, 81
    y = (seed * k1 + 113) & mask
    z = (y * k2 + 113) & mask
    return (seed * k2) & mask, y, ((z ^ (z >> 47)) * k2) & mask


_K0 = tl.constexpr(0xC3A5C85C97CB3127)
_K1 = tl.constexpr(0xB492B66FBE98F273)
_K2 = tl.constexpr(0x9AE16A3B2F90404F)
MURMUR_M = tl.constexpr(0xC6A4A7935BD1E995)
_MURMUR_H8 = tl.constexpr((8 * 0xC6A4A7935BD1E995) & ((1 << 64) - 1))  # seed 0 ^ (len 8 * m)
_FARM_X0, _FARM_Y0, _FARM_Z0 = (tl.constexpr(v) for v in _farm_long_init())

_BLOCK_STRINGS = 128
_BLOCK_IDS = 1024
# Table rows of the multi launchers (int64 columns); the last column is the first program id.
_BYTES_ROW = tl.constexpr(6)  # values ptr, offsets ptr, out ptr, n strings, hash code, first pid
_IDS_ROW = tl.constexpr(5)  # values ptr, out ptr, numel, hash code, first pid


# ---------------------------------------------------------------------------------------------
# uint64 helpers


@triton.jit
def _rotr(x, r: tl.constexpr):
    return (x >> r) | (x << (64 - r))


@triton.jit
def _shift_mix(x):
    return x ^ (x >> 47)


@triton.jit
def _hash_len16(u, v, mul):
    a = _shift_mix((u ^ v) * mul)
    b = _shift_mix((v ^ a) * mul)
    return b * mul


@triton.jit
def _weak_hash_len32_with_seeds(w, x, y, z, a, b):
    a = a + w
    b = _rotr(b + a + z, 21)
    c = a
    a = a + x + y
    b = b + _rotr(a, 44)
    return a + z, b + c


@triton.jit
def _byte(base, pos, mask):
    return tl.load(base + pos, mask=mask, other=0).to(tl.uint8, bitcast=True).to(tl.uint64)


@triton.jit
def _fetch(base, pos, mask, NBYTES: tl.constexpr):
    """The little-endian word of NBYTES bytes at base + pos (0 where masked off)."""
    w = _byte(base, pos, mask)
    for k in tl.static_range(1, NBYTES):
        w = w | (_byte(base, pos + k, mask) << (8 * k))
    return w


# ---------------------------------------------------------------------------------------------
# farmhash Fingerprint64 (farmhashna::Hash64)


@triton.jit
def _farm_words_len8to16(first, last, nu):
    mul = _K2 + nu * 2
    a = first + _K2
    c = _rotr(last, 37) * mul + a
    d = (_rotr(a, 25) + last) * mul
    return _hash_len16(c, d, mul)


@triton.jit
def _farm_len65plus(base, s, n, live):
    """farmhashna::Hash64 for the lanes in ``live`` (all of them longer than 64 bytes)."""
    x = _FARM_X0 + _fetch(base, s, live, 8)
    y = tl.zeros(s.shape, tl.uint64) + _FARM_Y0
    z = tl.zeros(s.shape, tl.uint64) + _FARM_Z0
    v0 = tl.zeros(s.shape, tl.uint64)
    v1 = tl.zeros(s.shape, tl.uint64)
    w0 = tl.zeros(s.shape, tl.uint64)
    w1 = tl.zeros(s.shape, tl.uint64)
    n_chunks = tl.where(live, (n - 1) // 64, 0)
    for c in range(0, tl.max(n_chunks, axis=0)):
        act = c < n_chunks
        p = s + c * 64
        f0 = _fetch(base, p, act, 8)
        f8 = _fetch(base, p + 8, act, 8)
        f16 = _fetch(base, p + 16, act, 8)
        f24 = _fetch(base, p + 24, act, 8)
        f32 = _fetch(base, p + 32, act, 8)
        f40 = _fetch(base, p + 40, act, 8)
        f48 = _fetch(base, p + 48, act, 8)
        f56 = _fetch(base, p + 56, act, 8)
        nx = _rotr(x + y + v0 + f8, 37) * _K1
        ny = _rotr(y + v1 + f48, 42) * _K1
        nx = nx ^ w1
        ny = ny + v0 + f40
        nz = _rotr(z + w0, 33) * _K1
        nv0, nv1 = _weak_hash_len32_with_seeds(f0, f8, f16, f24, v1 * _K1, nx + w0)
        nw0, nw1 = _weak_hash_len32_with_seeds(f32, f40, f48, f56, nz + w1, ny + f16)
        x = tl.where(act, nz, x)  # x and z swap
        y = tl.where(act, ny, y)
        z = tl.where(act, nx, z)
        v0 = tl.where(act, nv0, v0)
        v1 = tl.where(act, nv1, v1)
        w0 = tl.where(act, nw0, w0)
        w1 = tl.where(act, nw1, w1)

    mul = _K1 + ((z & 0xFF) << 1)
    p = s + n - 64  # the last 64 bytes
    w0 = w0 + ((n - 1) & 63).to(tl.uint64)
    v0 = v0 + w0
    w0 = w0 + v0
    f0 = _fetch(base, p, live, 8)
    f8 = _fetch(base, p + 8, live, 8)
    f16 = _fetch(base, p + 16, live, 8)
    f24 = _fetch(base, p + 24, live, 8)
    f32 = _fetch(base, p + 32, live, 8)
    f40 = _fetch(base, p + 40, live, 8)
    f48 = _fetch(base, p + 48, live, 8)
    f56 = _fetch(base, p + 56, live, 8)
    x = _rotr(x + y + v0 + f8, 37) * mul
    y = _rotr(y + v1 + f48, 42) * mul
    x = x ^ (w1 * 9)
    y = y + v0 * 9 + f40
    z = _rotr(z + w0, 33) * mul
    v0, v1 = _weak_hash_len32_with_seeds(f0, f8, f16, f24, v1 * mul, x + w0)
    w0, w1 = _weak_hash_len32_with_seeds(f32, f40, f48, f56, z + w1, y + f16)
    # (x and z swap here in the C code: the final mix below reads them swapped)
    return _hash_len16(_hash_len16(v0, w0, mul) + _shift_mix(y) * _K0 + x, _hash_len16(v1, w1, mul) + z, mul)


@triton.jit
def _any(cond):
    """Whether ``cond`` holds on some lane: a block-uniform branch condition."""
    return tl.max(cond.to(tl.int32), axis=0) > 0


@triton.jit
def _farm_strings(base, s, n, mask):
    nu = n.to(tl.uint64)
    mul = _K2 + nu * 2
    # Every lane would evaluate every length class (lanes of a block run in lockstep): a class
    # that no lane of the block has is skipped, so blocks of short strings skip the long paths.
    h = tl.zeros(n.shape, tl.uint64) + _K2  # 0 bytes (and masked-off lanes)

    m = mask & (n >= 1) & (n <= 3)
    if _any(m):
        yy = _byte(base, s, m) + (_byte(base, s + (n >> 1), m) << 8)
        zz = nu + (_byte(base, s + n - 1, m) << 2)
        h = tl.where(m, _shift_mix((yy * _K2) ^ (zz * _K0)) * _K2, h)

    m = mask & (n >= 4) & (n <= 7)
    if _any(m):
        h4 = _hash_len16(nu + (_fetch(base, s, m, 4) << 3), _fetch(base, s + n - 4, m, 4), mul)
        h = tl.where(m, h4, h)

    # 8..64 bytes share their first two and last two words
    m = mask & (n >= 8) & (n <= 64)
    if _any(m):
        first = _fetch(base, s, m, 8)
        last = _fetch(base, s + n - 8, m, 8)
        h = tl.where(m & (n <= 16), _farm_words_len8to16(first, last, nu), h)

        m = mask & (n >= 17) & (n <= 64)
        if _any(m):
            second = _fetch(base, s + 8, m, 8)
            last2 = _fetch(base, s + n - 16, m, 8)
            a = first * _K1
            c = last * mul
            d = last2 * _K2
            h17 = _hash_len16(_rotr(a + second, 43) + _rotr(c, 30) + d, a + _rotr(second + _K2, 18) + c, mul)
            h = tl.where(m & (n <= 32), h17, h)

            m = mask & (n >= 33) & (n <= 64)
            if _any(m):
                a = first * _K2
                yv = _rotr(a + second, 43) + _rotr(c, 30) + d
                zv = _hash_len16(yv, a + _rotr(second + _K2, 18) + c, mul)
                e = _fetch(base, s + 16, m, 8) * mul
                f = _fetch(base, s + 24, m, 8)
                g = (yv + _fetch(base, s + n - 32, m, 8)) * mul
                hh = (zv + _fetch(base, s + n - 24, m, 8)) * mul
                h33 = _hash_len16(_rotr(e + f, 43) + _rotr(g, 30) + hh, e + _rotr(f + a, 18) + g, mul)
                h = tl.where(m, h33, h)

    m = mask & (n > 64)
    if _any(m):
        h = tl.where(m, _farm_len65plus(base, s, n, m), h)
    return h


# ---------------------------------------------------------------------------------------------
# MurmurHash64A, seed 0


@triton.jit
def murmur_block(h, k):
    k = k * MURMUR_M
    k = k ^ (k >> 47)
    k = k * MURMUR_M
    return (h ^ k) * MURMUR_M


@triton.jit
def murmur_finish(h):
    h = h ^ (h >> 47)
    h = h * MURMUR_M
    return h ^ (h >> 47)


@triton.jit
def _murmur_strings(base, s, n, mask):
    h = n.to(tl.uint64) * MURMUR_M
    n_blocks = tl.where(mask, n // 8, 0)
    for b in range(0, tl.max(n_blocks, axis=0)):
        act = b < n_blocks
        h = tl.where(act, murmur_block(h, _fetch(base, s + b * 8, act, 8)), h)
    tail_len = n & 7
    tail_start = s + (n - tail_len)
    tail = tl.zeros(h.shape, tl.uint64)
    for k in tl.static_range(7):
        tail = tail | (_byte(base, tail_start + k, mask & (k < tail_len)) << (8 * k))
    h = tl.where(tail_len != 0, (h ^ tail) * MURMUR_M, h)
    return murmur_finish(h)


@triton.jit
def _murmur_id(x):
    return murmur_finish(murmur_block(tl.zeros(x.shape, tl.uint64) + _MURMUR_H8, x))


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _hash_string_block(values, offsets, out, n_strings, block, code, BLOCK: tl.constexpr):
    i = block * BLOCK + tl.arange(0, BLOCK)
    mask = i < n_strings
    s = tl.load(offsets + i, mask=mask, other=0)
    n = tl.load(offsets + i + 1, mask=mask, other=0) - s
    if code == _MURMUR:
        h = _murmur_strings(values, s, n, mask)
    else:
        h = _farm_strings(values, s, n, mask)
    tl.store(out + i, h.to(tl.int64, bitcast=True), mask=mask)


@triton.jit
def _hash_bytes_kernel(values, offsets, out, n_strings, CODE: tl.constexpr, BLOCK: tl.constexpr):
    _hash_string_block(values, offsets, out, n_strings, tl.program_id(0), CODE, BLOCK)


@triton.jit
def _feature_of_program(table, n_features, ROW: tl.constexpr, F_POW2: tl.constexpr):
    """(feature, block index inside it) of this program, from the table's first-program column."""
    pid = tl.program_id(0)
    f = tl.arange(0, F_POW2)
    first = tl.load(table + f * ROW + (ROW - 1), mask=f < n_features, other=2**62)
    feature = tl.sum((first <= pid).to(tl.int32), axis=0) - 1
    return feature, pid - tl.load(table + feature * ROW + (ROW - 1))


@triton.jit
def _hash_bytes_multi_kernel(table, n_features, F_POW2: tl.constexpr, BLOCK: tl.constexpr):
    feature, block = _feature_of_program(table, n_features, _BYTES_ROW, F_POW2)
    row = table + feature * _BYTES_ROW
    values = tl.load(row).to(tl.pointer_type(tl.int8))
    offsets = tl.load(row + 1).to(tl.pointer_type(tl.int64))
    out = tl.load(row + 2).to(tl.pointer_type(tl.int64))
    _hash_string_block(values, offsets, out, tl.load(row + 3), block, tl.load(row + 4), BLOCK)


@triton.jit
def _hash_id_block(values, out, numel, block, code, BLOCK: tl.constexpr):
    i = block * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    x = tl.load(values + i, mask=mask, other=0).to(tl.uint64, bitcast=True)
    if code == _MURMUR:
        h = _murmur_id(x)
    else:
        h = _farm_words_len8to16(x, x, tl.zeros(x.shape, tl.uint64) + 8)
    tl.store(out + i, h.to(tl.int64, bitcast=True), mask=mask)


@triton.jit
def _hash_int64_kernel(values, out, numel, CODE: tl.constexpr, BLOCK: tl.constexpr):
    _hash_id_block(values, out, numel, tl.program_id(0), CODE, BLOCK)


@triton.jit
def _hash_int64_multi_kernel(table, n_features, F_POW2: tl.constexpr, BLOCK: tl.constexpr):
    feature, block = _feature_of_program(table, n_features, _IDS_ROW, F_POW2)
    row = table + feature * _IDS_ROW
    values = tl.load(row).to(tl.pointer_type(tl.int64))
    out = tl.load(row + 1).to(tl.pointer_type(tl.int64))
    _hash_id_block(values, out, tl.load(row + 2), block, tl.load(row + 3), BLOCK)


# ---------------------------------------------------------------------------------------------
# launchers


def _device_of(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _table_width(n_features: int) -> int:
    return max(16, triton.next_power_of_2(n_features))  # few recompiles over feature counts


def hash_bytes_triton(values: Tensor, offsets: Tensor, hash_type: str) -> Tensor:
    values, offsets = values.contiguous(), offsets.contiguous()
    n = offsets.numel() - 1
    out = torch.empty(n, dtype=torch.int64, device=values.device)
    if n > 0:
        grid = (triton.cdiv(n, _BLOCK_STRINGS),)
        with _device_of(values):
            _hash_bytes_kernel[grid](values, offsets, out, n, CODE=_HASH_CODES[hash_type], BLOCK=_BLOCK_STRINGS)
    return out


def hash_bytes_multi_triton(values: list[Tensor], offsets: list[Tensor], hash_types: list[str]) -> list[Tensor]:
    values = [v.contiguous() for v in values]
    offsets = [o.contiguous() for o in offsets]
    outs = [torch.empty(o.numel() - 1, dtype=torch.int64, device=o.device) for o in offsets]
    rows, n_programs = [], 0
    for v, o, out, t in zip(values, offsets, outs, hash_types):
        rows.append([v.data_ptr(), o.data_ptr(), out.data_ptr(), out.numel(), _HASH_CODES[t], n_programs])
        n_programs += triton.cdiv(out.numel(), _BLOCK_STRINGS)
    if n_programs:
        table, _ = device_table(rows, values[0].device)  # non-blocking: a pageable .to() would sync
        with _device_of(values[0]):
            _hash_bytes_multi_kernel[(n_programs,)](
                table, len(rows), F_POW2=_table_width(len(rows)), BLOCK=_BLOCK_STRINGS
            )
    return outs


def hash_int64_triton(values: Tensor, hash_type: str) -> Tensor:
    values = values.contiguous()
    out = torch.empty_like(values)
    if values.numel():
        grid = (triton.cdiv(values.numel(), _BLOCK_IDS),)
        with _device_of(values):
            _hash_int64_kernel[grid](values, out, values.numel(), CODE=_HASH_CODES[hash_type], BLOCK=_BLOCK_IDS)
    return out


def hash_int64_multi_triton(values: list[Tensor], hash_types: list[str]) -> list[Tensor]:
    values = [v.contiguous() for v in values]
    outs = [torch.empty_like(v) for v in values]
    rows, n_programs = [], 0
    for v, out, t in zip(values, outs, hash_types):
        rows.append([v.data_ptr(), out.data_ptr(), v.numel(), _HASH_CODES[t], n_programs])
        n_programs += triton.cdiv(v.numel(), _BLOCK_IDS)
    if n_programs:
        table, _ = device_table(rows, values[0].device)  # non-blocking: a pageable .to() would sync
        with _device_of(values[0]):
            _hash_int64_multi_kernel[(n_programs,)](
                table, len(rows), F_POW2=_table_width(len(rows)), BLOCK=_BLOCK_IDS
            )
    return outs

"""String and id hashing: ``torch.ops.fxrec.hash_bytes`` / ``hash_int64`` and their ``_multi`` forms.

Two hash functions, chosen by ``hash_type`` (SPEC §3.4):

- ``"farm"``: farmhash ``Fingerprint64`` (= ``farmhashna::Hash64``), the raw 64-bit value as int64
  (it can be negative; the read-time masking of SPEC §2 is the IO layer's business, not this op's).
- ``"murmur"``: MurmurHash64A with seed 0.

``hash_bytes(values, offsets, hash_type)`` hashes N strings stored as concatenated int8 bytes:
string ``i`` is ``values[offsets[i]:offsets[i + 1]]``; ``offsets`` (int64, N + 1 entries) may start
above 0, so callers pass slices of a bigger buffer without copying. ``hash_int64(values,
hash_type)`` hashes each id's 8 little-endian bytes (the same value ``hash_bytes`` gives for those 8
bytes), keeping the shape. The ``_multi`` forms take lists (one entry per feature) and equal one
single call per feature; on CUDA they run as ONE Triton launch.

CPU kernel: vectorized torch over all strings (of a step, below) at once, with uint64 arithmetic
carried in int64 (torch's int64 ``*``, ``+`` and ``<<`` wrap; ``>>`` is arithmetic, so logical
shifts are masked). Strings are grouped by farmhash's length classes (0, 1-3, 4-7, 8-16, 17-32,
33-64, >64); 8-byte little-endian words are gathered from a zero-padded copy of the bytes the
strings span (reads past its end are safe; the algorithms only *use* a string's own bytes). Loops
over 64-byte chunks (farm, > 64 bytes) and 8-byte blocks (murmur) run over the chunk index with a
mask of the strings still having chunks, and drop finished strings once they are most of the working
set, so the work stays within twice the total chunk count, not N times the longest string. Batches
are hashed in steps of ``_CPU_STEP`` strings so temporaries stay small. Measured (2-core sandbox, 1M
strings, one thread): ~40 M strings/s at 10 bytes, ~5 M strings/s at 100 bytes.

CUDA kernel: ``fxrec.ops.triton.hash`` (one lane per string), bit-identical to this one: one
launch per call (also for the ``_multi`` forms, plus one non-blocking table copy), no host sync.

Validation: an unknown ``hash_type`` raises ValueError naming the accepted values, wrong dtypes
raise TypeError, wrong ranks or mismatched lists raise ValueError. On CPU the offsets are also
checked (non-decreasing, within ``values``); on CUDA they are not read (no host sync).
"""

from collections.abc import Callable, Sequence

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch import Tensor

from fxrec.ops.uint64 import as_int64, shr
from fxrec.ops.triton.hash import (
    hash_bytes_multi_triton,
    hash_bytes_triton,
    hash_int64_multi_triton,
    hash_int64_triton,
)

HASH_TYPES = ("farm", "murmur")

# ---------------------------------------------------------------------------------------------
# uint64 arithmetic in int64 tensors


_K0 = as_int64(0xC3A5C85C97CB3127)
_K1 = as_int64(0xB492B66FBE98F273)
_K2 = as_int64(0x9AE16A3B2F90404F)
MURMUR_M = as_int64(0xC6A4A7935BD1E995)
_FARM_SEED = 81


def _rotr(x: Tensor, r: int) -> Tensor:
    return shr(x, r) | (x << (64 - r))


def _shift_mix(x: Tensor) -> Tensor:
    return x ^ shr(x, 47)


def _hash_len16(u: Tensor, v: Tensor, mul: Tensor | int) -> Tensor:
    a = _shift_mix((u ^ v) * mul)
    b = _shift_mix((v ^ a) * mul)
    return b * mul


def _weak_hash_len32_with_seeds(w, x, y, z, a, b) -> tuple[Tensor, Tensor]:
    a = a + w
    b = _rotr(b + a + z, 21)
    c = a
    a = a + x + y
    b = b + _rotr(a, 44)
    return a + z, b + c


class _Bytes:
    """Reads bytes and unaligned little-endian words from a zero-padded copy of a byte range."""

    # Reads of up to 64 bytes at any position in [0, nbytes] stay inside the buffer: the chunk
    # loops also read (and discard) at the end position of lanes whose rounds are over.
    _PAD = 64

    def __init__(self, values: Tensor):
        self._bytes = torch.cat([values.view(torch.uint8), values.new_zeros(self._PAD, dtype=torch.uint8)])
        # Row p of this view is bytes p..p+7: one index_select + a dtype view gathers words
        # (x86/ARM little-endian hosts, which is what torch runs on).
        self._windows = self._bytes.unfold(0, 8, 1)

    def byte(self, pos: Tensor) -> Tensor:
        return torch.index_select(self._bytes, 0, pos).long()

    def fetch64(self, pos: Tensor) -> Tensor:
        return torch.index_select(self._windows, 0, pos).view(torch.int64).view(-1)

    def fetch_words(self, pos: Tensor, k: int) -> Tensor:
        """[len(pos), k]: the k <= 8 consecutive words at each position, in one gather."""
        return torch.index_select(self._bytes.unfold(0, 8 * k, 1), 0, pos).view(torch.int64)

    def fetch32(self, pos: Tensor) -> Tensor:
        return self.fetch64(pos) & 0xFFFFFFFF


def _run_rounds(rounds: Tensor, state: list[Tensor], step: Callable[..., tuple[Tensor, ...]]) -> list[Tensor]:
    """Applies ``state = step(*state)`` ``rounds[i]`` times to lane ``i`` of every state tensor.

    Each round runs on the working set of lanes, lanes whose rounds are over keep their state
    (masked). When more than half of the working set is done, the done lanes are written out
    and dropped, so the work stays within twice the total rounds (a few long strings in a batch
    of short ones cost their own chunks, not ``N * max(rounds)``).
    """
    result = None  # full-size state, written for lanes as they leave the working set
    lanes = None  # indices of the working set into ``result``; None: all lanes, in order
    max_rounds = int(rounds.max()) if rounds.numel() else 0
    for r in range(max_rounds):
        active = rounds > r
        n_active = int(active.sum())
        if 2 * n_active < rounds.numel():
            if result is None:
                result = [torch.empty_like(t) for t in state]
                lanes = torch.arange(rounds.numel(), device=rounds.device)
            done, keep = (~active).nonzero().squeeze(1), active.nonzero().squeeze(1)
            for res, t in zip(result, state):
                res.index_copy_(0, lanes[done], t[done])
            lanes, rounds, state = lanes[keep], rounds[keep], [t[keep] for t in state]
        new_state = step(*state)
        if n_active == rounds.numel():
            state = list(new_state)
        else:
            state = [torch.where(active, new, old) for new, old in zip(new_state, state)]
    if result is None:
        return state
    for res, t in zip(result, state):
        res.index_copy_(0, lanes, t)
    return result


# ---------------------------------------------------------------------------------------------
# farmhash Fingerprint64 (farmhashna::Hash64), one function per length class


def _farm_len0(rd: _Bytes, s: Tensor, n: Tensor) -> Tensor:
    return torch.full_like(s, _K2)


def _farm_len1to3(rd: _Bytes, s: Tensor, n: Tensor) -> Tensor:
    a, b, c = rd.byte(s), rd.byte(s + (n >> 1)), rd.byte(s + n - 1)
    y = a + (b << 8)
    z = n + (c << 2)
    return _shift_mix((y * _K2) ^ (z * _K0)) * _K2


def _farm_len4to7(rd: _Bytes, s: Tensor, n: Tensor) -> Tensor:
    mul = _K2 + n * 2
    return _hash_len16(n + (rd.fetch32(s) << 3), rd.fetch32(s + n - 4), mul)


def _farm_words_len8to16(first: Tensor, last: Tensor, n: Tensor | int) -> Tensor:
    """farmhash of 8..16 bytes given their first and last 8-byte words (hash_int64 shares it)."""
    mul = _K2 + n * 2
    a = first + _K2
    c = _rotr(last, 37) * mul + a
    d = (_rotr(a, 25) + last) * mul
    return _hash_len16(c, d, mul)


def _farm_len8to16(rd: _Bytes, s: Tensor, n: Tensor) -> Tensor:
    return _farm_words_len8to16(rd.fetch64(s), rd.fetch64(s + n - 8), n)


def _farm_len17to32(rd: _Bytes, s: Tensor, n: Tensor) -> Tensor:
    mul = _K2 + n * 2
    head, tail = rd.fetch_words(s, 2), rd.fetch_words(s + n - 16, 2)
    a = head[:, 0] * _K1
    b = head[:, 1]
    c = tail[:, 1] * mul
    d = tail[:, 0] * _K2
    return _hash_len16(_rotr(a + b, 43) + _rotr(c, 30) + d, a + _rotr(b + _K2, 18) + c, mul)


def _farm_len33to64(rd: _Bytes, s: Tensor, n: Tensor) -> Tensor:
    mul = _K2 + n * 2
    head, tail = rd.fetch_words(s, 4), rd.fetch_words(s + n - 32, 4)
    a = head[:, 0] * _K2
    b = head[:, 1]
    c = tail[:, 3] * mul
    d = tail[:, 2] * _K2
    y = _rotr(a + b, 43) + _rotr(c, 30) + d
    z = _hash_len16(y, a + _rotr(b + _K2, 18) + c, mul)
    e = head[:, 2] * mul
    f = head[:, 3]
    g = (y + tail[:, 0]) * mul
    h = (z + tail[:, 1]) * mul
    return _hash_len16(_rotr(e + f, 43) + _rotr(g, 30) + h, e + _rotr(f + a, 18) + g, mul)


def _farm_long_init() -> tuple[int, int, int]:
    """x, y, z of farmhashna::Hash64's long-string state before the first word is mixed in."""
    mask = (1 << 64) - 1
    y = (_FARM_SEED * _K1 + 113) & mask
    z = (y * _K2 + 113) & mask
    z = ((z ^ (z >> 47)) * _K2) & mask
    return as_int64(_FARM_SEED * _K2), as_int64(y), as_int64(z)


_FARM_X0, _FARM_Y0, _FARM_Z0 = _farm_long_init()


def _farm_len65plus(rd: _Bytes, s: Tensor, n: Tensor) -> Tensor:
    def chunk(x, y, z, v0, v1, w0, w1, p):  # one 64-byte chunk at p, then p += 64
        f = rd.fetch_words(p, 8).unbind(1)
        x = _rotr(x + y + v0 + f[1], 37) * _K1
        y = _rotr(y + v1 + f[6], 42) * _K1
        x = x ^ w1
        y = y + v0 + f[5]
        z = _rotr(z + w0, 33) * _K1
        v0, v1 = _weak_hash_len32_with_seeds(*f[:4], v1 * _K1, x + w0)
        w0, w1 = _weak_hash_len32_with_seeds(*f[4:], z + w1, y + f[2])
        return z, y, x, v0, v1, w0, w1, p + 64  # x and z swap

    x = _FARM_X0 + rd.fetch64(s)
    y = torch.full_like(s, _FARM_Y0)
    z = torch.full_like(s, _FARM_Z0)
    zero = torch.zeros_like(s)
    # The do-while loop runs (n - 1) // 64 times, leaving 1..64 bytes for the last-64 step.
    x, y, z, v0, v1, w0, w1, _ = _run_rounds((n - 1) >> 6, [x, y, z, zero, zero, zero, zero, s], chunk)

    mul = _K1 + ((z & 0xFF) << 1)
    f = rd.fetch_words(s + n - 64, 8).unbind(1)  # the last 64 bytes
    w0 = w0 + ((n - 1) & 63)
    v0 = v0 + w0
    w0 = w0 + v0
    x = _rotr(x + y + v0 + f[1], 37) * mul
    y = _rotr(y + v1 + f[6], 42) * mul
    x = x ^ (w1 * 9)
    y = y + v0 * 9 + f[5]
    z = _rotr(z + w0, 33) * mul
    v0, v1 = _weak_hash_len32_with_seeds(*f[:4], v1 * mul, x + w0)
    w0, w1 = _weak_hash_len32_with_seeds(*f[4:], z + w1, y + f[2])
    x, z = z, x
    return _hash_len16(
        _hash_len16(v0, w0, mul) + _shift_mix(y) * _K0 + z, _hash_len16(v1, w1, mul) + x, mul
    )


_FARM_CLASSES = (
    _farm_len0,
    _farm_len1to3,
    _farm_len4to7,
    _farm_len8to16,
    _farm_len17to32,
    _farm_len33to64,
    _farm_len65plus,
)
# Class of each length 0..64, and of 65 (= every longer length): a table lookup beats bucketize.
_FARM_CLASS_OF_LENGTH = torch.tensor([0] + [1] * 3 + [2] * 4 + [3] * 9 + [4] * 16 + [5] * 32 + [6])


def _farm_bytes(rd: _Bytes, s: Tensor, n: Tensor) -> Tensor:
    cls = torch.index_select(_FARM_CLASS_OF_LENGTH.to(n.device), 0, n.clamp(max=65))
    counts = torch.bincount(cls, minlength=len(_FARM_CLASSES)).tolist()
    out = None
    for c, (fn, count) in enumerate(zip(_FARM_CLASSES, counts)):
        if count == n.numel():
            return fn(rd, s, n)  # one class holds every string: no gather / scatter
        if count:
            idx = (cls == c).nonzero().squeeze(1)
            out = torch.empty_like(s) if out is None else out
            out.index_copy_(0, idx, fn(rd, torch.index_select(s, 0, idx), torch.index_select(n, 0, idx)))
    return torch.empty_like(s) if out is None else out


# ---------------------------------------------------------------------------------------------
# MurmurHash64A, seed 0


def murmur_block(h: Tensor, k: Tensor) -> Tensor:
    k = k * MURMUR_M
    k = k ^ shr(k, 47)
    k = k * MURMUR_M
    return (h ^ k) * MURMUR_M


def murmur_finish(h: Tensor) -> Tensor:
    h = h ^ shr(h, 47)
    h = h * MURMUR_M
    return h ^ shr(h, 47)


def _murmur_bytes(rd: _Bytes, s: Tensor, n: Tensor) -> Tensor:
    def block(h, p):
        return murmur_block(h, rd.fetch64(p)), p + 8

    h, p = _run_rounds(n >> 3, [n * MURMUR_M, s], block)
    tail_len = n & 7
    tail = rd.fetch64(p) & ((1 << (tail_len << 3)) - 1)  # the string's own 0..7 last bytes
    h = torch.where(tail_len != 0, (h ^ tail) * MURMUR_M, h)
    return murmur_finish(h)


# ---------------------------------------------------------------------------------------------
# kernels on whole tensors


# Strings (ids) per step of the CPU kernels: a step's temporaries stay in cache and are reused by
# the allocator instead of page-faulting fresh memory for each of ~100 elementwise ops.
_CPU_STEP = 1 << 17


def hash_bytes_torch(values: Tensor, offsets: Tensor, hash_type: str) -> Tensor:
    hash_strings = _farm_bytes if hash_type == "farm" else _murmur_bytes
    out = torch.empty(offsets.numel() - 1, dtype=torch.int64, device=offsets.device)
    if out.numel() == 0:
        return out
    # Copy only the bytes the strings span (offsets may index a small part of a big buffer).
    first, end = int(offsets[0]), int(offsets[-1])
    rd = _Bytes(values[first:end])
    for a in range(0, out.numel(), _CPU_STEP):
        s = offsets[a : a + _CPU_STEP + 1] - first
        out[a : a + _CPU_STEP] = hash_strings(rd, s[:-1], s[1:] - s[:-1])
    return out


def hash_int64_torch(values: Tensor, hash_type: str) -> Tensor:
    out = torch.empty_like(values, memory_format=torch.contiguous_format)
    flat_in, flat_out = values.reshape(-1), out.view(-1)
    for a in range(0, flat_in.numel(), _CPU_STEP):
        x = flat_in[a : a + _CPU_STEP]
        if hash_type == "farm":
            flat_out[a : a + _CPU_STEP] = _farm_words_len8to16(x, x, 8)
        else:
            flat_out[a : a + _CPU_STEP] = murmur_finish(murmur_block(torch.full_like(x, as_int64(8 * MURMUR_M)), x))
    return out


# ---------------------------------------------------------------------------------------------
# validation (never reads tensor data except CPU offsets)


def _check_hash_type(hash_type: str, arg: str) -> None:
    if hash_type not in HASH_TYPES:
        raise ValueError(f"{arg} must be one of {HASH_TYPES}, got {hash_type!r}")


def _check_bytes_args(values: Tensor, offsets: Tensor, hash_type: str, where: str = "") -> None:
    _check_hash_type(hash_type, f"hash_type{where}")
    if values.dtype != torch.int8:
        raise TypeError(f"values{where} must be int8 bytes, got {values.dtype}")
    if offsets.dtype != torch.int64:
        raise TypeError(f"offsets{where} must be int64, got {offsets.dtype}")
    # Sizes may be unbacked symbols under torch.compile: check what is known, skip the rest.
    if values.dim() != 1 or offsets.dim() != 1 or guard_or_false(offsets.shape[0] < 1):
        raise ValueError(
            f"values{where} must be 1-D and offsets{where} 1-D with N + 1 >= 1 entries, "
            f"got shapes {tuple(values.shape)} and {tuple(offsets.shape)}"
        )
    if values.device != offsets.device:
        raise ValueError(f"values{where} and offsets{where} are on {values.device} and {offsets.device}")
    if offsets.device.type == "cpu" and not _is_fake(offsets) and offsets.numel():
        bad = (offsets[0] < 0) | (offsets[-1] > values.numel())
        if bool(bad) or bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError(
                f"offsets{where} must be non-decreasing and within values{where} "
                f"[0, {values.numel()}]"
            )


def _check_int64_args(values: Tensor, hash_type: str, where: str = "") -> None:
    _check_hash_type(hash_type, f"hash_type{where}")
    if values.dtype != torch.int64:
        raise TypeError(f"values{where} must be int64, got {values.dtype}")


def _check_multi_lengths(**lists: Sequence) -> None:
    lengths = {name: len(x) for name, x in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"one entry per feature is needed in each list, got lengths {lengths}")


def _is_fake(t: Tensor) -> bool:
    return isinstance(t, torch._subclasses.fake_tensor.FakeTensor) or t.device.type == "meta"


# ---------------------------------------------------------------------------------------------
# ops


@torch.library.custom_op("fxrec::hash_bytes", mutates_args=())
def hash_bytes(values: Tensor, offsets: Tensor, hash_type: str) -> Tensor:
    """int64 [N] hash of each string ``values[offsets[i]:offsets[i + 1]]`` (int8 bytes)."""
    _check_bytes_args(values, offsets, hash_type)
    return hash_bytes_torch(values, offsets, hash_type)


@hash_bytes.register_kernel("cuda")
def _(values: Tensor, offsets: Tensor, hash_type: str) -> Tensor:
    _check_bytes_args(values, offsets, hash_type)
    return hash_bytes_triton(values, offsets, hash_type)


@hash_bytes.register_fake
def _(values: Tensor, offsets: Tensor, hash_type: str) -> Tensor:
    _check_bytes_args(values, offsets, hash_type)
    return values.new_empty(offsets.shape[0] - 1, dtype=torch.int64)


@torch.library.custom_op("fxrec::hash_int64", mutates_args=())
def hash_int64(values: Tensor, hash_type: str) -> Tensor:
    """The hash of each int64 id's 8 little-endian bytes, same shape."""
    _check_int64_args(values, hash_type)
    return hash_int64_torch(values, hash_type)


@hash_int64.register_kernel("cuda")
def _(values: Tensor, hash_type: str) -> Tensor:
    _check_int64_args(values, hash_type)
    return hash_int64_triton(values, hash_type)


@hash_int64.register_fake
def _(values: Tensor, hash_type: str) -> Tensor:
    _check_int64_args(values, hash_type)
    return torch.empty_like(values)


def _check_bytes_multi(values: list[Tensor], offsets: list[Tensor], hash_types: list[str]) -> None:
    _check_multi_lengths(values=values, offsets=offsets, hash_types=hash_types)
    for i, (v, o, t) in enumerate(zip(values, offsets, hash_types)):
        _check_bytes_args(v, o, t, where=f"[{i}]")


def _check_int64_multi(values: list[Tensor], hash_types: list[str]) -> None:
    _check_multi_lengths(values=values, hash_types=hash_types)
    for i, (v, t) in enumerate(zip(values, hash_types)):
        _check_int64_args(v, t, where=f"[{i}]")


# infer_schema has no str[]: the list ops spell out their schemas.
# The multi ops are cudagraph_unsafe: their kernels read a table copied from host memory that
# lives only for the call.
@torch.library.custom_op(
    "fxrec::hash_bytes_multi",
    mutates_args=(),
    tags=(torch.Tag.cudagraph_unsafe,),
    schema="(Tensor[] values, Tensor[] offsets, str[] hash_types) -> Tensor[]",
)
def hash_bytes_multi(values: list[Tensor], offsets: list[Tensor], hash_types: list[str]) -> list[Tensor]:
    """``[hash_bytes(v, o, t) for v, o, t in zip(values, offsets, hash_types)]``; one launch on CUDA."""
    _check_bytes_multi(values, offsets, hash_types)
    return [hash_bytes_torch(v, o, t) for v, o, t in zip(values, offsets, hash_types)]


@hash_bytes_multi.register_kernel("cuda")
def _(values: list[Tensor], offsets: list[Tensor], hash_types: list[str]) -> list[Tensor]:
    _check_bytes_multi(values, offsets, hash_types)
    return hash_bytes_multi_triton(values, offsets, hash_types)


@hash_bytes_multi.register_fake
def _(values: list[Tensor], offsets: list[Tensor], hash_types: list[str]) -> list[Tensor]:
    _check_bytes_multi(values, offsets, hash_types)
    return [v.new_empty(o.shape[0] - 1, dtype=torch.int64) for v, o in zip(values, offsets)]


@torch.library.custom_op(
    "fxrec::hash_int64_multi",
    mutates_args=(),
    tags=(torch.Tag.cudagraph_unsafe,),
    schema="(Tensor[] values, str[] hash_types) -> Tensor[]",
)
def hash_int64_multi(values: list[Tensor], hash_types: list[str]) -> list[Tensor]:
    """``[hash_int64(v, t) for v, t in zip(values, hash_types)]``; one launch on CUDA."""
    _check_int64_multi(values, hash_types)
    return [hash_int64_torch(v, t) for v, t in zip(values, hash_types)]


@hash_int64_multi.register_kernel("cuda")
def _(values: list[Tensor], hash_types: list[str]) -> list[Tensor]:
    _check_int64_multi(values, hash_types)
    return hash_int64_multi_triton(values, hash_types)


@hash_int64_multi.register_fake
def _(values: list[Tensor], hash_types: list[str]) -> list[Tensor]:
    _check_int64_multi(values, hash_types)
    return [torch.empty_like(v) for v in values]

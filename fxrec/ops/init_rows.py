"""``fxrec::init_rows``: the initial embedding row of each id, a pure function of (seed, id, column).

``init_rows(ids, dim, seed, kind, params, dtype, seeds=None) -> [*ids.shape, dim]`` of ``dtype``.
``seeds`` (optional int64, ``ids``' shape) gives each id its own seed ``seed + seeds[i]`` (mod
2**64): several tables coalesced into one (``table_coalesce``) initialize their new rows in one
call, each row with its own table's seed, so a row's value is what its table alone would give.
Row ``id``
does not depend on the other ids of the call, their order, duplicates, the device, or ``dim``
beyond its length (the row for ``dim=8`` is the first 8 columns of the row for ``dim=16``): this
is what makes a dynamic table's initial values independent of insertion order and world size
(SPEC §4.4).

``kind`` and ``params``:

- ``"constant"``, ``[value]``;
- ``"uniform"``, ``[a, b]``: uniform on ``[a, b)``, ``a < b``;
- ``"normal"``, ``[mean, std]``, ``std > 0``;
- ``"trunc_normal"``, ``[mean, std, a, b]``: torch's ``nn.init.trunc_normal_(mean, std, a, b)``,
  ``a < b`` ABSOLUTE bounds (RecIS's C++ kernel does this too; its docstring's "in units of std"
  is not what it runs). Sampled by inverse CDF like torch: ``x`` uniform on
  ``(erf((a - mean) / (std √2)), erf((b - mean) / (std √2)))``,
  ``mean + std √2 erfinv(x)``, clamped to ``[a, b]``. ``"normal"`` is the same with ``x`` on
  ``(-1, 1)`` and no clamp.

Random numbers (counter-based, no state): ``key = mix64(uint64(seed) + GAMMA)`` (the row's seed
with ``seeds``), the row state
``state = mix64(uint64(id) ^ key)`` (a bijection of the id, so distinct ids never share a state),
and the word of column ``j`` is ``mix64(state + (j + 1) * GAMMA)``: splitmix64's stream seeded by
the row state (``mix64`` is splitmix64's finalizer, ``GAMMA = 0x9E3779B97F4A7C15``). A word
becomes

- for ``uniform``, ``u = (word >> 40) * 2**-24`` in ``[0, 1)`` (24 bits: every value is exact in
  float32); ``a + (b - a) * u``, capped at the largest float32 below ``b``;
- for the normals, ``u = ((word >> 41) * 2 + 1) * 2**-24`` in ``(0, 1)`` (23 bits, odd multiples
  of ``2**-24``: never 0 or 1, exact in float32, ``1 - u`` exact too), ``x = lo + (hi - lo) * u``.
  The standard normal's tails end at ``|z| ≈ 5.3`` (``u = 2**-24``).

Float math is float32 with +, -, *, correctly rounded division and square root, and no fused
multiply-add; the log (for erfinv) is fxrec's own (fdlibm's reduction and a series), erfinv is
M. Giles' single-precision approximation: the normal value of every ``u`` is within 3e-7
(relative) of float64's ``√2 erfinv(2u - 1)``. Nothing comes from a platform libm, so the CPU
kernel here and the Triton kernel (``fxrec.ops.triton.init_rows``, launched with
``enable_fp_fusion=False``) are bit-identical (checked under Triton's interpreter; on CUDA by the
``gpu`` tests).
Scalar parameters are derived in float64 on the host and rounded once to float32. Results are
computed in float32 and cast to ``dtype`` (a floating dtype).
"""

import math
import struct
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from fxrec.ops.triton.init_rows import CONSTANT, GAUSSIAN, UNIFORM, init_rows_triton
from fxrec.ops.uint64 import GAMMA, as_int64, mix64, shr

__all__ = ["INIT_KINDS", "RowRecipe", "init_rows", "init_rows_torch", "row_recipe"]

INIT_KINDS = {"constant": 1, "uniform": 2, "normal": 2, "trunc_normal": 4}  # kind -> len(params)



def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (±inf stays)."""
    if not math.isfinite(x):
        return x
    rounded = struct.unpack("f", struct.pack("f", x))[0]
    if not math.isfinite(rounded):
        raise ValueError(f"fxrec::init_rows: a parameter derives {x}, out of float32 range")
    return rounded


class RowRecipe(NamedTuple):
    """What both kernels compute from (host-side, derived once per call by ``row_recipe``)."""

    key: int  # int64 bits of mix64(uint64(seed) + GAMMA)
    seed_word: int  # int64 bits of uint64(seed) + GAMMA: a row's key is mix64(seed_word + seeds[i])
    kernel_kind: int  # CONSTANT, UNIFORM or GAUSSIAN
    # Six float32 values. CONSTANT: (value,); UNIFORM: (a, b - a, largest float32 below b);
    # GAUSSIAN: (lo, hi - lo, mean, std √2, clamp low, clamp high). Unused slots are 0.
    p: tuple[float, float, float, float, float, float]


def _check_params(kind: str, params: list[float]) -> None:
    if kind not in INIT_KINDS:
        raise ValueError(f"fxrec::init_rows: kind must be one of {sorted(INIT_KINDS)}, got {kind!r}")
    if len(params) != INIT_KINDS[kind]:
        raise ValueError(
            f"fxrec::init_rows: kind {kind!r} takes {INIT_KINDS[kind]} params, got {list(params)}"
        )
    if not all(math.isfinite(p) for p in params):
        raise ValueError(f"fxrec::init_rows: params must be finite, got {list(params)}")
    if kind in ("normal", "trunc_normal") and not params[1] > 0:
        raise ValueError(f"fxrec::init_rows: std must be > 0, got {params[1]}")
    bounds = params[-2:] if kind in ("uniform", "trunc_normal") else None
    if bounds is not None and not bounds[0] < bounds[1]:
        raise ValueError(f"fxrec::init_rows: bounds need a < b, got a={bounds[0]}, b={bounds[1]}")


def row_recipe(seed: int, kind: str, params: list[float]) -> RowRecipe:
    """The kernel arguments for ``(seed, kind, params)`` (validated here)."""
    _check_params(kind, params)
    seed_word = as_int64(seed + GAMMA)
    key = int(mix64(torch.tensor(seed_word)))
    if kind == "constant":
        return RowRecipe(key, seed_word, CONSTANT, (_f32(params[0]), 0.0, 0.0, 0.0, 0.0, 0.0))
    if kind == "uniform":
        a, b = params
        if not _f32(a) < _f32(b):
            raise ValueError(f"fxrec::init_rows: uniform bounds a={a}, b={b} are equal in float32")
        below_b = float(np.nextafter(np.float32(b), np.float32(-np.inf)))
        return RowRecipe(key, seed_word, UNIFORM, (_f32(a), _f32(b - a), below_b, 0.0, 0.0, 0.0))
    mean, scale = params[0], params[1] * math.sqrt(2)
    if kind == "normal":
        return RowRecipe(key, seed_word, GAUSSIAN, (-1.0, 2.0, _f32(mean), _f32(scale), -math.inf, math.inf))
    a, b = params[2], params[3]
    lo, hi = math.erf((a - mean) / scale), math.erf((b - mean) / scale)
    return RowRecipe(key, seed_word, GAUSSIAN, (_f32(lo), _f32(hi - lo), _f32(mean), _f32(scale), _f32(a), _f32(b)))


# ---------------------------------------------------------------------------------------------
# CPU kernel: uint64 arithmetic in int64 tensors, float32 math without a libm


_TINY = 2.0**-126  # smallest normal float32


def _log(t: Tensor) -> Tensor:
    """Natural log of positive normal float32 values, fdlibm's reduction + atanh series.

    ``t = 2**e * m`` with ``m`` in ``[√½, √2)``; ``f = m - 1`` (exact), ``s = f / (2 + f)``,
    ``log m = 2 atanh(s) = f - (f²/2 - s (f²/2 + R))`` with ``R`` the series in ``z = s²``.
    """
    bits = t.view(torch.int32)
    mant = bits & 0x7FFFFF
    big = mant >= 0x3504F3  # m >= √2 (float32): halve m
    e = ((bits >> 23) - 127 + big.to(torch.int32)).to(torch.float32)
    m = (mant | (0x3F800000 - (big.to(torch.int32) << 23))).view(torch.float32)
    f = m - 1.0
    s = f / (f + 2.0)
    z = s * s
    r = z * (0.6666666865 + z * (0.4000000060 + z * (0.2857142985 + z * (0.2222222239 + z * 0.1818181872))))
    hfsq = 0.5 * f * f
    return e * 0.6931381225585938 - ((hfsq - (s * (hfsq + r) + e * 9.0580006145e-06)) - f)


def _sqrt2_erfinv(x: Tensor, one_minus_x2: Tensor) -> Tensor:
    """``erfinv(x)`` by M. Giles' single-precision approximation (given ``1 - x²``, computed
    where it is accurate); the √2 factor is left to the caller's scale."""
    w = -_log(one_minus_x2)
    wc = w - 2.5
    p = 2.81022636e-08
    for c in (3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087,
              -0.00125372503, -0.00417768164, 0.246640727, 1.50140941):  # fmt: skip
        p = p * wc + c
    # torch's vectorized float32 sqrt is not always correctly rounded; float64's rounded once to
    # float32 is, and so is Triton's sqrt_rn: the two kernels stay bit-identical.
    wt = torch.sqrt(w.double()).float() - 3.0
    q = -0.000200214257
    for c in (0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773,
              -0.0076224613, 0.00943887047, 1.00167406, 2.83297682):  # fmt: skip
        q = q * wt + c
    return torch.where(w < 5.0, p, q) * x


def _rows_chunk(ids: Tensor, seeds: Tensor | None, dim: int, recipe: RowRecipe) -> Tensor:
    key, seed_word, kernel_kind, p = recipe
    if kernel_kind == CONSTANT:
        return torch.full((ids.numel(), dim), p[0], dtype=torch.float32)
    if seeds is not None:
        key = mix64(seeds + seed_word)
    state = mix64(ids ^ key)
    counters = (torch.arange(1, dim + 1, dtype=torch.int64) * as_int64(GAMMA))[None, :]
    word = mix64(state[:, None] + counters)
    p32 = [torch.tensor(v, dtype=torch.float32) for v in p]  # float32 scalars: float32 math
    if kernel_kind == UNIFORM:
        u = shr(word, 40).to(torch.float32) * 2.0**-24
        return torch.minimum(p32[0] + p32[1] * u, p32[2])
    u = (shr(word, 41) * 2 + 1).to(torch.float32) * 2.0**-24
    x = p32[0] + p32[1] * u
    # 1 - x² as (1 - x)(1 + x): one of the factors is exact. Floored at the smallest normal
    # float32: x rounds to ±1 only for a bound >= ~5.3 std out, where the clamp below decides.
    z = _sqrt2_erfinv(x, torch.clamp_min((1.0 - x) * (1.0 + x), _TINY))
    return torch.clamp(p32[2] + p32[3] * z, p32[4], p32[5])


# Rows per CPU chunk: bounds the int64 temporaries to ~2**20 elements each.
_CHUNK_ELEMENTS = 1 << 20


def init_rows_torch(ids: Tensor, dim: int, recipe: RowRecipe, seeds: Tensor | None = None) -> Tensor:
    """The CPU kernel: float32 ``[ids.numel(), dim]`` rows of flat int64 ``ids`` (and per-id
    ``seeds``)."""
    ids = ids.reshape(-1)
    seeds = None if seeds is None else seeds.reshape(-1)
    out = torch.empty((ids.numel(), dim), dtype=torch.float32, device=ids.device)
    step = max(1, _CHUNK_ELEMENTS // dim)
    for start in range(0, ids.numel(), step):
        chunk_seeds = None if seeds is None else seeds[start : start + step]
        out[start : start + step] = _rows_chunk(ids[start : start + step], chunk_seeds, dim, recipe)
    return out


# ---------------------------------------------------------------------------------------------
# the op


def _check_args(ids: Tensor, dim: int, dtype: torch.dtype, seeds: Tensor | None) -> None:
    if ids.dtype != torch.int64:
        raise TypeError(f"fxrec::init_rows: ids must be int64, got {ids.dtype}")
    if seeds is not None:
        if seeds.dtype != torch.int64:
            raise TypeError(f"fxrec::init_rows: seeds must be int64, got {seeds.dtype}")
        if seeds.shape != ids.shape:
            raise ValueError(f"fxrec::init_rows: seeds has shape {tuple(seeds.shape)}, ids {tuple(ids.shape)}: "
                             "they must match")
        if seeds.device != ids.device:
            raise ValueError(f"fxrec::init_rows: seeds are on {seeds.device}, ids on {ids.device}: they must match")
    if dim < 1:
        raise ValueError(f"fxrec::init_rows: dim must be positive, got {dim}")
    if not dtype.is_floating_point:
        raise ValueError(f"fxrec::init_rows: dtype must be a floating dtype, got {dtype}")


@torch.library.custom_op("fxrec::init_rows", mutates_args=())
def init_rows(
    ids: Tensor, dim: int, seed: int, kind: str, params: list[float], dtype: torch.dtype,
    seeds: Tensor | None = None,
) -> Tensor:
    """Initial rows ``[*ids.shape, dim]`` of ``dtype``: row ``i`` is a function of
    ``(seed + seeds[i], ids[i], column)`` only (see the module docstring for kinds, params and the
    RNG)."""
    _check_args(ids, dim, dtype, seeds)
    rows = init_rows_torch(ids, dim, row_recipe(seed, kind, params), seeds)
    return rows.to(dtype).reshape(*ids.shape, dim)


@init_rows.register_kernel("cuda")
def _init_rows_cuda(
    ids: Tensor, dim: int, seed: int, kind: str, params: list[float], dtype: torch.dtype,
    seeds: Tensor | None = None,
) -> Tensor:
    _check_args(ids, dim, dtype, seeds)
    rows = init_rows_triton(ids, dim, row_recipe(seed, kind, params), seeds)
    return rows.to(dtype).reshape(*ids.shape, dim)


@init_rows.register_fake
def _init_rows_fake(
    ids: Tensor, dim: int, seed: int, kind: str, params: list[float], dtype: torch.dtype,
    seeds: Tensor | None = None,
) -> Tensor:
    _check_args(ids, dim, dtype, seeds)
    _check_params(kind, params)
    return ids.new_empty((*ids.shape, dim), dtype=dtype)

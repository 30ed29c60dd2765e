"""``fxrec::init_rows``: initial embedding rows, each a pure function of (seed, id, column),
written in place into the rows of a table.

``init_rows(out, rows, ids, seed, kind, params, seeds=None)`` (mutates ``out [R, dim]``, any
floating dtype): ``out[rows[i]] =`` the initial row of ``ids[i]``, computed in float32 and cast to
``out``'s dtype; rows ``-1`` are skipped (ids a table lookup did not insert); every other row of
``out`` is left untouched. ``rows``, ``ids`` (and ``seeds``) are 1-D int64 of one length. What a
table's insert runs (``TableStorage.lookup``): ONE op for the new rows of a lookup, rows -1 for the
ids already present, so neither a host sync (a boolean index of the new ids) nor a ``[U, dim]``
temporary and a scatter. An opaque op, not ``out[rows] = values``: Inductor (torch 2.11, CUDA)
compiles that ``index_put`` with an unbacked row count into a kernel whose launch grid divides by
zero when no row is new; this op launches nothing for zero rows. ``Initializer.init_rows`` gets plain values by writing into a fresh
tensor with ``rows = arange(n)``. The CPU kernel rejects row numbers outside ``[-1, R)`` and
computes only the rows it writes (none: no work); the CUDA kernel does not sync to check and
skips rows outside ``[0, R)``. A row given twice gets one of its values.

``seeds`` (optional) gives each id its own seed ``seed + seeds[i]`` (mod 2**64): several tables
coalesced into one (``table_coalesce``) initialize their new rows in one call, each row with its
own table's seed, so a row's value is what its table alone would give.
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
Scalar parameters are derived in float64 on the host and rounded once to float32, once per
``(seed, kind, params)`` (``row_recipe`` is cached: a table's inserts reuse it; no tensor work on
the host). Results are computed in float32 and cast to ``out``'s dtype.
"""

import functools
import math
import struct
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from fxrec.ops.triton.init_rows import CONSTANT, GAUSSIAN, UNIFORM, init_rows_triton
from fxrec.ops.uint64 import GAMMA, as_int64, mix64, mix64_int, shr

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
    """The kernel arguments for ``(seed, kind, params)`` (validated here; derived once per distinct
    arguments: cached)."""
    params = tuple(params)
    # the signs too: 0.0 == -0.0, but a constant -0.0 writes other bits than 0.0
    return _row_recipe(seed, kind, params, tuple(math.copysign(1.0, p) for p in params))


@functools.lru_cache(maxsize=1024)
def _row_recipe(seed: int, kind: str, params: tuple[float, ...], signs: tuple[float, ...]) -> RowRecipe:
    _check_params(kind, params)
    seed_word = as_int64(seed + GAMMA)
    key = as_int64(mix64_int(seed_word))
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


@functools.lru_cache(maxsize=1024)
def _float32_scalars(p: tuple[float, ...]) -> tuple[Tensor, ...]:
    """A recipe's parameters as 0-d float32 tensors (float32 math with them), made once."""
    return tuple(torch.tensor(v, dtype=torch.float32) for v in p)


def _rows_chunk(ids: Tensor, seeds: Tensor | None, dim: int, recipe: RowRecipe) -> Tensor:
    key, seed_word, kernel_kind, p = recipe
    if kernel_kind == CONSTANT:
        return torch.full((ids.numel(), dim), p[0], dtype=torch.float32)
    if seeds is not None:
        key = mix64(seeds + seed_word)
    state = mix64(ids ^ key)
    counters = (torch.arange(1, dim + 1, dtype=torch.int64) * as_int64(GAMMA))[None, :]
    word = mix64(state[:, None] + counters)
    p32 = _float32_scalars(p)
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


def _check_args(out: Tensor, rows: Tensor, ids: Tensor, seeds: Tensor | None) -> None:
    """Metadata only (no host sync): shapes, dtypes, devices."""
    if out.dim() != 2 or not out.dtype.is_floating_point:
        raise ValueError(f"fxrec::init_rows: out must be a 2-D [rows, dim] floating tensor, got {out.dtype} "
                         f"of shape {tuple(out.shape)}")
    for name, t in (("rows", rows), ("ids", ids), ("seeds", seeds)):
        if t is None:
            continue
        if t.dtype != torch.int64 or t.dim() != 1:
            raise TypeError(f"fxrec::init_rows: {name} must be a 1-D int64 tensor, got {t.dtype} of shape "
                            f"{tuple(t.shape)}")
        if t.shape != rows.shape:
            raise ValueError(f"fxrec::init_rows: {name} has shape {tuple(t.shape)}, rows {tuple(rows.shape)}: "
                             "they must match")
        if t.device != out.device:
            raise ValueError(f"fxrec::init_rows: {name} is on {t.device}, out on {out.device}: they must match")


@torch.library.custom_op("fxrec::init_rows", mutates_args=("out",))
def init_rows(
    out: Tensor, rows: Tensor, ids: Tensor, seed: int, kind: str, params: list[float], seeds: Tensor | None = None,
) -> None:
    """``out[rows[i]] = `` the initial row of ``ids[i]`` (a function of ``(seed + seeds[i], ids[i],
    column)`` only, cast to ``out``'s dtype), in place; rows -1 are skipped (module docstring)."""
    _check_args(out, rows, ids, seeds)
    recipe = row_recipe(seed, kind, params)
    if rows.numel() == 0:
        return
    low, high = torch.aminmax(rows)
    if low < -1 or high >= out.shape[0]:
        raise ValueError(f"fxrec::init_rows: row numbers must be in [-1, {out.shape[0]}), got [{int(low)}, {int(high)}]")
    new = (rows >= 0).nonzero().squeeze(1)  # CPU: the rows to write, so steps that insert nothing compute nothing
    if new.numel() == 0:
        return
    values = init_rows_torch(ids[new], out.shape[1], recipe, None if seeds is None else seeds[new])
    out.index_copy_(0, rows[new], values.to(out.dtype))


@init_rows.register_kernel("cuda")
def _init_rows_cuda(
    out: Tensor, rows: Tensor, ids: Tensor, seed: int, kind: str, params: list[float], seeds: Tensor | None = None,
) -> None:
    _check_args(out, rows, ids, seeds)
    init_rows_triton(out, rows, ids, row_recipe(seed, kind, params), seeds)


@init_rows.register_fake
def _init_rows_fake(
    out: Tensor, rows: Tensor, ids: Tensor, seed: int, kind: str, params: list[float], seeds: Tensor | None = None,
) -> None:
    _check_args(out, rows, ids, seeds)
    row_recipe(seed, kind, params)

"""Triton kernel for ``fxrec::init_rows``: per-id initial rows, bit-identical to the CPU kernel.

The formulas (RNG words, uniforms, log, erfinv) are documented in ``fxrec.ops.init_rows`` and
spelled here in the same operation order: +, -, *, ``div_rn``, ``sqrt_rn`` only, compiled with
``enable_fp_fusion=False`` (a fused multiply-add rounds once where the CPU rounds twice).

One program fills a ``[BLOCK_R, BLOCK_D]`` tile: ``BLOCK_R`` ids, the columns of their output
rows ``rows[i]`` (-1: skipped, a masked lane); the row states are computed once per id and
broadcast over the columns, and the float32 values are cast to the output's dtype on the store
(round to nearest even, as torch's ``.to``; bfloat16's rounding spelled out in bits, as the
interpreter's cast truncates). The launcher takes validated arguments and a
``RowRecipe`` (key, seed word, kernel kind, six float32 parameters) and optional per-id seeds
(a row's key is then ``mix64(seed_word + seeds[i])``), writes in place through the output's
strides, and works on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""

import triton
import triton.language as tl

from fxrec.ops.triton.uint64 import mix64
from fxrec.ops.uint64 import GAMMA
from torch import Tensor

__all__ = ["CONSTANT", "GAUSSIAN", "UNIFORM", "init_rows_triton"]

# Kernel kinds: normal and trunc_normal share one formula.
CONSTANT, UNIFORM, GAUSSIAN = 0, 1, 2
_UNIFORM = tl.constexpr(UNIFORM)
_GAUSSIAN = tl.constexpr(GAUSSIAN)

_GAMMA = tl.constexpr(GAMMA)

_TILE = 1024  # elements per program


@triton.jit
def _log(t):
    bits = t.to(tl.int32, bitcast=True)
    mant = bits & 0x7FFFFF
    big = (mant >= 0x3504F3).to(tl.int32)
    e = ((bits >> 23) - 127 + big).to(tl.float32)
    m = (mant | (0x3F800000 - (big << 23))).to(tl.float32, bitcast=True)
    f = m - 1.0
    s = tl.div_rn(f, f + 2.0)
    z = s * s
    r = z * (0.6666666865 + z * (0.4000000060 + z * (0.2857142985 + z * (0.2222222239 + z * 0.1818181872))))
    hfsq = 0.5 * f * f
    return e * 0.6931381225585938 - ((hfsq - (s * (hfsq + r) + e * 9.0580006145e-06)) - f)


@triton.jit
def _sqrt2_erfinv(x, one_minus_x2):
    w = -_log(one_minus_x2)
    wc = w - 2.5
    p = 2.81022636e-08 * wc + 3.43273939e-07
    p = p * wc + -3.5233877e-06
    p = p * wc + -4.39150654e-06
    p = p * wc + 0.00021858087
    p = p * wc + -0.00125372503
    p = p * wc + -0.00417768164
    p = p * wc + 0.246640727
    p = p * wc + 1.50140941
    wt = tl.sqrt_rn(w) - 3.0
    q = -0.000200214257 * wt + 0.000100950558
    q = q * wt + 0.00134934322
    q = q * wt + -0.00367342844
    q = q * wt + 0.00573950773
    q = q * wt + -0.0076224613
    q = q * wt + 0.00943887047
    q = q * wt + 1.00167406
    q = q * wt + 2.83297682
    return tl.where(w < 5.0, p, q) * x


@triton.jit
def _init_rows_kernel(
    out_ptr, rows_ptr, ids_ptr, seeds_ptr, n, num_out_rows, dim, out_s0, out_s1, key, seed_word,
    p0, p1, p2, p3, p4, p5,
    KIND: tl.constexpr, HAS_SEEDS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    out_rows = tl.load(rows_ptr + i, mask=i < n, other=-1)
    row_ok = (i < n) & (out_rows >= 0) & (out_rows < num_out_rows)  # -1 (and any other stray row): skipped
    # a program whose ids are all skipped stores nothing: skip its RNG too (a lookup passes every
    # id, with -1 for all but the few new rows: the draws of all ids cost ~0.5 ms of an H200 at 6M ids)
    if tl.max(row_ok.to(tl.int32), axis=0) > 0:
        mask = row_ok[:, None] & (cols < dim)[None, :]
        if KIND == _UNIFORM or KIND == _GAUSSIAN:
            ids = tl.load(ids_ptr + i, mask=row_ok, other=0).to(tl.uint64, bitcast=True)
            # tl.cast (not .to) also takes the constexpr Triton makes of an argument equal to 1.
            if HAS_SEEDS:
                seeds = tl.load(seeds_ptr + i, mask=row_ok, other=0).to(tl.uint64, bitcast=True)
                key64 = mix64(seeds + tl.cast(tl.cast(seed_word, tl.int64), tl.uint64, bitcast=True))
            else:
                key64 = tl.cast(tl.cast(key, tl.int64), tl.uint64, bitcast=True)
            state = mix64(ids ^ key64)
            word = mix64(state[:, None] + (cols + 1).to(tl.uint64)[None, :] * _GAMMA)
            if KIND == _UNIFORM:
                u = (word >> 40).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
                value = tl.minimum(p0 + p1 * u, p2)
            else:
                u = ((word >> 41) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08
                x = p0 + p1 * u
                z = _sqrt2_erfinv(x, tl.maximum((1.0 - x) * (1.0 + x), 1.1754943508222875e-38))
                value = tl.minimum(tl.maximum(p2 + p3 * z, p4), p5)
        else:
            value = tl.full((BLOCK_R, BLOCK_D), 0.0, tl.float32) + p0
        out = out_ptr + out_rows[:, None] * out_s0 + cols[None, :].to(tl.int64) * out_s1
        if out_ptr.dtype.element_ty == tl.bfloat16:
            # round to nearest even by hand (the values are finite): the interpreter's cast truncates
            bits = value.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(out, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(out, value.to(out_ptr.dtype.element_ty), mask=mask)


def init_rows_triton(out: Tensor, rows: Tensor, ids: Tensor, recipe, seeds: Tensor | None = None) -> None:
    """``out[rows[i]] =`` the float32 row of int64 ``ids[i]`` (and per-id int64 ``seeds[i]``) for
    a ``RowRecipe``, cast to ``out``'s dtype, in place, rows outside ``[0, len(out))`` (-1)
    skipped: one launch."""
    n, (num_out_rows, dim) = rows.numel(), out.shape
    if n == 0 or dim == 0:
        return
    rows, ids = rows.contiguous(), ids.contiguous()
    seeds_arg = ids if seeds is None else seeds.contiguous()  # unread without seeds
    block_d = min(triton.next_power_of_2(dim), _TILE)
    block_r = _TILE // block_d
    grid = (triton.cdiv(n, block_r), triton.cdiv(dim, block_d))
    key, seed_word, kernel_kind, p = recipe
    _init_rows_kernel[grid](
        out, rows, ids, seeds_arg, n, num_out_rows, dim, *out.stride(), key, seed_word, *p,
        KIND=kernel_kind, HAS_SEEDS=seeds is not None, BLOCK_R=block_r, BLOCK_D=block_d, enable_fp_fusion=False,
    )

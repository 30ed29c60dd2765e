"""torch.ops.fxrec.init_rows and fxrec.nn.initializers.

The oracle draws the words with a pure-Python splitmix64 and maps them with float64 math
(``torch.special.erfinv`` in float64 for the normals), sharing no code with fxrec. The op writes
rows in place (``out[rows[i]]``, rows -1 skipped); ``init_rows`` below reads plain values through
it (rows ``arange(n)`` of a fresh tensor), and the in-place tests check which rows it writes.
"""

import math
import struct

import pytest
import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxrec  # noqa: F401  (registers torch.ops.fxrec.*)
from fxrec.nn.initializers import (
    ConstantInitializer,
    Initializer,
    KaimingNormalInitializer,
    KaimingUniformInitializer,
    NormalInitializer,
    TruncNormalInitializer,
    UniformInitializer,
    XavierNormalInitializer,
    XavierUniformInitializer,
)
from fxrec.ops.init_rows import init_rows_torch, row_recipe
from fxrec.ops.triton.init_rows import init_rows_triton
from oracles import mix64

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MASK64 = (1 << 64) - 1
# Without CUDA the launcher runs under TRITON_INTERPRET=1 (set by conftest) on CPU tensors.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

ids_st = st.one_of(
    st.sampled_from([INT64_MIN, INT64_MIN + 1, -1, 0, 1, INT64_MAX]), st.integers(INT64_MIN, INT64_MAX)
)
seeds = st.one_of(st.sampled_from([0, 1, -1, INT64_MIN, INT64_MAX]), st.integers(INT64_MIN, INT64_MAX))
SPECS = [
    ("constant", [0.0]),
    ("constant", [-1.5e-3]),
    ("uniform", [0.0, 1.0]),
    ("uniform", [-0.05, 0.05]),
    ("uniform", [3.0, 3.001]),
    ("normal", [0.0, 1.0]),
    ("normal", [0.2, 0.01]),
    ("trunc_normal", [0.0, 1.0, -2.0, 2.0]),
    ("trunc_normal", [0.0, 0.01, -2.0, 2.0]),  # the seed tutorial's: bounds far out, a normal
    ("trunc_normal", [0.3, 1.0, -0.5, 2.0]),
    ("trunc_normal", [0.0, 1.0, 1.5, 1.6]),
    ("trunc_normal", [0.0, 1.0, -9.0, 9.0]),  # bounds beyond the tails float32 reaches
]
specs = st.sampled_from(SPECS)


def tensor(ids, device="cpu"):
    return torch.tensor(ids, dtype=torch.int64, device=device)


def init_rows(ids, dim, seed, kind, params, dtype=torch.float32, seeds=None):
    """The rows ``[*ids.shape, dim]`` of ``ids`` through the op: written at rows ``arange(n)`` of a
    fresh tensor."""
    flat = ids.reshape(-1)
    out = torch.empty(flat.numel(), dim, dtype=dtype, device=ids.device)
    rows = torch.arange(flat.numel(), device=ids.device)
    assert torch.ops.fxrec.init_rows(out, rows, flat, seed, kind, params,
                                     None if seeds is None else seeds.reshape(-1)) is None
    return out.reshape(*ids.shape, dim)


def triton_rows(ids, dim, recipe, seeds=None):
    """``init_rows`` through the Triton launcher (the interpreter on CPU tensors without CUDA)."""
    out = torch.empty(ids.numel(), dim, dtype=torch.float32, device=ids.device)
    init_rows_triton(out, torch.arange(ids.numel(), device=ids.device), ids, recipe, seeds)
    return out


# ---------------------------------------------------------------------------------------------
# oracle


def f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def words(seed, ident, dim):
    gamma = 0x9E3779B97F4A7C15
    state = mix64((ident & MASK64) ^ mix64(seed + gamma))
    return [mix64(state + (j + 1) * gamma) for j in range(dim)]


def oracle_row(seed, ident, dim, kind, params):
    """float64 values; uniform ones are float32-exact (the op's float32 formula, one op at a time)."""
    if kind == "constant":
        return [f32(params[0])] * dim
    out = []
    for w in words(seed, ident, dim):
        if kind == "uniform":
            a, b = params
            u = (w >> 40) / 2**24
            below_b = float(np.nextafter(np.float32(b), np.float32(-np.inf)))  # largest float32 < b
            out.append(min(f32(f32(a) + f32(f32(b - a) * u)), below_b))
            continue
        u = ((w >> 41) * 2 + 1) / 2**24
        mean, std = params[:2]
        if kind == "normal":
            lo, hi, clamp = -1.0, 1.0, (-math.inf, math.inf)
        else:
            a, b = params[2:]
            lo, hi = (math.erf((v - mean) / (std * math.sqrt(2))) for v in (a, b))
            clamp = (a, b)
        x = f32(f32(lo) + f32(f32(hi - lo) * u))  # the op's float32 x: its erfinv input
        z = math.sqrt(2) * torch.special.erfinv(torch.tensor(x, dtype=torch.float64)).item()
        out.append(min(max(mean + std * z, clamp[0]), clamp[1]))
    return out


def assert_close_to_oracle(out, seed, ids, dim, kind, params):
    expect = torch.tensor([oracle_row(seed, i, dim, kind, params) for i in ids], dtype=torch.float64)
    expect = expect.reshape(len(ids), dim)
    if kind in ("constant", "uniform"):
        assert torch.equal(out.double(), expect)
    else:
        # erfinv to ~3e-7 relative, float32 rounding of the scaled result; a clamped value can
        # land on the other side of a bound's rounding, within the same tolerance.
        torch.testing.assert_close(out.double(), expect, rtol=1e-6, atol=2e-6 * params[1])


@given(ids=st.lists(ids_st, max_size=40), seed=seeds, dim=st.integers(1, 9), spec=specs)
def test_matches_oracle(ids, seed, dim, spec):
    kind, params = spec
    out = init_rows(tensor(ids), dim, seed, kind, params)
    assert out.shape == (len(ids), dim) and out.dtype == torch.float32
    assert_close_to_oracle(out, seed, ids, dim, kind, params)


# ---------------------------------------------------------------------------------------------
# per-id determinism


@given(ids=st.lists(ids_st, min_size=1, max_size=60), seed=seeds, spec=specs, data=st.data())
def test_row_depends_only_on_seed_and_id(ids, seed, spec, data):
    kind, params = spec
    batch = ids + ids[:5]  # duplicates
    rows = init_rows(tensor(batch), 7, seed, kind, params)
    perm = data.draw(st.permutations(range(len(batch))))
    shuffled = init_rows(tensor([batch[i] for i in perm]), 7, seed, kind, params)
    assert torch.equal(shuffled, rows[perm])
    for i in {0, len(batch) - 1, data.draw(st.integers(0, len(batch) - 1))}:
        assert torch.equal(init_rows(tensor([batch[i]]), 7, seed, kind, params)[0], rows[i])
    # a narrower table's row is a prefix of a wider one's
    assert torch.equal(init_rows(tensor(batch), 3, seed, kind, params), rows[:, :3])


def test_shapes_and_dtypes():
    ids = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    out = init_rows(ids, 5, 7, "normal", [0.0, 1.0])
    assert out.shape == (3, 4, 5)
    assert torch.equal(out.reshape(12, 5), init_rows(ids.flatten(), 5, 7, "normal", [0.0, 1.0]))
    assert torch.equal(init_rows(ids.t(), 5, 7, "normal", [0.0, 1.0]), out.transpose(0, 1))
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        assert torch.equal(init_rows(ids, 5, 7, "normal", [0.0, 1.0], dtype), out.to(dtype))
    assert init_rows(tensor([]), 4, 0, "uniform", [0.0, 1.0]).shape == (0, 4)
    # more rows than one CPU chunk: chunking must not change rows
    big = torch.arange(-(2**17), 2**17, dtype=torch.int64)
    rows = init_rows(big, 9, 3, "uniform", [0.0, 1.0])
    assert torch.equal(rows[-5:], init_rows(big[-5:], 9, 3, "uniform", [0.0, 1.0]))


@pytest.mark.parametrize("kind, params", [s for s in SPECS if s[0] != "constant"])
def test_seeds_and_ids_differ(kind, params):
    ids = torch.arange(-500, 500, dtype=torch.int64)
    rows = init_rows(ids, 8, 0, kind, params)
    other_seed = init_rows(ids, 8, 1, kind, params)
    assert (rows != other_seed).any(dim=1).all()
    assert torch.unique(rows, dim=0).shape[0] == len(ids)


# ---------------------------------------------------------------------------------------------
# distributions, over 200k sequential ids (a hash's worst case) x 4 columns


N_IDS, DIM = 200_000, 4
SIGMAS = 6  # tolerance in standard errors


def sample(kind, params, seed=12345):
    return init_rows(torch.arange(N_IDS, dtype=torch.int64), DIM, seed, kind, params).double()


def assert_moments(x, mean, std, excess_kurtosis):
    n = x.numel()
    assert abs(x.mean().item() - mean) < SIGMAS * std / math.sqrt(n)
    # standard error of the sample variance: std² √((2 + excess kurtosis) / n)
    se_var = std**2 * math.sqrt((2 + excess_kurtosis) / n)
    assert abs(x.var().item() - std**2) < SIGMAS * se_var


def assert_independent_columns_and_ids(x):
    limit = SIGMAS / math.sqrt(x.shape[0])
    c = torch.corrcoef(torch.stack([x[:, 0], x[:, 1], x[:, 3]]))
    assert c[0, 1].abs() < limit and c[0, 2].abs() < limit
    assert torch.corrcoef(torch.stack([x[:-1, 0], x[1:, 0]]))[0, 1].abs() < limit  # id, id + 1


def assert_cdf(x, cdf, points):
    n = x.numel()
    for t in points:
        p = cdf(t)
        assert abs((x <= t).double().mean().item() - p) < SIGMAS * math.sqrt(p * (1 - p) / n) + 1e-9


def test_constant_exact():
    assert torch.equal(sample("constant", [0.125]), torch.full((N_IDS, DIM), 0.125, dtype=torch.float64))


@pytest.mark.parametrize("a, b", [(0.0, 1.0), (-0.05, 0.05)])
def test_uniform_distribution(a, b):
    x = sample("uniform", [a, b])
    assert x.min() >= f32(a) and x.max() < f32(b)
    assert_moments(x, (a + b) / 2, (b - a) / math.sqrt(12), excess_kurtosis=-1.2)
    assert_cdf(x, lambda t: (t - a) / (b - a), [a + (b - a) * q for q in (0.01, 0.1, 0.25, 0.5, 0.9, 0.99)])
    assert_independent_columns_and_ids(x)


def normal_cdf(t):
    return 0.5 * (1 + math.erf(t / math.sqrt(2)))


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (0.5, 0.01)])
def test_normal_distribution(mean, std):
    x = sample("normal", [mean, std])
    assert_moments(x, mean, std, excess_kurtosis=0.0)
    assert_cdf(x, lambda t: normal_cdf((t - mean) / std), [mean + std * k for k in (-3, -2, -1, 0, 0.5, 2, 3)])
    assert_independent_columns_and_ids(x)


def truncated_moments(alpha, beta):
    """Mean, variance and the CDF of the standard normal truncated to [alpha, beta]."""
    pdf = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    z = normal_cdf(beta) - normal_cdf(alpha)
    mean = (pdf(alpha) - pdf(beta)) / z
    var = 1 + (alpha * pdf(alpha) - beta * pdf(beta)) / z - mean**2
    return mean, var, lambda t: (normal_cdf(min(max(t, alpha), beta)) - normal_cdf(alpha)) / z


@pytest.mark.parametrize("mean, std, a, b", [(0.0, 1.0, -2.0, 2.0), (0.3, 1.0, -0.5, 2.0), (0.0, 0.01, -0.01, 0.02)])
def test_trunc_normal_distribution(mean, std, a, b):
    x = sample("trunc_normal", [mean, std, a, b])
    assert x.min() >= f32(a) and x.max() <= f32(b)
    alpha, beta = (a - mean) / std, (b - mean) / std
    m, var, cdf = truncated_moments(alpha, beta)
    # |excess kurtosis| of a truncated normal is < 1.2 (the uniform limit): bound the SE with it
    assert_moments(x, mean + std * m, std * math.sqrt(var), excess_kurtosis=0.0)
    qs = [alpha + (beta - alpha) * q for q in (0.05, 0.3, 0.5, 0.7, 0.95)]
    assert_cdf(x, lambda t: cdf((t - mean) / std), [mean + std * q for q in qs])
    assert_independent_columns_and_ids(x)


# ---------------------------------------------------------------------------------------------
# the Triton kernel (interpreter on CPU tensors without CUDA): bit-identical to the CPU kernel


@given(ids=st.lists(ids_st, max_size=20), seed=seeds, dim=st.sampled_from([1, 3, 16, 33]), spec=specs)
def test_triton_matches_cpu(ids, seed, dim, spec):
    recipe = row_recipe(seed, *spec)
    expect = init_rows_torch(tensor(ids), dim, recipe)
    out = triton_rows(tensor(ids, TRITON_DEVICE), dim, recipe)
    assert torch.equal(out.cpu(), expect)


def test_triton_matches_cpu_tiles():
    # several row tiles and column tiles (dim > 1024 splits columns)
    ids = torch.arange(-40, 40, dtype=torch.int64) * 0x9E3779B97F4A7C1
    for dim, spec in [(2, SPECS[5]), (1030, SPECS[7]), (1030, SPECS[3])]:
        recipe = row_recipe(99, *spec)
        expect = init_rows_torch(ids[:8] if dim > 1024 else ids, dim, recipe)
        out = triton_rows((ids[:8] if dim > 1024 else ids).to(TRITON_DEVICE), dim, recipe)
        assert torch.equal(out.cpu(), expect)


def test_opcheck():
    def case(ids, rows, n_out, dim, seed, kind, params, dtype, seeds=None):
        out = torch.full((n_out, dim), 7.0, dtype=dtype)
        return (out, tensor(rows), ids, seed, kind, params, seeds)

    cases = [
        case(tensor([0, -1, INT64_MIN, INT64_MAX, 5, 5]), [0, 1, 2, 3, 4, 5], 6, 4, 3, "trunc_normal",
             [0.0, 0.01, -2.0, 2.0], torch.float32),
        case(tensor([1, 2, 3]), [4, -1, 0], 6, 2, -7, "uniform", [-1.0, 1.0], torch.float64),
        case(tensor([1, 2, 3]), [-1, -1, -1], 2, 3, 0, "normal", [0.0, 1.0], torch.float32),
        case(tensor([1, 2]), [1, 0], 2, 3, 0, "normal", [0.0, 1.0], torch.float32, tensor([5, INT64_MIN])),
        case(tensor([]), [], 3, 8, 0, "constant", [0.5], torch.float32),
    ]
    for args in cases:
        torch.library.opcheck(torch.ops.fxrec.init_rows.default, args)


# -- in place: only rows >= 0 are written, each with its id's row --------------------------------


def written(n_out, dim, rows, ids, seed, spec, dtype=torch.float32, device="cpu", seeds=None):
    """``out`` (filled with a marker first) after the op writes ``ids`` at ``rows``."""
    out = torch.full((n_out, dim), -123.0, dtype=dtype, device=device)
    torch.ops.fxrec.init_rows(out, tensor(rows, device), tensor(ids, device), seed, *spec,
                              None if seeds is None else tensor(seeds, device))
    return out


@st.composite
def placements(draw, max_ids=12):
    """``(n_out, rows, ids)``: distinct output rows (or -1) for ids."""
    ids = draw(st.lists(ids_st, max_size=max_ids))
    n_out = draw(st.integers(len(ids), len(ids) + 5))
    slots = draw(st.permutations(range(n_out)))[:len(ids)]
    rows = [r if draw(st.booleans()) else -1 for r in slots]
    return n_out, rows, ids


@given(placed=placements(), seed=seeds, dim=st.integers(1, 6), spec=specs)
def test_in_place_writes_only_the_given_rows(placed, seed, dim, spec):
    n_out, rows, ids = placed
    out = written(n_out, dim, rows, ids, seed, spec)
    targets = {r: i for r, i in zip(rows, ids) if r >= 0}
    for r in range(n_out):
        if r in targets:
            assert_close_to_oracle(out[r:r + 1], seed, [targets[r]], dim, *spec)
        else:
            assert (out[r] == -123.0).all()  # untouched (rows -1 and rows not named)


@given(placed=placements(), seed=seeds, dim=st.sampled_from([1, 3, 16, 33]), spec=specs,
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]), with_seeds=st.booleans())
def test_triton_in_place_matches_cpu(placed, seed, dim, spec, dtype, with_seeds):
    n_out, rows, ids = placed
    row_seeds = [i * 7 + 1 for i in range(len(ids))] if with_seeds else None
    expect = written(n_out, dim, rows, ids, seed, spec, dtype, seeds=row_seeds)
    out = torch.full((n_out, dim), -123.0, dtype=dtype, device=TRITON_DEVICE)
    init_rows_triton(out, tensor(rows, TRITON_DEVICE), tensor(ids, TRITON_DEVICE), row_recipe(seed, *spec),
                     None if row_seeds is None else tensor(row_seeds, TRITON_DEVICE))
    assert torch.equal(out.cpu(), expect)


def test_in_place_strided_out_and_casts():
    ids = tensor([4, -4, 9])
    values = init_rows(ids, 3, 5, "normal", [0.0, 1.0])
    wide = torch.zeros(4, 6, dtype=torch.float64)
    torch.ops.fxrec.init_rows(wide[:, 1:4], tensor([3, -1, 0]), ids, 5, "normal", [0.0, 1.0])
    assert torch.equal(wide[3, 1:4], values[0].double()) and torch.equal(wide[0, 1:4], values[2].double())
    assert (wide[1:3] == 0).all() and (wide[:, [0, 4, 5]] == 0).all()
    out = torch.zeros(3, 3, dtype=torch.float64, device=TRITON_DEVICE)
    init_rows_triton(out[:, :3], tensor([3, -1, 0], TRITON_DEVICE)[[0, 2]], ids.to(TRITON_DEVICE)[[0, 2]],
                     row_recipe(5, "normal", [0.0, 1.0]))  # row 3 is out of range: skipped
    assert torch.equal(out[0].cpu(), values[2].double()) and (out[1:] == 0).all()


def test_in_place_rejects_rows_out_of_range():
    out = torch.zeros(3, 2)
    for bad in ([3], [-2]):
        with pytest.raises(ValueError, match=r"row numbers must be in \[-1, 3\)"):
            torch.ops.fxrec.init_rows(out, tensor(bad), tensor([1]), 0, "normal", [0.0, 1.0])
    assert (out == 0).all()
    with pytest.raises(ValueError, match="rows"):
        torch.ops.fxrec.init_rows(out, tensor([0, 1]), tensor([1]), 0, "normal", [0.0, 1.0])
    with pytest.raises(TypeError, match="rows must be a 1-D int64"):
        torch.ops.fxrec.init_rows(out, tensor([0]).int(), tensor([1]), 0, "normal", [0.0, 1.0])


def test_recipe_is_derived_once_and_keeps_the_sign_of_zero():
    assert row_recipe(3, "normal", [0.0, 1.0]) is row_recipe(3, "normal", (0.0, 1.0))
    assert row_recipe(3, "constant", [-0.0]).p[0] == 0.0
    assert math.copysign(1.0, row_recipe(3, "constant", [-0.0]).p[0]) == -1.0
    assert math.copysign(1.0, row_recipe(3, "constant", [0.0]).p[0]) == 1.0


# -- per-id seeds (coalesced tables): each row as its own table's seed gives it --------------------


def wrap64(x: int) -> int:
    x %= 1 << 64
    return x - (1 << 64) if x >> 63 else x


@given(rows=st.lists(st.tuples(ids_st, seeds), max_size=12), seed=seeds, dim=st.sampled_from([1, 3, 16]), spec=specs)
def test_per_id_seeds_equal_per_table_calls(rows, seed, dim, spec):
    ids, row_seeds = tensor([i for i, _ in rows]), tensor([s for _, s in rows])
    got = init_rows(ids, dim, seed, *spec, seeds=row_seeds)
    for k, (i, s) in enumerate(rows):
        assert torch.equal(got[k], init_rows(tensor([i]), dim, wrap64(seed + s), *spec)[0])
    triton = triton_rows(ids.to(TRITON_DEVICE), dim, row_recipe(seed, *spec), row_seeds.to(TRITON_DEVICE))
    assert torch.equal(triton.cpu(), got)


def test_per_id_seeds_initializer_and_validation():
    init = NormalInitializer(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    ids = tensor([5, 5, -9])
    got = init.init_rows(ids, 4, 0, seeds=tensor([11, -2, 11]))
    for k, s in enumerate([11, -2, 11]):
        assert torch.equal(got[k], init.init_rows(ids[k:k + 1], 4, s)[0])
    out, rows = torch.zeros(3, 4), tensor([0, 1, 2])
    with pytest.raises(TypeError, match="seeds must be a 1-D int64"):
        torch.ops.fxrec.init_rows(out, rows, ids, 0, "normal", [0.0, 1.0], ids.int())
    with pytest.raises(ValueError, match=r"seeds has shape \(2,\)"):
        torch.ops.fxrec.init_rows(out, rows, ids, 0, "normal", [0.0, 1.0], ids[:2])
    with pytest.raises(ValueError, match=r"seeds has shape \(2,\)"):
        init.init_rows(ids, 4, 0, seeds=ids[:2])


@pytest.mark.gpu
@given(rows=st.lists(st.tuples(ids_st, seeds), max_size=300), seed=seeds, dim=st.integers(1, 70), spec=specs)
def test_cuda_per_id_seeds_match_cpu(rows, seed, dim, spec):
    ids, row_seeds = tensor([i for i, _ in rows]), tensor([s for _, s in rows])
    cpu = init_rows(ids, dim, seed, *spec, seeds=row_seeds)
    cuda = init_rows(ids.cuda(), dim, seed, *spec, seeds=row_seeds.cuda())
    assert torch.equal(cuda.cpu(), cpu)


@pytest.mark.gpu
@given(placed=placements(max_ids=300), seed=seeds, dim=st.integers(1, 70), spec=specs,
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
def test_cuda_in_place_matches_cpu(placed, seed, dim, spec, dtype):
    n_out, rows, ids = placed
    cpu = written(n_out, dim, rows, ids, seed, spec, dtype)
    assert torch.equal(written(n_out, dim, rows, ids, seed, spec, dtype, "cuda").cpu(), cpu)


@pytest.mark.gpu
@given(ids=st.lists(ids_st, max_size=300), seed=seeds, dim=st.integers(1, 70), spec=specs)
def test_cuda_matches_cpu(ids, seed, dim, spec):
    cpu = init_rows(tensor(ids), dim, seed, *spec)
    assert torch.equal(init_rows(tensor(ids, "cuda"), dim, seed, *spec).cpu(), cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("kind, params", SPECS)
def test_cuda_matches_cpu_large(kind, params):
    ids = torch.randint(INT64_MIN, INT64_MAX, (1_000_000,), dtype=torch.int64)
    cpu = init_rows(ids, 16, 2024, kind, params)
    assert torch.equal(init_rows(ids.cuda(), 16, 2024, kind, params).cpu(), cpu)


# ---------------------------------------------------------------------------------------------
# argument errors


@pytest.mark.parametrize(
    "kind, params",
    [
        ("gaussian", [0.0, 1.0]),
        ("normal", [0.0]),
        ("normal", [0.0, 0.0]),
        ("normal", [0.0, -1.0]),
        ("uniform", [1.0, 1.0]),
        ("uniform", [2.0, 1.0]),
        ("trunc_normal", [0.0, 1.0, 2.0, -2.0]),
        ("trunc_normal", [0.0, 0.0, -2.0, 2.0]),
        ("constant", [math.nan]),
        ("uniform", [0.0, math.inf]),
        ("uniform", [1.0, 1.0 + 1e-12]),  # equal in float32
        ("uniform", [-3e38, 3e38]),  # b - a overflows float32
        ("constant", [1e39]),
    ],
)
def test_op_rejects_bad_params(kind, params):
    with pytest.raises(ValueError):
        init_rows(tensor([1]), 4, 0, kind, params)


def test_op_rejects_bad_args():
    with pytest.raises(TypeError, match="int64"):
        init_rows(torch.tensor([1], dtype=torch.int32), 4, 0, "normal", [0.0, 1.0])
    with pytest.raises(ValueError, match="floating"):
        init_rows(tensor([1]), 4, 0, "normal", [0.0, 1.0], torch.int64)
    with pytest.raises(ValueError, match="2-D"):
        torch.ops.fxrec.init_rows(torch.zeros(4), tensor([0]), tensor([1]), 0, "normal", [0.0, 1.0])


# ---------------------------------------------------------------------------------------------
# fxrec.nn.initializers


def test_recis_defaults_and_kinds():
    assert ConstantInitializer() == ConstantInitializer(init_val=0.0)
    assert UniformInitializer().row_spec(8) == ("uniform", [0.0, 1.0])
    assert NormalInitializer().row_spec(8) == ("normal", [0.0, 1.0])
    assert TruncNormalInitializer().row_spec(8) == ("trunc_normal", [0.0, 1.0, -2.0, 2.0])
    assert TruncNormalInitializer(mean=0, std=0.01).row_spec(8) == ("trunc_normal", [0.0, 0.01, -2.0, 2.0])
    kinds = {
        ConstantInitializer(0.1): "constant",
        UniformInitializer(): "uniform",
        NormalInitializer(): "normal",
        TruncNormalInitializer(): "trunc_normal",
        XavierUniformInitializer(): "uniform",
        XavierNormalInitializer(): "normal",
        KaimingUniformInitializer(): "uniform",
        KaimingNormalInitializer(): "normal",
    }
    for init, kind in kinds.items():
        assert isinstance(init, Initializer) and init.kind == kind


def test_equality_by_class_and_params():
    assert TruncNormalInitializer(mean=0, std=0.01) == TruncNormalInitializer(0.0, 0.01, -2.0, 2.0)
    assert hash(TruncNormalInitializer(mean=0, std=0.01)) == hash(TruncNormalInitializer(0.0, 0.01))
    assert TruncNormalInitializer(std=0.01) != TruncNormalInitializer(std=0.02)
    assert TruncNormalInitializer() != NormalInitializer()
    assert XavierUniformInitializer() != XavierNormalInitializer()
    assert KaimingUniformInitializer(mode="FAN_OUT") == KaimingUniformInitializer(mode="fan_out")
    assert KaimingUniformInitializer(nonlinearity="liner") == KaimingUniformInitializer(nonlinearity="linear")
    assert ConstantInitializer(0.0) != 0.0
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    assert UniformInitializer(generator=g1) == UniformInitializer(generator=torch.Generator().manual_seed(1))
    assert UniformInitializer(generator=g1) != UniformInitializer(generator=g2)
    assert UniformInitializer(generator=g1) != UniformInitializer()
    assert "std=0.01" in repr(TruncNormalInitializer(std=0.01))


def test_init_rows_goes_through_the_op():
    ids = tensor([3, -3, INT64_MAX])
    init = TruncNormalInitializer(mean=0.1, std=0.02, a=0.05, b=0.2)
    rows = init.init_rows(ids, 6, seed=11, dtype=torch.float64)
    assert torch.equal(rows, init_rows(ids, 6, 11, "trunc_normal", [0.1, 0.02, 0.05, 0.2], torch.float64))
    assert torch.equal(ConstantInitializer(0.5).init_rows(ids, 2, 0), torch.full((3, 2), 0.5))
    # a seeded generator changes the rows, deterministically
    seeded = lambda s: NormalInitializer(generator=torch.Generator().manual_seed(s)).init_rows(ids, 4, 11)  # noqa: E731
    assert torch.equal(seeded(5), seeded(5))
    assert not torch.equal(seeded(5), NormalInitializer().init_rows(ids, 4, 11))
    assert not torch.equal(seeded(5), seeded(6))


@pytest.mark.parametrize("dim, block_size", [(8, 10240), (64, 100)])
def test_fans_follow_torch_on_a_block(dim, block_size):
    # RecIS applies torch.nn.init to a [block_size, dim] block: fan_in = dim, fan_out = block_size.
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(block_size, dim))
    xavier_std = 1.5 * math.sqrt(2.0 / (fan_in + fan_out))
    kind, (lo, hi) = XavierUniformInitializer(gain=1.5).row_spec(dim, block_size)
    assert kind == "uniform" and math.isclose(hi, math.sqrt(3) * xavier_std) and lo == -hi
    assert XavierNormalInitializer(gain=1.5).row_spec(dim, block_size) == ("normal", [0.0, xavier_std])
    gain = torch.nn.init.calculate_gain("leaky_relu", 0.1)
    for mode, fan in (("fan_in", fan_in), ("fan_out", fan_out)):
        kind, (lo, hi) = KaimingUniformInitializer(a=0.1, mode=mode).row_spec(dim, block_size)
        assert kind == "uniform" and math.isclose(hi, math.sqrt(3) * gain / math.sqrt(fan)) and lo == -hi
        _, (mean, std) = KaimingNormalInitializer(a=0.1, mode=mode).row_spec(dim, block_size)
        assert mean == 0.0 and math.isclose(std, gain / math.sqrt(fan))
    relu = KaimingNormalInitializer(nonlinearity="relu").init_rows(torch.arange(50_000), dim, 0, block_size)
    assert abs(relu.std().item() / math.sqrt(2.0 / dim) - 1) < 0.02


@pytest.mark.parametrize(
    "make",
    [
        lambda: NormalInitializer(std=0.0),
        lambda: NormalInitializer(std=-1.0),
        lambda: TruncNormalInitializer(std=0.0),
        lambda: TruncNormalInitializer(a=2.0, b=-2.0),
        lambda: TruncNormalInitializer(a=1.0, b=1.0),
        lambda: UniformInitializer(a=1.0, b=0.0),
        lambda: UniformInitializer(a=0.0, b=math.nan),
        lambda: ConstantInitializer(math.inf),
        lambda: XavierUniformInitializer(gain=0.0),
        lambda: KaimingUniformInitializer(mode="fan_avg"),
        lambda: KaimingNormalInitializer(nonlinearity="gelu"),
    ],
)
def test_initializer_rejects_bad_params(make):
    with pytest.raises(ValueError):
        make()


def test_initializer_rejects_bad_dims():
    with pytest.raises(ValueError, match="dim"):
        NormalInitializer().init_rows(tensor([1]), 0, 0)
    with pytest.raises(ValueError, match="dim"):
        NormalInitializer().init_rows(tensor([1]), -1, 0)
    with pytest.raises(ValueError, match="dtype"):
        NormalInitializer().init_rows(tensor([1]), 4, 0, dtype=torch.int64)
    with pytest.raises(ValueError, match="block_size"):
        XavierNormalInitializer().init_rows(tensor([1]), 4, 0, block_size=0)

"""torch.ops.fxrec.bucketize / bucketize_multi against ``bisect.bisect_right`` in pure Python."""

import bisect
import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import fxrec  # noqa: F401  (registers torch.ops.fxrec.*)
from fxrec.ops.triton.bucketize import bucketize_multi_triton, bucketize_triton

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INF, NAN = math.inf, math.nan
FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Without CUDA the launchers run under TRITON_INTERPRET=1 (set by conftest) on CPU tensors.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def interpretable(values: torch.Tensor) -> bool:
    """Triton's interpreter reads bfloat16 subnormals as 0 (a GPU does not): skip those there."""
    if TRITON_DEVICE == "cuda" or values.dtype != torch.bfloat16:
        return True
    magnitude = values.float().abs()
    return not bool(((magnitude > 0) & (magnitude < torch.finfo(torch.bfloat16).tiny)).any())


def oracle(values: list, boundaries: list[float]) -> list[int]:
    """#{b <= v}, comparing in float64 (Python's float() of an int rounds to nearest even)."""
    return [len(boundaries) if math.isnan(v) else bisect.bisect_right(boundaries, float(v)) for v in values]


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def neighbours(x: float) -> list[float]:
    return [math.nextafter(x, -INF), x, math.nextafter(x, INF)]


boundary_lists = st.lists(
    st.floats(allow_nan=False, allow_infinity=True, width=64), unique=True, max_size=70
).map(sorted)


@st.composite
def bucketize_case(draw, max_size=1100):
    """(values tensor, boundaries list): values on, next to and between the boundaries."""
    boundaries = draw(boundary_lists)
    dtype = draw(st.sampled_from(FLOAT_DTYPES + [torch.int64]))
    if dtype == torch.int64:
        special = [INT64_MIN, -1, 0, 1, INT64_MAX, 2**53, 2**53 + 1, -(2**53) - 1]
        special += [int(b) for b in boundaries if math.isfinite(b) and abs(b) < 2**63]
        element = st.one_of(st.sampled_from(special), st.integers(INT64_MIN, INT64_MAX))
    else:
        special = [NAN, INF, -INF, 0.0, -0.0] + [x for b in boundaries for x in neighbours(b)]
        element = st.one_of(st.sampled_from(special), st.floats(width=64))
    values = draw(st.lists(element, max_size=max_size))
    # Casting to a narrow float rounds (and may overflow to inf); the oracle reads the rounded
    # values back, so it sees exactly what the op sees.
    exact = torch.int64 if dtype == torch.int64 else torch.float64
    return torch.tensor(values, dtype=exact).to(dtype), boundaries


def check(values: torch.Tensor, boundaries: list[float], out: torch.Tensor) -> None:
    assert out.dtype == torch.int64 and out.shape == values.shape
    assert out.flatten().tolist() == oracle(values.flatten().tolist(), boundaries)


def test_spec_examples():
    # SPEC 3.3: equal to a boundary -> upper bucket; NaN -> len(boundaries); +-inf at the ends.
    out = torch.ops.fxrec.bucketize(f64([-INF, -1, 0, 0.25, 0.5, 1, 2, INF, NAN]), f64([0, 0.5, 1]))
    assert out.tolist() == [0, 0, 1, 1, 2, 3, 3, 3, 3]


@given(case=bucketize_case())
def test_matches_oracle(case):
    values, boundaries = case
    check(values, boundaries, torch.ops.fxrec.bucketize(values, f64(boundaries)))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_float_values_near_boundaries(dtype):
    boundaries = [0.0, 0.1, 0.5, 1.0]  # 0.1 is not a float32: float32(0.1) > 0.1 in float64
    values = [x for b in boundaries for x in neighbours(b)] + [0.1, -0.0, NAN, INF, -INF] * 10
    x = f64(values).to(dtype)
    check(x, boundaries, torch.ops.fxrec.bucketize(x, f64(boundaries)))
    f32 = torch.tensor([0.5, 0.1], dtype=torch.float32)
    below = torch.nextafter(f32, torch.tensor(-INF))
    above = torch.nextafter(f32, torch.tensor(INF))
    x = torch.stack([below, f32, above], dim=1).flatten()
    assert torch.ops.fxrec.bucketize(x, f64(boundaries)).tolist() == [2, 3, 3, 1, 2, 2]


def test_int64_beyond_2_pow_53():
    # int64 values compare as their float64 rounding: 2**53 + 1 rounds to 2**53.
    x = torch.tensor([2**53 - 1, 2**53, 2**53 + 1, 2**53 + 2, INT64_MAX, INT64_MIN], dtype=torch.int64)
    out = torch.ops.fxrec.bucketize(x, f64([-(2.0**63), 2.0**53, 2.0**53 + 2, 2.0**63]))
    assert out.tolist() == [1, 2, 2, 3, 4, 1]


@given(rows=st.integers(0, 4), cols=st.integers(0, 4), data=st.data())
def test_2d_keeps_shape(rows, cols, data):
    boundaries = data.draw(boundary_lists)
    values = data.draw(st.lists(st.floats(width=32), min_size=rows * cols, max_size=rows * cols))
    x = torch.tensor(values, dtype=torch.float32).reshape(rows, cols)
    out = torch.ops.fxrec.bucketize(x, f64(boundaries))
    check(x, boundaries, out)
    assert torch.equal(torch.ops.fxrec.bucketize(x.t(), f64(boundaries)), out.t())


def test_empty():
    assert torch.ops.fxrec.bucketize(torch.empty(0, 3), f64([1.0])).shape == (0, 3)
    assert torch.ops.fxrec.bucketize(f64([NAN, INF, -1.0]), f64([])).tolist() == [0, 0, 0]


def test_does_not_write_input():
    x = f64([NAN, 0.5, 2.0])
    before = x.clone()
    torch.ops.fxrec.bucketize(x, f64([0.5]))
    torch.ops.fxrec.bucketize_multi([x], [f64([0.5])])
    torch.testing.assert_close(x, before, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool])
def test_rejects_value_dtype(dtype):
    with pytest.raises(TypeError, match="values"):
        torch.ops.fxrec.bucketize(torch.zeros(3, dtype=dtype), f64([1.0]))


@pytest.mark.parametrize(
    "boundaries, error, match",
    [
        (torch.tensor([0.0, 1.0]), TypeError, "float64"),
        (f64([[0.0, 1.0]]), ValueError, "1-D"),
        (f64([0.0, 0.0]), ValueError, "strictly increasing"),
        (f64([1.0, 0.0]), ValueError, "strictly increasing"),
        (f64([NAN]), ValueError, "strictly increasing"),
    ],
)
def test_rejects_boundaries(boundaries, error, match):
    with pytest.raises(error, match=match):
        torch.ops.fxrec.bucketize(f64([0.5]), boundaries)
    with pytest.raises(error, match=r"boundaries\[1\]"):
        torch.ops.fxrec.bucketize_multi([f64([0.5]), f64([0.5])], [f64([0.0]), boundaries])


def test_multi_rejects_length_mismatch():
    with pytest.raises(ValueError, match="boundaries"):
        torch.ops.fxrec.bucketize_multi([f64([0.5]), f64([1.5])], [f64([1.0])])


@given(cases=st.lists(bucketize_case(max_size=300), max_size=6))
def test_multi_equals_singles(cases):
    values = [v for v, _ in cases]
    boundaries = [f64(b) for _, b in cases]
    outs = torch.ops.fxrec.bucketize_multi(values, boundaries)
    assert len(outs) == len(values)
    for out, v, b in zip(outs, values, boundaries):
        assert torch.equal(out, torch.ops.fxrec.bucketize(v, b))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.int64])
def test_opcheck(dtype):
    boundaries = f64([-1.0, 0.0, 0.5, 3.0])
    x = torch.tensor([[-2.0, 0.0, 0.5], [1.0, 3.0, 4.0]]).to(dtype)
    torch.library.opcheck(torch.ops.fxrec.bucketize, (x, boundaries))
    torch.library.opcheck(torch.ops.fxrec.bucketize, (x[:0], boundaries))
    multi_args = ([x, x[0], x[:0]], [boundaries, f64([]), boundaries])
    torch.library.opcheck(torch.ops.fxrec.bucketize_multi, multi_args)


@given(case=bucketize_case())
def test_triton_matches_cpu(case):
    values, boundaries = case
    assume(interpretable(values))
    expected = torch.ops.fxrec.bucketize(values, f64(boundaries))
    got = bucketize_triton(values.to(TRITON_DEVICE), f64(boundaries).to(TRITON_DEVICE))
    assert torch.equal(got.cpu(), expected)


@given(cases=st.lists(bucketize_case(max_size=1100), max_size=4))
def test_triton_multi_matches_cpu(cases):
    assume(all(interpretable(v) for v, _ in cases))
    got = bucketize_multi_triton(
        [v.to(TRITON_DEVICE) for v, _ in cases], [f64(b).to(TRITON_DEVICE) for _, b in cases]
    )
    for out, (v, b) in zip(got, cases):
        assert torch.equal(out.cpu(), torch.ops.fxrec.bucketize(v, f64(b)))


def test_triton_2d_long_and_empty():
    boundaries = f64(torch.linspace(-3, 3, 101).tolist()).to(TRITON_DEVICE)
    x = torch.randn(3, 1500, generator=torch.Generator().manual_seed(0))
    x[0, :4] = torch.tensor([NAN, INF, -INF, 0.0])
    out = bucketize_triton(x.to(TRITON_DEVICE), boundaries)
    assert torch.equal(out.cpu(), torch.ops.fxrec.bucketize(x, boundaries.cpu()))
    assert bucketize_triton(x[:, :0].to(TRITON_DEVICE), boundaries).shape == (3, 0)
    assert bucketize_triton(x.t().to(TRITON_DEVICE), boundaries[:0]).cpu().eq(0).all()


@pytest.mark.slow
def test_compile_cpu():
    # triton_op on CPU decomposes into torch ops Inductor compiles; bucketize_multi stays opaque.
    def fn(x, ids, boundaries):
        return (
            torch.ops.fxrec.bucketize(x * 2, boundaries),
            torch.ops.fxrec.mod(ids, 10000),
            torch.ops.fxrec.bucketize_multi([x, ids], [boundaries, boundaries[1:]]),
        )

    compiled = torch.compile(fn, fullgraph=True)
    boundaries = f64([-1.0, 0.0, 0.5, 1.0])
    for n in (1000, 37):
        x = torch.randn(n)
        x[:4] = torch.tensor([NAN, INF, 0.25, 0.5])
        ids = torch.randint(-5, 5, (n,))
        expected = fn(x, ids, boundaries)
        torch.testing.assert_close(compiled(x, ids, boundaries), expected, rtol=0, atol=0, equal_nan=True)


# --- CUDA ------------------------------------------------------------------------------------


@pytest.mark.gpu
@given(case=bucketize_case(max_size=3000))
def test_cuda_matches_cpu(case):
    values, boundaries = case
    b = f64(boundaries)
    expected = torch.ops.fxrec.bucketize(values, b)
    assert torch.equal(torch.ops.fxrec.bucketize(values.cuda(), b.cuda()).cpu(), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.int64])
def test_cuda_large(dtype):
    gen = torch.Generator().manual_seed(1)
    boundaries = torch.sort(torch.randn(1000, generator=gen, dtype=torch.float64) * 3).values.unique()
    if dtype == torch.int64:
        x = torch.randint(-4, 5, (1009 * 993,), generator=gen)
        boundaries = torch.arange(-3, 4, dtype=torch.float64)
    else:
        x = (torch.randn(1009 * 993, generator=gen, dtype=torch.float64) * 4).to(dtype)
        x[:1000] = boundaries.to(dtype)  # values equal to (rounded) boundaries
        x[1000:1003] = torch.tensor([NAN, INF, -INF])
    x = x.reshape(1009, 993)
    expected = torch.ops.fxrec.bucketize(x, boundaries)
    assert torch.equal(torch.ops.fxrec.bucketize(x.cuda(), boundaries.cuda()).cpu(), expected)


@pytest.mark.gpu
@given(cases=st.lists(bucketize_case(max_size=3000), max_size=8))
def test_cuda_multi_equals_singles(cases):
    values = [v.cuda() for v, _ in cases]
    boundaries = [f64(b).cuda() for _, b in cases]
    for out, v, b in zip(torch.ops.fxrec.bucketize_multi(values, boundaries), values, boundaries):
        assert torch.equal(out, torch.ops.fxrec.bucketize(v, b))
        assert torch.equal(out.cpu(), torch.ops.fxrec.bucketize(v.cpu(), b.cpu()))


@pytest.mark.gpu
def test_cuda_opcheck_and_compile():
    boundaries = f64([-1.0, 0.0, 0.5, 3.0]).cuda()
    x = torch.tensor([[-2.0, 0.0, 0.5], [1.0, 3.0, NAN]], device="cuda")
    torch.library.opcheck(torch.ops.fxrec.bucketize, (x, boundaries))
    torch.library.opcheck(torch.ops.fxrec.bucketize_multi, ([x, x.double()], [boundaries, boundaries[:2]]))

    def fn(x, boundaries):
        return torch.ops.fxrec.bucketize(x * 2, boundaries), torch.ops.fxrec.bucketize_multi([x], [boundaries])

    y = torch.randn(100_000, device="cuda")
    y[:3] = torch.tensor([NAN, INF, 0.25])
    expected = fn(y, boundaries)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(y, boundaries), expected, rtol=0, atol=0)

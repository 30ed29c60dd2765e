"""torch.ops.fxrec.mod / mod_multi against a pure-Python uint64 oracle."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxrec  # noqa: F401  (registers torch.ops.fxrec.*)
from fxrec.ops.triton.mod import mod_multi_triton, mod_triton

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Without CUDA the launchers run under TRITON_INTERPRET=1 (set by conftest) on CPU tensors.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

ids = st.one_of(
    st.sampled_from([INT64_MIN, INT64_MIN + 1, -1, 0, 1, INT64_MAX]), st.integers(INT64_MIN, INT64_MAX)
)
SPECIAL_MODS = [1, 2, 3, 10000, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32, 2**32 + 1]
SPECIAL_MODS += [2**62 + 7, 2**63 - 1]
mod_values = st.one_of(st.sampled_from(SPECIAL_MODS), st.integers(1, INT64_MAX))


def oracle(values: list[int], mod_value: int) -> list[int]:
    """uint64 remainder (always < mod_value <= INT64_MAX, so it reads back as int64 unchanged)."""
    return [(x % 2**64) % mod_value for x in values]


def as_tensor(values: list[int], device="cpu") -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def test_pinned_values():
    # SPEC 3.2: -1 % 10000 = 1615 (2**64 - 1 = 1615 mod 10000).
    assert torch.ops.fxrec.mod(as_tensor([-1]), 10000).tolist() == [1615]


@given(values=st.lists(ids, max_size=1100), mod_value=mod_values)
def test_matches_oracle(values, mod_value):
    out = torch.ops.fxrec.mod(as_tensor(values), mod_value)
    assert out.dtype == torch.int64
    assert out.tolist() == oracle(values, mod_value)


@pytest.mark.parametrize("mod_value", SPECIAL_MODS)
def test_extremes_every_mod(mod_value):
    values = [INT64_MIN, INT64_MIN + 1, -2, -1, 0, 1, mod_value - 1, mod_value, INT64_MAX - 1, INT64_MAX]
    values = values * 5  # > 32 elements: the vectorized CPU loop, not only its tail
    assert torch.ops.fxrec.mod(as_tensor(values), mod_value).tolist() == oracle(values, mod_value)


@given(rows=st.integers(0, 5), cols=st.integers(0, 5), data=st.data(), mod_value=mod_values)
def test_2d_keeps_shape(rows, cols, data, mod_value):
    values = data.draw(st.lists(ids, min_size=rows * cols, max_size=rows * cols))
    x = as_tensor(values).reshape(rows, cols)
    out = torch.ops.fxrec.mod(x, mod_value)
    assert out.shape == (rows, cols)
    assert out.flatten().tolist() == oracle(values, mod_value)
    # a non-contiguous view of the same ids
    assert torch.ops.fxrec.mod(x.t(), mod_value).tolist() == out.t().tolist()


def test_does_not_write_input():
    x = as_tensor([-1, 5, INT64_MIN])
    before = x.clone()
    torch.ops.fxrec.mod(x, 3)
    torch.ops.fxrec.mod_multi([x], [3])
    assert torch.equal(x, before)


@pytest.mark.parametrize("mod_value", [0, -1, INT64_MIN])
def test_rejects_non_positive_mod(mod_value):
    with pytest.raises(ValueError, match="mod_value"):
        torch.ops.fxrec.mod(as_tensor([1]), mod_value)
    with pytest.raises(ValueError, match="mod_value"):
        torch.ops.fxrec.mod_multi([as_tensor([1]), as_tensor([2])], [5, mod_value])


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.uint8])
def test_rejects_non_int64(dtype):
    with pytest.raises(TypeError, match="int64"):
        torch.ops.fxrec.mod(torch.zeros(3, dtype=dtype), 10)
    with pytest.raises(TypeError, match=r"values\[1\]"):
        torch.ops.fxrec.mod_multi([as_tensor([1]), torch.zeros(3, dtype=dtype)], [10, 10])


def test_multi_rejects_length_mismatch():
    with pytest.raises(ValueError, match="mod_values"):
        torch.ops.fxrec.mod_multi([as_tensor([1]), as_tensor([2])], [5])


features = st.lists(st.tuples(st.lists(ids, max_size=300), mod_values), max_size=6)


@given(features=features)
def test_multi_equals_singles(features):
    values = [as_tensor(v) for v, _ in features]
    mods = [m for _, m in features]
    outs = torch.ops.fxrec.mod_multi(values, mods)
    assert len(outs) == len(values)
    for out, v, m in zip(outs, values, mods):
        assert torch.equal(out, torch.ops.fxrec.mod(v, m))


@pytest.mark.parametrize(
    "values, mod_value",
    [([-1, 0, INT64_MIN, INT64_MAX], 10000), ([], 7), ([[1, -2], [3, -4]], 2**63 - 1), ([5], 1)],
)
def test_opcheck(values, mod_value):
    torch.library.opcheck(torch.ops.fxrec.mod, (as_tensor(values), mod_value))


def test_opcheck_multi():
    values = [as_tensor([-1, 0, INT64_MAX]), as_tensor([]), as_tensor([[INT64_MIN, 3]])]
    args = (values, [10000, 3, 2**62 + 7])
    torch.library.opcheck(torch.ops.fxrec.mod_multi, args)
    torch.library.opcheck(torch.ops.fxrec.mod_multi, ([], []))


@given(values=st.lists(ids, max_size=1100), mod_value=mod_values)
def test_triton_matches_cpu(values, mod_value):
    expected = torch.ops.fxrec.mod(as_tensor(values), mod_value)
    got = mod_triton(as_tensor(values, TRITON_DEVICE), mod_value)
    assert torch.equal(got.cpu(), expected)


@given(features=st.lists(st.tuples(st.lists(ids, max_size=1100), mod_values), max_size=4))
def test_triton_multi_matches_cpu(features):
    got = mod_multi_triton([as_tensor(v, TRITON_DEVICE) for v, _ in features], [m for _, m in features])
    for out, (v, m) in zip(got, features):
        assert torch.equal(out.cpu(), torch.ops.fxrec.mod(as_tensor(v), m))


@pytest.mark.parametrize("mod_value", SPECIAL_MODS)
def test_triton_extremes_every_mod(mod_value):
    # 2-D and > 1 block; mod values around 2**31 / 2**32 cover the split of the kernel argument
    gen = torch.Generator().manual_seed(mod_value % 997)
    x = torch.randint(INT64_MIN, INT64_MAX, (3, 700), generator=gen)
    x[0, :6] = as_tensor([INT64_MIN, INT64_MIN + 1, -1, 0, 1, INT64_MAX])
    expected = torch.ops.fxrec.mod(x, mod_value)
    assert torch.equal(mod_triton(x.to(TRITON_DEVICE), mod_value).cpu(), expected)
    assert torch.equal(mod_multi_triton([x.to(TRITON_DEVICE)], [mod_value])[0].cpu(), expected)


def test_triton_noncontiguous_and_empty():
    x = as_tensor([[INT64_MIN, -1, 0], [1, INT64_MAX, 12345]], TRITON_DEVICE)
    assert torch.equal(mod_triton(x.t(), 1).cpu(), torch.zeros(3, 2, dtype=torch.int64))
    assert mod_triton(as_tensor([], TRITON_DEVICE), 5).shape == (0,)
    assert [o.shape for o in mod_multi_triton([as_tensor([], TRITON_DEVICE)] * 2, [3, 4])] == [(0,), (0,)]


@pytest.mark.slow
def test_compile_cpu():
    # triton_op on CPU decomposes into torch ops that Inductor fuses; mod_multi stays opaque.
    def fn(x):
        return torch.ops.fxrec.mod(x, 10000) + 1, torch.ops.fxrec.mod_multi([x, x * 3], [2**63 - 1, 7])

    compiled = torch.compile(fn, fullgraph=True)
    for n in (1000, 37):
        x = torch.randint(INT64_MIN, INT64_MAX, (n,))
        x[:4] = as_tensor([INT64_MIN, -1, 0, INT64_MAX])
        torch.testing.assert_close(compiled(x), fn(x), rtol=0, atol=0)


# --- CUDA ------------------------------------------------------------------------------------


@pytest.mark.gpu
@given(values=st.lists(ids, max_size=3000), mod_value=mod_values)
def test_cuda_matches_cpu(values, mod_value):
    x = as_tensor(values)
    assert torch.equal(torch.ops.fxrec.mod(x.cuda(), mod_value).cpu(), torch.ops.fxrec.mod(x, mod_value))


@pytest.mark.gpu
@pytest.mark.parametrize("mod_value", [1, 10000, 2**31, 2**62 + 7, 2**63 - 1])
def test_cuda_large(mod_value):
    gen = torch.Generator().manual_seed(mod_value % 1000)
    x = torch.randint(INT64_MIN, INT64_MAX, (1009 * 993,), generator=gen)
    x[:4] = as_tensor([INT64_MIN, -1, 0, INT64_MAX])
    x = x.reshape(1009, 993)
    expected = torch.ops.fxrec.mod(x, mod_value)
    assert torch.equal(torch.ops.fxrec.mod(x.cuda(), mod_value).cpu(), expected)
    assert expected[0, :4].tolist() == oracle([INT64_MIN, -1, 0, INT64_MAX], mod_value)


@pytest.mark.gpu
@given(features=st.lists(st.tuples(st.lists(ids, max_size=3000), mod_values), max_size=8))
def test_cuda_multi_equals_singles(features):
    values = [as_tensor(v).cuda() for v, _ in features]
    mods = [m for _, m in features]
    for out, v, m in zip(torch.ops.fxrec.mod_multi(values, mods), values, mods):
        assert torch.equal(out, torch.ops.fxrec.mod(v, m))
        assert torch.equal(out.cpu(), torch.ops.fxrec.mod(v.cpu(), m))


@pytest.mark.gpu
def test_cuda_opcheck_and_compile():
    x = as_tensor([[INT64_MIN, -1], [0, INT64_MAX]]).cuda()
    torch.library.opcheck(torch.ops.fxrec.mod, (x, 10000))
    torch.library.opcheck(torch.ops.fxrec.mod_multi, ([x, x[0]], [10000, 3]))

    def fn(x):
        singles = [torch.ops.fxrec.mod(x, m) + 1 for m in SPECIAL_MODS]
        return singles, torch.ops.fxrec.mod_multi([x, x * 3], [2**63 - 1, 7])

    y = torch.randint(INT64_MIN, INT64_MAX, (100_000,), device="cuda")
    y[:4] = as_tensor([INT64_MIN, -1, 0, INT64_MAX])
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(y), fn(y), rtol=0, atol=0)

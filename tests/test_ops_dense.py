"""fxrec::ragged_to_dense / ragged_to_dense_backward / dense_to_ragged, and RaggedTensor's
to_dense / from_dense, against pure-Python oracles."""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from fxrec.ops.triton.dense import dense_to_ragged_triton, ragged_to_dense_backward_triton, ragged_to_dense_triton
from fxrec.ragged import RaggedTensor

HAS_CUDA = torch.cuda.is_available()
# Launchers run on the GPU when there is one, else on CPU tensors under TRITON_INTERPRET=1 (conftest).
LAUNCHER_DEVICE = "cuda" if HAS_CUDA else "cpu"

INT_DTYPES = [torch.int64, torch.int32, torch.int8, torch.uint8]
FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TRAILING = [(), (3,), (2, 2), (0,)]

to_dense = torch.ops.fxrec.ragged_to_dense
to_dense_backward = torch.ops.fxrec.ragged_to_dense_backward
to_ragged = torch.ops.fxrec.dense_to_ragged


# -- helpers -------------------------------------------------------------------------------------

def make_values(shape: tuple, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bit patterns (NaNs, infs, -0.0 for floats) plus the integer extremes."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    raw = torch.randint(0, 256, (math.prod(shape) * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    values = raw.view(dtype).reshape(shape)
    if not dtype.is_floating_point and values.numel() >= 2:
        info = torch.iinfo(dtype)
        values.view(-1)[:2] = torch.tensor([info.min, info.max], dtype=dtype)
    return values


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    actual, expected = actual.detach().cpu().contiguous(), expected.detach().cpu().contiguous()
    assert torch.equal(actual.view(torch.uint8), expected.view(torch.uint8)), (actual, expected)


def to(device, *tensors):
    return [t.to(device) for t in tensors]


def ragged_to_dense_oracle(values: torch.Tensor, offsets: list[int], width: int, default) -> torch.Tensor:
    """Row by row: the first ``width`` items of each row, then ``default``."""
    rows = [values[b:e] for b, e in zip(offsets, offsets[1:])]
    if width < 0:
        width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width, *values.shape[1:]), default, dtype=values.dtype)
    for i, row in enumerate(rows):
        out[i, : min(len(row), width)] = row[:width]
    return out


def dense_to_ragged_oracle(dense: list[list]) -> tuple[list, list[int]]:
    values, offsets = [], [0]
    for row in dense:
        length = max((j + 1 for j, x in enumerate(row) if x != 0), default=0)  # NaN != 0; -0.0 == 0
        values += row[:length]
        offsets.append(offsets[-1] + length)
    return values, offsets


# -- strategies ----------------------------------------------------------------------------------

@st.composite
def ragged_cases(draw, max_rows: int = 8, max_len: int = 8, dtypes=INT_DTYPES + FLOAT_DTYPES + [torch.bool],
                 trailing=TRAILING):
    """(values, offsets, width, default): offsets may start after unused items."""
    lengths = draw(st.lists(st.integers(0, max_len), max_size=max_rows))
    offsets = [draw(st.integers(0, 3))]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    dtype = draw(st.sampled_from(dtypes))
    shape = (offsets[-1] + draw(st.integers(0, 3)), *draw(st.sampled_from(trailing)))
    values = make_values(shape, dtype, draw(st.integers(0, 2**31)))
    width = draw(st.one_of(st.just(-1), st.integers(0, max_len + 2)))
    if dtype == torch.bool:
        default = draw(st.sampled_from([0.0, 1.0]))
    elif dtype.is_floating_point:
        default = draw(st.sampled_from([0.0, -1.5, 6e4, float("nan"), float("-inf")]))
    else:
        info = torch.iinfo(dtype)
        default = float(draw(st.sampled_from([0, 7, info.min, max(info.min, -100)])))
    return values, torch.tensor(offsets, dtype=torch.int64), width, default


@st.composite
def dense_cases(draw, max_rows: int = 8, max_len: int = 8):
    """[B, L] tensors with many zeros (inside rows and trailing), NaN and -0.0 for floats."""
    dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.int8, torch.bool, torch.float32, torch.float64,
                                  torch.float16]))
    n_rows, width = draw(st.integers(0, max_rows)), draw(st.integers(0, max_len))
    if dtype == torch.bool:
        elements = st.booleans()
    elif dtype.is_floating_point:
        elements = st.sampled_from([0.0, 0.0, -0.0, 1.5, -2.0, float("nan"), float("inf")])
    else:
        info = torch.iinfo(dtype)
        elements = st.sampled_from([0, 0, 0, 1, -3, info.min, info.max])
    rows = draw(st.lists(st.lists(elements, min_size=width, max_size=width), min_size=n_rows, max_size=n_rows))
    return torch.tensor(rows, dtype=dtype).reshape(n_rows, width)


# -- ragged_to_dense -----------------------------------------------------------------------------

@given(ragged_cases())
def test_ragged_to_dense_matches_oracle(case):
    values, offsets, width, default = case
    assert_bits_equal(to_dense(*case), ragged_to_dense_oracle(values, offsets.tolist(), width, default))


def test_ragged_to_dense_long_rows():
    lengths = torch.tensor([0, 2000, 1025, 3, 1999])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]) + 2
    values = make_values((int(offsets[-1]) + 1, 2), torch.float32, seed=1)
    for width in (-1, 0, 1024, 1500, 2100):
        assert_bits_equal(to_dense(values, offsets, width, -1.0),
                          ragged_to_dense_oracle(values, offsets.tolist(), width, -1.0))


def test_ragged_to_dense_pinned_example():
    values, offsets = torch.arange(1, 8), torch.tensor([1, 4, 4, 6])
    assert to_dense(values, offsets, -1, 0.0).tolist() == [[2, 3, 4], [0, 0, 0], [5, 6, 0]]
    assert to_dense(values, offsets, 2, -9.0).tolist() == [[2, 3], [-9, -9], [5, 6]]
    assert to_dense(values, offsets, 0, 0.0).shape == (3, 0)
    assert to_dense(values, torch.tensor([3]), -1, 0.0).shape == (0, 0)


@pytest.mark.parametrize("dtype,default", [(torch.int64, 1.5), (torch.int8, 200.0), (torch.int32, float("nan")),
                                           (torch.bool, 2.0), (torch.float16, 1e30)])
def test_ragged_to_dense_rejects_lossy_default(dtype, default):
    with pytest.raises(ValueError, match="default"):
        to_dense(torch.zeros(3, dtype=dtype), torch.tensor([0, 3]), -1, default)


def test_ragged_to_dense_rejects_bad_arguments():
    values = torch.arange(4)
    with pytest.raises(ValueError, match="width must be -1"):
        to_dense(values, torch.tensor([0, 4]), -2, 0.0)
    with pytest.raises(TypeError, match="offsets must be int64"):
        to_dense(values, torch.tensor([0, 4], dtype=torch.int32), -1, 0.0)
    for offsets in ([0, 3, 2], [0, 5], [-1, 2]):
        with pytest.raises(ValueError, match="non-decreasing"):
            to_dense(values, torch.tensor(offsets), 2, 0.0)
        with pytest.raises(ValueError, match="non-decreasing"):
            ragged_to_dense_triton(*to(LAUNCHER_DEVICE, values, torch.tensor(offsets)), -1, 0)


def test_ragged_to_dense_gradcheck():
    values = torch.randn(11, 2, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([1, 4, 4, 9, 10])
    for width in (-1, 0, 2, 7):
        fn = lambda v, w=width: to_dense(v, offsets, w, 0.5)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (values,))
        assert torch.autograd.gradgradcheck(fn, (values,))


def test_dense_to_ragged_gradcheck():
    dense = torch.tensor([[1.5, 0.0, -2.0, 0.0], [0.0] * 4, [3.0, 1.0, 2.0, 4.0]], dtype=torch.float64,
                         requires_grad=True)
    # gradcheck perturbs every entry: only rows that end in a non-zero keep their length.
    assert torch.autograd.gradcheck(lambda d: to_ragged(d)[0], (dense[2:, :].detach().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda d: to_ragged(d)[0], (dense[:1, :3].detach().requires_grad_(),))
    values, _ = to_ragged(dense)
    values.backward(torch.arange(1.0, 8.0, dtype=torch.float64))
    # Kept items (zeros inside a row included) get their gradient; stripped zeros get 0.
    assert dense.grad.tolist() == [[1.0, 2.0, 3.0, 0.0], [0.0] * 4, [4.0, 5.0, 6.0, 7.0]]


def test_ragged_to_dense_gradient_values():
    values = torch.arange(6, dtype=torch.float32, requires_grad=True)
    out = to_dense(values, torch.tensor([1, 4, 5]), 2, 0.0)
    out.backward(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    # Item 0 is outside every row, item 3 truncated, item 5 after the last row: zero gradient.
    assert values.grad.tolist() == [0.0, 1.0, 2.0, 0.0, 3.0, 0.0]


# -- dense_to_ragged -----------------------------------------------------------------------------

@given(dense_cases())
def test_dense_to_ragged_matches_oracle(dense):
    values, offsets = to_ragged(dense)
    expected_values, expected_offsets = dense_to_ragged_oracle(dense.tolist())
    assert offsets.dtype == torch.int64 and offsets.tolist() == expected_offsets
    assert_bits_equal(values, torch.tensor(expected_values, dtype=dense.dtype))


def test_dense_to_ragged_pinned_example():
    values, offsets = to_ragged(torch.tensor([[1, 0, 2, 0, 0], [0, 0, 0, 0, 0], [0, 3, 3, 3, 3]]))
    assert values.tolist() == [1, 0, 2, 0, 3, 3, 3, 3] and offsets.tolist() == [0, 3, 3, 8]
    values, offsets = to_ragged(torch.zeros(0, 4))
    assert values.shape == (0,) and offsets.tolist() == [0]


def test_dense_to_ragged_rejects_bad_arguments():
    with pytest.raises(ValueError, match="must be 2-D"):
        to_ragged(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="unsupported dtype"):
        to_ragged(torch.zeros(2, 3, dtype=torch.complex64))


@given(ragged_cases(dtypes=[torch.int64, torch.float32], trailing=[()]))
def test_round_trip_without_trailing_zeros(case):
    values, offsets, _, _ = case
    values = torch.where(values == 0, torch.ones_like(values), values)  # no zeros at all
    rows_start_at_zero = offsets - offsets[0]
    items = values[offsets[0]: offsets[-1]]
    out_values, out_offsets = to_ragged(to_dense(values, offsets, -1, 0.0))
    assert_bits_equal(out_values, items)
    assert out_offsets.tolist() == rows_start_at_zero.tolist()


# -- RaggedTensor ------------------------------------------------------------------------------

def test_ragged_tensor_to_dense_two_levels():
    # 3 rows of lists: [[1, 2], [3]], [], [[], [4, 5, 6]]
    rt = RaggedTensor(torch.tensor([1, 2, 3, 4, 5, 6]), [torch.tensor([0, 2, 2, 4]), torch.tensor([0, 2, 3, 3, 6])])
    expected = [[[1, 2, 0], [3, 0, 0]], [[0, 0, 0], [0, 0, 0]], [[0, 0, 0], [4, 5, 6]]]
    assert rt.to_dense().tolist() == expected
    assert rt.to_dense(default=-1).tolist() == [[[1, 2, -1], [3, -1, -1]], [[-1, -1, -1], [-1, -1, -1]],
                                                [[-1, -1, -1], [4, 5, 6]]]


@given(ragged_cases(dtypes=[torch.int64, torch.float32], max_rows=5, max_len=5))
def test_ragged_tensor_to_dense_matches_oracle(case):
    values, offsets, _, default = case
    expected = ragged_to_dense_oracle(values, offsets.tolist(), -1, default)
    assert_bits_equal(RaggedTensor(values, offsets).to_dense(default), expected)


def test_ragged_tensor_from_dense():
    rt = RaggedTensor.from_dense(torch.tensor([[5, 0, 6, 0], [0, 0, 0, 0], [7, 8, 9, 1]]))
    assert rt.values().tolist() == [5, 0, 6, 7, 8, 9, 1]
    assert [o.tolist() for o in rt.offsets()] == [[0, 3, 3, 7]]
    assert rt.to_dense().tolist() == [[5, 0, 6, 0], [0, 0, 0, 0], [7, 8, 9, 1]]


# -- opcheck -------------------------------------------------------------------------------------

def opcheck_cases():
    values = torch.randn(11, 2, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([1, 4, 4, 9, 10])
    grad = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    return [
        (to_dense, (values, offsets, -1, 0.5)),
        (to_dense, (values, offsets, 3, 0.0)),
        (to_dense, (torch.arange(5), torch.tensor([0, 2, 5]), 0, 7.0)),
        (to_dense, (torch.empty(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), -1, 0.0)),
        (to_dense_backward, (grad, offsets, 11)),
        (to_dense_backward, (torch.empty(0, 0), torch.zeros(1, dtype=torch.int64), 3)),
        (to_ragged, (torch.tensor([[1, 0, 2, 0], [0, 0, 0, 0], [3, 3, 3, 3]]),)),
        (to_ragged, (torch.zeros(0, 3),)),
        (to_ragged, (torch.tensor([[1.5, 0.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True),)),
    ]


@pytest.mark.parametrize("index", range(9))
def test_opcheck(index):
    op, args = opcheck_cases()[index]
    torch.library.opcheck(op, args)


@pytest.mark.slow
def test_compiles_fullgraph_with_data_dependent_sizes():
    def step(values, offsets):
        dense = to_dense(values, offsets, -1, 0.0)  # width: a data-dependent size
        items, item_offsets = to_ragged(dense.sum(-1))
        return dense.square().sum() + items.sum(), item_offsets

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        for offsets in ([1, 4, 4, 9, 11], [0, 2, 2]):
            values = torch.randn(12, 2, dtype=torch.float64, requires_grad=True)
            expected_values = values.detach().clone().requires_grad_()
            loss, item_offsets = compiled(values, torch.tensor(offsets))
            expected_loss, expected_offsets = step(expected_values, torch.tensor(offsets))
            loss.backward(), expected_loss.backward()
            torch.testing.assert_close(loss, expected_loss)
            assert item_offsets.tolist() == expected_offsets.tolist()
            torch.testing.assert_close(values.grad, expected_values.grad)


# -- Triton launchers (interpreter on CPU, or the GPU) -------------------------------------------

@settings(max_examples=20)
@given(ragged_cases(max_rows=4, max_len=5))
def test_ragged_to_dense_launcher_matches_cpu(case):
    values, offsets, width, default = case
    expected = to_dense(*case)
    fill = bool(default) if values.dtype == torch.bool else default if values.dtype.is_floating_point else int(default)
    assert_bits_equal(ragged_to_dense_triton(*to(LAUNCHER_DEVICE, values, offsets), width, fill), expected)


@settings(max_examples=20)
@given(ragged_cases(max_rows=4, max_len=5, dtypes=FLOAT_DTYPES))
def test_ragged_to_dense_backward_launcher_matches_cpu(case):
    values, offsets, width, _ = case
    width = max(width, 0)
    grad = make_values((offsets.shape[0] - 1, width, *values.shape[1:]), values.dtype, seed=width)
    expected = to_dense_backward(grad, offsets, values.shape[0])
    assert_bits_equal(ragged_to_dense_backward_triton(*to(LAUNCHER_DEVICE, grad, offsets), values.shape[0]), expected)


@settings(max_examples=20)
@given(dense_cases(max_rows=4, max_len=5))
def test_dense_to_ragged_launcher_matches_cpu(dense):
    values, offsets = dense_to_ragged_triton(dense.to(LAUNCHER_DEVICE))
    expected_values, expected_offsets = to_ragged(dense)
    assert_bits_equal(values, expected_values)
    assert_bits_equal(offsets, expected_offsets)


def test_ragged_to_dense_launcher_items_wider_than_a_word():
    # complex128 items are 2 words: the default's two words must alternate, not repeat the first.
    values, offsets = torch.randn(7, dtype=torch.complex128), torch.tensor([0, 3, 3, 6])
    expected = ragged_to_dense_oracle(values, offsets.tolist(), 4, 1.5)
    assert_bits_equal(to_dense(values, offsets, 4, 1.5), expected)
    assert_bits_equal(ragged_to_dense_triton(*to(LAUNCHER_DEVICE, values, offsets), 4, 1.5), expected)


def test_launchers_rows_longer_than_a_block():
    offsets = torch.tensor([3, 1303, 1303, 1310])
    values = make_values((1312, 3), torch.int16, seed=2)
    assert_bits_equal(ragged_to_dense_triton(*to(LAUNCHER_DEVICE, values, offsets), -1, -1),
                      to_dense(values, offsets, -1, -1.0))
    dense = torch.zeros(2, 1500)
    dense[0, 1200] = 1.0
    dense[1, :3] = 2.0
    assert_bits_equal(torch.cat(dense_to_ragged_triton(dense.to(LAUNCHER_DEVICE))[1:]), torch.tensor([0, 1201, 1204]))


# -- CUDA ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@given(ragged_cases())
def test_ragged_to_dense_cuda_matches_cpu(case):
    values, offsets, width, default = case
    assert_bits_equal(to_dense(*to("cuda", values, offsets), width, default), to_dense(*case))


@pytest.mark.gpu
@given(ragged_cases(dtypes=FLOAT_DTYPES))
def test_ragged_to_dense_backward_cuda_matches_cpu(case):
    values, offsets, width, _ = case
    grad = make_values((offsets.shape[0] - 1, max(width, 0), *values.shape[1:]), values.dtype, seed=3)
    assert_bits_equal(to_dense_backward(*to("cuda", grad, offsets), values.shape[0]),
                      to_dense_backward(grad, offsets, values.shape[0]))


@pytest.mark.gpu
@given(dense_cases())
def test_dense_to_ragged_cuda_matches_cpu(dense):
    for actual, expected in zip(to_ragged(dense.cuda()), to_ragged(dense)):
        assert_bits_equal(actual, expected)


@pytest.mark.gpu
def test_cuda_large():
    # B = 4096 rows up to 2000 long.
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 2001, (4096,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]) + 3
    values = make_values((int(offsets[-1]) + 5,), torch.int64, seed=4)
    for width in (-1, 1000):
        dense = to_dense(values, offsets, width, -1.0)
        assert_bits_equal(to_dense(*to("cuda", values, offsets), width, -1.0), dense)
        for actual, expected in zip(to_ragged(dense.cuda()), to_ragged(dense)):
            assert_bits_equal(actual, expected)
    floats = make_values((values.shape[0], 4), torch.float32, seed=5)
    grad = torch.randn(4096, 1000, 4, generator=gen)
    assert_bits_equal(to_dense(*to("cuda", floats, offsets), 1000, 0.0), to_dense(floats, offsets, 1000, 0.0))
    assert_bits_equal(to_dense_backward(*to("cuda", grad, offsets), floats.shape[0]),
                      to_dense_backward(grad, offsets, floats.shape[0]))


@pytest.mark.gpu
def test_cuda_gradcheck():
    values = torch.randn(11, 2, dtype=torch.float64, device="cuda", requires_grad=True)
    offsets = torch.tensor([1, 4, 4, 9, 10], device="cuda")
    for width in (-1, 2):
        fn = lambda v, w=width: to_dense(v, offsets, w, 0.5)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (values,))
        assert torch.autograd.gradgradcheck(fn, (values,))


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(9))
def test_opcheck_cuda(index):
    op, args = opcheck_cases()[index]
    args = tuple(a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)

"""fxrec::gather_rows against a row-by-row numpy oracle, their Triton
kernels (under the interpreter on CPU, and on CUDA when there is one), opcheck and errors."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxrec  # noqa: F401  (registers torch.ops.fxrec.*)
from fxrec.ops.triton.gather import gather_rows_triton

gather_rows = torch.ops.fxrec.gather_rows
HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def oracle(table: np.ndarray, rows: list[int]) -> np.ndarray:
    out = np.zeros((len(rows), table.shape[1]), dtype=table.dtype)
    for i, r in enumerate(rows):
        if r >= 0:
            out[i] = table[r]
    return out


@st.composite
def cases(draw, max_rows=12, max_dim=150):
    n_table = draw(st.integers(0, max_rows))
    dim = draw(st.integers(1, max_dim))
    values = draw(st.lists(st.floats(-1e3, 1e3, width=32) | st.just(float("nan")), min_size=n_table * dim,
                           max_size=n_table * dim))
    table = np.array(values, dtype=np.float32).reshape(n_table, dim)
    rows = draw(st.lists(st.integers(-1, n_table - 1), max_size=70))
    return table, rows


@given(case=cases(), dtype=st.sampled_from(DTYPES))
def test_cpu_matches_oracle(case, dtype):
    table, rows = case
    t = torch.from_numpy(table).to(dtype)
    got = gather_rows(t, torch.tensor(rows, dtype=torch.int64))
    expected = oracle(t.to(torch.float64).numpy(), rows)
    assert got.dtype == dtype and got.shape == (len(rows), table.shape[1])
    np.testing.assert_array_equal(got.to(torch.float64).numpy(), expected)


@given(case=cases(max_rows=6, max_dim=70))
def test_triton_equals_cpu(case):
    table, rows = case
    t, r = torch.from_numpy(table).to(TRITON_DEVICE), torch.tensor(rows, dtype=torch.int64, device=TRITON_DEVICE)
    np.testing.assert_array_equal(gather_rows_triton(t, r).cpu().numpy(), gather_rows(t.cpu(), r.cpu()).numpy())


def test_triton_out_of_range_rows_read_as_zero():
    t = torch.arange(12.0, device=TRITON_DEVICE).reshape(4, 3)
    got = gather_rows_triton(t, torch.tensor([3, 4, -7, 0], device=TRITON_DEVICE))
    assert got.cpu().tolist() == [[9.0, 10.0, 11.0], [0.0] * 3, [0.0] * 3, [0.0, 1.0, 2.0]]


def test_errors():
    t = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"\[-1, 4\)"):
        gather_rows(t, torch.tensor([4]))
    with pytest.raises(ValueError, match=r"\[-1, 4\)"):
        gather_rows(t, torch.tensor([-2]))
    with pytest.raises(TypeError, match="rows must be a 1-D int64"):
        gather_rows(t, torch.tensor([0], dtype=torch.int32))
    with pytest.raises(TypeError, match="floating point"):
        gather_rows(torch.zeros(4, 2, dtype=torch.int64), torch.tensor([0]))
    with pytest.raises(ValueError, match="2-D"):
        gather_rows(torch.zeros(4), torch.tensor([0]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(device):
    table = torch.randn(7, 5, device=device)
    for rows in ([0, -1, 6, 6], []):
        torch.library.opcheck(gather_rows, (table, torch.tensor(rows, dtype=torch.int64, device=device)))


@pytest.mark.gpu
def test_cuda_equals_cpu_large():
    gen = torch.Generator().manual_seed(0)
    for dim in (1, 8, 16, 64, 130):
        table = torch.randn(100_000, dim, generator=gen)
        rows = torch.randint(-1, 100_000, (300_000,), generator=gen)
        assert torch.equal(gather_rows(table.cuda(), rows.cuda()).cpu(), gather_rows(table, rows))

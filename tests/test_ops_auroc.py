"""``fxrec::auroc_histogram``: the (bucket, label) counts and bad-value bits of one batch, against
a pure numpy oracle (a bucket = how many thresholds a prediction exceeds, counted one by one);
the Triton kernel (the interpreter on CPU tensors without CUDA) against the torch kernel;
opcheck; CUDA against CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxrec.metrics.auroc import auroc_thresholds
from fxrec.ops.auroc import ARITH_MAX_T, auroc_histogram_torch
from fxrec.ops.triton.auroc import auroc_histogram_triton

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LABEL_DTYPES = [torch.bool, torch.int64, torch.int32, torch.float32, torch.float64]


def bounds_of(t: int, dtype: torch.dtype) -> torch.Tensor:
    thr = torch.tensor(auroc_thresholds(t), dtype=torch.float64).to(dtype)
    return torch.cat([thr[:1], thr])


def oracle(pred: np.ndarray, label: np.ndarray, t: int, dtype: torch.dtype) -> list[int]:
    """The counts and bits, one prediction at a time: its bucket is how many thresholds (in
    ``pred``'s dtype) it exceeds, NaN's is 1; bit 1 a prediction outside [0, 1] or NaN, bit 2 a
    label that is not 0 or 1 (NaN included)."""
    thr = torch.tensor(auroc_thresholds(t), dtype=torch.float64).to(dtype).tolist()
    counts = [0] * (2 * (t + 1) + 1)
    for p, y in zip(pred.tolist(), label.tolist()):
        k = 1 if math.isnan(p) else sum(p > x for x in thr)
        counts[k + (t + 1) * (y != 0)] += 1
        if not 0 <= p <= 1:
            counts[-1] |= 1
        if y not in (0, 1) or (isinstance(y, float) and math.isnan(y)):
            counts[-1] |= 2
    return counts


SPECIALS = [0.0, 1.0, -1e-8, 1 + 1e-8, 0.5, float("nan"), float("inf"), -float("inf"), -3.0, 7.0]


@st.composite
def batches(draw, max_size: int = 300):
    t = draw(st.sampled_from([3, 7, 200, 1001]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    thr = auroc_thresholds(t)
    at = st.sampled_from(thr).map(lambda x: float(torch.tensor(x, dtype=torch.float64).to(dtype)))
    one = st.one_of(st.floats(0, 1, width=32 if dtype == torch.float32 else 64), at, st.sampled_from(SPECIALS))
    pred = draw(st.lists(one, max_size=max_size))
    ldtype = draw(st.sampled_from(LABEL_DTYPES))
    if ldtype == torch.bool:
        labels = draw(st.lists(st.booleans(), min_size=len(pred), max_size=len(pred)))
    elif ldtype.is_floating_point:
        labels = draw(st.lists(st.sampled_from([0.0, 1.0, 0.0, 1.0, 0.5, 2.0, -1.0, float("nan"), float("inf")]),
                               min_size=len(pred), max_size=len(pred)))
    else:
        labels = draw(st.lists(st.sampled_from([0, 1, 0, 1, 2, -1]), min_size=len(pred), max_size=len(pred)))
    return t, torch.tensor(pred, dtype=dtype), torch.tensor(labels, dtype=ldtype)


@given(batches())
def test_matches_oracle(case):
    t, pred, label = case
    got = torch.ops.fxrec.auroc_histogram(pred, label, bounds_of(t, pred.dtype), t)
    assert got.dtype == torch.int64 and got.shape == (2 * (t + 1) + 1,)
    assert got.tolist() == oracle(pred.numpy(), label.numpy(), t, pred.dtype)


@given(batches(max_size=1500))
def test_triton_matches_torch(case):
    t, pred, label = case
    bounds = bounds_of(t, pred.dtype)
    expected = auroc_histogram_torch(pred, label, bounds, t)
    got = auroc_histogram_triton(pred.to(TRITON_DEVICE), label.to(TRITON_DEVICE), bounds.to(TRITON_DEVICE), t)
    assert torch.equal(got.cpu(), expected)


def test_empty_batch_and_exact_thresholds():
    t = 200
    for dtype in (torch.float32, torch.float64):
        bounds = bounds_of(t, dtype)
        empty = torch.ops.fxrec.auroc_histogram(torch.empty(0, dtype=dtype), torch.empty(0), bounds, t)
        assert not empty.any()
        thr = bounds[1:]
        pred = torch.cat([thr[1:-1], torch.nextafter(thr[1:-1], torch.tensor(2.0, dtype=dtype))])
        got = torch.ops.fxrec.auroc_histogram(pred, torch.ones(pred.shape[0]), bounds, t)
        expected = torch.bincount(torch.bucketize(pred, thr) + t + 1, minlength=2 * (t + 1)).tolist() + [0]
        assert got.tolist() == expected


def test_rejects_bad_arguments():
    bounds = bounds_of(5, torch.float32)
    with pytest.raises(TypeError, match="pred must be 1-D float32 or float64"):
        torch.ops.fxrec.auroc_histogram(torch.zeros(3, dtype=torch.float16), torch.zeros(3), bounds, 5)
    with pytest.raises(ValueError, match="as long as pred"):
        torch.ops.fxrec.auroc_histogram(torch.zeros(3), torch.zeros(2), bounds, 5)
    with pytest.raises(ValueError, match="bounds must be"):
        torch.ops.fxrec.auroc_histogram(torch.zeros(3), torch.zeros(3), bounds, 6)
    with pytest.raises(ValueError, match="bounds must be"):
        torch.ops.fxrec.auroc_histogram(torch.zeros(3, dtype=torch.float64), torch.zeros(3), bounds, 5)


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    for dtype, ldtype in [(torch.float32, torch.float32), (torch.float64, torch.bool), (torch.float32, torch.int64)]:
        pred = torch.rand(50, generator=gen).to(dtype)
        label = (torch.rand(50, generator=gen) < 0.5).to(ldtype)
        torch.library.opcheck(torch.ops.fxrec.auroc_histogram, (pred, label, bounds_of(7, dtype), 7))
        torch.library.opcheck(torch.ops.fxrec.auroc_histogram, (pred[:0], label[:0], bounds_of(7, dtype), 7))


@pytest.mark.gpu
@given(batches(max_size=3000))
def test_cuda_matches_cpu(case):
    t, pred, label = case
    bounds = bounds_of(t, pred.dtype)
    expected = torch.ops.fxrec.auroc_histogram(pred, label, bounds, t)
    got = torch.ops.fxrec.auroc_histogram(pred.cuda(), label.cuda(), bounds.cuda(), t)
    assert torch.equal(got.cpu(), expected)


@pytest.mark.gpu
def test_cuda_large_and_beyond_arithmetic():
    gen = torch.Generator().manual_seed(3)
    pred = torch.rand(1_000_000, generator=gen)
    label = torch.rand(1_000_000, generator=gen) < 0.3
    for t in (200, 65537, ARITH_MAX_T + 1):  # the last: the torch kernel's search
        bounds = bounds_of(t, torch.float32)
        expected = torch.ops.fxrec.auroc_histogram(pred, label, bounds, t)
        assert torch.equal(torch.ops.fxrec.auroc_histogram(pred.cuda(), label.cuda(), bounds.cuda(), t).cpu(), expected)

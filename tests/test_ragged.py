"""RaggedTensor: construction, accessors, conversions, pytree registration."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given
from hypothesis import strategies as st

from fxrec.ragged import RaggedTensor
from raggedutil import offsets_of, ragged_ids, rows_of

rows_st = st.lists(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=7), max_size=6)


def test_accessors_and_offsets_list():
    values = torch.tensor([1, 2, 3])
    rt = RaggedTensor(values, torch.tensor([0, 2, 3]))
    assert rt.values() is values
    assert isinstance(rt.offsets(), list) and rt.offsets()[0].tolist() == [0, 2, 3]
    assert rt.weight() is None
    assert rt.batch_size() == 2 and rt.dtype == torch.int64 and rt.device.type == "cpu"


def test_int32_offsets_become_int64():
    rt = RaggedTensor(torch.tensor([1]), torch.tensor([0, 1], dtype=torch.int32))
    assert rt.offsets()[0].dtype == torch.int64


@pytest.mark.parametrize(
    "args, error, match",
    [
        (([1, 2], torch.tensor([0, 2])), TypeError, "values must be a tensor"),
        ((torch.tensor([1]), torch.tensor([0.0, 1.0])), TypeError, "integer"),
        ((torch.tensor([1]), torch.tensor([], dtype=torch.int64)), ValueError, "at least one element"),
        ((torch.tensor([1]), []), ValueError, "at least one offsets"),
        ((torch.tensor([1]), torch.tensor([0, 1]), torch.tensor([1.0, 2.0])), ValueError, "weight has 2 items"),
        ((torch.tensor([1]), torch.tensor([0, 1]), torch.tensor([1])), TypeError, "floating point"),
    ],
)
def test_bad_construction(args, error, match):
    with pytest.raises(error, match=match):
        RaggedTensor(*args)


@given(rows=rows_st)
def test_shape_and_to_dense_match_python(rows):
    rt = ragged_ids(rows)
    width = max((len(r) for r in rows), default=0)
    assert tuple(rt.shape) == (len(rows), width) == tuple(rt.real_shape())
    dense = rt.to_dense(default=-5)
    assert dense.tolist() == [r + [-5] * (width - len(r)) for r in rows] or (not rows and dense.numel() == 0)


def test_two_level_to_dense_and_shape():
    # row 0: [[1, 2], [3]], row 1: [[4, 5, 6]]
    rt = RaggedTensor(torch.arange(1, 7), [torch.tensor([0, 2, 3]), torch.tensor([0, 2, 3, 6])])
    assert tuple(rt.shape) == (2, 2, 3)
    assert rt.to_dense().tolist() == [[[1, 2, 0], [3, 0, 0]], [[4, 5, 6], [0, 0, 0]]]


@given(rows=st.lists(st.lists(st.integers(-9, 9), max_size=6), max_size=6))
def test_from_dense_strips_trailing_zeros(rows):
    width = max((len(r) for r in rows), default=0)
    dense = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int64).reshape(len(rows), width)
    rt = RaggedTensor.from_dense(dense)

    def strip(r):
        while r and r[-1] == 0:
            r = r[:-1]
        return r

    assert rows_of(rt) == [strip(r) for r in rows]


def test_clone_is_deep_and_to_casts_values_only():
    rt = RaggedTensor(torch.tensor([1, 2]), torch.tensor([0, 2]), torch.tensor([0.5, 1.5]))
    copy = rt.clone()
    copy.values()[0] = 100
    copy.offsets()[0][1] = 1
    copy.weight()[0] = 9.0
    assert rt.values().tolist() == [1, 2] and rt.offsets()[0].tolist() == [0, 2] and rt.weight().tolist() == [0.5, 1.5]
    as_float = rt.to(torch.float64)
    assert as_float.dtype == torch.float64 and as_float.offsets()[0].dtype == torch.int64
    assert as_float.weight().dtype == torch.float32
    moved = rt.to("cpu")
    assert moved.values().tolist() == [1, 2]


@pytest.mark.gpu
def test_pin_memory_and_cuda_round_trip():
    rt = RaggedTensor(torch.tensor([1, 2]), torch.tensor([0, 2]), torch.tensor([0.5, 1.5]))
    pinned = rt.pin_memory()
    assert pinned.values().is_pinned() and pinned.offsets()[0].is_pinned() and pinned.weight().is_pinned()
    on_gpu = pinned.to("cuda", non_blocking=True)
    assert on_gpu.device.type == "cuda"
    assert on_gpu.cpu().values().tolist() == [1, 2]


def test_pytree_flatten_round_trip():
    rt = RaggedTensor(torch.tensor([1, 2, 3]), [torch.tensor([0, 1, 2]), torch.tensor([0, 2, 3])], torch.ones(3))
    leaves, spec = pytree.tree_flatten({"x": rt, "y": torch.zeros(1)})
    assert len(leaves) == 5 and all(isinstance(leaf, torch.Tensor) for leaf in leaves)
    rebuilt = pytree.tree_unflatten(leaves, spec)["x"]
    assert isinstance(rebuilt, RaggedTensor) and rebuilt.values() is rt.values()
    assert len(rebuilt.offsets()) == 2 and rebuilt.weight() is rt.weight()
    doubled = pytree.tree_map(lambda t: t * 2, rt)
    assert doubled.values().tolist() == [2, 4, 6]


def test_compiled_function_takes_and_returns_ragged():
    def f(rt):
        return RaggedTensor(rt.values() + 1, rt.offsets(), rt.weight())

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    rt = RaggedTensor(torch.tensor([1, 2, 3]), offsets_of([2, 1]))
    out = compiled(rt)
    assert isinstance(out, RaggedTensor) and out.values().tolist() == [2, 3, 4]

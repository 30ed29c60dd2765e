"""fxrec::check_row_lengths: rejects rows over the limit, passes offsets through otherwise."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxrec.ops.triton.check import copy_and_max_row_length_triton
from raggedutil import offsets_of

lengths_st = st.lists(st.integers(0, 3000), max_size=40)
# Without CUDA the launcher runs under TRITON_INTERPRET=1 (set by conftest) on CPU tensors.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@given(lengths=lengths_st, max_len=st.integers(0, 3000))
def test_check_row_lengths_matches_python(lengths, max_len):
    offsets = offsets_of(lengths)
    if max(lengths, default=0) > max_len:
        with pytest.raises(ValueError, match=rf"feature 'f': a row has {max(lengths)} items.*seq_len={max_len}"):
            torch.ops.fxrec.check_row_lengths(offsets, max_len, "feature 'f'")
    else:
        out = torch.ops.fxrec.check_row_lengths(offsets, max_len, "feature 'f'")
        assert torch.equal(out, offsets) and out.data_ptr() != offsets.data_ptr()


@given(lengths=st.lists(st.integers(0, 50), max_size=20), start=st.integers(0, 5))
def test_triton_copy_and_max_row_length_match_python(lengths, start):
    offsets = (offsets_of(lengths) + start).to(TRITON_DEVICE)
    copy, longest = copy_and_max_row_length_triton(offsets)
    assert int(longest) == max(lengths, default=0)
    assert torch.equal(copy, offsets) and copy.data_ptr() != offsets.data_ptr()


def test_triton_copy_and_max_row_length_over_blocks():
    lengths = [i % 7 for i in range(2500)]
    lengths[2222] = 40
    offsets = offsets_of(lengths).to(TRITON_DEVICE)
    copy, longest = copy_and_max_row_length_triton(offsets)
    assert int(longest) == 40 and torch.equal(copy, offsets)


def test_opcheck():
    for offsets in (offsets_of([3, 0, 2]), offsets_of([])):
        torch.library.opcheck(torch.ops.fxrec.check_row_lengths.default, (offsets, 5, "x"))


def test_bad_offsets_rejected():
    with pytest.raises(TypeError, match="int64"):
        torch.ops.fxrec.check_row_lengths(torch.tensor([0.0, 1.0]), 3, "x")


@pytest.mark.gpu
@given(lengths=lengths_st, max_len=st.integers(0, 3000))
def test_cuda_equals_cpu(lengths, max_len):
    offsets = offsets_of(lengths)
    try:
        expected = torch.ops.fxrec.check_row_lengths(offsets, max_len, "x")
    except ValueError as e:
        with pytest.raises(ValueError, match=str(e).split(":")[0]):
            torch.ops.fxrec.check_row_lengths(offsets.cuda(), max_len, "x")
        return
    assert torch.equal(torch.ops.fxrec.check_row_lengths(offsets.cuda(), max_len, "x").cpu(), expected)

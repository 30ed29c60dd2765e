"""Triton kernels for ragged <-> dense conversion (``fxrec::ragged_to_dense``,
``fxrec::ragged_to_dense_backward``, ``fxrec::dense_to_ragged``).

Moving items is dtype-agnostic, so the copy kernels see every tensor as rows of integer
"words" (the widest of 8/4/2/1 bytes that divides the row size and the addresses, see
:func:`as_words`): one kernel serves every dtype, trailing dims included, and the copies are
bit-exact (NaN payloads, -0.0). Only :func:`dense_to_ragged_triton` compares values (``!= 0``)
and so reads them in their own dtype.

Launchers work on CUDA tensors and, under ``TRITON_INTERPRET=1``, on CPU tensors.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "as_words",
    "word_size",
    "ragged_to_dense_triton",
    "ragged_to_dense_backward_triton",
    "dense_to_ragged_triton",
]

_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def word_size(row_bytes: int, *tensors: Tensor) -> int:
    """The widest word (8, 4, 2 or 1 bytes) dividing ``row_bytes`` and every tensor's address."""
    for word in (8, 4, 2, 1):
        if row_bytes % word == 0 and all(t.data_ptr() % word == 0 for t in tensors):
            return word
    raise AssertionError("unreachable: 1 divides everything")


def as_words(t: Tensor, word: int) -> Tensor:
    """View a contiguous ``[N, *]`` tensor's bytes as ``[N, row_bytes // word]`` integers."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:])).view(torch.uint8).view(_WORD_DTYPES[word])


def _block(words_per_row: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel whose programs each cover up to ``words_per_row`` words."""
    block = min(1024, max(32, triton.next_power_of_2(max(words_per_row, 1))))
    return block, max(1, block // 256)


@triton.jit
def _ragged_to_dense_kernel(
    values, offsets, default_row, out, n_value_words, width, row_words, row_len, n_chunks, BLOCK: tl.constexpr
):
    # One program per (row, chunk of the row's row_len = width * row_words output words). Products
    # of sizes come from the host so that they are int64 whenever they need to be.
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_chunks
    k = (pid % n_chunks) * BLOCK + tl.arange(0, BLOCK)
    begin = tl.load(offsets + row)
    end = tl.load(offsets + row + 1)
    kept = tl.minimum(tl.maximum(end - begin, 0), width)
    in_row = k < row_len
    src = begin * row_words + k
    # The bounds test keeps bad offsets (not validated on the no-sync width >= 0 path) inside values.
    valid = (k < kept * row_words) & (src >= 0) & (src < n_value_words)
    x = tl.load(values + src, mask=valid, other=0)
    fill = tl.load(default_row + k % row_words, mask=in_row & ~valid, other=0)
    tl.store(out + row * row_len + k, tl.where(valid, x, fill), mask=in_row)


@triton.jit
def _dense_to_ragged_kernel(dense, offsets, out, n_out_words, width, row_words, row_len, n_chunks,
                            BLOCK: tl.constexpr):
    # Inverse copy: the first min(len, width) items of dense row i go to out[offsets[i]:].
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_chunks
    k = (pid % n_chunks) * BLOCK + tl.arange(0, BLOCK)
    begin = tl.load(offsets + row)
    end = tl.load(offsets + row + 1)
    kept = tl.minimum(tl.maximum(end - begin, 0), width)
    dst = begin * row_words + k
    valid = (k < kept * row_words) & (dst >= 0) & (dst < n_out_words)
    x = tl.load(dense + row * row_len + k, mask=valid, other=0)
    tl.store(out + dst, x, mask=valid)


@triton.jit
def _trailing_length_kernel(dense, lengths, width, BLOCK: tl.constexpr):
    # Row length once trailing zeros are stripped = 1 + index of the last non-zero (0 if none).
    row = tl.program_id(0).to(tl.int64)
    last = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(0, width, BLOCK):
        k = start + tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(dense + row * width + k, mask=k < width, other=0)
        last = tl.maximum(last, tl.where(x != 0, k + 1, 0))
    tl.store(lengths + row, tl.max(last, 0))


def ragged_to_dense_triton(values: Tensor, offsets: Tensor, width: int, default: int | float | bool) -> Tensor:
    """``[N, *]`` rows -> ``[B, W, *]`` padded with ``default`` (W = longest row when width < 0).

    ``width < 0`` syncs once (``.tolist()``) to read the longest row and validate the offsets;
    ``width >= 0`` does not sync.
    """
    values, offsets = values.contiguous(), offsets.contiguous()
    n_rows = offsets.numel() - 1
    if width < 0:
        width = _longest_row(offsets, values.shape[0]) if n_rows > 0 else 0
    item_shape = values.shape[1:]
    out = torch.empty((n_rows, width, *item_shape), dtype=values.dtype, device=values.device)
    default_row = torch.full((1, *item_shape), default, dtype=values.dtype, device=values.device)
    row_bytes = math.prod(item_shape) * values.element_size()
    if out.numel() == 0:
        return out
    word = word_size(row_bytes, values, out, default_row)
    row_words = row_bytes // word
    block, num_warps = _block(width * row_words)
    n_chunks = triton.cdiv(width * row_words, block)
    _ragged_to_dense_kernel[(n_rows * n_chunks,)](
        as_words(values, word), offsets, as_words(default_row, word), as_words(out.view(-1, *item_shape), word),
        values.shape[0] * row_words, width, row_words, width * row_words, n_chunks, BLOCK=block, num_warps=num_warps,
    )
    return out


def _longest_row(offsets: Tensor, n_values: int) -> int:
    lengths = offsets[1:] - offsets[:-1]
    # The one host sync of the width < 0 path: W is data-dependent. Validation rides along.
    longest, shortest, first, last = torch.stack([lengths.max(), lengths.min(), offsets[0], offsets[-1]]).tolist()
    if shortest < 0 or first < 0 or last > n_values:
        raise ValueError(
            f"fxrec::ragged_to_dense: offsets must be non-decreasing within [0, {n_values}] (values' length)"
        )
    return longest


def ragged_to_dense_backward_triton(grad: Tensor, offsets: Tensor, num_values: int) -> Tensor:
    """Gradient of ``ragged_to_dense`` w.r.t. values: ``[B, W, *]`` -> ``[num_values, *]``,
    each kept item's gradient at its values position, zeros elsewhere. No sync."""
    grad, offsets = grad.contiguous(), offsets.contiguous()
    n_rows, width = grad.shape[0], grad.shape[1]
    item_shape = grad.shape[2:]
    out = torch.zeros((num_values, *item_shape), dtype=grad.dtype, device=grad.device)
    _scatter_rows(grad, offsets, out, n_rows, width, item_shape)
    return out


def _scatter_rows(dense: Tensor, offsets: Tensor, out: Tensor, n_rows: int, width: int, item_shape) -> None:
    row_bytes = math.prod(item_shape) * dense.element_size()
    if n_rows == 0 or width == 0 or row_bytes == 0 or out.shape[0] == 0:
        return
    word = word_size(row_bytes, dense, out)
    row_words = row_bytes // word
    block, num_warps = _block(width * row_words)
    n_chunks = triton.cdiv(width * row_words, block)
    _dense_to_ragged_kernel[(n_rows * n_chunks,)](
        as_words(dense.view(-1, *item_shape), word), offsets, as_words(out, word),
        out.shape[0] * row_words, width, row_words, width * row_words, n_chunks, BLOCK=block, num_warps=num_warps,
    )


def dense_to_ragged_triton(dense: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, L]`` -> (values, offsets from 0): each row without its trailing zeros.

    Syncs once (reading the total length, ``offsets[-1]``) to allocate values.
    """
    dense = dense.contiguous()
    n_rows, width = dense.shape
    # Comparison needs the real dtype; Triton reads torch.bool as bytes.
    readable = dense.view(torch.uint8) if dense.dtype == torch.bool else dense
    lengths = torch.zeros(n_rows, dtype=torch.int64, device=dense.device)
    if n_rows > 0 and width > 0:
        block, num_warps = _block(width)
        _trailing_length_kernel[(n_rows,)](readable, lengths, width, BLOCK=block, num_warps=num_warps)
    offsets = torch.zeros(n_rows + 1, dtype=torch.int64, device=dense.device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    total = int(offsets[-1])  # the one host sync: the values length is data-dependent
    values = torch.empty(total, dtype=dense.dtype, device=dense.device)
    _scatter_rows(dense, offsets, values, n_rows, width, ())
    return values, offsets

"""Longest row of a ragged level: one pass over the offsets, an atomic max per block."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _max_row_length_kernel(offsets_ptr, out_ptr, num_rows, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < num_rows
    start = tl.load(offsets_ptr + rows, mask=mask, other=0)
    end = tl.load(offsets_ptr + rows + 1, mask=mask, other=0)
    tl.atomic_max(out_ptr, tl.max(end - start, axis=0))


def max_row_length_triton(offsets: torch.Tensor) -> torch.Tensor:
    """0-d int64 tensor: the longest row of ``offsets`` (0 for no rows)."""
    out = torch.zeros((), dtype=torch.int64, device=offsets.device)
    num_rows = offsets.numel() - 1
    if num_rows > 0:
        block = 1024
        _max_row_length_kernel[(triton.cdiv(num_rows, block),)](offsets, out, num_rows, BLOCK=block)
    return out

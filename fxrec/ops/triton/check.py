"""Copy of a ragged level's offsets and its longest row: one pass, an atomic max per block."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_and_max_row_length_kernel(offsets_ptr, copy_ptr, longest_ptr, num_rows, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    start = tl.load(offsets_ptr + i, mask=i <= num_rows, other=0)
    tl.store(copy_ptr + i, start, mask=i <= num_rows)
    end = tl.load(offsets_ptr + i + 1, mask=i < num_rows, other=0)
    tl.atomic_max(longest_ptr, tl.max(tl.where(i < num_rows, end - start, 0), axis=0))


def copy_and_max_row_length_triton(offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a copy of ``offsets``, 0-d int64 tensor: its longest row, 0 for no rows) in one launch
    after one zero-fill: both live in one buffer, whose zeros also start the max."""
    num_rows = offsets.numel() - 1
    buffer = torch.zeros(num_rows + 2, dtype=torch.int64, device=offsets.device)
    block = 1024
    _copy_and_max_row_length_kernel[(triton.cdiv(num_rows + 1, block),)](
        offsets, buffer, buffer[num_rows + 1:], num_rows, BLOCK=block
    )
    return buffer[: num_rows + 1], buffer[num_rows + 1]

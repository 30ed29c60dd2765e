"""``fxrec::check_row_lengths``: reject rows longer than a limit (SequenceTruncate(truncate=False)).

The check needs the longest row on the host, so it syncs a GPU once; it returns a copy of the
offsets so that it sits on the data path and no graph rewrite can drop it.
"""

from __future__ import annotations

import torch

from fxrec.ops.triton.check import copy_and_max_row_length_triton


def _raise_if_too_long(longest: int, max_len: int, where: str) -> None:
    if longest > max_len:
        raise ValueError(f"{where}: a row has {longest} items, more than seq_len={max_len} (check_length=True)")


def _validate(offsets: torch.Tensor, max_len: int) -> None:
    if offsets.dtype != torch.int64 or offsets.dim() != 1:
        raise TypeError(f"check_row_lengths: offsets must be a 1-D int64 tensor, got {offsets.dtype} {tuple(offsets.shape)}")
    if max_len < 0:
        raise ValueError(f"check_row_lengths: max_len must be >= 0, got {max_len}")


@torch.library.custom_op("fxrec::check_row_lengths", mutates_args=())
def check_row_lengths(offsets: torch.Tensor, max_len: int, where: str) -> torch.Tensor:
    """Copy of ``offsets``; ValueError naming ``where`` if any row is longer than ``max_len``."""
    _validate(offsets, max_len)
    lengths = offsets[1:] - offsets[:-1]
    _raise_if_too_long(int(lengths.max()) if lengths.numel() else 0, max_len, where)
    return offsets.clone()


@check_row_lengths.register_kernel("cuda")
def check_row_lengths_with_triton(offsets: torch.Tensor, max_len: int, where: str) -> torch.Tensor:
    """The CUDA kernel (also runs on CPU tensors under ``TRITON_INTERPRET=1``)."""
    _validate(offsets, max_len)
    copy, longest = copy_and_max_row_length_triton(offsets.contiguous())  # 2 launches
    _raise_if_too_long(int(longest), max_len, where)  # the one host sync
    return copy


@check_row_lengths.register_fake
def _(offsets: torch.Tensor, max_len: int, where: str) -> torch.Tensor:
    return torch.empty_like(offsets)

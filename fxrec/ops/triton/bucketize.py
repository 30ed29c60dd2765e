"""Triton kernels for ``fxrec::bucketize`` / ``fxrec::bucketize_multi``.

``out = #{b in boundaries : b <= float64(v)}``, NaN -> ``len(boundaries)``, by a branchless binary
search over the (strictly increasing, float64) boundaries. Launchers take CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from fxrec.ops.triton.mod import BLOCK, device_table, find_segment, first_blocks

__all__ = ["VALUE_DTYPES", "bucketize_multi_triton", "bucketize_triton"]

# The value dtypes the kernels read, in the order of the dtype codes of the multi-feature table.
VALUE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64)


@triton.jit
def _count_le(boundaries_ptr, num_boundaries, v):
    """#{i : boundaries[i] <= v} per lane of float64 ``v``; NaN -> num_boundaries.

    Binary lifting: ``pos`` grows by powers of two while the boundary at ``pos + step - 1`` is
    <= v. The predicate is true on a prefix of the sorted boundaries, so ``pos`` ends at its
    length; the step count is uniform across lanes (no divergence).
    """
    pos = tl.zeros(v.shape, dtype=tl.int64)
    step = tl.full([], 1, tl.int64)
    while step * 2 <= num_boundaries:
        step *= 2
    while step > 0:
        candidate = pos + step
        in_range = candidate <= num_boundaries
        b = tl.load(boundaries_ptr + candidate - 1, mask=in_range, other=0.0)
        pos = tl.where(in_range & (b <= v), candidate, pos)
        step = step // 2
    # Every comparison with NaN is false: NaN would land in bucket 0, the spec puts it last.
    return tl.where(v != v, num_boundaries, pos)


@triton.jit
def _bucketize_kernel(values_ptr, boundaries_ptr, out_ptr, numel, num_boundaries, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    v = tl.load(values_ptr + offsets, mask=mask, other=0).to(tl.float64)
    tl.store(out_ptr + offsets, _count_le(boundaries_ptr, num_boundaries, v), mask=mask)


@triton.jit
def _bucketize_multi_kernel(table_ptr, num_segments, SEGMENTS: tl.constexpr, BLOCK: tl.constexpr):
    # Table rows (int64, num_segments columns): first block, numel, values address, out address,
    # boundaries address, number of boundaries, value dtype code (index in VALUE_DTYPES).
    segment, block = find_segment(table_ptr, num_segments, SEGMENTS)
    numel = tl.load(table_ptr + num_segments + segment)
    values_addr = tl.load(table_ptr + 2 * num_segments + segment)
    out_ptr = tl.load(table_ptr + 3 * num_segments + segment).to(tl.pointer_type(tl.int64))
    boundaries_ptr = tl.load(table_ptr + 4 * num_segments + segment).to(tl.pointer_type(tl.float64))
    num_boundaries = tl.load(table_ptr + 5 * num_segments + segment)
    dtype_code = tl.load(table_ptr + 6 * num_segments + segment)
    offsets = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    # One branch per program (a program serves one feature), so no divergence.
    if dtype_code == 0:
        v = tl.load(values_addr.to(tl.pointer_type(tl.float64)) + offsets, mask=mask, other=0)
    elif dtype_code == 1:
        v = tl.load(values_addr.to(tl.pointer_type(tl.float32)) + offsets, mask=mask, other=0).to(tl.float64)
    elif dtype_code == 2:
        v = tl.load(values_addr.to(tl.pointer_type(tl.float16)) + offsets, mask=mask, other=0).to(tl.float64)
    elif dtype_code == 3:
        v = tl.load(values_addr.to(tl.pointer_type(tl.bfloat16)) + offsets, mask=mask, other=0).to(tl.float64)
    else:
        v = tl.load(values_addr.to(tl.pointer_type(tl.int64)) + offsets, mask=mask, other=0).to(tl.float64)
    tl.store(out_ptr + offsets, _count_le(boundaries_ptr, num_boundaries, v), mask=mask)


def bucketize_triton(values: Tensor, boundaries: Tensor) -> Tensor:
    """int64 bucket of every value (any shape, a dtype of ``VALUE_DTYPES``) in one launch.

    Arguments are validated by the op (``fxrec.ops.bucketize``). Traceable: uses ``wrap_triton``,
    so ``torch.ops.fxrec.bucketize`` (a ``triton_op``) shows the kernel to Inductor.
    """
    values = values.contiguous()
    boundaries = boundaries.contiguous()
    out = torch.empty(values.shape, dtype=torch.int64, device=values.device)
    numel = values.numel()
    wrap_triton(_bucketize_kernel)[(triton.cdiv(numel, BLOCK),)](
        values, boundaries, out, numel, boundaries.numel(), BLOCK=BLOCK
    )
    return out


def bucketize_multi_triton(values: list[Tensor], boundaries: list[Tensor]) -> list[Tensor]:
    """``bucketize_triton`` of every ``(values[i], boundaries[i])`` in ONE launch.

    Per-feature pointers, sizes and value dtypes go through a table (see ``mod_multi_triton``).
    Eager only (reads data pointers): the op ``fxrec::bucketize_multi`` is an opaque custom op.
    """
    if not values:
        return []
    values = [v.contiguous() for v in values]
    boundaries = [b.contiguous() for b in boundaries]
    outs = [torch.empty(v.shape, dtype=torch.int64, device=v.device) for v in values]
    numels = [v.numel() for v in values]
    starts, total_blocks = first_blocks(numels)
    table, _ = device_table(
        [
            starts,
            numels,
            [v.data_ptr() for v in values],
            [o.data_ptr() for o in outs],
            [b.data_ptr() for b in boundaries],
            [b.numel() for b in boundaries],
            [VALUE_DTYPES.index(v.dtype) for v in values],
        ],
        values[0].device,
    )
    if total_blocks > 0:
        _bucketize_multi_kernel[(total_blocks,)](
            table, len(values), SEGMENTS=triton.next_power_of_2(len(values)), BLOCK=BLOCK
        )
    return outs

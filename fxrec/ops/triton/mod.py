"""Triton kernels for ``fxrec::mod`` / ``fxrec::mod_multi``: ``int64(uint64(x) % uint64(m))``.

Launchers take CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (how CI checks the
kernel logic without a GPU). ``device_table`` builds the per-feature table that the multi-feature
kernels (here and in ``bucketize.py``) read to serve N tensors with one launch.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

__all__ = ["BLOCK", "device_table", "find_segment", "first_blocks", "mod_multi_triton", "mod_triton"]

# Elements per program. Each program of a multi-feature kernel serves one feature, so a feature
# costs at most one partly empty block.
BLOCK = 1024


@triton.jit
def _mod_kernel(values_ptr, out_ptr, numel, mod_high, mod_low, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x = tl.load(values_ptr + offsets, mask=mask)
    # tl.cast (not .to) also accepts the constexpr Triton makes of an int argument equal to 1.
    low = tl.cast(tl.cast(mod_low, tl.int32), tl.uint32, bitcast=True).to(tl.uint64)
    mod_value = (tl.cast(mod_high, tl.uint64) << 32) | low
    # Triton's % is unsigned only if both operands are.
    r = x.to(tl.uint64, bitcast=True) % mod_value
    tl.store(out_ptr + offsets, r.to(tl.int64, bitcast=True), mask=mask)


@triton.jit
def find_segment(table_ptr, num_segments, SEGMENTS: tl.constexpr):
    """The segment (feature) this program serves: the last one whose first block <= program id.

    Row 0 of the table holds each segment's first block (non-decreasing; an empty segment
    shares its first block with the next one, so the last match is the non-empty one).
    Returns (segment, index of this program's block inside the segment).
    """
    pid = tl.program_id(0)
    segments = tl.arange(0, SEGMENTS)
    first_block = tl.load(table_ptr + segments, mask=segments < num_segments, other=2**62)
    segment = tl.sum((first_block <= pid).to(tl.int32), axis=0) - 1
    return segment, pid - tl.load(table_ptr + segment)


@triton.jit
def _mod_multi_kernel(table_ptr, num_segments, SEGMENTS: tl.constexpr, BLOCK: tl.constexpr):
    # Table rows (int64, num_segments columns): first block, numel, values address, out address,
    # mod value.
    segment, block = find_segment(table_ptr, num_segments, SEGMENTS)
    numel = tl.load(table_ptr + num_segments + segment)
    values_ptr = tl.load(table_ptr + 2 * num_segments + segment).to(tl.pointer_type(tl.int64))
    out_ptr = tl.load(table_ptr + 3 * num_segments + segment).to(tl.pointer_type(tl.int64))
    mod_value = tl.load(table_ptr + 4 * num_segments + segment).to(tl.uint64, bitcast=True)
    offsets = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x = tl.load(values_ptr + offsets, mask=mask)
    r = x.to(tl.uint64, bitcast=True) % mod_value
    tl.store(out_ptr + offsets, r.to(tl.int64, bitcast=True), mask=mask)


def mod_triton(values: Tensor, mod_value: int) -> Tensor:
    """``int64(uint64(values) % uint64(mod_value))`` in one launch; int64 in, int64 out, same shape.

    Arguments are validated by the op (``fxrec.ops.mod``). Traceable: uses ``wrap_triton``, so
    ``torch.ops.fxrec.mod`` (a ``triton_op``) shows the kernel to Inductor.
    """
    values = values.contiguous()
    out = torch.empty_like(values)
    numel = values.numel()
    # Inductor (torch 2.11) fails to compile a user kernel whose Python-int argument exceeds
    # int32 ("'int' object has no attribute 'xreplace'"): pass the 63-bit mod value as its high
    # 31 bits and its low 32 bits read as an int32.
    mod_high, mod_low = mod_value >> 32, mod_value & 0xFFFFFFFF
    mod_low -= (mod_low >> 31) << 32
    wrap_triton(_mod_kernel)[(triton.cdiv(numel, BLOCK),)](values, out, numel, mod_high, mod_low, BLOCK=BLOCK)
    return out


def device_table(rows: list[list[int]], device: torch.device, status_entries: int = 0) -> tuple[Tensor, Tensor]:
    """``rows`` (int64, row-major) in a flat buffer on ``device``, followed by ``status_entries``
    zeros where kernels write totals and flags (so they need no zero-fill launch of their own).
    Returns (table, status) views of the buffer.

    Built in pinned memory and copied without blocking the host. The copy reads host memory that
    lives only for this call, which is why the multi-feature ops are tagged ``cudagraph_unsafe``.
    """
    flat = [x for row in rows for x in row]
    cuda = device.type == "cuda"
    buffer = torch.tensor(flat + [0] * status_entries, dtype=torch.int64, pin_memory=cuda)
    if cuda:
        buffer = buffer.to(device, non_blocking=True)
    return buffer[: len(flat)], buffer[len(flat):]


def first_blocks(numels: list[int]) -> tuple[list[int], int]:
    """Each segment's first block (row 0 of a segment table) and the total number of blocks."""
    starts, total = [], 0
    for numel in numels:
        starts.append(total)
        total += triton.cdiv(numel, BLOCK)
    return starts, total


def mod_multi_triton(values: list[Tensor], mod_values: list[int]) -> list[Tensor]:
    """``mod_triton`` of every ``(values[i], mod_values[i])`` in ONE launch.

    The kernel reads a table of per-feature (first block, numel, values address, out address,
    mod value) and addresses each feature's tensors through raw pointers, so inputs and outputs
    stay separate tensors (no concatenation copies). Eager only (reads data pointers): the op
    ``fxrec::mod_multi`` is an opaque custom op.
    """
    if not values:
        return []
    values = [v.contiguous() for v in values]
    outs = [torch.empty_like(v) for v in values]
    numels = [v.numel() for v in values]
    starts, total_blocks = first_blocks(numels)
    table, _ = device_table(
        [starts, numels, [v.data_ptr() for v in values], [o.data_ptr() for o in outs], list(mod_values)],
        values[0].device,
    )
    if total_blocks > 0:
        _mod_multi_kernel[(total_blocks,)](
            table, len(values), SEGMENTS=triton.next_power_of_2(len(values)), BLOCK=BLOCK
        )
    return outs

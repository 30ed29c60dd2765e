"""Triton kernel for ``fxrec::auroc_histogram``: each prediction's bucket, its (bucket, label) bin
counted with an int64 atomic add, and the batch's bad-value bits, in ONE launch (the torch
kernel's ~15 ops; ``fxrec.ops.auroc`` says what is computed). Launchers take CUDA tensors, or
CPU tensors under ``TRITON_INTERPRET=1``.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxrec.ops.triton import cdiv

__all__ = ["auroc_histogram_triton"]

_BLOCK = 1024


@triton.jit
def _auroc_histogram_kernel(pred_ptr, label_ptr, bounds_ptr, counts_ptr, n, num_thresholds,
                            FLOAT_LABELS: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    p = tl.load(pred_ptr + offsets, mask=mask, other=0.0)
    # The arithmetic bucket of fxrec.ops.auroc (k or k + 1 whatever the rounding, corrected by the
    # threshold below it); NaN goes to bucket 1 as torch's clamp / long / clamp sends it there.
    est = tl.minimum(tl.maximum(1.0 + p * (num_thresholds - 1), 1.0), num_thresholds * 1.0)
    bucket = tl.minimum(tl.maximum(est.to(tl.int64), 1), num_thresholds)
    bucket = tl.where(p != p, 1, bucket)
    below = tl.load(bounds_ptr + bucket, mask=mask, other=0.0)
    bucket = tl.where(below >= p, bucket - 1, bucket)
    label = tl.load(label_ptr + offsets, mask=mask, other=0)
    if FLOAT_LABELS:
        bad_label = (label - label * label) != 0  # not 0 or 1 (NaN and inf included)
    else:
        bad_label = (label < 0) | (label > 1)
    positive = (label != 0).to(tl.int64)
    tl.atomic_add(counts_ptr + bucket + (num_thresholds + 1) * positive, tl.full(p.shape, 1, tl.int64), mask=mask,
                  sem="relaxed")
    bad_pred = ~((p >= 0) & (p <= 1))  # NaN fails both
    # the block's bits: one atomic per program (1: a bad prediction, 2: a bad label)
    any_pred = tl.max(tl.where(mask & bad_pred, 1, 0).to(tl.int64), 0)
    any_label = tl.max(tl.where(mask & bad_label, 2, 0).to(tl.int64), 0)
    tl.atomic_or(counts_ptr + 2 * (num_thresholds + 1), any_pred | any_label, sem="relaxed")


def auroc_histogram_triton(pred: Tensor, label: Tensor, bounds: Tensor, num_thresholds: int) -> Tensor:
    """``fxrec::auroc_histogram`` in one launch (after a zero fill of the ``[2 (T + 1) + 1]``
    counts). ``label`` may be bool (read as uint8)."""
    counts = torch.zeros(2 * (num_thresholds + 1) + 1, dtype=torch.int64, device=pred.device)
    n = pred.shape[0]
    if n:
        label = label.view(torch.uint8) if label.dtype == torch.bool else label
        _auroc_histogram_kernel[(cdiv(n, _BLOCK),)](
            pred.contiguous(), label.contiguous(), bounds, counts, n, num_thresholds,
            FLOAT_LABELS=label.is_floating_point(), BLOCK=_BLOCK,
        )
    return counts

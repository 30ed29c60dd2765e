"""``fxrec::auroc_histogram``: one batch's AUROC counts (``fxrec.metrics.auroc``) in one op.

``auroc_histogram(pred [B], label [B], bounds [T + 1], num_thresholds T) -> counts [2 (T + 1) + 1]``
(int64):

- ``counts[k + (T + 1) y]``, ``k`` in ``[0, T]``, ``y`` in {0, 1}: how many predictions exceed
  exactly ``k`` of the T thresholds (strictly: ``torch.bucketize(pred, thresholds)``) with a
  label that is zero (``y = 0``) or not (``y = 1``);
- ``counts[2 (T + 1)]``: the batch's bad values as bits, 1 for a prediction outside [0, 1] or
  NaN, 2 for a label that is not 0 or 1 (NaN included; bool labels never are).

``pred``: float32 or float64; ``label``: any real or bool dtype, same length; ``bounds``: the
thresholds in ``pred``'s dtype, each bucket's lower one (``bounds[k] = thr[k - 1]`` for k >= 1;
``bounds[0]`` is not read). The bucket is arithmetic, not a search: the thresholds are evenly
spaced, so ``floor(1 + p (T - 1))`` clamped to ``[1, T]`` is ``k`` or ``k + 1`` whatever the
rounding, and one comparison with the threshold below it settles which; a NaN lands in bucket 1
(counted, never an out-of-bounds index; the bits report it). Exact for ``T <= ARITH_MAX_T``
(above that float32 rounding may exceed one bucket: the torch kernel binary-searches there, and
the CUDA kernel hands such calls to it).

CPU kernel in torch ops; CUDA: one Triton launch (``fxrec.ops.triton.auroc``: atomic adds into
the zero-filled counts), where the torch kernel took ~15 ops of host dispatch a step.
"""

import torch
from torch import Tensor

from fxrec.ops.triton.auroc import auroc_histogram_triton

__all__ = ["ARITH_MAX_T", "auroc_buckets", "auroc_histogram", "auroc_histogram_torch"]

ARITH_MAX_T = 1 << 20


def _check_args(pred: Tensor, label: Tensor, bounds: Tensor, num_thresholds: int) -> None:
    if pred.dtype not in (torch.float32, torch.float64) or pred.dim() != 1:
        raise TypeError(f"fxrec::auroc_histogram: pred must be 1-D float32 or float64, got {pred.dtype} "
                        f"{tuple(pred.shape)}")
    if label.dim() != 1 or label.shape[0] != pred.shape[0] or label.is_complex():
        raise ValueError(f"fxrec::auroc_histogram: label must be 1-D, real and as long as pred ({pred.shape[0]}), "
                         f"got {label.dtype} {tuple(label.shape)}")
    if num_thresholds < 3 or bounds.dtype != pred.dtype or tuple(bounds.shape) != (num_thresholds + 1,):
        raise ValueError(f"fxrec::auroc_histogram: bounds must be [{num_thresholds} + 1] in pred's dtype "
                         f"(num_thresholds >= 3), got {bounds.dtype} {tuple(bounds.shape)}")
    if label.device != pred.device or bounds.device != pred.device:
        raise ValueError("fxrec::auroc_histogram: pred, label and bounds must be on one device")


def auroc_buckets(pred: Tensor, bounds: Tensor, num_thresholds: int) -> Tensor:
    """int64 ``[B]``: how many thresholds each prediction exceeds (module docstring), in torch ops."""
    t = num_thresholds
    if t > ARITH_MAX_T:
        return torch.bucketize(pred, bounds[1:])
    # 1 + p (T - 1) in one op (the int 1 promotes to pred's dtype), clamped in float (huge values
    # stay convertible) and again as int (NaN's conversion); in place: the passes are memory-bound
    est = torch.add(torch.ones((), dtype=torch.int64, device=pred.device), pred, alpha=t - 1)
    est = est.clamp_(1, t).long().clamp_(1, t)
    too_high = bounds.index_select(0, est) >= pred
    return est.add_(too_high, alpha=-1)  # (sub_ refuses bool operands)


def _bad_bits(pred: Tensor, label: Tensor) -> Tensor:
    """int64 ``[1]``: bit 1 a bad prediction, bit 2 a bad label (module docstring)."""
    bad_pred = (~((pred >= 0) & (pred <= 1))).any()  # NaN fails both
    if label.dtype == torch.bool:
        bad_label = torch.zeros((), dtype=torch.bool, device=label.device)
    elif label.is_floating_point():
        bad_label = (label - label * label != 0).any()  # zero only for 0 and 1 (NaN, inf: NaN)
    else:
        bad_label = ((label < 0) | (label > 1)).any()
    return (bad_pred.long() + 2 * bad_label.long()).reshape(1)


def auroc_histogram_torch(pred: Tensor, label: Tensor, bounds: Tensor, num_thresholds: int) -> Tensor:
    """The reference kernel in torch ops (every device)."""
    bins = auroc_buckets(pred, bounds, num_thresholds).add_(label != 0, alpha=num_thresholds + 1)
    hist = torch.zeros(2 * (num_thresholds + 1), dtype=torch.int64, device=pred.device)
    hist.scatter_add_(0, bins, torch.ones_like(bins))
    return torch.cat([hist, _bad_bits(pred, label)])


@torch.library.custom_op("fxrec::auroc_histogram", mutates_args=())
def auroc_histogram(pred: Tensor, label: Tensor, bounds: Tensor, num_thresholds: int) -> Tensor:
    """The batch's ``[2 (T + 1)]`` (bucket, label) counts and its bad-value bits (module docstring)."""
    _check_args(pred, label, bounds, num_thresholds)
    return auroc_histogram_torch(pred, label, bounds, num_thresholds)


@auroc_histogram.register_kernel("cuda")
def _auroc_histogram_cuda(pred: Tensor, label: Tensor, bounds: Tensor, num_thresholds: int) -> Tensor:
    _check_args(pred, label, bounds, num_thresholds)
    if num_thresholds > ARITH_MAX_T:  # the arithmetic bucket is inexact there
        return auroc_histogram_torch(pred, label, bounds, num_thresholds)
    return auroc_histogram_triton(pred, label, bounds, num_thresholds)


@auroc_histogram.register_fake
def _auroc_histogram_fake(pred: Tensor, label: Tensor, bounds: Tensor, num_thresholds: int) -> Tensor:
    _check_args(pred, label, bounds, num_thresholds)
    return pred.new_empty(2 * (num_thresholds + 1) + 1, dtype=torch.int64)

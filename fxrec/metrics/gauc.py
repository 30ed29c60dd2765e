"""``Gauc``: group AUC (SPEC §5.3), vectorized, accumulated over batches.

A group is the set of rows of a batch that share an ``indicators`` value (a user id, say),
contiguous or not. Per group: the exact AUC with ties counted half (the Mann-Whitney statistic
``(R_pos - P (P + 1) / 2) / (P N)`` on mid-ranks), skipped if the group holds only one class;
the groups are averaged weighted by their size (rows). All groups of a batch count, the first and
the last included (RecIS dropped those two: a bug the SPEC overrules).

How (no Python loop per group; no host sync but the input check): the rows are sorted by
``(indicator, prediction)`` (two stable sorts); group and tie-run boundaries are where the sorted
indicator, or prediction, changes; group and run sizes by ``index_add_`` into B-sized arrays
(no group count needs reading back); each row's mid-rank within its group is
``run_start + (run_size - 1) / 2 - group_start + 1``; positives' rank sums, positive counts and
sizes per group by ``index_add_`` again. Arithmetic in float64 (rank sums are exact up to
B ~ 1e7).

Decisions, written down:
- A group is per batch and per rank: a user whose rows arrive in two batches (or on two ranks)
  counts as two groups. ``forward`` returns ``(batch_gauc, cumulative_gauc)``; the cumulative
  value is ``sum(size * auc) / sum(size)`` over every counted group of every batch since
  ``reset()``.
- When ``torch.distributed`` is initialized, each batch's two sums are all-reduced (summed) across
  ranks before use (a collective: every rank calls ``forward`` the same number of times), so both
  values are global and equal on every rank.
- No group with both classes (in the batch, or in total): the value is 0.0, not NaN, so that
  logs and averages stay finite. 0.0 can also be a genuine GAUC (every group perfectly inverted):
  ``weight_sum == 0`` tells the two apart.
- Inputs ``[B]`` or ``[B, 1]`` (a 0-dim tensor counts as ``[1]``); labels of any dtype with
  values in {0, 1}; predictions any real dtype (only their order matters), NaN rejected;
  indicators any sortable dtype. ``ValueError`` for mismatched shapes, a label not 0 or 1, or a
  NaN prediction: one fused check, **one host sync per call** (``validate_args=False`` skips it;
  skipped as well while ``torch.compile`` traces).
- The sums are float64 buffers ``gauc_sum`` and ``weight_sum`` (in the ``state_dict``: checkpoints
  carry them); results are float64 0-dim tensors on their device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fxrec.metrics.auroc import flatten_batch


def group_auc_sums(labels: torch.Tensor, predictions: torch.Tensor, indicators: torch.Tensor) -> torch.Tensor:
    """float64 [2]: (sum over two-class groups of size * AUC, sum of their sizes). 1-D inputs of
    equal length; labels 0/1."""
    n = labels.numel()
    device = labels.device
    if n == 0:
        return torch.zeros(2, dtype=torch.float64, device=device)
    pred = predictions if predictions.is_floating_point() else predictions.double()
    p, by_pred = torch.sort(pred, stable=True)
    g, by_group = torch.sort(indicators[by_pred], stable=True)
    p = p[by_group]
    y = labels[by_pred[by_group]].to(torch.float64)

    new_group = torch.ones(n, dtype=torch.bool, device=device)
    new_group[1:] = g[1:] != g[:-1]
    new_run = new_group.clone()
    new_run[1:] |= p[1:] != p[:-1]
    gid = new_group.cumsum(0) - 1  # group of each sorted row, in [0, n)
    rid = new_run.cumsum(0) - 1  # tie run (same group and prediction) of each sorted row

    ones = torch.ones(n, dtype=torch.float64, device=device)
    size = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, gid, ones)
    run = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, rid, ones)
    group_start = size.cumsum(0) - size  # sorted position of each group's first row
    run_start = run.cumsum(0) - run
    rank = run_start[rid] + (run[rid] - 1) / 2 - group_start[gid] + 1  # 1-based mid-rank in group

    pos = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, gid, y)
    rank_sum = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, gid, rank * y)
    neg = size - pos
    counted = (pos > 0) & (neg > 0)
    auc = (rank_sum - pos * (pos + 1) / 2) / torch.where(counted, pos * neg, 1.0)
    weight = torch.where(counted, size, 0.0)
    return torch.stack([(weight * auc).sum(), weight.sum()])


class Gauc(nn.Module):
    """Group AUC (module docstring). ``forward(labels, predictions, indicators) ->
    (batch_gauc, cumulative_gauc)``; ``compute()`` the cumulative value; ``reset()``."""

    gauc_sum: torch.Tensor
    weight_sum: torch.Tensor

    def __init__(self, validate_args: bool = True):
        super().__init__()
        self.validate_args = validate_args
        self.register_buffer("gauc_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("weight_sum", torch.zeros((), dtype=torch.float64))

    def _apply(self, fn, recurse=True):
        # The sums stay float64 whatever dtype the model moves to (.half() would ruin them).
        before = (self.gauc_sum, self.weight_sum)
        super()._apply(fn, recurse)
        self.gauc_sum = before[0].to(device=self.gauc_sum.device, dtype=torch.float64)
        self.weight_sum = before[1].to(device=self.weight_sum.device, dtype=torch.float64)
        return self

    def _check(self, labels, predictions, indicators):
        labels = flatten_batch(labels, "labels", "Gauc")
        predictions = flatten_batch(predictions, "predictions", "Gauc")
        indicators = flatten_batch(indicators, "indicators", "Gauc")
        if not (labels.shape == predictions.shape == indicators.shape):
            raise ValueError(
                f"Gauc: labels {tuple(labels.shape)}, predictions {tuple(predictions.shape)} and indicators "
                f"{tuple(indicators.shape)} differ in shape"
            )
        if self.validate_args and not torch.compiler.is_compiling() and labels.numel():
            bad_label = ((labels != 0) & (labels != 1)).any()
            bad_pred = predictions.isnan().any() if predictions.is_floating_point() else bad_label.new_zeros(())
            bad_label, bad_pred = torch.stack([bad_label, bad_pred]).tolist()
            if bad_label:
                raise ValueError("Gauc: labels must be 0 or 1")
            if bad_pred:
                raise ValueError("Gauc: a prediction is NaN")
        return labels, predictions, indicators

    @staticmethod
    def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)

    def forward(self, labels: torch.Tensor, predictions: torch.Tensor, indicators: torch.Tensor):
        """(this batch's GAUC, the GAUC of every batch since reset), float64 0-dim tensors."""
        sums = group_auc_sums(*self._check(labels, predictions, indicators))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        sums = sums.to(self.gauc_sum.device)
        self.gauc_sum += sums[0]
        self.weight_sum += sums[1]
        return self._ratio(sums[0], sums[1]), self.compute()

    def compute(self) -> torch.Tensor:
        """The cumulative GAUC (0.0 while no group has counted)."""
        return self._ratio(self.gauc_sum, self.weight_sum)

    def reset(self) -> None:
        self.gauc_sum.zero_()
        self.weight_sum.zero_()

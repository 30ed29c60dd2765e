"""``AUROC``: TF-style streaming AUC over fixed thresholds (SPEC §5.2), in O(N + T).

The curve is TensorFlow's ``tf.compat.v1.metrics.auc(curve="ROC",
summation_method="trapezoidal")`` (RecIS copied it): ``T`` thresholds
``[-1e-7] + [(i + 1) / (T - 1) for i in range(T - 2)] + [1 + 1e-7]``; a prediction is positive at
a threshold iff ``pred > thr`` (strict); per threshold the tp/fp/tn/fn counts accumulate over
batches; then ``tpr = (tp + 1e-6) / (tp + fn + 1e-6)``, ``fpr = fp / (fp + tn + 1e-6)`` and
``auc = sum_j (fpr[j] - fpr[j+1]) * (tpr[j] + tpr[j+1]) / 2`` (fpr falls as the threshold rises,
so every term is >= 0).

How the counts are made (no N x T comparison matrix): each prediction's bucket ``k`` = the number
of thresholds it exceeds (what ``torch.bucketize(pred, thr)`` returns); a histogram of
``k + (T + 1) label`` in ``2 (T + 1)`` bins (no host sync, unlike CUDA ``bincount``); then a
cumulative sum gives, per threshold ``j``, how many negatives and positives have ``k <= j``: that
is tn and fn, and the totals minus them fp and tp. The histogram and the batch's value check are
ONE op, ``fxrec::auroc_histogram`` (one Triton launch on CUDA). Because the thresholds are evenly
spaced the bucket is computed arithmetically (``floor(1 + pred * (T - 1))``, which is ``k`` or
``k + 1``, then corrected by one comparison with the threshold below it, so float rounding cannot
move a prediction across a threshold): 3-5x faster than ``torch.bucketize``'s binary search on CPU
(``bench/metrics.py``), and identical to it (tested).

With exact counts the binned curve's trapezoid is the Mann-Whitney AUC of the *bucket indices*
(ties counted half): it differs from the exact AUC only through positive/negative pairs that fall
into the same bucket (each moves it by at most ``0.5 / (P N)``) and the 1e-6 terms (< 3e-6).
Edge cases follow the formula, as TF: no positive seen -> tpr = 1 everywhere -> AUC 1; no negative
seen (or nothing at all) -> fpr = 0 everywhere -> AUC 0.

Comparisons run in float32 for float16/bfloat16/float32 predictions (the thresholds rounded to
float32, as TF and RecIS compare them) and in float64 for float64 predictions; integer or bool
predictions are converted to float32. Counters are int64 *buffers* (``tp``, ``fp``, ``tn``,
``fn``: RecIS's names, so they sit in the model's ``state_dict`` and checkpoints carry them; they
follow the module's ``.to()``). ``compute()`` returns a float64 0-dim tensor on the counters'
device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

KEPSILON = 1e-7  # how far the outer thresholds sit outside [0, 1] (TF's kepsilon)
EPSILON = 1e-6  # TF's smoothing in tpr and fpr


def auroc_thresholds(num_thresholds: int) -> list[float]:
    """The SPEC's threshold list (Python floats, increasing)."""
    inner = [(i + 1) * 1.0 / (num_thresholds - 1) for i in range(num_thresholds - 2)]
    return [0.0 - KEPSILON] + inner + [1.0 + KEPSILON]


def flatten_batch(t: torch.Tensor, what: str, owner: str = "AUROC") -> torch.Tensor:
    """[B], [B, 1] or a 0-dim tensor (what ``squeeze()`` leaves of a batch of one) -> [B]; a
    ``ValueError`` naming ``owner`` and ``what`` otherwise (shared by AUROC and Gauc)."""
    if t.dim() == 0:
        return t.reshape(1)
    if t.dim() == 2 and t.shape[1] == 1:
        return t.reshape(-1)
    if t.dim() != 1:
        raise ValueError(f"{owner}: {what} must have shape [B] or [B, 1], got {tuple(t.shape)}")
    return t


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class AUROC(nn.Module):
    """TF-style streaming AUROC (module docstring) with ``num_thresholds`` thresholds.

    - ``update(pred, label)``: adds the batch's counts to the counters.
    - ``compute()``: the AUC of everything accumulated since the last ``reset()``.
    - ``forward(pred, label)``: the AUC of this batch alone; it does **not** touch the counters
      (RecIS's behaviour; the tutorial calls ``update()`` then ``compute()``).
    - ``reset()``: zeroes the counters.

    ``dist_sync_on_step=True``: when ``torch.distributed`` is initialized, every batch's counts
    (in ``update`` and in ``forward``) are all-reduced (summed) across ranks before use, so every
    rank holds the global counters and the global AUC; it is a collective: every rank must call
    it the same number of times. Not initialized: a no-op. ``False``: the counters stay local to
    the rank (``compute`` does not sync either).

    Inputs: ``pred`` and ``label`` of shape ``[B]`` or ``[B, 1]`` (equal ``B``; a 0-dim tensor
    counts as ``[1]``), any float dtype for ``pred``, labels of any real or bool dtype with values
    in {0, 1}. ``ValueError`` for a prediction outside [0, 1] or NaN, a label not 0 or 1, or
    mismatched shapes. The value check comes with the histogram: ``fxrec::auroc_histogram``
    returns the batch's bad-value bits with its counts, read back to the host (one int). On the
    CPU it is read before the counters move. On a GPU the
    read would wait for the batch's predictions (a host sync per step, stalling the launch
    queue), so it does not wait: the check's result is copied to the host asynchronously and read
    by the NEXT ``update`` or ``forward`` call (by then the device is normally past it, so nothing
    waits), which raises the ``ValueError`` for the earlier batch, whose counts are already in the
    counters; ``check_pending()`` reads it at once (a sync). ``validate_args=False`` skips the
    check; it is also skipped while ``torch.compile`` traces (a host read would break the graph).
    Unchecked, a prediction below 0 or above 1 lands in the outer
    buckets (as ``bucketize`` puts it), a NaN in the lowest inner bucket and any non-zero label
    counts as positive: never an out-of-bounds index.

    Under ``DistributedDataParallel`` the counters are buffers, which DDP broadcasts from rank 0
    at every forward by default (``broadcast_buffers=True``): harmless with
    ``dist_sync_on_step=True`` (every rank holds the same counters), but it overwrites per-rank
    counters otherwise; wrap with ``broadcast_buffers=False`` (or ignore these buffers) then.
    """

    tp: torch.Tensor
    fp: torch.Tensor
    tn: torch.Tensor
    fn: torch.Tensor
    thresholds: torch.Tensor

    def __init__(self, num_thresholds: int = 200, dist_sync_on_step: bool = False, validate_args: bool = True):
        super().__init__()
        if num_thresholds <= 2:
            raise ValueError(f"AUROC: num_thresholds must be > 2, got {num_thresholds}")
        self.num_thresholds = int(num_thresholds)
        self.dist_sync_on_step = dist_sync_on_step
        self.validate_args = validate_args
        t = self.num_thresholds
        # float64 master copy; cast to the comparison dtype per call (T elements). Not persistent:
        # it is a function of num_thresholds, and old checkpoints need not carry it.
        self.register_buffer("thresholds", torch.tensor(auroc_thresholds(t), dtype=torch.float64), persistent=False)
        for name in ("tp", "fp", "tn", "fn"):
            self.register_buffer(name, torch.zeros(t, dtype=torch.int64))
        self._make_constants()
        # a GPU batch's value check on its way to the host: (flags [2] in pinned memory, its event)
        self._pending_check: tuple[torch.Tensor, torch.cuda.Event] | None = None

    def _apply(self, fn, recurse=True):
        # .half() / .to(dtype) would round the thresholds: rebuild them in float64 on the
        # counters' (possibly new) device. The int64 counters are never cast by dtype moves.
        super()._apply(fn, recurse)
        self.thresholds = torch.tensor(auroc_thresholds(self.num_thresholds), dtype=torch.float64, device=self.tp.device)
        self._make_constants()
        return self

    def _make_constants(self) -> None:
        """The tensors every batch uses, on the counters' device: made with the buffers, not per
        batch (each would be ops per step; nor while a compiled step runs, which would recompile
        when it filled a cache). Plain attributes, not buffers: ``.half()`` must not round them.

        - ``_bounds``: per comparison dtype (float32, float64: ``_check``), each bucket's lower
          threshold (``[k]``: ``thr[k - 1]``, k >= 1; [0] is never read: ``fxrec::auroc_histogram``);
        - ``_rate_scale``, ``_rate_eps``: (fpr, tpr)'s numerators are (fp / 2, tp + 1e-6) (``_auc``),
          ``_denominator_eps`` TF's smoothing of their denominators; float64, so the int64 counts
          they meet become float64;
        - ``_trapezoid_signs``: -1, +1 (each neighbouring pair's fpr difference, tpr sum)."""
        device = self.tp.device
        self._bounds = {}
        for dtype in (torch.float32, torch.float64):
            thr = self.thresholds.to(dtype)
            self._bounds[dtype] = torch.cat([thr[:1], thr])
        self._rate_scale = torch.tensor([[0.5], [1.0]], dtype=torch.float64, device=device)
        self._rate_eps = torch.tensor([[0.0], [EPSILON]], dtype=torch.float64, device=device)
        self._denominator_eps = torch.tensor([EPSILON], dtype=torch.float64, device=device)
        self._trapezoid_signs = torch.tensor([[-1.0], [1.0]], dtype=torch.float64, device=device)

    def extra_repr(self) -> str:
        return f"num_thresholds={self.num_thresholds}, dist_sync_on_step={self.dist_sync_on_step}"

    # -- counting --------------------------------------------------------------------------------

    def _check(self, pred: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred, label = flatten_batch(pred, "predictions"), flatten_batch(label, "labels")
        if pred.shape != label.shape:
            raise ValueError(f"AUROC: predictions {tuple(pred.shape)} and labels {tuple(label.shape)} differ in shape")
        if not pred.is_floating_point() or pred.dtype in (torch.float16, torch.bfloat16):
            pred = pred.float()
        if label.is_complex():
            raise TypeError(f"AUROC: labels must be real or bool, got {label.dtype}")
        if label.device != pred.device:
            label = label.to(pred.device)
        return pred, label

    def _check_bits(self, bits: torch.Tensor) -> None:
        """The value check of a batch from its bad-value bits (``fxrec::auroc_histogram``, int64
        ``[1]``): at once on the CPU, the next call's on a GPU (class docstring)."""
        if bits.device.type != "cuda":
            self._raise_for(int(bits), "")
            return
        host = torch.empty(bits.shape, dtype=bits.dtype, pin_memory=True)
        host.copy_(bits, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending_check = (host, event)

    def check_pending(self) -> None:
        """Raise the ``ValueError`` of a GPU batch whose value check has not been read yet
        (class docstring), waiting for it if needed; a no-op otherwise."""
        if self._pending_check is None:
            return
        host, event = self._pending_check
        self._pending_check = None
        event.synchronize()
        self._raise_for(int(host), " (an earlier batch on the GPU, already counted)")

    @staticmethod
    def _raise_for(bits: int, which: str) -> None:
        """``bits``: ``fxrec::auroc_histogram``'s, 1 a bad prediction, 2 a bad label."""
        if bits & 1:
            raise ValueError(f"AUROC: predictions must lie in [0, 1] (a prediction is outside it or NaN){which}")
        if bits & 2:
            raise ValueError(f"AUROC: labels must be 0 or 1{which}")

    def _batch_counts(self, pred: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch's counts per threshold (all-reduced if asked), int64 [2, T] each: ``above``
        (fp, tp: predicted positive) and ``below`` (tn, fn: predicted negative)."""
        with torch.no_grad():  # pred may carry autograd history: recording it would add ops
            pred, label = self._check(pred, label)
            checks = self.validate_args and not torch.compiler.is_compiling()  # (class docstring)
            if checks:
                self.check_pending()  # an earlier GPU batch's error first
            t = self.num_thresholds
            # one op: the histogram of bucket k + (T + 1) label (any non-zero label counts as
            # positive, in bounds) and the bad-value bits
            counts = torch.ops.fxrec.auroc_histogram(pred, label, self._bounds[pred.dtype], t)
            hist = counts.narrow(0, 0, 2 * (t + 1))
            if checks and pred.numel():
                self._check_bits(counts.narrow(0, 2 * (t + 1), 1))
            if self.dist_sync_on_step and _distributed():
                dist.all_reduce(hist, op=dist.ReduceOp.SUM)  # the counts below are linear in it
            # [0, k] negatives, [1, k] positives with bucket <= k; at threshold j those with bucket
            # <= j are predicted negative (tn, fn), the rest of each total positive (fp, tp)
            below, total = hist.view(2, t + 1).cumsum(1).split([t, 1], 1)
            return total - below, below

    def _auc(self, above: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
        """The AUC (module docstring's formula) of int64 [2, T] counts: ``above`` fp, tp and
        ``below`` tn, fn; in float64, the bits of the formula evaluated term by term."""
        # [fpr / 2, tpr]: the trapezoid's 1/2 taken in fp's numerator, which is exact (a power of
        # 2, far from float64's underflow), so every later rounding is the formula's, halved
        rates = torch.addcmul(self._rate_eps, above, self._rate_scale) / (above + below + self._denominator_eps)
        # left + right * (-1, +1): (fpr[j] - fpr[j+1]) / 2 and tpr[j] + tpr[j+1]; their product
        pairs = torch.addcmul(rates[:, :-1], rates[:, 1:], self._trapezoid_signs)
        return pairs.prod(0).sum()

    # -- the metric API --------------------------------------------------------------------------

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add this batch's counts to the counters."""
        above, below = self._batch_counts(pred, label)
        torch._foreach_add_([self.fp, self.tp, self.tn, self.fn], [*above, *below])

    def compute(self) -> torch.Tensor:
        """AUC (float64 0-dim tensor) of everything accumulated since the last reset."""
        return self._auc(torch.stack([self.fp, self.tp]), torch.stack([self.tn, self.fn]))

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """AUC of this batch alone (the counters are left as they are)."""
        return self._auc(*self._batch_counts(pred, label))

    def reset(self) -> None:
        """Zero the counters."""
        for c in (self.tp, self.fp, self.tn, self.fn):
            c.zero_()

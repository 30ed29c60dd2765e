"""AUROC and Gauc benchmark: ``AUROC.update`` + ``compute`` on N predictions (default 1M) against a
naive O(N x T) baseline measured in the same run, plus Gauc's forward.

  fxrec AUROC           update (input check: one host sync; arithmetic bucket; scatter_add
                        histogram; cumulative sum) + compute, T = 200
  fxrec AUROC, no check the same with ``validate_args=False`` (no host sync)
  bucketize variant     the same counts with ``torch.bucketize`` for the bucket (what the
                        arithmetic bucket replaces)
  naive O(N x T)        ``pred[:, None] > thr[None, :]`` in chunks of 64K rows, tp/fp summed per
                        threshold (RecIS's method, chunked to bound memory) + the same compute
  Gauc forward          N rows in N / 20 groups (two stable sorts + segment sums)

Every AUROC variant's counters are checked equal to fxrec's before timing. Printed: the machine,
then median ms and M predictions/s per row and the naive/fxrec ratio.

    python -m bench.metrics [--n 1000000] [--thresholds 200] [--reps 10] [--device cuda|cpu] [--threads N]
    python -m bench.metrics --smoke    # 100K predictions, 3 reps: seconds

On a shared CPU machine ``--threads 1`` gives steadier numbers (one busy core stalls every
2-thread op).
"""

from __future__ import annotations

import argparse

import torch

from bench.timing import machine, median_ms
from fxrec.metrics import AUROC, Gauc


def naive_counts(pred: torch.Tensor, label: torch.Tensor, thr: torch.Tensor,
                 chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """([fp, tp], [tn, fn]) per threshold (``AUROC._batch_counts``'s layout) by comparing every
    prediction with every threshold."""
    tp = torch.zeros(thr.numel(), dtype=torch.int64, device=pred.device)
    fp = torch.zeros_like(tp)
    pos_total = neg_total = 0
    for p, y in zip(pred.split(chunk), label.split(chunk)):
        above = p[:, None] > thr[None, :]
        yb = y.bool()[:, None]
        tp += (above & yb).sum(0)
        fp += (above & ~yb).sum(0)
        pos_total = pos_total + y.sum()
        neg_total = neg_total + (y.numel() - y.sum())
    return torch.stack([fp, tp]), torch.stack([neg_total - fp, pos_total - tp])


def bucketize_counts(m: AUROC, pred: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = m.num_thresholds
    bins = torch.bucketize(pred, m.thresholds.to(pred.dtype)) * 2 + label
    hist = torch.zeros(2 * (t + 1), dtype=torch.int64, device=pred.device).scatter_add_(0, bins, torch.ones_like(bins))
    at_or_above = hist.view(t + 1, 2).flip(0).cumsum(0).flip(0)
    tp, fp, total = at_or_above[1:, 1], at_or_above[1:, 0], at_or_above[0]
    return torch.stack([fp, tp]), torch.stack([total[0] - fp, total[1] - tp])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--thresholds", type=int, default=200)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    ap.add_argument("--smoke", action="store_true", help="100K predictions, 3 reps")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.n, args.reps = 100_000, 3
    dev, n, t = args.device, args.n, args.thresholds

    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(n, generator=gen).to(dev)
    label = (torch.rand(n, generator=gen) < 0.3).long().to(dev)
    groups = torch.randint(0, max(1, n // 20), (n,), generator=gen).to(dev)
    checked, unchecked = AUROC(t).to(dev), AUROC(t, validate_args=False).to(dev)
    thr = checked.thresholds.to(pred.dtype)

    reference = torch.cat(checked._batch_counts(pred, label))
    assert torch.equal(torch.cat(naive_counts(pred, label, thr)), reference), "naive counts differ"
    assert torch.equal(torch.cat(bucketize_counts(checked, pred, label)), reference), "bucketize counts differ"

    def fxrec_step(m):
        def run():
            m.update(pred, label)
            return m.compute()
        return run

    def counts_then_auc(fn):
        return lambda: checked._auc(*fn())

    gauc = Gauc().to(dev)
    rows = [
        ("fxrec AUROC update+compute", fxrec_step(checked)),
        ("fxrec AUROC, validate_args=False", fxrec_step(unchecked)),
        ("bucketize variant (no check)", counts_then_auc(lambda: bucketize_counts(checked, pred, label))),
        ("naive O(N x T), 64K chunks", counts_then_auc(lambda: naive_counts(pred, label, thr))),
        ("Gauc forward (N/20 groups)", lambda: gauc(label, pred, groups)),
    ]
    print(f"# AUROC / Gauc, N = {n:,}, T = {t}, {machine(dev)}")
    print("| op | ms | M preds/s | x fxrec AUROC |")
    print("|---|---|---|---|")
    base = None
    for name, fn in rows:
        reps = max(1, args.reps // 5) if name.startswith("naive") else args.reps
        ms = median_ms(fn, dev, reps=reps, warmup=1)
        base = base if base is not None else ms
        print(f"| {name} | {ms:.3f} | {n / ms / 1e3:.1f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()

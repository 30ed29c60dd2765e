"""fxrec.metrics (SPEC §5.2 AUROC, §5.3 Gauc), fxrec.framework.metrics and fxrec.utils.logger.

AUROC against two independent numpy oracles: SPEC's TF-binned formula computed the O(N x T) way
(every prediction against every threshold), to 1e-9; and the exact AUC (mid-ranks, ties half),
within the binning bound derived in ``binning_bound``. Gauc against a pure-Python per-group pair
count. Distribution: a 2-process gloo group (spawned, world 2)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

from fxrec.framework import metrics as fmetrics
from fxrec.metrics import AUROC, Gauc
from fxrec.metrics.gauc import group_auc_sums
from fxrec.ops.auroc import auroc_buckets
from fxrec.utils.logger import Logger

HAS_CUDA = torch.cuda.is_available()
SEED_LABELS = [0, 0, 1, 0, 0, 0, 1, 0, 1, 1]
SEED_PREDS = [0.1, 0.2, 0.3, 0.4, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


# -- numpy / pure-Python oracles (no fxrec code) ---------------------------------------------------


def np_thresholds(t: int, dtype) -> np.ndarray:
    """SPEC §5.2's list, written out again, rounded to the comparison dtype."""
    thr = [-1e-7] + [(i + 1) / (t - 1) for i in range(t - 2)] + [1 + 1e-7]
    return np.array(thr, dtype=np.float64).astype(dtype)


def tf_counts(pred: np.ndarray, label: np.ndarray, t: int):
    """tp, fp, tn, fn per threshold, the O(N x T) way: pred > thr compared in pred's dtype."""
    thr = np_thresholds(t, pred.dtype)
    positive = pred[:, None] > thr[None, :]
    y = label.astype(bool)[:, None]
    return ((positive & y).sum(0), (positive & ~y).sum(0), (~positive & ~y).sum(0), (~positive & y).sum(0))


def tf_auc(tp, fp, tn, fn) -> float:
    tp, fp, tn, fn = (np.asarray(c, dtype=np.float64) for c in (tp, fp, tn, fn))
    tpr = (tp + 1e-6) / (tp + fn + 1e-6)
    fpr = fp / (fp + tn + 1e-6)
    return float(np.sum((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2))


def exact_auc(pred: np.ndarray, label: np.ndarray) -> float:
    """Mann-Whitney on mid-ranks (ties half), O(N log N)."""
    pred = pred.astype(np.float64)
    _, inverse, counts = np.unique(pred, return_inverse=True, return_counts=True)
    mid = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mid-rank of each distinct value
    ranks = mid[inverse]
    p = int(label.sum())
    n = len(label) - p
    return float((ranks[label == 1].sum() - p * (p + 1) / 2) / (p * n))


def binning_bound(pred: np.ndarray, label: np.ndarray, t: int) -> float:
    """|binned - exact| bound. With exact counts the trapezoid over the thresholds is the
    Mann-Whitney AUC of the bucket indices (how many thresholds each prediction exceeds): it
    differs from the exact AUC only on positive/negative pairs in one bucket, where the exact
    AUC scores 0, 0.5 or 1 and the binned one 0.5: at most 0.5 per pair / (P N). The 1e-6 terms
    move tpr and fpr by at most 1e-6 each (P, N >= 1): < 3e-6 on the area."""
    thr = np_thresholds(t, pred.dtype)
    bucket = (pred[:, None] > thr[None, :]).sum(1)
    pos = np.bincount(bucket[label == 1], minlength=t + 1)
    neg = np.bincount(bucket[label == 0], minlength=t + 1)
    p, n = int(label.sum()), len(label) - int(label.sum())
    return 0.5 * float((pos * neg).sum()) / (p * n) + 3e-6


def gauc_oracle(labels, preds, groups):
    """(sum of size * AUC over two-class groups, sum of their sizes), one group and pair at a time."""
    rows: dict = {}
    for y, p, g in zip(labels, preds, groups):
        rows.setdefault(g, []).append((y, p))
    num = den = 0.0
    for members in rows.values():
        pos = [p for y, p in members if y == 1]
        neg = [p for y, p in members if y == 0]
        if not pos or not neg:
            continue
        wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
        num += len(members) * wins / (len(pos) * len(neg))
        den += len(members)
    return num, den


# -- strategies ------------------------------------------------------------------------------------

THRESHOLD_COUNTS = [3, 4, 7, 200]


def near_thresholds(t: int) -> list[float]:
    """Every float32 threshold inside [0, 1] and its float32 neighbours: where rounding bites."""
    thr = np_thresholds(t, np.float32)[1:-1]
    values = np.concatenate([thr, np.nextafter(thr, np.float32(2)), np.nextafter(thr, np.float32(-1)), [0, 1]])
    return [float(v) for v in np.clip(values, 0, 1)]


@st.composite
def auroc_data(draw, max_n=200):
    t = draw(st.sampled_from(THRESHOLD_COUNTS))
    n = draw(st.integers(0, max_n))
    special = near_thresholds(t)
    value = st.one_of(st.floats(0, 1, width=32), st.sampled_from(special))
    preds = draw(st.lists(value, min_size=n, max_size=n))
    labels = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    return t, np.array(preds, dtype=np.float32), np.array(labels, dtype=np.int64)


# -- AUROC -----------------------------------------------------------------------------------------


def test_seed_value():
    m = AUROC(num_thresholds=200)
    m.update(torch.tensor(SEED_PREDS), torch.tensor(SEED_LABELS))
    assert round(float(m.compute()), 4) == 0.7917
    assert round(float(AUROC()(torch.tensor(SEED_PREDS), torch.tensor(SEED_LABELS))), 4) == 0.7917
    assert abs(float(m.compute()) - tf_auc(*tf_counts(np.array(SEED_PREDS, np.float32), np.array(SEED_LABELS), 200))) < 1e-12


@given(auroc_data())
def test_auroc_matches_tf_formula_and_exact_auc(data):
    t, preds, labels = data
    m = AUROC(num_thresholds=t)
    m.update(torch.from_numpy(preds), torch.from_numpy(labels))
    counts = tf_counts(preds, labels, t)
    for name, expected in zip(("tp", "fp", "tn", "fn"), counts):
        np.testing.assert_array_equal(getattr(m, name).numpy(), expected, err_msg=name)
    got = float(m.compute())
    assert abs(got - tf_auc(*counts)) <= 1e-9
    p = int(labels.sum())
    if 0 < p < len(labels):
        assert abs(got - exact_auc(preds, labels)) <= binning_bound(preds, labels, t)


@given(auroc_data(max_n=100))
def test_auroc_float64_predictions(data):
    t, preds, labels = data
    preds64 = preds.astype(np.float64) * (1 - 1e-12)  # leave float32's grid
    m = AUROC(num_thresholds=t)
    m.update(torch.from_numpy(preds64), torch.from_numpy(labels))
    assert abs(float(m.compute()) - tf_auc(*tf_counts(preds64, labels, t))) <= 1e-9


def test_auroc_well_spread_is_exact():
    """One class per bucket: no pair shares a bucket, so binned == exact up to the 1e-6 terms."""
    t = 200
    gen = np.random.default_rng(0)
    buckets = gen.permutation(t - 1)[:150]
    preds = ((buckets + 0.5) / (t - 1)).astype(np.float32)
    labels = gen.integers(0, 2, size=150)
    labels[:2] = [0, 1]
    m = AUROC(num_thresholds=t)
    m.update(torch.from_numpy(preds), torch.from_numpy(labels))
    assert abs(float(m.compute()) - exact_auc(preds, labels)) <= 3e-6


@pytest.mark.parametrize("t", [3, 7, 200, 1000, 65537])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_buckets_equal_bucketize(t, dtype):
    """The arithmetic bucket (ceil + one correction per side) is exactly torch.bucketize's."""
    m = AUROC(num_thresholds=t, validate_args=False)
    thr = m.thresholds.to(dtype)
    inner = thr[1:-1]
    p = torch.cat([inner, torch.nextafter(inner, torch.tensor(2.0, dtype=dtype)),
                   torch.nextafter(inner, torch.tensor(-1.0, dtype=dtype)),
                   torch.rand(10_000, generator=torch.Generator().manual_seed(t), dtype=dtype),
                   torch.tensor([0.0, 1.0, -0.5, -1e-8, 1 + 1e-8, 7.0, 1e30, -1e30], dtype=dtype)])
    torch.testing.assert_close(auroc_buckets(p, m._bounds[dtype], t), torch.bucketize(p, thr), rtol=0, atol=0)
    nan = auroc_buckets(torch.tensor([float("nan")], dtype=dtype), m._bounds[dtype], t)  # in range, no crash
    assert 0 <= int(nan) <= t


@given(auroc_data(), st.lists(st.integers(0, 200), max_size=4))
def test_auroc_accumulates_like_one_batch(data, cuts):
    t, preds, labels = data
    cuts = sorted(c for c in cuts if c <= len(preds))
    whole, parts = AUROC(num_thresholds=t), AUROC(num_thresholds=t)
    whole.update(torch.from_numpy(preds), torch.from_numpy(labels))
    for p, y in zip(np.split(preds, cuts), np.split(labels, cuts)):
        parts.update(torch.from_numpy(p), torch.from_numpy(y))
    for name in ("tp", "fp", "tn", "fn"):
        assert torch.equal(getattr(whole, name), getattr(parts, name))
    assert float(whole.compute()) == float(parts.compute())


def test_auroc_forward_reset():
    p, y = torch.tensor(SEED_PREDS), torch.tensor(SEED_LABELS)
    m = AUROC()
    m.update(p[:5], y[:5])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    batch = m(p, y)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), "forward must not touch the counters"
    fresh = AUROC()
    fresh.update(p, y)
    assert float(batch) == float(fresh.compute())
    m.reset()
    assert all(int(v.abs().sum()) == 0 for v in m.state_dict().values())
    m.update(p, y)
    assert float(m.compute()) == float(fresh.compute())


def test_auroc_edge_cases():
    m = AUROC()
    assert float(m.compute()) == 0.0  # nothing seen: fpr = 0 everywhere
    m.update(torch.tensor([0.2, 0.7]), torch.tensor([1, 1]))
    assert float(m.compute()) == 0.0  # positives only: fpr = 0 everywhere (TF's formula)
    m.update(torch.empty(0), torch.empty(0))
    assert int(m.tp[0]) == 2
    m.reset()
    m.update(torch.tensor([0.2, 0.7]), torch.tensor([0, 0]))
    assert abs(float(m.compute()) - 1.0) < 1e-6  # negatives only: tpr = 1e-6 / 1e-6 everywhere


@pytest.mark.parametrize("pdtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("ldtype", [torch.bool, torch.int32, torch.int64, torch.float32])
def test_auroc_shapes_and_dtypes(pdtype, ldtype):
    p = torch.tensor(SEED_PREDS, dtype=pdtype)
    y = torch.tensor(SEED_LABELS).to(ldtype)
    expected = tf_auc(*tf_counts(p.float().numpy() if pdtype != torch.float64 else p.numpy(), np.array(SEED_LABELS), 200))
    for pp, yy in [(p, y), (p[:, None], y[:, None]), (p[:, None], y), (p, y[:, None])]:
        m = AUROC()
        m.update(pp, yy)
        assert abs(float(m.compute()) - expected) < 1e-12
    one = AUROC()
    one.update(p[:1].squeeze(), y[:1].squeeze())  # a batch of one squeezed to 0-dim
    assert int(one.tp[0] + one.fn[0] + one.fp[0] + one.tn[0]) == 1


@pytest.mark.parametrize("pred, label, match", [
    ([0.5, 1.5], [0, 1], r"\[0, 1\]"),
    ([-0.1, 0.5], [0, 1], r"\[0, 1\]"),
    ([float("nan"), 0.5], [0, 1], r"\[0, 1\]"),
    ([0.5, 0.5], [0, 2], "labels"),
    ([0.5, 0.5], [0, 0.5], "labels"),
    ([0.5, 0.5], [0, 1, 1], "shape"),
])
def test_auroc_errors(pred, label, match):
    m = AUROC()
    with pytest.raises(ValueError, match=match):
        m.update(torch.tensor(pred), torch.tensor(label))
    with pytest.raises(ValueError, match=match):
        m(torch.tensor(pred), torch.tensor(label))
    assert int(m.tp.sum() + m.fp.sum() + m.tn.sum() + m.fn.sum()) == 0


def test_auroc_bad_shapes_and_arguments():
    with pytest.raises(ValueError, match="shape"):
        AUROC().update(torch.rand(4, 2), torch.ones(4, 2))
    with pytest.raises(ValueError, match="num_thresholds"):
        AUROC(num_thresholds=2)
    m = AUROC(validate_args=False)
    m.update(torch.tensor([1.5, -1.0, 0.5]), torch.tensor([1, 0, 1]))  # no check: outer buckets
    assert m.tp.tolist()[0] == 2 and m.tp.tolist()[-1] == 1


@pytest.mark.parametrize("pdtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("ldtype", [torch.bool, torch.int64, torch.float32])
def test_auroc_step_op_count(pdtype, ldtype):
    """update + compute run every training step, and on a GPU each aten op costs the host a
    dispatch (bench/step_host.py): their count is pinned (20, ``fxrec::auroc_histogram`` one of
    them, plus the value check's view and read, plus a float16 cast; the tutorial's float32
    predictions with autograd history and float labels: 22, were 33 with the histogram and the
    check in torch ops, 55 before that), with no op that would sync a GPU but the CPU check's
    read, and the oracle's results."""
    from bench.step_host import HostOpCounter

    gen = torch.Generator().manual_seed(0)
    p = torch.rand(64, generator=gen).to(pdtype).requires_grad_()
    y = (torch.rand(64, generator=gen) < 0.3).to(ldtype)
    compared = p.detach().numpy() if pdtype == torch.float64 else p.detach().float().numpy()
    counts = tf_counts(compared, y.long().numpy(), 200)
    cast = int(pdtype == torch.float16)
    for validate, ops, syncs in [(True, 22 + cast, {"_local_scalar_dense"}), (False, 20 + cast, set())]:
        m = AUROC(validate_args=validate)
        with HostOpCounter("cpu") as counter:
            m.update(p, y)
            auc = m.compute()
        assert counter.ops <= ops and {reason for reason, _, _ in counter.syncs} == syncs
        for name, expected in zip(("tp", "fp", "tn", "fn"), counts):
            np.testing.assert_array_equal(getattr(m, name).numpy(), expected, err_msg=name)
        assert abs(float(auc) - tf_auc(*counts)) <= 1e-12


def test_auroc_buffers_in_state_dict():
    model = torch.nn.Module()
    model.auc = AUROC(num_thresholds=50)
    assert list(model.parameters()) == []
    assert set(model.state_dict()) == {"auc.tp", "auc.fp", "auc.tn", "auc.fn"}
    assert all(v.dtype == torch.int64 for v in model.state_dict().values())
    model.auc.update(torch.tensor(SEED_PREDS), torch.tensor(SEED_LABELS))
    other = torch.nn.Module()
    other.auc = AUROC(num_thresholds=50)
    other.load_state_dict(model.state_dict())
    assert float(other.auc.compute()) == float(model.auc.compute())
    model.half()  # dtype moves leave counters and thresholds alone
    assert model.auc.thresholds.dtype == torch.float64 and model.auc.tp.dtype == torch.int64
    assert float(other.auc.compute()) == float(model.auc.compute())


# -- Gauc ------------------------------------------------------------------------------------------


@st.composite
def gauc_data(draw, max_n=60):
    n = draw(st.integers(0, max_n))
    n_groups = draw(st.integers(1, 12))
    pred = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.floats(-5, 5, width=32))
    preds = draw(st.lists(pred, min_size=n, max_size=n))
    labels = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    groups = draw(st.lists(st.integers(-3, n_groups), min_size=n, max_size=n))  # interleaved
    return labels, preds, groups


def as_tensors(labels, preds, groups):
    return (torch.tensor(labels, dtype=torch.int64), torch.tensor(preds, dtype=torch.float32),
            torch.tensor(groups, dtype=torch.int64))


def ratio(num, den):
    return num / den if den > 0 else 0.0


@given(gauc_data())
def test_gauc_matches_oracle(data):
    labels, preds, groups = data
    preds = [float(np.float32(p)) for p in preds]
    num, den = gauc_oracle(labels, preds, groups)
    sums = group_auc_sums(*as_tensors(labels, preds, groups))
    assert abs(float(sums[0]) - num) <= 1e-9 * max(1.0, num) and float(sums[1]) == den
    batch, total = Gauc()(*as_tensors(labels, preds, groups))
    assert abs(float(batch) - ratio(num, den)) <= 1e-12 and float(total) == float(batch)


@given(st.lists(gauc_data(max_n=30), min_size=1, max_size=4))
def test_gauc_cumulative(batches):
    m = Gauc()
    num_all = den_all = 0.0
    for labels, preds, groups in batches:
        preds = [float(np.float32(p)) for p in preds]
        num, den = gauc_oracle(labels, preds, groups)
        num_all, den_all = num_all + num, den_all + den
        batch, total = m(*as_tensors(labels, preds, groups))
        assert abs(float(batch) - ratio(num, den)) <= 1e-12
        assert abs(float(total) - ratio(num_all, den_all)) <= 1e-12
    assert abs(float(m.compute()) - ratio(num_all, den_all)) <= 1e-12
    m.reset()
    assert float(m.compute()) == 0.0 and float(m.weight_sum) == 0.0


def test_gauc_fixed_cases():
    # group 3: AUC 1 (size 3); group 7: a tie, 0.5 (size 2); group 9: one class (skipped);
    # groups first and last in sort order both count (RecIS dropped them).
    labels = [1, 0, 1, 0, 1, 1]
    preds = [0.9, 0.1, 0.5, 0.5, 0.2, 0.3]
    groups = [3, 3, 7, 7, 3, 9]
    batch, total = Gauc()(*as_tensors(labels, preds, groups))
    assert abs(float(batch) - 0.8) < 1e-12
    all_ties = Gauc()(torch.tensor([0, 1, 0, 1]), torch.full((4,), 0.3), torch.tensor([1, 1, 2, 2]))[0]
    assert float(all_ties) == 0.5
    singles = Gauc()(torch.tensor([0, 1, 1]), torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1, 2, 3]))
    assert float(singles[0]) == 0.0 and float(singles[1]) == 0.0  # no group counts: 0, not NaN
    shaped = Gauc()(torch.tensor(labels)[:, None].float(), torch.tensor(preds)[:, None], torch.tensor(groups)[:, None])
    assert abs(float(shaped[0]) - 0.8) < 1e-12
    empty = Gauc()(torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.int64))
    assert float(empty[0]) == 0.0


def test_gauc_errors_and_state():
    m = Gauc()
    with pytest.raises(ValueError, match="shape"):
        m(torch.tensor([0, 1]), torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="labels"):
        m(torch.tensor([0, 2]), torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="NaN"):
        m(torch.tensor([0, 1]), torch.tensor([0.1, float("nan")]), torch.tensor([1, 1]))
    m(torch.tensor([0, 1, 1]), torch.tensor([0.1, 0.2, 0.0]), torch.tensor([1, 1, 1]))
    assert set(m.state_dict()) == {"gauc_sum", "weight_sum"} and list(m.parameters()) == []
    other = Gauc()
    other.load_state_dict(m.state_dict())
    assert float(other.compute()) == float(m.compute()) == 0.5
    m.half()
    assert m.gauc_sum.dtype == torch.float64 and float(m.compute()) == 0.5


# -- distributed: 2 gloo ranks ---------------------------------------------------------------------


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str, preds, labels, groups):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    gloo_all_reduce = dist.all_reduce

    def nccl_like_all_reduce(tensor, *args, **kwargs):  # gloo reduces any layout, NCCL refuses strided ones
        if not tensor.is_contiguous():
            raise ValueError("Tensors must be contiguous")
        return gloo_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = nccl_like_all_reduce  # this spawned process's module only
    try:
        p, y, g = (torch.tensor(x[rank::world]) for x in (preds, labels, groups))
        synced, local = AUROC(dist_sync_on_step=True), AUROC(dist_sync_on_step=False)
        synced.update(p[:7], y[:7])
        synced.update(p[7:], y[7:])
        local.update(p, y)
        batch_auc = synced(p, y)
        gauc = Gauc()(y, p, g + 100 * rank)  # disjoint groups per rank
        torch.save({"synced": synced.state_dict(), "local": local.state_dict(), "auc": synced.compute(),
                    "batch_auc": batch_auc, "gauc": gauc}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_sync(tmp_path):
    gen = np.random.default_rng(1)
    n = 40
    preds = gen.random(n).astype(np.float32).tolist()
    labels = gen.integers(0, 2, n).tolist()
    groups = gen.integers(0, 4, n).tolist()
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path), preds, labels, groups), nprocs=2)
    out = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    whole = AUROC()
    whole.update(torch.tensor(preds), torch.tensor(labels))
    for r in range(2):
        for k, v in whole.state_dict().items():
            assert torch.equal(out[r]["synced"][k], v), (r, k)  # all-reduced = the union's counts
        assert float(out[r]["auc"]) == float(whole.compute())
        assert float(out[r]["batch_auc"]) == float(whole.compute())
    local_sum = {k: out[0]["local"][k] + out[1]["local"][k] for k in whole.state_dict()}
    for k, v in whole.state_dict().items():
        assert torch.equal(local_sum[k], v)  # without sync each rank kept its own half
    shard_groups = [g + 100 * (i % 2) for i, g in enumerate(groups)]
    num, den = gauc_oracle(labels, preds, shard_groups)
    for r in range(2):
        batch, total = out[r]["gauc"]
        assert abs(float(batch) - num / den) < 1e-12 and abs(float(total) - num / den) < 1e-12


# -- CUDA ------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_metrics_cuda_match_cpu():
    gen = torch.Generator().manual_seed(0)
    p, y = torch.rand(100_000, generator=gen), (torch.rand(100_000, generator=gen) < 0.3).long()
    g = torch.randint(0, 5000, (100_000,), generator=gen)
    cpu, gpu = AUROC(), AUROC().cuda()
    cpu.update(p, y)
    gpu.update(p.cuda(), y.cuda())
    for k, v in cpu.state_dict().items():
        assert torch.equal(gpu.state_dict()[k].cpu(), v)
    assert abs(float(gpu.compute()) - float(cpu.compute())) < 1e-12
    a, b = Gauc()(y, p, g), Gauc().cuda()(y.cuda(), p.cuda(), g.cuda())
    assert abs(float(a[0]) - float(b[0])) < 1e-9


@pytest.mark.gpu
def test_auroc_cuda_check_does_not_wait():
    """On a GPU a batch's value check is read by the next call (no host sync per update): a bad
    batch raises there, or at check_pending(); good batches never raise."""
    m = AUROC().cuda()
    good, labels = torch.tensor([0.2, 0.9], device="cuda"), torch.tensor([0, 1], device="cuda")
    m.update(good, labels)
    m.update(good, labels)
    m.check_pending()
    m.update(torch.tensor([0.2, 1.5], device="cuda"), labels)  # counted, not yet raised
    with pytest.raises(ValueError, match=r"\[0, 1\].*earlier batch"):
        m.update(good, labels)
    m.update(good, torch.tensor([0, 2], device="cuda"))
    with pytest.raises(ValueError, match="labels must be 0 or 1.*earlier batch"):
        m.check_pending()
    m.check_pending()  # read once


# -- add_metric and Logger -------------------------------------------------------------------------


def test_add_metric_registry():
    fmetrics.clear_metrics()
    x = torch.ones(2, requires_grad=True)
    fmetrics.add_metric("loss", (x * 2).sum())
    fmetrics.add_metric("lr", 0.1)
    fmetrics.add_metric("lr", 0.2)
    got = fmetrics.get_log_metrics()
    assert set(got) == {"loss", "lr"} and got["lr"] == 0.2
    assert not got["loss"].requires_grad and float(got["loss"]) == 4.0
    got["other"] = 1  # a copy: the registry is unchanged
    assert "other" not in fmetrics.get_metrics()
    fmetrics.clear_metrics()
    assert fmetrics.get_log_metrics() == {}


def test_logger(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    log = Logger("fxrec.test_metrics.logger")
    log.info("hello %d", 3)
    log.warning("careful")
    log.debug("hidden")  # default level INFO
    Logger("fxrec.test_metrics.logger").info("once")  # a second Logger adds no handlers
    out, err = capsys.readouterr()
    assert "[INFO] [fxrec.test_metrics.logger] hello 3" in out and out.count("once") == 1
    assert "careful" in err and "careful" not in out and "hidden" not in out
    monkeypatch.setenv("RANK", "1")
    log.info("ranked")
    log.info_rank0("not on rank 1")
    out, _ = capsys.readouterr()
    assert "[rank 1] [fxrec.test_metrics.logger] ranked" in out and "not on rank 1" not in out
    log.setLevel(logging.DEBUG)
    log.debug("shown")
    assert "shown" in capsys.readouterr().out


def test_compiled_update_has_no_graph_break():
    """The training step runs AUROC update/compute and add_metric under torch.compile (SPEC §6)."""
    m = AUROC()

    def step(p, y):
        m.update(p, y)
        auc = m.compute()
        fmetrics.add_metric("auc", auc)
        return auc

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    got = compiled(torch.tensor(SEED_PREDS), torch.tensor(SEED_LABELS))
    assert round(float(got), 4) == 0.7917
    assert float(fmetrics.get_log_metrics()["auc"]) == float(got)
    fmetrics.clear_metrics()

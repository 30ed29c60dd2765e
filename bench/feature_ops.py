"""Feature-stage benchmark: the tutorial's feature set, and per-op throughput.

GPU (when present), for the seed tutorial's features at each batch size:
  engine  FeatureEngine, eager: one fxrec op per feature and op (the graph as built)
  passes  FeatureEngine(..., passes=True), eager: the graph after fxrec.passes (horizontal
          fusion: one multi-tensor op per op type and level, as ``multi`` writes by hand)
  multi   the same work through fxrec's multi-tensor ops, hand-written: one launch per op type
          and level
  torch   the same work through fxrec's plain-torch reference kernels on the GPU (the vectorized
          torch code that is also the CPU kernel): what it costs without Triton
plus the bytes the stage must move at least and the bandwidth that implies, and the kernels,
memory copies and host syncs of one ``passes`` call. Times are per call over calls run back to
back with one synchronize at the end (what a training step pays). Then each op of ``multi`` on its
own (ms, kernels, copies, syncs), and, on CPU, M items/s for each op on about 1M items.

    python -m bench.feature_ops [--batch-sizes 1024 4096] [--cpu-items 1000000]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.utils._pytree import tree_leaves

import fxrec  # noqa: F401  (registers torch.ops.fxrec)
from examples.deepctr.features import get_feature_conf
from fxrec.features.feature_engine import FeatureEngine
from fxrec.ops.bucketize import bucketize_torch
from fxrec.ops.cross import feature_cross_torch
from fxrec.ops.hash import hash_bytes_torch
from fxrec.ops.mod import mod_torch
from fxrec.ops.truncate import sequence_truncate_torch
from fxrec.ragged import RaggedTensor
from bench.timing import copy_bandwidth

SEQ_LEN = 1000
ops = torch.ops.fxrec


def seed_batch(b: int, device: str, seed: int = 0, max_seq_len: int = 2000) -> dict:
    """Data shaped like the tutorial's generator: sequences of 1..max_seq_len-1 (1999) ids /
    10-byte strings."""
    rng = np.random.default_rng(seed)

    def offsets(lengths):
        return torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    def single_ids():
        return RaggedTensor(torch.arange(b, dtype=torch.int64), torch.arange(b + 1, dtype=torch.int64))

    seq_lengths = rng.integers(1, max_seq_len, b)
    seq = RaggedTensor(torch.from_numpy(rng.integers(0, 1_000_000, seq_lengths.sum())), offsets(seq_lengths))
    pool = rng.integers(ord("0"), ord("z"), (1000, 10)).astype(np.int8)
    str_counts = rng.integers(1, max_seq_len, b)
    picks = rng.integers(0, 1000, str_counts.sum())
    strings = RaggedTensor(
        torch.from_numpy(pool[picks].reshape(-1)),
        [offsets(str_counts), torch.arange(0, 10 * len(picks) + 1, 10, dtype=torch.int64)],
    )
    batch = {
        "label": torch.from_numpy(rng.integers(0, 2, (b, 1)).astype(np.float32)),
        "dense1": torch.from_numpy(rng.random((b, 8), dtype=np.float32)),
        "dense2": torch.from_numpy(rng.random((b, 1), dtype=np.float32)),
        "sparse1": single_ids(),
        "sparse2": single_ids(),
        "sparse3": single_ids(),
        "sparse4": seq,
        "sparse5": strings,
    }
    return {k: v.to(device) for k, v in batch.items()}


def stage_multi(batch: dict, boundaries: torch.Tensor) -> dict:
    """The seed's feature stage with one multi-tensor launch per op type and dependency level."""
    s1, s2, s3, s4, s5 = (batch[f"sparse{i}"] for i in range(1, 6))
    bucket = ops.bucketize(batch["dense2"], boundaries)
    (hashed,) = ops.hash_bytes_multi([s5.values()], [s5.offsets()[1]], ["farm"])
    cross_ids, cross_offsets, _ = ops.feature_cross(s1.values(), s1.offsets()[0], None, s2.values(), s2.offsets()[0], None)
    m3, m4, m5, mc = ops.mod_multi([s3.values(), s4.values(), hashed, cross_ids], [10000, 10000, 10000, 1000])
    (t4, t5), (o4, o5), _ = ops.sequence_truncate_multi(
        [m4, m5], [s4.offsets()[0], s5.offsets()[0]], [None, None], [SEQ_LEN, SEQ_LEN], [False, False]
    )
    return {"dense2": bucket, "sparse3": m3, "sparse4": (t4, o4), "sparse5": (t5, o5), "cross": (mc, cross_offsets)}


def stage_torch(batch: dict, boundaries: torch.Tensor) -> dict:
    """The same stage through fxrec's plain-torch reference kernels."""
    s1, s2, s3, s4, s5 = (batch[f"sparse{i}"] for i in range(1, 6))
    bucket = bucketize_torch(batch["dense2"], boundaries)
    hashed = hash_bytes_torch(s5.values(), s5.offsets()[1], "farm")
    cross_ids, cross_offsets, _ = feature_cross_torch(
        s1.values(), s1.offsets()[0], None, s2.values(), s2.offsets()[0], None
    )
    m3, m4, m5, mc = (mod_torch(v, m) for v, m in ((s3.values(), 10000), (s4.values(), 10000), (hashed, 10000), (cross_ids, 1000)))
    t4, o4, _ = sequence_truncate_torch(m4, s4.offsets()[0], None, SEQ_LEN, False)
    t5, o5, _ = sequence_truncate_torch(m5, s5.offsets()[0], None, SEQ_LEN, False)
    return {"dense2": bucket, "sparse3": m3, "sparse4": (t4, o4), "sparse5": (t5, o5), "cross": (mc, cross_offsets)}


def min_bytes(batch: dict) -> int:
    """Fewest bytes the stage must move: each input read once, each output written once."""
    s4, s5 = batch["sparse4"], batch["sparse5"]
    n4, n5, nbytes = s4.values().numel(), s5.offsets()[1].numel() - 1, s5.values().numel()
    kept4 = int(torch.clamp(s4.offsets()[0].diff(), max=SEQ_LEN).sum())
    kept5 = int(torch.clamp(s5.offsets()[0].diff(), max=SEQ_LEN).sum())
    b = batch["dense2"].shape[0]
    return (
        b * (4 + 8)                      # bucketize dense2
        + nbytes + 8 * (n5 + 1)          # read string bytes + string offsets
        + 8 * n4 + 8 * kept4             # sparse4: read ids, write kept ids (mod fused in truncate's read)
        + 8 * kept5                      # sparse5: write kept hashed ids
        + 3 * 8 * b * 2                  # sparse3 mod, cross ids (one pair per row) in and out
    )


def time_gpu(fn, reps: int = 50) -> float:
    """Milliseconds per call of ``fn`` run ``reps`` times back to back with ONE synchronize at the
    end: what a training step pays (host work, launches and the ops' own host syncs; GPU work
    overlaps the host's next calls), not one synchronize per op."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def count_launches(fn) -> tuple[int, int, int]:
    """(kernels, memory copies and fills, host syncs) of one call of ``fn``: kernels and copies as
    the GPU ran them (profiler), syncs as CUDA's sync debug mode reports them."""
    fn()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    device_events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    copies = sum(e.name.startswith(("Memcpy", "Memset")) for e in device_events)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)
    return len(device_events) - copies, copies, syncs


def check_same(a: dict, b: dict) -> None:
    for key in a:
        x, y = a[key], b[key]
        for u, v in zip(x if isinstance(x, tuple) else (x,), y if isinstance(y, tuple) else (y,)):
            assert torch.equal(u, v), f"{key}: implementations disagree"


def check_same_engine(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = tree_leaves(a[key]), tree_leaves(b[key])
        assert len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y)), f"{key}: engines disagree"


def bench_gpu(batch_sizes: list[int]) -> None:
    print(f"\n## GPU feature stage: {torch.cuda.get_device_name()} (torch {torch.__version__})")
    bandwidth = copy_bandwidth("cuda", 1 << 28)
    print(f"device-to-device copy: {bandwidth:.0f} GB/s (read + write)")
    engine = FeatureEngine(get_feature_conf(seq_len=SEQ_LEN)).cuda()
    fused = FeatureEngine(get_feature_conf(seq_len=SEQ_LEN), passes=True).cuda()
    boundaries = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64, device="cuda")
    rows = ["| B | ids in | engine ms | passes ms | multi ms | torch ms | passes vs engine | multi vs engine "
            "| multi vs torch | floor ms | passes kernels / copies / syncs |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in batch_sizes:
        batch = seed_batch(b, "cuda")
        check_same(stage_multi(batch, boundaries), stage_torch(batch, boundaries))
        check_same_engine(engine(batch), fused(batch))
        t_engine = time_gpu(lambda: engine(batch))
        t_passes = time_gpu(lambda: fused(batch))
        t_multi = time_gpu(lambda: stage_multi(batch, boundaries))
        t_torch = time_gpu(lambda: stage_torch(batch, boundaries))
        kernels, copies, syncs = count_launches(lambda: fused(batch))
        nbytes = min_bytes(batch)
        ids = batch["sparse4"].values().numel() + batch["sparse5"].offsets()[1].numel() - 1
        rows.append(
            f"| {b} | {ids / 1e6:.1f}M | {t_engine:.3f} | {t_passes:.3f} | {t_multi:.3f} | {t_torch:.3f} | "
            f"{t_engine / t_passes:.2f}x | {t_engine / t_multi:.2f}x | {t_torch / t_multi:.2f}x | "
            f"{nbytes / bandwidth / 1e6:.3f} | {kernels} / {copies} / {syncs} |"
        )
        breakdown(batch, boundaries)
    print("\n".join(rows))


def breakdown(batch: dict, boundaries: torch.Tensor) -> None:
    """Each step of ``stage_multi`` on its own: ms per call (back to back, one synchronize), and
    the kernels, copies and host syncs of one call."""
    s1, s2, s4, s5 = batch["sparse1"], batch["sparse2"], batch["sparse4"], batch["sparse5"]
    (hashed,) = ops.hash_bytes_multi([s5.values()], [s5.offsets()[1]], ["farm"])
    steps = {
        "bucketize": lambda: ops.bucketize(batch["dense2"], boundaries),
        "hash_bytes": lambda: ops.hash_bytes(s5.values(), s5.offsets()[1], "farm"),
        "hash_bytes_multi": lambda: ops.hash_bytes_multi([s5.values()], [s5.offsets()[1]], ["farm"]),
        "feature_cross": lambda: ops.feature_cross(s1.values(), s1.offsets()[0], None, s2.values(), s2.offsets()[0], None),
        "mod_multi": lambda: ops.mod_multi([s4.values(), hashed], [10000, 10000]),
        "sequence_truncate": lambda: ops.sequence_truncate(s4.values(), s4.offsets()[0], None, SEQ_LEN, False),
        "sequence_truncate_multi": lambda: ops.sequence_truncate_multi(
            [s4.values(), hashed], [s4.offsets()[0], s5.offsets()[0]], [None, None], [SEQ_LEN] * 2, [False] * 2),
    }
    print(f"\nB={batch['dense2'].shape[0]}, per op:\n\n| op | ms | kernels | copies | syncs |\n|---|---|---|---|---|")
    for name, fn in steps.items():
        kernels, copies, syncs = count_launches(fn)
        print(f"| {name} | {time_gpu(fn, reps=20):.3f} | {kernels} | {copies} | {syncs} |")


def time_cpu(fn, min_seconds: float = 0.5) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def bench_cpu(items: int) -> None:
    print(f"\n## CPU ops, ~{items / 1e6:.1f}M items: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads (torch {torch.__version__})")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-(2**63), 2**63 - 1, (items,), generator=g)
    floats = torch.rand(items, generator=g)
    bounds = torch.linspace(0, 1, 100, dtype=torch.float64)
    strings = torch.randint(-128, 127, (items * 10,), dtype=torch.int8, generator=g)
    str_offsets = torch.arange(0, items * 10 + 1, 10)
    rows = items // 1000
    seq_offsets = torch.arange(0, items + 1, 1000)
    pair_rows = items // 16
    pair_offsets = torch.arange(0, pair_rows * 4 + 1, 4)
    pair_ids = ids[: pair_rows * 4]
    cases = [
        ("mod", items, lambda: ops.mod(ids, 10000)),
        ("mod_multi (4 features)", items, lambda: ops.mod_multi(list(ids.chunk(4)), [10000] * 4)),
        ("bucketize (100 bounds)", items, lambda: ops.bucketize(floats, bounds)),
        ("hash_bytes farm (10 B strings)", items, lambda: ops.hash_bytes(strings, str_offsets, "farm")),
        ("hash_bytes murmur (10 B strings)", items, lambda: ops.hash_bytes(strings, str_offsets, "murmur")),
        ("hash_int64 farm", items, lambda: ops.hash_int64(ids, "farm")),
        ("feature_cross (4 x 4 per row, out ids)", pair_rows * 16,
         lambda: ops.feature_cross(pair_ids, pair_offsets, None, pair_ids, pair_offsets, None)),
        (f"sequence_truncate ({rows} rows of 1000 -> 500)", items,
         lambda: ops.sequence_truncate(ids, seq_offsets, None, 500, False)),
        ("ragged_to_dense (rows of 1000)", items, lambda: ops.ragged_to_dense(ids, seq_offsets, -1, 0.0)),
    ]
    print("| op | M items/s |")
    print("|---|---|")
    for name, n, fn in cases:
        print(f"| {name} | {n / time_cpu(fn) / 1e6:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--cpu-items", type=int, default=1_000_000)
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    if torch.cuda.is_available():
        bench_gpu(args.batch_sizes)
    else:
        print("no CUDA device: GPU feature stage skipped")
    if not args.skip_cpu:
        bench_cpu(args.cpu_items)


if __name__ == "__main__":
    main()

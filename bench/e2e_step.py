"""End-to-end training step of the seed tutorial's DeepCTR: fxrec eager / passes / compiled
against a plain-PyTorch version compiled with torch.compile, in one run.

One step = features (bucketize dense2, farm-hash sparse5's strings, cross sparse1 x sparse2, mod,
truncate sparse4/5 to ``--seq-len``) + dynamic-table lookups with the tutorial's combiners (sum,
mean, tile) + the dense MLP + BCE + backward + SparseAdamWTF on the touched rows + AdamW on the
dense weights + the AUROC update, from raw in-memory batches already on the device (the
tutorial's generator's shapes: ``bench.feature_ops.seed_batch``; ``--pool`` batches per size,
rotated, so no step reuses the previous step's batch).

Variants (``samples/s`` = B / median step time; ratios against ``torch compiled``):

  fxrec eager      ``examples.deepctr.model.DeepCTR`` as the tutorial runs it
  fxrec passes     the same with ``passes=True`` on both engines (fused feature ops, one lookup
                   per storage)
  fxrec compiled   ``fxrec.compile(model)``: the engines' graphs rewritten by the passes, forward
                   + backward one Inductor graph for every batch; the optimizer steps outside it
                   (fused kernels already)
  torch eager      what a user without fxrec writes (``TorchCTR``): fixed ``nn.Embedding`` tables
                   (ids modded into 10000 rows, the cross hashed into 1000; sparse=False: dense
                   gradients, AdamW over every row), sequences padded to ``[B, seq_len]`` for the
                   tile (pad row 0, ``padding_idx``), sparse5's strings farm-hashed and padded by
                   the data loader (outside the step, as RecIS's ``hash_type="farm"`` does),
                   ``torch.optim.AdamW`` (fused, as every variant's) for all parameters, the same AUROC update in torch ops
  torch compiled   ``torch.compile`` of that model's forward (static shapes: one B per run)

Two times per variant and B, each the median over ``--steps`` samples. The variants take turns
(every round one sample of each), so all of them are timed over the same stretch of the run:
a host whose speed drifts during a run moves every variant alike, not only the ones timed last.
  ms/step           steps run back to back as a training loop runs them: a sample is
                    ``--back-to-back`` consecutive steps (batches rotated) between two device
                    events, divided by their number, so the host's work on a step overlaps the
                    device's on the one before (up to the step's first host sync). samples/s and
                    the ratios are of this time.
  synced ms/step    one step between two events, the device idle before it: the step's latency,
                    which adds to each step the device's work the host does not wait for
                    (the column the earlier sessions' tables report as ms/step).

The header names the card and the host's speed: µs to issue one ``torch.add``
(``bench.timing.host_op_us``). fxrec's steps are host-bound and the baseline's is GPU-bound, so
the ratios move with the host between machines (and between leases of one kind of machine).

First-compile time: the first step of a compiled variant (tracing, Inductor, the backward's
compile), once per variant (fxrec compiles one graph for every B; torch recompiles per B).
``--sync-debug`` (CUDA) counts the host syncs of one step per fxrec variant
(``torch.cuda.set_sync_debug_mode``). ``--variants 'fxrec passes' ...`` runs only those (the
baseline ``torch compiled`` always runs): two trees compared on one lease without the compiles.

Counted first (METHOD.md), B = 4096, seq_len 1000, float32:
  FLOPs  the MLP's first layer dominates: 32056 x 128 x 2 per row forward, x3 with its two
         backward products: 24.6 MFLOP per row, 101 GFLOP per step; at the ~50 TFLOP/s of an
         H100/H200's float32 (no TF32: torch's default) that is ~2 ms: a floor of ~2M samples/s
         for every variant, fxrec or not.
  bytes  the tiled embeddings [B, 32000] float32 are written (fwd), read by the matmul, and
         their gradient written and read back (bwd): ~2 GB; sequence ids and strings ~0.2 GB:
         ~0.5 ms at ~4 TB/s. Tables and optimizer state of the seed are small (10000-row tables).
  So the floor is the dense matmuls (~2 ms at B=4096, ~0.5 ms at B=1024); what sits above it is
  the sparse part's launches, host syncs and Python: what compiling removes.
  Prediction: torch compiled near 4 ms at B=4096 (the reference: ~0.99M samples/s on an H200);
  fxrec compiled target >= 1.5x that (<= 2.8 ms).

    python -m bench.e2e_step [--batch-sizes 1024 4096] [--steps 20] [--back-to-back 5] [--seq-len 1000] [--sync-debug]
    python -m bench.e2e_step --device cpu --batch-sizes 64 --steps 3 --seq-len 8 --max-seq-len 16

``--world-size N`` (N > 1) measures scaling instead: the fxrec eager, passes and compiled steps
at B rows per rank, in 1 process and in N processes (spawned here: NCCL on GPUs ``cuda:0..N-1``,
gloo on the CPU), tables row-wise sharded over the N ranks and the dense weights under DDP, as the
Trainer runs them (compiled: ``fxrec.compile`` of the DDP wrapper, the all-to-alls traced into
the graph as functional collectives). Printed per variant and
B: ms per step (the slowest rank's median), samples/s over all ranks, scaling efficiency
(samples/s at N over N x samples/s in one process) and the bytes all ranks sent through
all-to-all per step (``fxrec.distributed.sharded.traffic``: ids, tags, rows, gradients, sizes).

    python -m bench.e2e_step --world-size 2 [--batch-sizes 1024 4096]
    python -m bench.e2e_step --device cpu --world-size 2 --batch-sizes 16 --steps 2 --seq-len 8 --max-seq-len 16
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fxrec
from bench.feature_ops import seed_batch
from bench.timing import host_op_us, machine, median_ms
from examples.deepctr.model import DeepCTR, DenseModel
from fxrec.distributed import reset_traffic, traffic
from fxrec.distributed.ddp import wrap_ddp
from fxrec.features.feature import Feature
from fxrec.features.feature_engine import FeatureEngine
from fxrec.features.op import Hash, SelectField
from fxrec.framework.metrics import clear_metrics
from fxrec.metrics.auroc import auroc_thresholds
from fxrec.nn.modules.hashtable import filter_out_sparse_param
from fxrec.optim import SparseAdamWTF

ROWS = 10000  # the tutorial's Mod(10000)
CROSS_ROWS = 1000  # the tutorial's Mod(1000) after the cross
THRESHOLDS = 200
LR = 0.001


# -- the plain-PyTorch model and its batches -------------------------------------------------------

class TorchCTR(nn.Module):
    """The tutorial's DeepCTR written without fxrec (module docstring): same features, widths,
    dense model, loss and AUROC counters."""

    def __init__(self, seq_len: int) -> None:
        super().__init__()

        def table(rows: int, dim: int, pad: bool = False) -> nn.Embedding:
            emb = nn.Embedding(rows + pad, dim, padding_idx=0 if pad else None)
            with torch.no_grad():
                emb.weight.normal_(0, 0.01)
                if pad:
                    emb.weight[0] = 0
            return emb

        self.sparse1 = table(ROWS, 8)  # shared with dense2's buckets, as the tutorial's "sparse1" table
        self.sparse2 = table(ROWS, 16)
        self.sparse3 = table(ROWS, 8)
        self.sparse4 = table(ROWS, 16, pad=True)
        self.sparse5 = table(ROWS, 16, pad=True)
        self.cross = table(CROSS_ROWS, 16)
        self.dense_arch = DenseModel(seq_len)
        self.register_buffer("boundaries", torch.tensor([0.0, 0.5, 1.0]))
        self.register_buffer("thresholds", torch.tensor(auroc_thresholds(THRESHOLDS), dtype=torch.float32))
        self.register_buffer("counts", torch.zeros(2, THRESHOLDS + 1, dtype=torch.int64))  # [neg/pos, bucket]

    def forward(self, b: dict) -> torch.Tensor:
        s1, s2 = b["sparse1"] % ROWS, b["sparse2"] % ROWS
        d2 = torch.bucketize(b["dense2"][:, 0], self.boundaries, right=True)  # #{boundary <= v}
        cross = (s1 * 1000003 + s2) % CROSS_ROWS

        def padded(ids: torch.Tensor) -> torch.Tensor:  # -1 = padding -> row 0
            return torch.where(ids >= 0, ids % ROWS + 1, 0)

        x = torch.cat([
            b["dense1"], self.sparse1(d2), self.sparse1(s1), self.sparse2(s2), self.sparse3(b["sparse3"] % ROWS),
            self.sparse4(padded(b["sparse4"])).flatten(1), self.sparse5(padded(b["sparse5"])).flatten(1),
            self.cross(cross),
        ], -1)
        pred = self.dense_arch(x).squeeze(-1)
        label = b["label"].squeeze(-1)
        loss = F.binary_cross_entropy(pred, label)
        with torch.no_grad():  # AUROC counters: predictions per threshold bucket, by label
            bucket = torch.bucketize(pred.detach(), self.thresholds)
            self.counts += torch.bincount(bucket + (THRESHOLDS + 1) * (label > 0.5).long(),
                                          minlength=2 * (THRESHOLDS + 1)).view(2, -1)
        return loss


def _padded(values: np.ndarray, offsets: np.ndarray, length: int) -> torch.Tensor:
    """[B, length] int64: each row's first ``length`` items (truncate right), -1 after its end."""
    rows = len(offsets) - 1
    out = np.full((rows, length), -1, dtype=np.int64)
    lengths = np.minimum(np.diff(offsets), length)
    row = np.repeat(np.arange(rows), lengths)
    col = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[row, col] = values[np.repeat(offsets[:-1], lengths) + col]
    return torch.from_numpy(out)


def torch_batch(raw: dict, seq_len: int, device: str) -> dict:
    """A raw (CPU) batch as a plain-PyTorch user's loader delivers it (TorchCTR's docstring)."""
    hash_strings = FeatureEngine([Feature("h").add_op(SelectField("sparse5")).add_op(Hash("farm"))]).to(device)
    hashed = hash_strings({"sparse5": raw["sparse5"].to(device)})["h"].cpu()  # on the device: seconds on a CPU
    out = {k: raw[k] for k in ("label", "dense1", "dense2")}
    for name in ("sparse1", "sparse2", "sparse3"):  # one id per row
        out[name] = raw[name].values()
    for name, ragged in (("sparse4", raw["sparse4"]), ("sparse5", hashed)):
        out[name] = _padded(ragged.values().numpy(), ragged.offsets()[0].numpy(), seq_len)
    return {k: v.to(device) for k, v in out.items()}


# -- variants ------------------------------------------------------------------------------------------

def dense_adamw(model: nn.Module) -> torch.optim.AdamW:
    """Every variant's dense optimizer: torch's fused AdamW (one kernel for all parameters, step
    counters on the device: no per-parameter host work; CPU and CUDA both have it)."""
    return torch.optim.AdamW(model.parameters(), lr=LR, fused=True)


def fxrec_variant(kind: str, device: str, seq_len: int):
    """(model, forward, dense optimizer, sparse optimizer) of an fxrec variant."""
    torch.manual_seed(0)
    model = DeepCTR(device=torch.device(device), seq_len=seq_len, passes="passes" in kind).to(device)
    forward = fxrec.compile(model) if "compiled" in kind else model
    sparse = SparseAdamWTF(filter_out_sparse_param(model), lr=LR)
    return model, forward, dense_adamw(model), sparse


def torch_variant(kind: str, device: str, seq_len: int):
    torch.manual_seed(0)
    model = TorchCTR(seq_len).to(device)
    # static shapes, one graph per B (as a user with fixed-size batches gets them)
    forward = torch.compile(model, dynamic=False) if kind == "compiled" else model
    return model, forward, dense_adamw(model), None


def make_step(forward, dense, sparse):
    def step(batch: dict) -> None:
        clear_metrics()
        forward(batch).backward()
        dense.step()
        if sparse is not None:
            sparse.step()
        dense.zero_grad(set_to_none=True)
        if sparse is not None:
            sparse.zero_grad()
    return step


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def fail(results: dict, name: str, b: int, error: Exception) -> None:
    """Record and report a variant that failed at batch size ``b``."""
    results[name, b] = error
    print(f"# {name}, B={b}: failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")


def count_syncs(step, batch: dict) -> int:
    """Host syncs of one step (CUDA's sync debug mode warns once per sync)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


VARIANTS = [("fxrec eager", fxrec_variant, "eager"), ("fxrec passes", fxrec_variant, "passes"),
            ("fxrec compiled", fxrec_variant, "compiled"),
            ("torch eager", torch_variant, "eager"),
            ("torch compiled", torch_variant, "compiled")]


SCALING_VARIANTS = ("eager", "passes", "compiled")


def _scaling_rank(rank: int, world: int, args: argparse.Namespace, store: str, out: str) -> None:
    """One rank of ``--world-size``: its own batches, the fxrec eager / passes / compiled steps timed; writes
    ``{variant/B: [ms, bytes a step]}`` (rank 0: the slowest rank's ms, all ranks' bytes)."""
    cuda = torch.device(args.device).type == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method="file://" + store, rank=rank, world_size=world)
    results = {}
    for kind in SCALING_VARIANTS:
        model, _, dense, sparse = fxrec_variant(kind, str(device), args.seq_len)
        forward = wrap_ddp(model, device) or model
        if "compiled" in kind:
            forward = fxrec.compile(forward)
        calls = [0]
        inner = make_step(forward, dense, sparse)

        def step(batch: dict) -> None:
            calls[0] += 1
            inner(batch)

        for b in args.batch_sizes:
            pool = [{k: v.to(device) for k, v in seed_batch(b, "cpu", seed=1000 * rank + i,
                                                             max_seq_len=args.max_seq_len).items()}
                    for i in range(args.pool)]
            step(pool[0])  # grows the tables (and compiles)
            turn, current = iter(range(1 << 30)), {}

            def setup(pool=pool, turn=turn, current=current):
                current["batch"] = pool[next(turn) % len(pool)]

            reset_traffic()
            calls[0] = 0
            ms = median_ms(lambda: step(current["batch"]), str(device), reps=args.steps, warmup=args.warmup,
                           setup=setup)
            # on the rank's device: NCCL reduces device tensors only
            stats = torch.tensor([ms, sum(traffic().values()) / calls[0]], dtype=torch.float64, device=device)
            if world > 1:
                slowest, total = stats.clone(), stats.clone()
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                dist.all_reduce(total, op=dist.ReduceOp.SUM)
                stats = torch.stack([slowest[0], total[1]])
            results[f"{kind}/{b}"] = stats.tolist()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def scaling(args: argparse.Namespace) -> None:
    """``--world-size`` (module docstring)."""
    if torch.device(args.device).type == "cuda" and torch.cuda.device_count() < args.world_size:
        raise ValueError(f"--world-size {args.world_size} needs that many GPUs, this machine has "
                         f"{torch.cuda.device_count()}")
    print(f"# {machine(args.device)}; scaling 1 -> {args.world_size} processes, B rows per rank, "
          f"seq_len {args.seq_len}, {args.steps} timed steps (median of the slowest rank)")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, args.world_size):
            out = os.path.join(tmp, f"w{world}.json")
            mp.spawn(_scaling_rank, args=(world, args, os.path.join(tmp, f"store{world}"), out), nprocs=world)
            with open(out) as f:
                runs[world] = json.load(f)
    w = args.world_size
    print()
    print(f"| variant | B per rank | ms/step, 1 process | ms/step, {w} | samples/s, 1 | samples/s, {w} "
          "| scaling efficiency | all-to-all bytes a step |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in SCALING_VARIANTS:
        for b in args.batch_sizes:
            one, many = runs[1][f"{kind}/{b}"], runs[w][f"{kind}/{b}"]
            rate_one, rate_many = b / one[0] * 1e3, w * b / many[0] * 1e3
            print(f"| fxrec {kind} | {b} | {one[0]:.3f} | {many[0]:.3f} | {rate_one:,.0f} | {rate_many:,.0f} "
                  f"| {rate_many / (w * rate_one):.0%} | {many[1]:,.0f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    parser.add_argument("--back-to-back", type=int, default=5,
                        help="consecutive steps per sample of ms/step (module docstring)")
    parser.add_argument("--seq-len", type=int, default=1000, help="sparse4/5 truncation and tile length")
    parser.add_argument("--max-seq-len", type=int, default=2000, help="generated sequences are 1..this-1 long")
    parser.add_argument("--pool", type=int, default=3, help="distinct batches per size, rotated")
    parser.add_argument("--sync-debug", action="store_true", help="count each fxrec variant's host syncs (CUDA)")
    parser.add_argument("--world-size", type=int, default=1,
                        help="> 1: scaling of the fxrec steps from 1 to this many processes (module docstring)")
    parser.add_argument("--variants", nargs="+", default=[name for name, _, _ in VARIANTS],
                        choices=[name for name, _, _ in VARIANTS], metavar="VARIANT",
                        help="the variants to run (quoted names, e.g. 'fxrec passes'); the baseline 'torch compiled' "
                             "always runs")
    args = parser.parse_args(argv)
    variants = [v for v in VARIANTS if v[0] in args.variants or v[0] == "torch compiled"]
    if (args.steps < 1 or args.back_to_back < 1 or args.pool < 1 or args.seq_len < 1 or args.max_seq_len < 2
            or args.world_size < 1):
        raise ValueError("need --steps >= 1, --back-to-back >= 1, --pool >= 1, --seq-len >= 1, --max-seq-len >= 2, "
                         "--world-size >= 1")
    if args.world_size > 1:
        scaling(args)
        return
    device = args.device
    print(f"# {machine(device)}; host: {host_op_us(device):.1f} µs to issue a torch.add (bench.timing.host_op_us)")
    print(f"# seq_len {args.seq_len}, sequences 1..{args.max_seq_len - 1}, {args.steps} timed steps (median), "
          f"pool of {args.pool} batches")
    raws = {b: [seed_batch(b, "cpu", seed=i, max_seq_len=args.max_seq_len) for i in range(args.pool)]
            for b in args.batch_sizes}
    inputs = {"fxrec": {b: [{k: v.to(device) for k, v in r.items()} for r in rs] for b, rs in raws.items()},
              "torch": {b: [torch_batch(r, args.seq_len, device) for r in rs] for b, rs in raws.items()}}
    results = {}  # (variant, B) -> ms back to back, or the exception that stopped that variant (reported, not fatal)
    synced = {}  # (variant, B) -> ms, one step between events
    compile_s, syncs = {}, {}
    steps = []  # (name, kind, step) of every variant, built once: the rounds below take turns
    for name, make, kind in variants:
        model, forward, dense, sparse = make(kind, device, args.seq_len)
        steps.append((name, kind, make_step(forward, dense, sparse)))
    for b in args.batch_sizes:
        live = {}  # name -> (step, pool, turn) of the variants that are running at this B
        for name, kind, step in steps:
            pool = inputs[name.split()[0]][b]
            try:
                start = time.perf_counter()
                step(pool[0])  # the first step: compiles (compiled variants) and grows the tables
                synchronize(device)
                if "compiled" in kind:
                    compile_s.setdefault(name, []).append(time.perf_counter() - start)
                for i in range(args.warmup):
                    step(pool[(i + 1) % len(pool)])
                live[name] = (step, pool, iter(range(1 << 30)))
            except Exception as error:  # one variant failing must not hide the others' numbers
                fail(results, name, b, error)
        # Rounds: each takes one synced sample of every variant in turn, then (as many steps in
        # all as the synced samples) one back-to-back sample of each, so every variant is timed
        # over the same stretch of the run and a host that slows down mid-run moves them alike.
        one, back = {name: [] for name in live}, {name: [] for name in live}
        for r in range(args.steps):
            for name, (step, pool, turn) in list(live.items()):
                try:
                    one[name].append(median_ms(lambda: step(pool[next(turn) % len(pool)]), device, reps=1, warmup=0))
                    if r < max(1, args.steps // args.back_to_back):  # one untimed step first: the device busy
                        back[name].append(median_ms(lambda: step(pool[next(turn) % len(pool)]), device, reps=1,
                                                    warmup=1, calls=args.back_to_back))
                except Exception as error:
                    fail(results, name, b, error)
                    del live[name]
        for name, (step, pool, _) in live.items():
            synced[name, b], results[name, b] = float(np.median(one[name])), float(np.median(back[name]))
            if args.sync_debug and name.startswith("fxrec") and torch.device(device).type == "cuda":
                syncs[name, b] = count_syncs(step, pool[0])
    print()
    print(f"ms/step: {args.back_to_back} steps back to back per sample; synced: one step per sample")
    print("| variant | B | ms/step | samples/s | vs torch compiled | synced ms/step | synced vs torch compiled "
          "|" + (" host syncs/step |" if syncs else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if syncs else ""))
    for b in args.batch_sizes:
        ref = results["torch compiled", b]
        for name, _, _ in variants:
            ms = results[name, b]
            if isinstance(ms, Exception):
                row = f"| {name} | {b} | failed: {type(ms).__name__} | | | | |"
            elif isinstance(ref, Exception):
                row = f"| {name} | {b} | {ms:.3f} | {b / ms * 1e3:,.0f} | | {synced[name, b]:.3f} | |"
            else:
                one, ref_one = synced[name, b], synced["torch compiled", b]
                row = (f"| {name} | {b} | {ms:.3f} | {b / ms * 1e3:,.0f} | {ref / ms:.2f}x | {one:.3f} "
                       f"| {ref_one / one:.2f}x |")
            if syncs:
                row += f" {syncs.get((name, b), '')} |"
            print(row)
    print()
    for name, seconds in compile_s.items():
        print(f"first step of {name} (compile + run): " + ", ".join(
            f"B={b}: {s:.1f} s" for b, s in zip(args.batch_sizes, seconds)))


if __name__ == "__main__":
    main()

"""Embedding gather + combiner benchmark: ``fxrec::segment_combine`` and its backward
``fxrec::segment_combine_backward``, and ``fxrec::table_combine`` (the lookup fused with the
combiner: what the embedding layer runs), against torch's embedding ops in the same run.

A table ``emb float32 [rows, dim]`` (default 8M rows; row 0 is zeros, the pad row of the padded
baseline) is read at random rows (ids uniform in ``[1, rows)``: every gather is random access),
for a batch of B = 4096 rows of ids shaped like the seed's features:

  single  1 id per row (sparse1-3)                    combiners sum, mean
  bag     1..39 ids per row (~20)                     combiners sum, sum with weights, mean
  seq     1..1999 ids per row, tile_len 1000 (sparse4) combiner tile

at dims 8, 16, 64, 128. For each case, combiner and dim, forward and backward:

  forward   fxrec segment_combine; F.embedding_bag (sum/mean, per_sample_weights for weighted
            sum); F.embedding + torch.segment_reduce; for tile, F.embedding of the padded
            [B, tile_len] id matrix (built outside the timing; pad id 0 is the zero row and
            padding_idx, so it gets no gradient).
            Also F.embedding alone (gather only) per case and dim, and fxrec::gather_rows
            (a plain Triton gather of the same rows into [N, dim]: the ceiling that random rows
            of this width allow, next to which the combiners' % copy reads).
            For bag/sum and seq/tile also the embedding layer's path, with the batch's ids
            deduplicated into U unique rows (``rows [U]``, ``index`` into them): fxrec
            table_combine (table [rows, dim] read through ``table[rows[index[i]]]``) without an
            anchor and with HashTable's stride-0 zero anchor (training), and the unfused path
            it replaced, gather_rows [U, dim] + segment_combine. Same bytes counted as
            segment_combine (table_combine also reads 8 B of rows per item, not counted). Their
            last column: table_combine ms / segment_combine ms; the unfused row's: its ms /
            table_combine-with-anchor ms. Calls of at least COMPOSE_MIN_ITEMS items of rows of
            at least COMPOSE_MIN_ROW_BYTES (the seq case at dim >= 64) compose each item's table
            row in a pass of their own first; the row "same, rows indirect / composed" times the
            training call the other way.
  backward  fxrec segment_combine_backward into [rows, dim] (what embedding_bag's dense grad
            is) and into [U, dim] (index remapped to the U unique rows: how fxrec's lookup layer
            calls it, DESIGN.md: no dense table gradient); autograd backward of embedding_bag
            (or of F.embedding for tile) with sparse=False (a dense [rows, dim] grad, zeroed
            every call) and sparse=True (one grad row per item, uncoalesced).

Timing: each sample is ``--calls`` calls back to back (CUDA events around them, divided by the
count): the host's dispatch of one call (custom-op dispatch, checks, Triton launch: ~0.1 ms)
overlaps the GPU's work on the one before, as in a training step, so each row is the kernels'
throughput; with one call per sample the same dispatch sits inside every timed interval (the
first session's numbers: 0.15 ms of a 0.9 ms tile forward). The small cases stay launch-bound
either way.

Printed: the card, torch/triton versions and the device-to-device copy bandwidth (``dst.copy_(src)``
of 1 GiB, read + written), then one table: median ms, MB counted, GB/s, % of the copy bandwidth
(target: >= 80% for fxrec) and how many times slower each torch row is than the fxrec row of the
same pass and output. The ``single`` case moves < 1 MB: it measures launch and dispatch cost.

Bytes counted (the fewest the pass must move; the same count for every implementation of a pass,
except the gradient's output rows, which differ by output):
  forward sum/mean   gathered rows N x dim x 4 (random rows of >= 32 B: whole sectors)
                     + index 8 N + weights 4 N (if any) + offsets 8 (B + 1) + output B x dim x 4
  forward tile       the K = sum(min(len, tile_len)) kept items' rows K x dim x 4 + index 8 K
                     + offsets + output B x tile_len x dim x 4 (zero padding included)
  gather only        N x dim x 4 read + the same written + index 8 N
  backward           incoming gradient (B x dim x 4; tile: its K filled slots) + index, weights,
                     offsets as above + the gradient written once: out_rows x dim x 4 (sparse
                     outputs also 8 B of index per row). NOT counted: the zero fill before the
                     atomic adds (dense outputs: another out_rows x dim x 4) and the atomics'
                     read-modify-write traffic.

    python -m bench.embedding [--rows 8388608] [--batch 4096] [--dims 8 16 64 128] [--reps 10] [--calls 5]
    python -m bench.embedding --smoke    # CPU (the ops' torch kernels), tiny sizes, seconds
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.timing import copy_bandwidth, machine, median_ms
from fxrec.ops.triton import combine as triton_combine  # (importing fxrec registers torch.ops.fxrec)

ops = torch.ops.fxrec
TARGET = 0.8  # of the copy bandwidth (the issue)
ISSUE_F_EMBEDDING_TBS, ISSUE_TRITON_GATHER_TBS = 0.23, 3.1  # H200, 64-byte rows (the issue)
TABLE_COMBINE_ROWS = {("bag", "sum"), ("seq", "tile")}  # (case, combiner) also timed through table_combine


@dataclass
class Case:
    name: str
    combiners: tuple[str, ...]  # "sum", "sum+w" (weighted sum), "mean", "tile"
    index: torch.Tensor  # int64 [N], rows in [1, rows)
    offsets: torch.Tensor  # int64 [B + 1]
    weight: torch.Tensor  # float32 [N] (used by "sum+w")
    tile_len: int = 1
    padded: torch.Tensor | None = None  # int64 [B, tile_len], tile only: ids, 0 past the row's end
    kept: int = 0  # items inside the tile (tile only)

    @property
    def n(self) -> int:
        return self.index.numel()

    @property
    def b(self) -> int:
        return self.offsets.numel() - 1


def make_case(name: str, lengths: torch.Tensor, combiners: tuple[str, ...], rows: int, tile_len: int,
              device: str, seed: int) -> Case:
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n = int(offsets[-1])
    index = torch.randint(1, rows, (n,), generator=gen)
    weight = torch.rand(n, generator=gen)
    case = Case(name, combiners, index.to(device), offsets.to(device), weight.to(device), tile_len)
    if "tile" in combiners:
        slots = torch.arange(tile_len)
        mask = slots < lengths[:, None]
        positions = (offsets[:-1, None] + slots).clamp(max=max(n - 1, 0))
        case.padded = torch.where(mask, index[positions], 0).to(device)
        case.kept = int(mask.sum())
    return case


def make_cases(rows: int, b: int, bag_max: int, seq_max: int, tile_len: int, device: str) -> list[Case]:
    gen = torch.Generator().manual_seed(0)
    return [
        make_case("single", torch.ones(b, dtype=torch.int64), ("sum", "mean"), rows, 1, device, 1),
        make_case("bag", torch.randint(1, bag_max + 1, (b,), generator=gen), ("sum", "sum+w", "mean"), rows, 1,
                  device, 2),
        make_case("seq", torch.randint(1, seq_max + 1, (b,), generator=gen), ("tile",), rows, tile_len, device, 3),
    ]


# -- bytes counted (module docstring) ------------------------------------------------------------


def forward_bytes(case: Case, combiner: str, dim: int) -> int:
    if combiner == "tile":
        return case.kept * (dim * 4 + 8) + 8 * (case.b + 1) + case.b * case.tile_len * dim * 4
    weights = 4 * case.n if combiner == "sum+w" else 0
    return case.n * (dim * 4 + 8) + weights + 8 * (case.b + 1) + case.b * dim * 4


def backward_bytes(case: Case, combiner: str, dim: int, out_rows: int, sparse: bool = False) -> int:
    items = case.kept if combiner == "tile" else case.n
    grad_in = items * dim * 4 if combiner == "tile" else case.b * dim * 4
    weights = 4 * items if combiner == "sum+w" else 0
    return grad_in + 8 * items + weights + 8 * (case.b + 1) + out_rows * (dim * 4 + (8 if sparse else 0))


# -- the ops under test and the baselines ---------------------------------------------------------


def fxrec_forward(emb: torch.Tensor, case: Case, combiner: str):
    weight = case.weight if combiner == "sum+w" else None
    mode = "sum" if combiner == "sum+w" else combiner
    return lambda: ops.segment_combine(emb, case.index, case.offsets, weight, mode, case.tile_len)


def fxrec_table_forward(emb: torch.Tensor, case: Case, combiner: str, unique: tuple, anchor: bool):
    """table_combine as the embedding layer calls it: rows [U] of the table, index into them."""
    uniq, inverse = unique
    weight = case.weight if combiner == "sum+w" else None
    mode = "sum" if combiner == "sum+w" else combiner
    zero = torch.zeros((), dtype=emb.dtype, device=emb.device).expand(uniq.numel(), emb.shape[1]) if anchor else None
    return lambda: ops.table_combine(emb, uniq, zero, inverse, case.offsets, weight, mode, case.tile_len)


ROW_LOOKUPS = {"indirect": "rows[index[i]] read in the combine kernel",
               "composed": "each item's table row composed in a pass first"}


def row_lookup(mode: str, fn):
    """``fn`` with table_combine's launchers reading the table rows ``mode``'s way (their
    thresholds ``COMPOSE_MIN_ITEMS`` / ``COMPOSE_MIN_ROW_BYTES`` set to always / never)."""
    def call():
        saved = triton_combine.COMPOSE_MIN_ITEMS, triton_combine.COMPOSE_MIN_ROW_BYTES
        limit = 0 if mode == "composed" else 1 << 62
        triton_combine.COMPOSE_MIN_ITEMS = triton_combine.COMPOSE_MIN_ROW_BYTES = limit
        try:
            return fn()
        finally:
            triton_combine.COMPOSE_MIN_ITEMS, triton_combine.COMPOSE_MIN_ROW_BYTES = saved
    return call


def unfused_forward(emb: torch.Tensor, case: Case, combiner: str, unique: tuple):
    """The path table_combine replaced: gather_rows into [U, dim], then segment_combine."""
    uniq, inverse = unique
    weight = case.weight if combiner == "sum+w" else None
    mode = "sum" if combiner == "sum+w" else combiner
    return lambda: ops.segment_combine(ops.gather_rows(emb, uniq), inverse, case.offsets, weight, mode, case.tile_len)


def fxrec_backward(grad: torch.Tensor, index: torch.Tensor, case: Case, combiner: str, num_rows: int):
    weight = case.weight if combiner == "sum+w" else None
    mode = "sum" if combiner == "sum+w" else combiner
    return lambda: ops.segment_combine_backward(grad, index, case.offsets, weight, mode, case.tile_len, num_rows)


def torch_forward(emb: torch.Tensor, case: Case, combiner: str, sparse: bool = False) -> torch.Tensor:
    """embedding_bag (sum/mean) or the padded F.embedding (tile): the same result as fxrec."""
    if combiner == "tile":
        return F.embedding(case.padded, emb, padding_idx=0, sparse=sparse).view(case.b, -1)
    weight = case.weight if combiner == "sum+w" else None
    mode = "sum" if combiner == "sum+w" else combiner
    return F.embedding_bag(case.index, emb, case.offsets, mode=mode, per_sample_weights=weight,
                           include_last_offset=True, sparse=sparse)


def gather_reduce(emb: torch.Tensor, case: Case, combiner: str) -> torch.Tensor:
    """F.embedding then torch.segment_reduce (weights applied in between)."""
    rows = F.embedding(case.index, emb)
    if combiner == "sum+w":
        rows = rows * case.weight[:, None]
    return torch.segment_reduce(rows, "mean" if combiner == "mean" else "sum", offsets=case.offsets, axis=0)


def autograd_backward(emb: torch.Tensor, case: Case, combiner: str, grad: torch.Tensor, sparse: bool):
    """Backward only: the graph is built once, ``autograd.grad`` replays it."""
    leaf = emb.detach().requires_grad_()
    out = torch_forward(leaf, case, combiner, sparse=sparse)
    return lambda: torch.autograd.grad(out, leaf, grad, retain_graph=True)[0]


# -- the table ----------------------------------------------------------------------------------


class Table:
    def __init__(self, device: str, reps: int, calls: int, copy_gbs: float):
        self.device, self.reps, self.calls, self.copy_gbs = device, reps, calls, copy_gbs
        self.reference: dict[str, float] = {}  # fxrec ms of the current (case, combiner, dim), by output
        self.gather_16: list[tuple[int, float]] = []  # (N, GB/s) of F.embedding gathers at dim 16
        self.tile_16: list[float] = []  # GB/s of fxrec tile forward at dim 16

    def header(self) -> None:
        print("| case | combiner | dim | pass | op | MB counted | ms | GB/s | % copy | torch ms / fxrec ms |")
        print("|---|---|---|---|---|---|---|---|---|---|")

    def row(self, case: Case, combiner: str, dim: int, pass_: str, op: str, nbytes: int, fn,
            ref: str | None = None, compare: str | None = None) -> float | None:
        """Time ``fn`` and print its row. ``ref``: record it as the fxrec time of that output;
        ``compare``: print this row's time over the recorded fxrec time of that output."""
        cells = [case.name, combiner, str(dim), pass_, op, f"{nbytes / 1e6:.1f}"]
        try:
            ms = median_ms(fn, self.device, reps=self.reps, calls=self.calls)
        except RuntimeError as err:  # OOM (a RuntimeError too) or an unsupported baseline: the table goes on
            oom = isinstance(err, torch.OutOfMemoryError)
            if oom:
                torch.cuda.empty_cache()
            reason = "OOM" if oom else f"error: {str(err).splitlines()[0][:60]}"
            print("| " + " | ".join(cells + [reason, "-", "-", "-"]) + " |")
            return None
        gbs = nbytes / ms / 1e6
        ratio = f"{ms / self.reference[compare]:.2f}x" if compare in self.reference else "-"
        print("| " + " | ".join(cells + [f"{ms:.4f}", f"{gbs:.0f}", f"{100 * gbs / self.copy_gbs:.0f}%", ratio]) + " |")
        if ref is not None:
            self.reference[ref] = ms
        return gbs


def check_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), f"{what}: fxrec and torch disagree"


def bench_combiner(t: Table, emb: torch.Tensor, case: Case, combiner: str, unique: tuple) -> None:
    dim, rows = emb.shape[1], emb.shape[0]
    uniq, inverse = unique
    t.reference.clear()
    fwd = forward_bytes(case, combiner, dim)
    out = fxrec_forward(emb, case, combiner)()
    check_close(out, torch_forward(emb, case, combiner), f"{case.name} {combiner} dim {dim} forward")
    gbs = t.row(case, combiner, dim, "fwd", "fxrec segment_combine", fwd, fxrec_forward(emb, case, combiner), ref="fwd")
    if (case.name, combiner) in TABLE_COMBINE_ROWS:
        check_close(fxrec_table_forward(emb, case, combiner, unique, True)(), out,
                    f"{case.name} {combiner} dim {dim} table_combine")
        t.row(case, combiner, dim, "fwd", f"fxrec table_combine (rows [U={uniq.numel()}])", fwd,
              fxrec_table_forward(emb, case, combiner, unique, False), compare="fwd")
        t.row(case, combiner, dim, "fwd", "fxrec table_combine + zero anchor (training)", fwd,
              fxrec_table_forward(emb, case, combiner, unique, True), ref="fused", compare="fwd")
        # the other way to read the rows (composed: for big calls of wide rows; else forced here)
        other = "indirect" if triton_combine._composes(emb, case.n, None) else "composed"
        t.row(case, combiner, dim, "fwd", f"  same, rows {other} ({ROW_LOOKUPS[other]})", fwd,
              row_lookup(other, fxrec_table_forward(emb, case, combiner, unique, True)), compare="fused")
        t.row(case, combiner, dim, "fwd", "gather_rows [U, dim] + segment_combine (unfused)", fwd,
              unfused_forward(emb, case, combiner, unique), compare="fused")
    if combiner == "tile":
        if dim == 16 and gbs is not None:
            t.tile_16.append(gbs)
        t.row(case, combiner, dim, "fwd", "F.embedding, padded [B, tile_len]", fwd,
              lambda: torch_forward(emb, case, combiner), compare="fwd")
    else:
        t.row(case, combiner, dim, "fwd", "F.embedding_bag", fwd, lambda: torch_forward(emb, case, combiner),
              compare="fwd")
        t.row(case, combiner, dim, "fwd", "F.embedding + segment_reduce", fwd,
              lambda: gather_reduce(emb, case, combiner), compare="fwd")

    grad = torch.randn_like(out)
    dense = fxrec_backward(grad, case.index, case, combiner, rows)()
    compact = fxrec_backward(grad, inverse, case, combiner, uniq.numel())()
    expected = autograd_backward(emb, case, combiner, grad, sparse=False)()
    check_close(dense, expected, f"{case.name} {combiner} dim {dim} backward")
    check_close(compact, expected[uniq], f"{case.name} {combiner} dim {dim} backward, unique rows")
    del out, dense, compact, expected
    t.row(case, combiner, dim, "bwd", "fxrec backward -> [rows, dim]", backward_bytes(case, combiner, dim, rows),
          fxrec_backward(grad, case.index, case, combiner, rows), ref="dense")
    t.row(case, combiner, dim, "bwd", f"fxrec backward -> [U={uniq.numel()}, dim]",
          backward_bytes(case, combiner, dim, uniq.numel()),
          fxrec_backward(grad, inverse, case, combiner, uniq.numel()), ref="compact")
    name = "F.embedding (padded)" if combiner == "tile" else "embedding_bag"
    sparse_rows = case.padded.numel() if combiner == "tile" else case.n
    t.row(case, combiner, dim, "bwd", f"{name} backward, dense [rows, dim]", backward_bytes(case, combiner, dim, rows),
          autograd_backward(emb, case, combiner, grad, sparse=False), compare="dense")
    t.row(case, combiner, dim, "bwd", f"{name} backward, sparse ({sparse_rows} rows)",
          backward_bytes(case, combiner, dim, sparse_rows, sparse=True),
          autograd_backward(emb, case, combiner, grad, sparse=True), compare="compact")


def bench_dim(t: Table, cases: list[Case], rows: int, dim: int, device: str) -> None:
    emb = torch.rand((rows, dim), device=device)
    emb[0] = 0  # the padded baseline's pad row
    for case in cases:
        gather = 2 * case.n * dim * 4 + 8 * case.n
        gbs = t.row(case, "-", dim, "fwd", "F.embedding gather only", gather, lambda: F.embedding(case.index, emb))
        if dim == 16 and gbs is not None:
            t.gather_16.append((case.n, gbs))
        t.row(case, "-", dim, "fwd", "fxrec gather_rows (plain Triton gather)", gather,
              lambda: ops.gather_rows(emb, case.index))
        unique = torch.unique(case.index, return_inverse=True)
        for combiner in case.combiners:
            try:
                bench_combiner(t, emb, case, combiner, unique)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"| {case.name} | {combiner} | {dim} | - | OOM (setup) | - | - | - | - | - |")


def run(rows: int, b: int, dims: list[int], reps: int, calls: int, bag_max: int, seq_max: int, tile_len: int,
        device: str, copy_bytes: int) -> None:
    print(f"## fxrec segment_combine: {machine(device)}")
    copy_gbs = copy_bandwidth(device, copy_bytes)
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write, {copy_bytes >> 20} MiB); "
          f"target for fxrec: >= {TARGET:.0%} of it = {TARGET * copy_gbs:.0f} GB/s")
    cases = make_cases(rows, b, bag_max, seq_max, tile_len, device)
    print(f"table {rows:,} rows, B={b}, " + ", ".join(
        f"{c.name}: N={c.n:,}" + (f" (K={c.kept:,} in the tile of {c.tile_len})" if c.kept else "") for c in cases)
        + f"; median of {reps} samples of {calls} calls back to back\n")
    t = Table(device, reps, calls, copy_gbs)
    t.header()
    for dim in dims:
        try:
            bench_dim(t, cases, rows, dim, device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"| - | - | {dim} | - | OOM (table) | - | - | - | - | - |")
    if t.gather_16:
        n, gbs = max(t.gather_16)
        print(f"\nF.embedding gathering 64-byte rows (dim 16, N={n:,}; rows read + written + ids): {gbs / 1e3:.2f} TB/s"
              + (f"; fxrec tile forward at dim 16: {t.tile_16[0] / 1e3:.2f} TB/s" if t.tile_16 else "")
              + f" (the issue, H200: F.embedding {ISSUE_F_EMBEDDING_TBS} TB/s, a plain Triton gather "
              f"{ISSUE_TRITON_GATHER_TBS} TB/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1 << 23)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dims", type=int, nargs="+", default=[8, 16, 64, 128])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--calls", type=int, default=5, help="calls back to back per timed sample")
    parser.add_argument("--smoke", action="store_true", help="CPU, 64K rows, B=256, short rows, 3 repeats")
    args = parser.parse_args()
    if args.smoke:
        run(1 << 16, 256, [8, 16], 3, 1, 39, 199, 100, "cpu", 1 << 24)
    elif torch.cuda.is_available():
        run(args.rows, args.batch, args.dims, args.reps, args.calls, 39, 1999, 1000, "cuda", 1 << 30)
    else:
        print("no CUDA device: run with --smoke for the CPU check")


if __name__ == "__main__":
    main()

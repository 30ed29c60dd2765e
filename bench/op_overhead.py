"""Host cost of one call of each fxrec op: what a training step pays per op before any byte moves.

Every op runs on tiny inputs (B = 8 rows of 4 items, a 16-row table of dim 16), ``--calls``
times back to back; printed per op: the host's time to issue one call (``perf_counter`` over the
calls, before the final synchronize), the wall time per call once the GPU has drained, the
host syncs of one call (CUDA's sync debug mode) and the kernels and copies one call launches
(``torch.profiler``). Baselines in the same run: ``torch.add`` (one aten op), a no-op
``torch.library.custom_op`` (the dispatch floor of the custom-op API fxrec registers its ops
with), a bare Triton kernel launch (the launch floor of every fxrec CUDA kernel) and the same
launch through ``torch.library.wrap_triton`` (how the ``triton_op`` kernels launch).

Counted first (METHOD.md): the inputs are a few hundred bytes: every microsecond here is host
work (Python, dispatch, launch, sync), none of it bandwidth. A step of the tutorial model calls
~80 fxrec ops: at ~50 µs each that alone is ~4 ms of the host's time per step.

    python -m bench.op_overhead [--calls 200]
"""

from __future__ import annotations

import argparse
import time

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

import fxrec  # noqa: F401  (registers torch.ops.fxrec)
from bench.feature_ops import count_launches
from bench.timing import machine
from fxrec.ops.table import new_index
from fxrec.ops.triton.sparse_update import sparse_adam_update_triton

ops = torch.ops.fxrec


@torch.library.custom_op("fxrec_bench::noop", mutates_args=())
def _noop(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@_noop.register_fake
def _(x):
    return torch.empty_like(x)


@triton.jit
def _empty_kernel(x, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x + i, tl.load(x + i, mask=i < n), mask=i < n)


def cases(device: str) -> list[tuple[str, object]]:
    """(name, zero-argument call) of the baselines and every op of the training step."""
    gen = torch.Generator().manual_seed(0)
    b, per_row, dim = 8, 4, 16
    offsets = torch.arange(0, b * per_row + 1, per_row, device=device)
    ids = torch.randint(-50, 50, (b * per_row,), generator=gen).to(device)
    floats = torch.rand(b * per_row, generator=gen).to(device)
    strings = torch.randint(97, 123, (b * per_row * 10,), dtype=torch.int8, generator=gen).to(device)
    str_offsets = torch.arange(0, b * per_row * 10 + 1, 10, device=device)
    bounds = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64, device=device)
    keys, state = new_index(64, device)
    rows, _ = ops.table_find_or_insert(keys, state, ids, None, None)
    table = torch.randn(64, dim, device=device)
    unique = torch.unique(ids, return_inverse=True)
    u = unique[0].numel()
    urows = ops.table_find(keys, state, unique[0])
    anchor = torch.zeros((), device=device).expand(u, dim)
    grad_tile = torch.randn(b, per_row * dim, device=device)
    moments = [torch.zeros(64, dim, device=device) for _ in range(2)]
    grads = torch.randn(u, dim, device=device)
    one = torch.ones((), dtype=torch.float64, device=device)
    x = torch.zeros(16, device=device)
    return [
        ("baseline: torch.add", lambda: torch.add(x, 1)),
        ("baseline: no-op custom_op", lambda: _noop(x)),
        ("baseline: bare Triton launch", lambda: _empty_kernel[(1,)](x, 16, BLOCK=16)),
        ("baseline: Triton launch through wrap_triton", lambda: wrap_triton(_empty_kernel)[(1,)](x, 16, BLOCK=16)),
        ("mod", lambda: ops.mod(ids, 1000)),
        ("bucketize", lambda: ops.bucketize(floats, bounds)),
        ("hash_bytes farm", lambda: ops.hash_bytes(strings, str_offsets, "farm")),
        ("feature_cross", lambda: ops.feature_cross(ids, offsets, None, ids, offsets, None)),
        ("sequence_truncate", lambda: ops.sequence_truncate(ids, offsets, None, 2, False)),
        ("table_find", lambda: ops.table_find(keys, state, ids)),
        ("table_find_or_insert", lambda: ops.table_find_or_insert(keys, state, ids, None, None)),
        ("torch.unique (inverse)", lambda: torch.unique(ids, return_inverse=True)),
        ("init_rows trunc_normal", lambda: ops.init_rows(table, urows, unique[0], 7, "trunc_normal",
                                                         [0.0, 0.01, -0.02, 0.02])),
        ("gather_rows", lambda: ops.gather_rows(table, rows)),
        ("table_combine tile", lambda: ops.table_combine(table, urows, anchor, unique[1], offsets, None, "tile",
                                                         per_row)),
        ("table_combine sum", lambda: ops.table_combine(table, urows, anchor, unique[1], offsets, None, "sum", 1)),
        ("segment_combine_backward tile", lambda: ops.segment_combine_backward(grad_tile, unique[1], offsets, None,
                                                                               "tile", per_row, u)),
        ("sparse_adam_update", lambda: ops.sparse_adam_update(table, moments[0], moments[1], urows, grads, 1e-3, 0.9,
                                                              0.999, 1e-8, 0.0, one, one)),
        # the same kernel through its launcher alone: what the custom-op layers add to a mutating op
        ("sparse_adam_update's launcher, no custom op", lambda: sparse_adam_update_triton(
            table, moments[0], moments[1], urows, grads, 1e-3, 0.9, 0.999, 1e-8, 0.0, one, one)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark measures the host cost of CUDA calls")
        return
    print(f"# {machine('cuda')}; {args.calls} calls back to back per op, tiny inputs")
    print()
    print("| op | host µs / call (issue) | wall µs / call (drained) | host syncs / call | GPU kernels + copies / call |")
    print("|---|---|---|---|---|")
    for name, fn in cases("cuda"):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.calls):
            fn()
        issued = time.perf_counter()
        torch.cuda.synchronize()
        drained = time.perf_counter()
        kernels, copies, syncs = count_launches(fn)
        print(f"| {name} | {(issued - start) / args.calls * 1e6:.1f} | {(drained - start) / args.calls * 1e6:.1f} "
              f"| {syncs} | {kernels + copies} |")


if __name__ == "__main__":
    main()

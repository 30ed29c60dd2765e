"""Host cost of the tutorial's training step: ms per step, aten ops per step and the ops that
would synchronize with a CUDA device, each with the Python line that called it.

The step is ``bench.e2e_step``'s (features, dynamic tables and combiners, dense MLP, BCE,
backward, AdamW + SparseAdamWTF, AUROC update) for the fxrec variants ``eager`` and ``passes``.
On the 2-core dev VM run it at a small batch (the default B=64, short sequences), where a step's
bytes and FLOPs are negligible and what is left is the host's work per step: Python, op dispatch
and (on a GPU) launches and syncs.

``HostOpCounter`` (a ``TorchDispatchMode`` plus a ``TorchFunctionMode``) counts, per step:

- aten ops: every op the step dispatches, views and allocations included (each costs the host a
  dispatch); an fxrec custom op counts once, ``inside fxrec ops`` counts the aten ops its kernel
  runs (on CPU the reference kernels, on CUDA the Triton launchers' torch ops);
- sync-capable ops: ops that read a device value back to the host or size an output from device
  data, so that on CUDA they wait for every queued kernel: ``_local_scalar_dense`` (``.item()``,
  ``int(t)``, ``bool(t)``, ``float(t)``, a tensor in ``if``), ``Tensor.tolist``, ``nonzero`` /
  ``argwhere``, ``unique*``, ``masked_select``, indexing or index-writing with a boolean mask,
  ``repeat_interleave`` without ``output_size``, ``bincount`` (CUDA sizes it from the max),
  ``equal`` / ``allclose``, a device-to-host copy. Each is reported with the innermost frame of
  this repository that called it (file:line and function) and, when it ran inside an fxrec
  custom op's kernel, that op's name. On CPU nothing actually waits: these are the ops that
  WOULD sync on CUDA (and a CPU reference kernel's syncs are not the CUDA kernel's: those rows
  are marked ``in fxrec::op``; run on a GPU for the CUDA kernels' own).

Times: ``ms/step`` the median wall time (CUDA events on a GPU), ``host CPU ms/step`` the median
CPU time of this process per step (``time.process_time``: on a shared VM, what the step costs the
host whoever else holds the cores). Usable on a GPU too (``--device cuda``): the same counts, and
on a GPU an op on host tensors only (torch.optim's step counters) is not counted as a sync.

    python -m bench.step_host                                  # CPU, B=64, seq_len 8
    python -m bench.step_host --device cuda --batch-sizes 64 1024 --seq-len 1000 --max-seq-len 2000
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.e2e_step import fxrec_variant, make_step
from bench.feature_ops import seed_batch
from bench.timing import machine, median_ms

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_THIS = os.path.abspath(__file__)

# Ops that always read a device value back or size their output from device data.
_ALWAYS_SYNC = {"_local_scalar_dense", "nonzero", "argwhere", "unique", "_unique", "_unique2", "unique_consecutive",
                "unique_dim", "unique_dim_consecutive", "masked_select", "bincount", "equal", "allclose",
                "is_nonzero"}
# Indexing ops that sync when an index is a boolean mask (CUDA turns the mask into a nonzero).
_MASK_INDEXED = {"index", "index_put", "index_put_", "_index_put_impl_"}
# Python-level reads that do not dispatch an aten op on CPU tensors.
_PYTHON_READS = {"tolist"}


def _backend_keys(args) -> torch._C.DispatchKeySet:
    """The backend dispatch key of the first tensor in ``args`` (where an op's kernel is)."""
    device = next(t.device for t in tree_leaves(args) if isinstance(t, torch.Tensor))
    return torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA if device.type == "cuda" else torch._C.DispatchKey.CPU)


def _is_mask(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def _on_device(args) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tree_leaves(args))


def _sync_reason(func, args, kwargs, cuda: bool) -> str | None:
    """Why ``func(*args, **kwargs)`` would wait for the device, or None. ``cuda``: the step runs
    on a GPU, where ops on host tensors (e.g. torch.optim's step counters) wait for nothing."""
    name = func.overloadpacket.__name__
    if cuda and not _on_device(args):
        return None
    if name in _ALWAYS_SYNC:
        return name
    if name in _MASK_INDEXED and len(args) > 1 and any(_is_mask(t) for t in args[1] if t is not None):
        return f"{name} (boolean mask)"
    if name == "repeat_interleave" and isinstance(args[0] if args else None, torch.Tensor) and \
            kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None) and \
            (len(args) > 1 and isinstance(args[1], torch.Tensor) or args[0].dtype == torch.int64 and len(args) == 1):
        return "repeat_interleave (no output_size)"
    if name in ("_to_copy", "copy_"):
        src = args[1] if name == "copy_" else args[0]
        dst_device = args[0].device if name == "copy_" else kwargs.get("device")
        non_blocking = kwargs.get("non_blocking", False) or (name == "copy_" and len(args) > 2 and args[2])
        if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_device is not None and \
                torch.device(dst_device).type == "cpu" and not non_blocking:
            return f"{name} (device to host)"
    return None


def _caller() -> str:
    """The innermost frame of this repository (outside this file) on the Python stack."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path.startswith(_ROOT) and path != _THIS:
            return f"{path[len(_ROOT):]}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


class HostOpCounter:
    """``with HostOpCounter(device) as c:`` counts the aten ops and sync-capable ops run inside (module
    docstring): ``c.ops`` (top-level aten ops, fxrec ops once each), ``c.inner_ops`` (aten ops
    inside fxrec ops' kernels; ``c.inner_by_op`` by fxrec op), ``c.op_names`` (Counter by op name, top level), ``c.syncs``
    (Counter of ``(op, caller, enclosing fxrec op or "")``)."""

    def __init__(self, device: str = "cpu") -> None:
        cuda = torch.device(device).type == "cuda"
        self.ops = 0
        self.inner_ops = 0
        self.op_names: collections.Counter = collections.Counter()
        self.op_callers: collections.Counter = collections.Counter()
        self.inner_by_op: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()
        self._fxrec_op: list[str] = []
        self._python_read = 0
        counter = self

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if counter._fxrec_op:
                    counter.inner_ops += 1
                    counter.inner_by_op[counter._fxrec_op[-1]] += 1
                else:
                    counter.ops += 1
                    counter.op_names[str(func.overloadpacket.__name__)] += 1
                    counter.op_callers[_caller().split(":")[0] + " " + _caller().split(" ")[-1]] += 1
                reason = None if counter._python_read else _sync_reason(func, args, kwargs, cuda)
                if reason is not None:
                    counter.syncs[reason, _caller(), counter._fxrec_op[-1] if counter._fxrec_op else ""] += 1
                if func.namespace == "fxrec":  # count what its kernel runs too
                    counter._fxrec_op.append(f"fxrec::{func.overloadpacket.__name__}")
                    try:
                        with self:  # below the Python key: the op's kernel, whose aten ops this mode sees
                            return func.redispatch(_backend_keys(args), *args, **kwargs)
                    finally:
                        counter._fxrec_op.pop()
                return func(*args, **kwargs)

        class _Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name not in _PYTHON_READS or cuda and not _on_device(args):
                    return func(*args, **(kwargs or {}))
                counter.syncs[f"Tensor.{name}", _caller(), counter._fxrec_op[-1] if counter._fxrec_op else ""] += 1
                counter._python_read += 1  # its own device-to-host copy is the same sync
                try:
                    return func(*args, **(kwargs or {}))
                finally:
                    counter._python_read -= 1

        self._modes = (_Function(), _Dispatch())

    def __enter__(self) -> "HostOpCounter":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    @property
    def sync_count(self) -> int:
        return sum(self.syncs.values())


def count_step(step, batch: dict, device: str, steps: int = 1) -> HostOpCounter:
    """The counts of ``steps`` calls of ``step(batch)`` on ``device``."""
    counter = HostOpCounter(device)
    with counter:
        for _ in range(steps):
            step(batch)
    return counter


def host_cpu_ms(fn, reps: int, setup) -> float:
    """Median CPU time (``time.process_time``, this process) of ``fn()`` in ms: the host's own work,
    without the time a shared machine's other processes hold the cores."""
    times = []
    for _ in range(reps):
        setup()
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) * 1e3)
    return float(np.median(times))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=8, help="sparse4/5 truncation and tile length")
    parser.add_argument("--max-seq-len", type=int, default=16, help="generated sequences are 1..this-1 long")
    parser.add_argument("--variants", nargs="+", default=["eager", "passes"], choices=["eager", "passes"])
    parser.add_argument("--top", type=int, default=15, help="the most frequent aten ops to print per variant")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads (1: on a shared 2-core VM an op's OpenMP team waits for a busy core, "
                             "turning 10 us ops into ms; the host cost is one thread's anyway)")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.seq_len < 1 or args.max_seq_len < 2:
        raise ValueError("need --steps >= 1, --seq-len >= 1, --max-seq-len >= 2")
    device = args.device
    print(f"# {machine(device)}; seq_len {args.seq_len}, sequences 1..{args.max_seq_len - 1}")
    rows, sites = [], {}
    for kind in args.variants:
        _, forward, dense, sparse = fxrec_variant(kind, device, args.seq_len)
        step = make_step(forward, dense, sparse)
        for b in args.batch_sizes:
            pool = [seed_batch(b, device, seed=i, max_seq_len=args.max_seq_len) for i in range(3)]
            step(pool[0])  # grows the tables
            turn = iter(range(1 << 30))
            current = {}

            def setup(pool=pool, turn=turn, current=current):
                current["batch"] = pool[next(turn) % len(pool)]

            ms = median_ms(lambda: step(current["batch"]), device, reps=args.steps, warmup=args.warmup, setup=setup)
            cpu_ms = host_cpu_ms(lambda: step(current["batch"]), args.steps, setup)
            counts = count_step(step, pool[1], device)
            rows.append((kind, b, ms, cpu_ms, counts))
            sites[kind, b] = counts
    print()
    print("| variant | B | ms/step | host CPU ms/step | aten ops/step | inside fxrec ops "
          "| sync-capable ops/step (outside fxrec ops) |")
    print("|---|---|---|---|---|---|---|")
    for kind, b, ms, cpu_ms, c in rows:
        outside = sum(n for (_, _, op), n in c.syncs.items() if not op)
        print(f"| fxrec {kind} | {b} | {ms:.2f} | {cpu_ms:.2f} | {c.ops} | {c.inner_ops} | {c.sync_count} ({outside}) |")
    for (kind, b), c in sites.items():
        print(f"\n## fxrec {kind}, B={b}: sync-capable ops (op, caller, inside)")
        for (reason, where, inside), n in sorted(c.syncs.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {n:4d}  {reason:40s} {where}" + (f"  [in {inside}]" if inside else ""))
        print(f"## fxrec {kind}, B={b}: the {args.top} most frequent aten ops")
        print("  " + ", ".join(f"{name} {n}" for name, n in c.op_names.most_common(args.top)))
        print(f"## fxrec {kind}, B={b}: aten ops inside each fxrec op's kernel (all its calls)")
        print("  " + ", ".join(f"{name} {n}" for name, n in c.inner_by_op.most_common()))
        print(f"## fxrec {kind}, B={b}: aten ops by calling function (top level)")
        for where, n in c.op_callers.most_common(args.top):
            print(f"  {n:4d}  {where}")


if __name__ == "__main__":
    main()

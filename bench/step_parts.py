"""Where the training step's host time goes, part by part: wall-clock timers, no profiler.

The step is ``bench.e2e_step``'s (features, dynamic tables and combiners, dense MLP, BCE,
backward, AdamW + SparseAdamWTF, AUROC update) for fxrec eager / passes / compiled, beside the
plain-PyTorch baseline compiled (``bench.e2e_step.TorchCTR``, ``torch.compile``). fxrec's step is
host-bound: what a step costs is the host's time to issue it, and this says which layer spends
it. Steps run back to back (``--steps`` of them after ``--warmup``, one device sync at the end);
each part is the mean of its time per step, from ``time.perf_counter`` around:

- the step's phases: forward, backward, the dense optimizer's step, the sparse optimizer's step,
  both ``zero_grad``;
- a ``torch.compile``'d module's call (``OptimizedModule``: fxrec.compile's inner call, the
  baseline's forward); in the forward, what is outside it is ``fxrec.compile``'s own work
  (room, gradient leaves and dynamic marks: ``CompiledModel.__call__``);
- the calls of Inductor's compiled graphs (``torch._inductor.output_code.CompiledFxGraph``), in
  the forward and in the backward: what is left of the compiled call around them is Dynamo's
  guards and AOTAutograd's wrappers (forward), autograd and AOTAutograd's backward (backward);
- every fxrec custom op's kernel for the device (the Python launcher and what it waits for: an
  op that reads a count back waits there for the queued GPU work), per phase.

A host sync's wait is inside the part that syncs. At a small batch (``--batch-sizes 64``) the
GPU's work is negligible and the parts are the host's cost alone; at the benchmark's B=4096 they
add the waits. Counted first (METHOD.md): nothing here is bandwidth or FLOPs; the parts should sum
to the step's wall time, minus what the timers cannot see (autograd's own work between nodes).

    python -m bench.step_parts --device cuda --batch-sizes 64 4096
    python -m bench.step_parts --device cpu --batch-sizes 16 --seq-len 8 --max-seq-len 16 --steps 5
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import pkgutil
import time

import torch
import torch._inductor.output_code as inductor_output
from torch._dynamo.eval_frame import OptimizedModule
from torch._library.custom_ops import CustomOpDef

import fxrec.ops
from bench.e2e_step import fxrec_variant, make_step, torch_batch, torch_variant
from bench.feature_ops import seed_batch
from bench.timing import host_op_us, machine
from fxrec.framework.metrics import clear_metrics

PHASES = ("forward", "backward", "dense step", "sparse step", "zero_grad")


class PartTimer:
    """Accumulates seconds per part while it is installed (``installed()``): the phase now running
    (set by the step loop) decides where an Inductor call or an fxrec op is counted."""

    def __init__(self, device: str) -> None:
        self.device_type = torch.device(device).type
        self.seconds: collections.Counter = collections.Counter()
        self.phase = ""

    @contextlib.contextmanager
    def part(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def _timed(self, fn, name_of):
        def timed(*args, **kwargs):
            with self.part(name_of(args)):
                return fn(*args, **kwargs)
        return timed

    @contextlib.contextmanager
    def installed(self):
        """Wrap Inductor's graph call, ``fxrec.compile``'s call and every fxrec op's kernel for
        this device; unwrap on exit."""
        restore = []

        def wrap(owner, attr, name_of):  # owner: a class (attr: a method) or a kernel dict (attr: its key)
            if isinstance(owner, dict):
                original = owner[attr]
                restore.append(lambda: owner.__setitem__(attr, original))
                owner[attr] = self._timed(original, name_of)
            else:  # an inherited method is shadowed, then the shadow removed
                own = vars(owner).get(attr)
                original = getattr(owner, attr)
                restore.append(lambda: setattr(owner, attr, own) if own is not None else delattr(owner, attr))
                setattr(owner, attr, self._timed(original, name_of))

        wrap(inductor_output.CompiledFxGraph, "__call__", lambda a: f"{self.phase}: Inductor graph call")
        # a torch.compile'd module's call (fxrec.compile's inner call, the baseline's forward):
        # Dynamo's guards and AOTAutograd's wrappers around the Inductor graph call
        wrap(OptimizedModule, "__call__", lambda a: f"{self.phase}: torch.compile'd call")
        for info in pkgutil.iter_modules(fxrec.ops.__path__):
            for op in vars(importlib.import_module(f"fxrec.ops.{info.name}")).values():
                if isinstance(op, CustomOpDef):
                    key = self.device_type if self.device_type in op._backend_fns else None
                    if key in op._backend_fns:
                        wrap(op._backend_fns, key, lambda a, n=op._name: f"{self.phase}: fxrec ops ({n})")
        try:
            yield
        finally:
            for undo in reversed(restore):
                undo()


def timed_step(forward, dense, sparse, timer: PartTimer):
    """``bench.e2e_step.make_step``'s step, its phases timed."""
    def step(batch: dict) -> None:
        clear_metrics()
        timer.phase = "forward"
        with timer.part("forward"):
            loss = forward(batch)
        timer.phase = "backward"
        with timer.part("backward"):
            loss.backward()
        timer.phase = "dense step"
        with timer.part("dense step"):
            dense.step()
        timer.phase = "sparse step"
        with timer.part("sparse step"):
            if sparse is not None:
                sparse.step()
        timer.phase = "zero_grad"
        with timer.part("zero_grad"):
            dense.zero_grad(set_to_none=True)
            if sparse is not None:
                sparse.zero_grad()
    return step


def measure(make, kind: str, pool: list[dict], args: argparse.Namespace) -> tuple[float, dict[str, float]]:
    """(wall ms a step, {part: ms a step}) of one variant over ``pool`` (rotated)."""
    _, forward, dense, sparse = make(kind, args.device, args.seq_len)
    plain = make_step(forward, dense, sparse)
    for i in range(1 + args.warmup):  # the first step compiles and grows the tables
        plain(pool[i % len(pool)])
    timer = PartTimer(args.device)
    step = timed_step(forward, dense, sparse, timer)
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    with timer.installed():
        step(pool[0])  # the wrappers' first call, untimed
        sync()
        timer.seconds.clear()
        start = time.perf_counter()
        for i in range(args.steps):
            step(pool[i % len(pool)])
        sync()
        wall = (time.perf_counter() - start) * 1e3 / args.steps
    return wall, {name: seconds * 1e3 / args.steps for name, seconds in timer.seconds.items()}


OUTSIDE, WRAPPERS, GRAPH, OPS = ("outside torch.compile'd call", "Dynamo + AOTAutograd / autograd",
                                  "Inductor graph calls", "fxrec ops")


def rows_of(parts: dict[str, float]) -> dict[tuple[str, str], float]:
    """One variant's table rows, keyed (phase, what): the phase, then what nests inside it:
    the time outside a ``torch.compile``'d call (fxrec.compile's own work), the wrappers around
    Inductor's graph calls (forward: Dynamo + AOTAutograd; backward: autograd + AOTAutograd's
    backward), the graph calls, and fxrec's ops (all, then each)."""
    rows = {}
    for phase in PHASES:
        total = parts.get(phase, 0.0)
        rows[phase, ""] = total
        call, graph = parts.get(f"{phase}: torch.compile'd call"), parts.get(f"{phase}: Inductor graph call")
        if call is not None:
            rows[phase, OUTSIDE] = total - call
        if graph is not None:
            rows[phase, WRAPPERS] = (total if call is None else call) - graph
            rows[phase, GRAPH] = graph
        ops = {name.split("(")[1].rstrip(")"): ms for name, ms in parts.items() if name.startswith(f"{phase}: fxrec ops")}
        if ops:
            rows[phase, OPS] = sum(ops.values())
            rows.update({(phase, op): ms for op, ms in ops.items()})
    return rows


def row_order(tables: list[dict[tuple[str, str], float]]) -> list[tuple[str, str]]:
    """Every variant's rows in one order: per phase, the phase, the nested parts, then the ops by
    their largest time in any variant."""
    order = []
    for phase in PHASES:
        present = {key for table in tables for key in table if key[0] == phase}
        order += [(phase, what) for what in ("", OUTSIDE, WRAPPERS, GRAPH, OPS) if (phase, what) in present]
        ops = present - {(phase, what) for what in ("", OUTSIDE, WRAPPERS, GRAPH, OPS)}
        order += sorted(ops, key=lambda key: -max(table.get(key, 0.0) for table in tables))
    return order


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 4096])
    parser.add_argument("--steps", type=int, default=50, help="timed steps, back to back")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after the first")
    parser.add_argument("--seq-len", type=int, default=1000, help="sparse4/5 truncation and tile length")
    parser.add_argument("--max-seq-len", type=int, default=2000, help="generated sequences are 1..this-1 long")
    parser.add_argument("--pool", type=int, default=3, help="distinct batches per size, rotated")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.pool < 1 or args.seq_len < 1 or args.max_seq_len < 2:
        raise ValueError("need --steps >= 1, --warmup >= 0, --pool >= 1, --seq-len >= 1, --max-seq-len >= 2")
    variants = [("fxrec eager", fxrec_variant, "eager"), ("fxrec passes", fxrec_variant, "passes"),
                ("fxrec compiled", fxrec_variant, "compiled"), ("torch compiled", torch_variant, "compiled")]
    print(f"# {machine(args.device)}; host: {host_op_us(args.device):.1f} µs to issue a torch.add")
    print(f"# seq_len {args.seq_len}, sequences 1..{args.max_seq_len - 1}, {args.steps} steps back to back, "
          "ms a step (means)")
    for b in args.batch_sizes:
        raws = [seed_batch(b, "cpu", seed=i, max_seq_len=args.max_seq_len) for i in range(args.pool)]
        pools = {"fxrec": [{k: v.to(args.device) for k, v in r.items()} for r in raws],
                 "torch": [torch_batch(r, args.seq_len, args.device) for r in raws]}
        walls, tables = {}, {}
        for name, make, kind in variants:
            walls[name], parts = measure(make, kind, pools[name.split()[0]], args)
            tables[name] = rows_of(parts)
        print()
        print(f"B={b}")
        print("| part | " + " | ".join(name for name, _, _ in variants) + " |")
        print("|---|" + "---|" * len(variants))
        print("| **wall** | " + " | ".join(f"**{walls[name]:.3f}**" for name, _, _ in variants) + " |")
        for phase, what in row_order(list(tables.values())):
            label = phase if not what else f"{phase}: {what}" if what in (OUTSIDE, WRAPPERS, GRAPH, OPS) else f"{phase}: · {what}"
            cells = [f"{tables[name][phase, what]:.3f}" if (phase, what) in tables[name] else ""
                     for name, _, _ in variants]
            print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

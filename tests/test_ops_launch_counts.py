"""What each feature op's CUDA path costs the host: kernel launches, table copies, host syncs.

The eager feature stage is host-bound (bench/README.md): at B=4096 its bytes take tens of
microseconds on the GPU, every launch ~5-10 us of host time and every sync a round trip that
also drains the GPU queue. So the counts are pinned here, for the tutorial's shapes, by running
each CUDA launcher under Triton's interpreter on CPU tensors and counting what it asks for:

- Triton kernels (the interpreter's grid calls),
- torch kernels (aten ops other than views and allocations, each one launch on CUDA),
- table copies (``device_table``: one non-blocking host-to-device copy each),
- host syncs: ``.tolist()``, ``.item()``-like reads (``int(t)``, ``bool(t)``) and the ops that
  size an output from data (``nonzero``, ``unique``, boolean-mask indexing, ``masked_select``,
  ``repeat_interleave`` without ``output_size``, ``equal``).

| op (tutorial shapes)                 | kernels (Triton + torch) | table copies | syncs | before        |
|--------------------------------------|--------------------------|--------------|-------|---------------|
| bucketize                            | 1                        | 0            | 0     | same          |
| hash_bytes                           | 1                        | 0            | 0     | same          |
| hash_bytes_multi                     | 1                        | 1            | 0     | 1 + 1 blocking copy (a sync) |
| feature_cross                        | 3 (2 + zeros)            | 0            | 1     | 4 (2 + zeros, cumsum), 1 sync before the pair kernel |
| mod_multi                            | 1                        | 1            | 0     | same          |
| bucketize_multi                      | 1                        | 1            | 0     | same          |
| sequence_truncate(_multi) (any N)    | 2                        | 1            | 1     | 3 (2 + cumsum), 2 copies, 1 sync |
| sequence_truncate_3d                 | 3 (2 + arange)           | 1            | 1     | 6 (2 + zeros, cumsum, arange, mul), 1 copy, 1 sync |
| check_row_lengths (truncate=False)   | 2 (1 + zeros)            | 0            | 1     | 3 + 1 sync    |
| table_combine_multi (4 features)     | 1                        | 1            | 0     | 4 (table_combine each) |
| segment_combine_backward_multi (4)   | 2 (1 + zeros)            | 1            | 0     | 8 + 3 adds (one zeros + scatter each) |

The torch kernels (the CPU path; ``bench.feature_ops``'s torch stage on a GPU) of
``sequence_truncate``, ``_3d`` and ``feature_cross`` read the data once (were 4, 5 and 3 reads).

On a GPU ``bench/feature_ops.py`` reports the same counts from the profiler and CUDA's sync
debug mode. The truncate and cross kernels are also compiled here for an H100 (sm_90 cubin, no GPU
needed): the interpreter accepts code the compiler rejects.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import pytest
import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import fxrec.ops.triton.bucketize as triton_bucketize
import fxrec.ops.triton.combine as triton_combine
import fxrec.ops.triton.hash as triton_hash
import fxrec.ops.triton.mod as triton_mod
import fxrec.ops.triton.truncate as triton_truncate
from fxrec.ops.check import check_row_lengths_with_triton
from fxrec.ops.cross import feature_cross_torch, feature_cross_with_triton
from fxrec.ops.triton.cross import SHORT_ROW
from fxrec.ops.truncate import sequence_truncate_3d_torch, sequence_truncate_torch

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="counts launches under the Triton interpreter (bench/feature_ops.py on GPUs)"
)

# Allocations and views launch nothing.
_NO_LAUNCH = {"empty", "empty_like", "new_empty", "empty_strided", "lift_fresh", "detach", "alias"}
# Ops that wait for the GPU before they return (they read data or size an output from data).
_SYNCING = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select", "equal"}


def _sync_name(func, args, kwargs) -> str | None:
    """The name under which an aten call counts as a host sync on CUDA, else None."""
    name = func.overloadpacket.__name__
    if name in _SYNCING:
        return name
    if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                               for i in args[1]):
        return "index with a boolean mask"
    if name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    return None


class _Counts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.torch_kernels: collections.Counter = collections.Counter()
        self.triton_kernels = 0
        self.tables = 0
        self.syncs: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sync = _sync_name(func, args, kwargs)
        if sync is not None:
            self.syncs[sync] += 1
        elif not func.is_view and func.overloadpacket.__name__ not in _NO_LAUNCH:
            self.torch_kernels[func.overloadpacket.__name__] += 1
        return func(*args, **kwargs)


@pytest.fixture
def counts(monkeypatch):
    """Counts while ``with counts:``; the interpreter's and the tables' own tensor work is not
    counted (on a GPU they are one launch and one copy)."""
    from triton.runtime.interpreter import GridExecutor

    mode = _Counts()
    grid_call = GridExecutor.__call__
    device_table = triton_mod.device_table

    def triton_kernel(self, *args, **kwargs):
        mode.triton_kernels += 1
        with _disable_current_modes():
            return grid_call(self, *args, **kwargs)

    def table(*args, **kwargs):
        mode.tables += 1
        with _disable_current_modes():
            return device_table(*args, **kwargs)

    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        mode.syncs["tolist"] += 1
        return tolist(self)

    monkeypatch.setattr(GridExecutor, "__call__", triton_kernel)
    for module in (triton_mod, triton_bucketize, triton_hash, triton_truncate, triton_combine):
        monkeypatch.setattr(module, "device_table", table)
    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    return mode


def _tutorial_batch(b: int = 16):
    """Small data shaped like the tutorial's: one id per row, sequences, 10-byte strings."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 30, (b,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n = int(offsets[-1])
    return {
        "dense": torch.rand(b, 1, generator=gen),
        "single": torch.arange(b),
        "single_offsets": torch.arange(b + 1),
        "seq": torch.randint(0, 1 << 40, (n,), generator=gen),
        "seq_offsets": offsets,
        "seq_weight": torch.rand(n, generator=gen),
        "bytes": torch.randint(48, 122, (10 * n,), generator=gen).to(torch.int8),
        "string_offsets": torch.arange(0, 10 * n + 1, 10),
    }


def _calls(d):
    bounds = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    return {
        "bucketize": lambda: triton_bucketize.bucketize_triton(d["dense"], bounds),
        "hash_bytes": lambda: triton_hash.hash_bytes_triton(d["bytes"], d["string_offsets"], "farm"),
        "hash_bytes_multi": lambda: triton_hash.hash_bytes_multi_triton(
            [d["bytes"], d["bytes"]], [d["string_offsets"], d["string_offsets"]], ["farm", "murmur"]),
        "feature_cross": lambda: feature_cross_with_triton(
            d["single"], d["single_offsets"], None, d["single"], d["single_offsets"], None),
        "mod_multi": lambda: triton_mod.mod_multi_triton(
            [d["single"], d["seq"], d["seq"], d["single"]], [10000, 10000, 10000, 1000]),
        "bucketize_multi": lambda: triton_bucketize.bucketize_multi_triton([d["dense"], d["seq"]], [bounds, bounds]),
        "sequence_truncate": lambda: triton_truncate.truncate_triton(
            d["seq"], d["seq_offsets"], d["seq_weight"], 10, False),
        "sequence_truncate_multi": lambda: triton_truncate.truncate_multi_triton(
            [d["seq"], d["seq"], d["seq"]], [d["seq_offsets"]] * 3, [None, d["seq_weight"], None],
            [10, 10, 5], [False, True, False]),
        "sequence_truncate_3d": lambda: triton_truncate.truncate_3d_triton(
            d["bytes"], d["seq_offsets"], d["string_offsets"], None, 3, True),
        "check_row_lengths": lambda: check_row_lengths_with_triton(d["seq_offsets"], 30, "feature 'seq'"),
        # the coalesced tutorial's dim-16 storage: sum, tile, tile, mean through one anchor
        "table_combine_multi": lambda args=_storage(d): triton_combine.table_combine_multi_triton(*args),
        "segment_combine_backward_multi": lambda args=_storage_grads(d): (
            triton_combine.segment_combine_backward_multi_triton(*args)),
    }


def _storage(d):
    """``table_combine_multi``'s arguments: 4 features of one storage (U = 40 unique ids, dim 16)."""
    index = [d["single"] % 40, d["seq"] % 40, d["seq"] % 40, d["seq"] % 40]
    offsets = [d["single_offsets"]] + [d["seq_offsets"]] * 3
    zero_anchor = torch.zeros(()).expand(40, 16)
    return (torch.randn(50, 16), torch.arange(40), zero_anchor, index, offsets, [None, None, None, d["seq_weight"]],
            ["sum", "tile", "tile", "mean"], [1, 5, 5, 1])


def _storage_grads(d):
    table, rows, _, index, offsets, weight, combiner, tile_len = _storage(d)
    grads = [torch.ones(o.shape[0] - 1, (t if c == "tile" else 1) * 16) for o, c, t in zip(offsets, combiner, tile_len)]
    return grads, index, offsets, weight, combiner, tile_len, rows.shape[0]


_TOLIST = {"tolist": 1}

# op: (Triton kernels, torch kernels, table copies, host syncs)
EXPECTED = {
    "bucketize": (1, {}, 0, {}),
    "hash_bytes": (1, {}, 0, {}),
    "hash_bytes_multi": (1, {}, 1, {}),
    "feature_cross": (2, {"zeros": 1}, 0, _TOLIST),
    "mod_multi": (1, {}, 1, {}),
    "bucketize_multi": (1, {}, 1, {}),
    "sequence_truncate": (2, {}, 1, _TOLIST),
    "sequence_truncate_multi": (2, {}, 1, _TOLIST),
    "sequence_truncate_3d": (2, {"arange": 1}, 1, _TOLIST),
    "check_row_lengths": (1, {"zeros": 1}, 0, {"_local_scalar_dense": 1}),
    "table_combine_multi": (1, {}, 1, {}),
    "segment_combine_backward_multi": (1, {"zeros": 1}, 1, {}),
}


@pytest.mark.parametrize("op", EXPECTED)
def test_launches_and_syncs(op, counts):
    call = _calls(_tutorial_batch())[op]
    with counts:
        call()
    triton_kernels, torch_kernels, tables, syncs = EXPECTED[op]
    assert (counts.triton_kernels, dict(counts.torch_kernels), counts.tables, dict(counts.syncs)) == (
        triton_kernels, torch_kernels, tables, syncs)


def test_counts_see_every_kind_of_sync(counts):
    x = torch.arange(5)
    with counts:
        x[x > 2]
        torch.repeat_interleave(x, x)
        torch.repeat_interleave(x, x, output_size=10)  # sized by the caller: no sync
        torch.unique(x)
        x.nonzero()
        int(x[0])
        x.tolist()
    assert dict(counts.syncs) == {
        "index with a boolean mask": 1, "repeat_interleave without output_size": 1, "_unique2": 1, "nonzero": 1,
        "_local_scalar_dense": 1, "tolist": 1,
    }


def _cpu_calls(d):
    return {
        "sequence_truncate": lambda: sequence_truncate_torch(d["seq"], d["seq_offsets"], d["seq_weight"], 10, True),
        "sequence_truncate_3d": lambda: sequence_truncate_3d_torch(
            d["bytes"], d["seq_offsets"], d["string_offsets"], None, 3, True),
        "feature_cross": lambda: feature_cross_torch(
            d["single"], d["single_offsets"], None, d["seq"], d["seq_offsets"], d["seq_weight"]),
    }


@pytest.mark.parametrize("op", ["sequence_truncate", "sequence_truncate_3d", "feature_cross"])
def test_torch_kernels_read_the_data_once(op, counts):
    # The torch kernels (the CPU path, and ``bench.feature_ops``'s torch stage on a GPU) read the
    # output length and the offsets check back in ONE read (a host sync on a GPU).
    call = _cpu_calls(_tutorial_batch())[op]
    with counts:
        call()
    assert (counts.triton_kernels, dict(counts.syncs)) == (0, {"_local_scalar_dense": 1})


def test_feature_cross_long_rows_add_one_sync(counts):
    # A row longer than SHORT_ROW is de-duplicated again by torch sorts (no sync of their own)
    # and its output length read once more; the pair kernel queued before the first sync saw the
    # long-row flag and wrote nothing, so it runs again: 3 Triton launches and 2 syncs.
    d = _tutorial_batch()
    x_offsets = torch.tensor([0, SHORT_ROW + 6, d["seq"].numel()])
    with counts:
        feature_cross_with_triton(d["seq"], x_offsets, None, d["single"][:2], d["single_offsets"][:3], None)
    assert (counts.triton_kernels, dict(counts.syncs)) == (3, {"tolist": 1, "_local_scalar_dense": 1})


# -- the same kernels compiled for the GPU ------------------------------------------------------
# The interpreter runs kernels as Python: it accepts code that Triton's compiler rejects (a plain
# global in a kernel, a loop bound of the wrong type). Compiling for an H100 (sm_90) needs no GPU,
# but needs the kernels as compiled functions: in a process without TRITON_INTERPRET.

_I64 = "*i64"


def _cross_plan_signature():
    signature = {}
    for side in "xy":
        signature.update({f"{side}_values_ptr": _I64, f"{side}_num_values": "i64", f"{side}_offsets_ptr": _I64,
                          f"{side}_weight_ptr": "*fp32", f"{side}_uniq_ptr": _I64, f"{side}_uniq_weight_ptr": "*fp64",
                          f"{side}_start_ptr": _I64, f"{side}_count_ptr": _I64})
    signature.update({"pairs_ptr": _I64, "out_offsets_ptr": _I64, "num_rows": "i32", "HAS_X_WEIGHT": "constexpr",
                      "HAS_Y_WEIGHT": "constexpr", "TINY": "constexpr", "BLOCK": "constexpr",
                      "SCAN_BLOCK": "constexpr"})
    return signature


# kernel (module attribute): (signature, constexprs)
_GPU_KERNELS = {
    "truncate._rows_kernel": ({
        "features": _I64, "cum_out": _I64, "start_out": _I64, "block_totals": _I64, "status": _I64,
        "n_features": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024}),
    "truncate._slots_kernel": ({
        "outer": _I64, "inner": _I64, "cum_out": _I64, "start_out": _I64, "block_totals": _I64, "status": _I64,
        "n_slots": "i64", "n_lists": "i64", "n_values": "i64", "seq_len": "i64", "keep_last": "i32",
        "BLOCK": "constexpr"}, {"BLOCK": 1024}),
    "truncate._segment_copy_kernel": ({
        "jobs": _I64, "seg_starts": _I64, "cum": _I64, "block_totals": _I64, "SEG_BLOCK": "constexpr",
        "MAX_BLOCKS": "constexpr", "BLOCK": "constexpr"}, {"SEG_BLOCK": 1024, "MAX_BLOCKS": 1, "BLOCK": 1024}),
    "cross._plan_short_rows_kernel": (
        _cross_plan_signature(),
        {"HAS_X_WEIGHT": True, "HAS_Y_WEIGHT": True, "TINY": 8, "BLOCK": 64, "SCAN_BLOCK": 1024}),
    "cross._cross_pairs_kernel": ({
        "out_offsets_ptr": _I64, "x_uniq_ptr": _I64, "x_start_ptr": _I64, "x_weight_ptr": "*fp32",
        "y_uniq_ptr": _I64, "y_start_ptr": _I64, "y_count_ptr": _I64, "y_weight_ptr": "*fp32", "ids_ptr": _I64,
        "weight_ptr": "*fp32", "capacity": "i64", "num_rows": "i32", "num_flags": "i32", "search_steps": "i32",
        "HAS_X_WEIGHT": "constexpr", "HAS_Y_WEIGHT": "constexpr", "BLOCK": "constexpr"},
        {"HAS_X_WEIGHT": True, "HAS_Y_WEIGHT": False, "BLOCK": 1024}),
}


def compile_kernels_for_the_gpu() -> None:
    """Compiles every kernel of ``_GPU_KERNELS`` to an sm_90 cubin (raises on the first failure)."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for name, (signature, constexprs) in _GPU_KERNELS.items():
        module, kernel = name.split(".")
        fn = getattr(importlib.import_module(f"fxrec.ops.triton.{module}"), kernel)
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], name


def test_kernels_compile_for_the_gpu():
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(tests), tests, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", "import test_ops_launch_counts as t; t.compile_kernels_for_the_gpu()"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]

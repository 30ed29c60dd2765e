"""What each feature op's CUDA path costs the host: kernel launches, table copies, host syncs.

The eager feature stage is host-bound (bench/README.md): at B=4096 its bytes take tens of
microseconds on the GPU, every launch ~5-10 us of host time and every sync a round trip that
also drains the GPU queue. So the counts are pinned here, for the tutorial's shapes, by running
each CUDA launcher under Triton's interpreter on CPU tensors and counting what it asks for:

- Triton kernels (the interpreter's grid calls),
- torch kernels (aten ops other than views and allocations, each one launch on CUDA),
- table copies (``device_table``: one non-blocking host-to-device copy each),
- host syncs (``.item()``-like reads and ``.tolist()``).

| op (tutorial shapes)                 | kernels (Triton + torch) | table copies | syncs | before        |
|--------------------------------------|--------------------------|--------------|-------|---------------|
| bucketize                            | 1                        | 0            | 0     | same          |
| hash_bytes                           | 1                        | 0            | 0     | same          |
| hash_bytes_multi                     | 1                        | 1            | 0     | 1 + 1 blocking copy (a sync) |
| feature_cross                        | 4 (2 + zeros, cumsum)    | 0            | 1     | 28 + 1 sync   |
| mod_multi                            | 1                        | 1            | 0     | same          |
| bucketize_multi                      | 1                        | 1            | 0     | same          |
| sequence_truncate_multi (any N)      | 3 (2 + cumsum)           | 2            | 1     | 5, 2 copies, 1 sync |
| check_row_lengths (truncate=False)   | 2 (1 + zeros)            | 0            | 1     | 3 + 1 sync    |
| table_combine_multi (4 features)     | 1                        | 1            | 0     | 4 (table_combine each) |
| segment_combine_backward_multi (4)   | 2 (1 + zeros)            | 1            | 0     | 8 + 3 adds (one zeros + scatter each) |

On a GPU ``bench/feature_ops.py`` reports the same counts from the profiler and CUDA's sync
debug mode.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import fxrec.ops.triton.bucketize as triton_bucketize
import fxrec.ops.triton.combine as triton_combine
import fxrec.ops.triton.hash as triton_hash
import fxrec.ops.triton.mod as triton_mod
import fxrec.ops.triton.truncate as triton_truncate
from fxrec.ops.check import check_row_lengths_with_triton
from fxrec.ops.cross import feature_cross_with_triton

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="counts launches under the Triton interpreter (bench/feature_ops.py on GPUs)"
)

# Allocations and views launch nothing.
_NO_LAUNCH = {"empty", "empty_like", "new_empty", "empty_strided", "lift_fresh", "detach", "alias"}


class _Counts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.torch_kernels: collections.Counter = collections.Counter()
        self.triton_kernels = 0
        self.tables = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.syncs += 1
        elif not func.is_view and name not in _NO_LAUNCH:
            self.torch_kernels[name] += 1
        return func(*args, **(kwargs or {}))


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
        mode.syncs += 1
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
        "sequence_truncate_multi": lambda: triton_truncate.truncate_multi_triton(
            [d["seq"], d["seq"], d["seq"]], [d["seq_offsets"]] * 3, [None, d["seq_weight"], None],
            [10, 10, 5], [False, True, False]),
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


# op: (Triton kernels, torch kernels, table copies, host syncs)
EXPECTED = {
    "bucketize": (1, {}, 0, 0),
    "hash_bytes": (1, {}, 0, 0),
    "hash_bytes_multi": (1, {}, 1, 0),
    "feature_cross": (2, {"zeros": 1, "cumsum": 1}, 0, 1),
    "mod_multi": (1, {}, 1, 0),
    "bucketize_multi": (1, {}, 1, 0),
    "sequence_truncate_multi": (2, {"cumsum": 1}, 2, 1),
    "check_row_lengths": (1, {"zeros": 1}, 0, 1),
    "table_combine_multi": (1, {}, 1, 0),
    "segment_combine_backward_multi": (1, {"zeros": 1}, 1, 0),
}


@pytest.mark.parametrize("op", EXPECTED)
def test_launches_and_syncs(op, counts):
    call = _calls(_tutorial_batch())[op]
    with counts:
        call()
    triton_kernels, torch_kernels, tables, syncs = EXPECTED[op]
    assert (counts.triton_kernels, dict(counts.torch_kernels), counts.tables, counts.syncs) == (
        triton_kernels, torch_kernels, tables, syncs)

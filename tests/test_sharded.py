"""Row-wise sharded tables (fxrec.distributed.sharded, SPEC §8): the owner function against a
pure-Python oracle, the spread of structured ids, and sharded training in 2 and 3 gloo processes
against one process (tests/sharded_util.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxrec.distributed.sharded import NUM_SLICES, mix64, owner_of, slice_of, slice_range
from tests.sharded_util import CONFIGS, assert_close_snapshots, merge_shards, reference
from tests.trainer_util import run_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "sharded_worker.py")
MASK = (1 << 64) - 1
INT64 = st.integers(-(2**63), 2**63 - 1)


def oracle_owner(i: int, world: int) -> int:
    """splitmix64's finalizer on the id's uint64 bits, top 16 bits, contiguous slice ranges."""
    z = i & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    z ^= z >> 31
    return (z >> 48) * world // NUM_SLICES


def test_mix64_pinned():
    # splitmix64(seed=0)'s first output is the finalizer of 0x9E3779B97F4A7C15: 0xE220A8397B1DCDAF
    x = torch.tensor([0x9E3779B97F4A7C15 - (1 << 64)], dtype=torch.int64)
    assert int(mix64(x)) & MASK == 0xE220A8397B1DCDAF


@given(st.lists(INT64, max_size=50), st.integers(1, 9))
def test_every_id_has_exactly_one_owner(ids, world):
    t = torch.tensor(ids, dtype=torch.int64)
    owners = owner_of(t, world)
    assert owners.tolist() == [oracle_owner(i, world) for i in ids]
    slices = slice_of(t)
    for r in range(world):  # the slice ranges partition [0, NUM_SLICES) and agree with owner_of
        lo, hi = slice_range(r, world)
        assert ((slices >= lo) & (slices < hi)).eq(owners == r).all()
    assert slice_range(0, world)[0] == 0 and slice_range(world - 1, world)[1] == NUM_SLICES
    assert all(slice_range(r, world)[1] == slice_range(r + 1, world)[0] for r in range(world - 1))


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_structured_ids_spread_evenly(world):
    ids = torch.arange(100_000, dtype=torch.int64) * 65536  # the raw low 16 bits are all 0
    sizes = torch.bincount(owner_of(ids, world), minlength=world)
    assert sizes.max() / sizes.min() <= 1.2, sizes.tolist()


def test_bad_world_size():
    with pytest.raises(ValueError, match="world size"):
        owner_of(torch.zeros(1, dtype=torch.int64), 0)
    with pytest.raises(TypeError, match="int64"):
        owner_of(torch.zeros(1, dtype=torch.int32), 2)


def _run_sharded(tmp_path, world: int, device: str = "cpu") -> list[dict]:
    out = tmp_path / f"w{world}"
    out.mkdir()
    run_ranks(WORKER, world, str(tmp_path), [str(out), str(tmp_path / f"store{world}"), device],
              cuda=device == "cuda")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _check_against_reference(ranks: list[dict], world: int) -> None:
    for config in CONFIGS:
        key = "/".join(config)
        losses, want = reference(config, world)
        for r in ranks:
            torch.testing.assert_close(torch.tensor(r[key]["losses"]), torch.tensor(losses), atol=1e-5, rtol=1e-5)
        snaps = [r[key]["snapshot"] for r in ranks]
        for r, snap in enumerate(snaps):  # each rank holds exactly the ids it owns
            for name in ("t", "r"):
                ids = torch.tensor(snap[name]["ids"], dtype=torch.int64)
                assert (owner_of(ids, world) == r).all(), (key, name, r)
        assert_close_snapshots(merge_shards(snaps), want)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_training_equals_one_process(tmp_path, world):
    """Every combiner with both grad_reduce_by values, SparseAdamWTF and SGD: after 5 steps the
    losses, the dense weights and every table row and slot (the union of the ranks' shards) equal
    one process's within 1e-5."""
    _check_against_reference(_run_sharded(tmp_path, world), world)


@pytest.mark.gpu
def test_sharded_training_equals_one_process_on_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    _check_against_reference(_run_sharded(tmp_path, 2, "cuda"), 2)

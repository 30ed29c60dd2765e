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

from fxrec.framework.checkpoint import CheckpointManager
from fxrec.distributed.sharded import (NUM_SLICES, _as_int32, _ids_of, mix64, owner_bounds, owner_of, slice_of,
                                      slice_range)
from fxrec.nn.modules.hashtable import MAX_ROWS_ENV, HashTable
from tests.sharded_util import (
    CAP_IDS,
    CONFIGS,
    DIM,
    EVAL_STEPS,
    EXTRAS,
    ROW_CAP,
    TRAFFIC_IDS,
    assert_close_snapshots,
    build,
    cap_batch,
    union_of_shards,
    rank_batch,
    reference,
    run_extra,
    train_step,
)
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


@pytest.mark.parametrize("n", [0, 1, 4])
def test_ids_round_trip_through_int32_words(n):
    """Ids sent as int32 words beside a tag word (an odd row width) decode to themselves, for one
    row too (``.contiguous()`` keeps a lone row's stride, which int64 cannot view)."""
    ids = torch.tensor([-(2**63), 2**63 - 1, 7 << 16, -1][:n], dtype=torch.int64)
    words = torch.cat([_as_int32(ids), torch.arange(n, dtype=torch.int32)[:, None]], 1)
    assert torch.equal(_ids_of(words), ids)


def test_owner_bounds_checks_its_input_and_is_the_identity_in_one_process():
    assert owner_bounds([3, 0, 7]) == [3, 0, 7] and owner_bounds([]) == []
    with pytest.raises(ValueError, match="owner_bounds"):
        owner_bounds([2, -1])
    with pytest.raises(TypeError, match="owner_bounds"):
        owner_bounds([2.0])
    with pytest.raises(TypeError, match="owner_bounds"):
        owner_bounds([True])


def _run_sharded(directory, world: int, device: str = "cpu") -> list[dict]:
    out = directory / f"w{world}"
    out.mkdir()
    run_ranks(WORKER, world, str(directory), [str(out), str(directory / f"store{world}"), device],
              cuda=device == "cuda")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """The worker's results at world sizes 2 and 3 (gloo), computed once for the module's tests."""
    runs = {}

    def get(world: int) -> list[dict]:
        if world not in runs:
            runs[world] = _run_sharded(tmp_path_factory.mktemp(f"sharded{world}"), world)
        return runs[world]
    return get


def _check_owned(snap: dict, rank: int, world: int, what: str) -> None:
    for name in ("t", "r"):
        ids = torch.tensor(snap[name]["ids"], dtype=torch.int64)
        assert (owner_of(ids, world) == rank).all(), (what, name, rank)


def _check_against_reference(ranks: list[dict], world: int) -> None:
    for config in CONFIGS:
        key = "/".join(config)
        losses, want = reference(config, world)
        for r in ranks:
            torch.testing.assert_close(torch.tensor(r[key]["losses"]), torch.tensor(losses), atol=1e-5, rtol=1e-5)
        snaps = [r[key]["snapshot"] for r in ranks]
        for r, snap in enumerate(snaps):  # each rank holds exactly the ids it owns
            _check_owned(snap, r, world, key)
        assert_close_snapshots(union_of_shards(snaps), want)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_training_equals_one_process(sharded_runs, world):
    """Every combiner with both grad_reduce_by values, SparseAdamWTF and SGD: after 5 steps the
    losses, the dense weights and every table row and slot (the union of the ranks' shards) equal
    one process's within 1e-5."""
    _check_against_reference(sharded_runs(world), world)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("extra", EXTRAS, ids=[e[0] for e in EXTRAS])
def test_sharded_eviction_read_only_accumulation_passes_and_eval(sharded_runs, world, extra):
    """Eviction on the owners, a table turned ReadOnly mid-run, 2-micro-batch gradient
    accumulation, merged lookups over coalesced tables (passes=True: "t" and "r" in one storage,
    (tag, id) pairs to the owners; one feature not trainable, or 2 micro-batches): losses and every shard
    equal one process's; then eval mode (mostly unseen ids: zero rows) gives one process's
    outputs and inserts nothing."""
    name, config, kwargs, steps, micro = extra
    ranks = [r[name] for r in sharded_runs(world)]
    want = run_extra(name, config, kwargs, steps, micro, None, world)
    for r, got in enumerate(ranks):
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), atol=1e-5, rtol=1e-5)
        _check_owned(got["trained"], r, world, name)
        assert got["after_eval"] == got["trained"]  # eval inserts nothing, updates nothing
    assert_close_snapshots(union_of_shards([g["trained"] for g in ranks]), want["trained"])
    per_step = len(want["outputs"]) // len(EVAL_STEPS) // world  # outputs per (step, rank): a, b, c
    for r, got in enumerate(ranks):
        for i, s in enumerate(EVAL_STEPS):
            expected = want["outputs"][(i * world + r) * per_step: (i * world + r + 1) * per_step]
            mine = got["outputs"][i * per_step: (i + 1) * per_step]
            for a, b in zip(mine, expected):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5)
    if kwargs.get("passes"):  # sharded + coalesced: "t" and "r" share one storage, here and in the reference
        assert want["storage"] == ["t", "r"] and all(g["storage"] == ["t", "r"] for g in ranks)
    if name == "evict":  # it did evict: fewer ids than a run without eviction keeps
        assert len(want["trained"]["t"]["ids"]) < len(run_extra("read_only", config, {}, steps, 1, None, world)
                                                      ["trained"]["t"]["ids"])
    if name == "read_only":  # no id first seen after step 2 got into "r"
        early = {i for s in range(2) for r in range(world) for i in rank_batch(s, r, world)["c"].values().tolist()}
        assert set(want["trained"]["r"]["ids"]) == early


@pytest.mark.parametrize("world", [2, 3])
def test_row_cap_trains_sharded(sharded_runs, world):
    """A table of CAP_IDS ids, more than one rank's ROW_CAP, trains sharded: each rank holds only
    the ids it owns, all of them together."""
    snaps = [r["cap"] for r in sharded_runs(world)]
    for r, snap in enumerate(snaps):
        _check_owned(snap, r, world, "cap")
        assert len(snap["t"]["ids"]) <= ROW_CAP
    assert len(union_of_shards(snaps)["t"]["ids"]) == CAP_IDS


def test_row_cap_fails_unsharded_naming_the_table(monkeypatch):
    monkeypatch.setenv(MAX_ROWS_ENV, str(ROW_CAP))
    model, dense, sparse = build(CONFIGS[0])
    train_step(model, dense, sparse, [cap_batch(0, 0, 1)])  # 30 ids: under the cap
    with pytest.raises(ValueError, match=f"HashTable 't': {CAP_IDS} ids exceed this rank's cap of {ROW_CAP}"):
        train_step(model, dense, sparse, [cap_batch(1, 0, 1)])


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_row_cap_env_must_be_a_positive_int(monkeypatch, value):
    monkeypatch.setenv(MAX_ROWS_ENV, value)
    with pytest.raises(ValueError, match=MAX_ROWS_ENV):
        build(CONFIGS[0])


@pytest.mark.parametrize("world", [2, 3])
def test_traffic_counts_the_bytes_sent_to_other_ranks(sharded_runs, world):
    """One lookup of TRAFFIC_IDS (HashTable.forward, eval mode) on every rank: each rank sends
    the distinct ids other ranks own (8 bytes each) and gets their rows back, so it sends the rows
    of its own ids the others asked for (DIM float32 each); the sizes exchange is 8 bytes per
    other rank. Every rank asked for the same ids."""
    uniq = torch.unique(TRAFFIC_IDS)
    owners = owner_of(uniq, world)
    for r, rank in enumerate(sharded_runs(world)):
        got = rank["traffic"]
        assert got["ids"] == 8 * int((owners != r).sum())
        assert got["rows"] == 4 * DIM * int((owners == r).sum()) * (world - 1)
        assert got["sizes"] == 8 * (world - 1) and got["grads"] == 0 and got["tags"] == 0


@pytest.mark.parametrize("world", [2, 3])
def test_traffic_of_coalesced_tables_counts_the_tags(sharded_runs, world):
    """Tables "t" and "r" coalesced into one storage (passes=True): one eval-mode merged lookup
    sends each distinct (tag, id) pair to the owner of its id, as 3 int32 words (8 bytes of id
    counted as "ids", 4 of tag as "tags"), and gets the rows back; one sizes exchange."""
    t_ids = torch.unique(torch.cat([TRAFFIC_IDS.reshape(-1), TRAFFIC_IDS.reshape(-1) + 1]))
    pairs = torch.cat([t_ids, torch.unique(TRAFFIC_IDS)])  # the same id in "t" and "r": two pairs
    owners = owner_of(pairs, world)
    for r, rank in enumerate(sharded_runs(world)):
        assert rank["traffic_coalesced_storage"] == ["t", "r"]
        got = rank["traffic_coalesced"]
        assert got["ids"] == 8 * int((owners != r).sum()) and got["tags"] == 4 * int((owners != r).sum())
        assert got["rows"] == 4 * DIM * int((owners == r).sum()) * (world - 1)
        assert got["sizes"] == 8 * (world - 1) and got["grads"] == 0


_FAILING_SAVE = """
import os, sys
sys.path.insert(0, {repo!r})
import torch.distributed as dist
import fxrec.framework.checkpoint as checkpoint
from tests.trainer_util import make_batches, make_trainer

out, store = sys.argv[1], sys.argv[2]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
trainer = make_trainer(out, make_batches(4, 4, seed=rank), train_steps=1)
trainer.train()  # ckpt_1, both shards


def fail(event, path):
    if rank == 1 and event == "file_written" and path.name.startswith("sparse.shard1"):
        raise OSError("disk full")


checkpoint._test_hook = fail
trainer.args.train_steps = 2
try:
    trainer.train()  # step 2 trains; its checkpoint fails on rank 1
except (OSError, RuntimeError) as e:
    print("raised:", type(e).__name__, e)
    assert ("disk full" in str(e)) and (rank == 1 or "rank 1 failed to write its shard" in str(e))
else:
    raise AssertionError("the save did not fail")
dist.barrier()
# Exit without tearing gloo down: after a collective that raised on purpose, a teardown racing the
# other rank's aborted once ("terminate called without an active exception"); nothing is left to
# flush but stdout.
sys.stdout.flush()
os._exit(0)
"""


def test_a_rank_failing_to_write_its_shard_fails_the_save_everywhere(tmp_path):
    """Rank 1 fails to write its shard of ckpt_2: every rank raises (rank 0 naming rank 1), the
    temp dir is gone and ckpt_1 stays the latest, loadable, checkpoint."""
    script = tmp_path / "failing_save.py"
    script.write_text(_FAILING_SAVE.format(repo=REPO))
    out = tmp_path / "out"
    run_ranks(str(script), 2, str(tmp_path), [str(out), str(tmp_path / "store")])
    manager = CheckpointManager(out)
    assert manager.latest_step() == 1 and manager.list_steps() == [1]
    assert sorted(os.listdir(out)) == ["checkpoint", "ckpt_1"]  # no temp dir left
    assert {"sparse.shard0", "sparse.shard1"} <= set(manager.part_names(1))
    manager.load(1)  # every file verifies


@pytest.mark.gpu
def test_sharded_training_equals_one_process_on_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    _check_against_reference(_run_sharded(tmp_path, 2, "cuda"), 2)


@given(st.lists(st.lists(st.sampled_from([0, 1, -1, 65536, -(2**63), 2**63 - 1, 7, 7 << 16]), max_size=8),
                max_size=4))
def test_take_id_grads_sums_per_id_over_lookups(lookups):
    """Sharded lookups record gradients by id (HashTable.grad_anchor(..., ids=...)):
    take_id_grads gives each id once with its gradient summed over every lookup and its
    occurrences counted, unreduced — against a dict oracle. Lookups of no id and anchors without
    a gradient add nothing."""
    table = HashTable(DIM, name="t")
    want_sum: dict[int, torch.Tensor] = {}
    want_count: dict[int, float] = {}
    for i, ids in enumerate(lookups):
        uniq, counts = torch.unique(torch.tensor(ids, dtype=torch.int64), return_counts=True)
        anchor = table.grad_anchor(torch.arange(uniq.numel()), counts, ids=uniq)
        if i == 1:
            continue  # this anchor gets no gradient
        grad = torch.arange(uniq.numel() * DIM, dtype=torch.float32).reshape(-1, DIM) + i
        (anchor * grad).sum().backward()
        for j, k in enumerate(uniq.tolist()):
            want_sum[k] = want_sum.get(k, 0) + grad[j]
            want_count[k] = want_count.get(k, 0) + float(counts[j])
    ids, sums, counts = table.take_id_grads()
    assert ids.tolist() == sorted(want_sum)
    for k, s, c in zip(ids.tolist(), sums, counts.tolist()):
        assert torch.equal(s, want_sum[k]) and c == want_count[k]
    assert table.take_id_grads()[0].numel() == 0  # taken: nothing pending

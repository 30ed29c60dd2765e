"""HashTable (SPEC §4.4) against a Python dict oracle: random sequences of training lookups,
eval lookups, row writes, steps and evictions; growth; gradients; state_dict; hooks."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxrec.nn.hashtable_hook import AdmitHook, FilterHook
from fxrec.nn.initializers import TruncNormalInitializer, UniformInitializer
from fxrec.nn.modules.hashtable import HashTable, filter_out_sparse_param
from fxrec.ops.table import EMPTY, FILLED

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
DIM = 3
an_id = st.one_of(st.integers(-8, 8), st.sampled_from([INT64_MIN, INT64_MAX, 2**40, -(2**40)]),
                  st.integers(INT64_MIN, INT64_MAX))
a_batch = st.lists(an_id, max_size=12)
an_op = st.one_of(
    st.tuples(st.just("train"), a_batch),
    st.tuples(st.just("eval"), a_batch),
    st.tuples(st.just("write"), a_batch),
    st.tuples(st.just("step"), st.integers(1, 3)),
    st.tuples(st.just("evict"), st.just(None)),
)


def initial_row(table: HashTable, id_: int) -> torch.Tensor:
    return table.initializer.init_rows(torch.tensor([id_]), table.dim, table.seed, table.block_size)[0]


class Oracle:
    """id -> (embedding row, slot row, last seen step), with the table's step counter."""

    def __init__(self, table: HashTable, slot_init: float, filter_step: int) -> None:
        self.table, self.slot_init, self.filter_step = table, slot_init, filter_step
        self.rows: dict[int, list] = {}
        self.step = 0

    def train(self, ids):
        for i in ids:
            if i not in self.rows:
                self.rows[i] = [initial_row(self.table, i), torch.full((2,), self.slot_init), 0]
            self.rows[i][2] = self.step

    def evict(self):
        stale = [i for i, (_, _, seen) in self.rows.items() if self.step - seen >= self.filter_step]
        for i in stale:
            del self.rows[i]
        return len(stale)


def table_content(table: HashTable) -> dict[int, tuple]:
    filled = (table.state == FILLED).nonzero().squeeze(1)
    slot = table.slots()["m"]
    return {int(table.keys[r]): (table.embedding[r], slot[r], int(table.last_seen[r])) for r in filled.tolist()}


@given(ops=st.lists(an_op, max_size=14), filter_step=st.integers(1, 3), block_size=st.sampled_from([1, 4, 64]))
def test_table_matches_dict_oracle(ops, filter_step, block_size):
    table = HashTable([DIM], block_size=block_size, name="t", initializer=UniformInitializer(-1, 1),
                      filter_hook=FilterHook("GlobalStepFilter", {"filter_step": filter_step}))
    table.slot("m", 2, init=0.5)
    oracle = Oracle(table, 0.5, filter_step)
    for n, (kind, arg) in enumerate(ops):
        if kind in ("train", "write"):
            table.train()
            ids = torch.tensor(arg, dtype=torch.int64)
            rows = table.lookup(ids)
            oracle.train(arg)
            assert (rows >= 0).all()
            assert torch.equal(table.keys[rows], ids)  # the row holds the id
            for i, r in zip(arg, rows.tolist()):  # one row per id
                assert r == rows[ids == i][0]
            if kind == "write":  # rows keep written values through growth and eviction
                for i, r in zip(arg, rows.tolist()):
                    oracle.rows[i][0] = torch.full((DIM,), float(n) + i % 7)
                    oracle.rows[i][1] = torch.full((2,), -float(n))
                    table.embedding[r] = oracle.rows[i][0]
                    table.slots()["m"][r] = oracle.rows[i][1]
        elif kind == "eval":
            table.eval()
            rows = table.lookup(torch.tensor(arg, dtype=torch.int64))
            emb = table.gather(rows)
            for i, r, e in zip(arg, rows.tolist(), emb):
                if i in oracle.rows:
                    assert r >= 0 and torch.equal(e, oracle.rows[i][0])
                else:
                    assert r == -1 and torch.equal(e, torch.zeros(DIM))
        elif kind == "step":
            for _ in range(arg):
                table.advance_step()
            oracle.step += arg
        else:
            assert table.evict_stale() == oracle.evict()
        assert len(table) == len(oracle.rows)
        assert 2 * len(table) <= table.capacity
        assert table.storage.size_bound >= len(table)  # the host's bound (reserve) never undercounts
        # free rows hold the slot's initial value: what an insert leaves a new id's slot at
        assert (table.slots()["m"][table.state == EMPTY] == 0.5).all()
    content = table_content(table)
    assert content.keys() == oracle.rows.keys()
    for i, (emb, slot, seen) in oracle.rows.items():
        assert torch.equal(content[i][0], emb)
        assert torch.equal(content[i][1], slot)
        assert content[i][2] == seen


def test_initial_rows_do_not_depend_on_insertion_order():
    ids = torch.randint(INT64_MIN, INT64_MAX, (300,), dtype=torch.int64)
    a = HashTable(8, block_size=4, name="emb", initializer=TruncNormalInitializer(0, 0.01))
    b = HashTable(8, block_size=1024, name="emb", initializer=TruncNormalInitializer(0, 0.01))
    a.lookup(ids)
    for chunk in ids.flip(0).split(7):
        b.lookup(chunk)
    ea, eb = a.gather(a.lookup(ids)), b.gather(b.lookup(ids))
    assert torch.equal(ea, eb)
    assert torch.equal(ea, a.initializer.init_rows(ids, 8, a.seed, a.block_size))
    other = HashTable(8, name="other", initializer=TruncNormalInitializer(0, 0.01))
    assert not torch.equal(other.gather(other.lookup(ids)), ea)  # the seed is the table's


def test_forward_gathers_duplicates_and_grads_sum_over_occurrences():
    table = HashTable(2, name="t", initializer=UniformInitializer())
    ids = torch.tensor([[7, -1, 7], [INT64_MIN, 7, 0]])
    emb = table(ids)
    assert emb.shape == (2, 3, 2)
    weights = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    (emb * weights).sum().backward()
    rows, grads = table.take_grads()
    rows, grads = rows[rows >= 0], grads[rows >= 0]  # -1: padding
    got = {int(table.keys[r]): g for r, g in zip(rows.tolist(), grads)}
    flat_ids, flat_w = ids.reshape(-1).tolist(), weights.reshape(-1, 2)
    expected = {}
    for i, w in zip(flat_ids, flat_w):
        expected[i] = expected.get(i, torch.zeros(2)) + w
    assert got.keys() == expected.keys()
    for i in expected:
        torch.testing.assert_close(got[i], expected[i], rtol=0, atol=0)
    assert table.take_grads()[0].numel() == 0  # taken once


@given(lookups=st.lists(st.lists(st.integers(-4, 4), max_size=6), min_size=1, max_size=4),
       reduce=st.sampled_from(["worker", "id"]), data=st.data())
def test_take_grads_merges_lookups_without_a_sync(lookups, reduce, data):
    """Several lookups of one table: ``take_grads`` gives each touched row once (the rest -1
    padding, as many entries as the lookups' distinct ids together), its gradient summed over
    every occurrence (``"id"``: divided by their number); an unused lookup is left out."""
    table = HashTable(2, name="t", grad_reduce_by=reduce)
    loss, expected, occurrences, entries = 0.0, {}, {}, 0
    for ids in lookups:
        weights = torch.tensor(data.draw(st.lists(st.integers(-3, 3), min_size=2 * len(ids), max_size=2 * len(ids))),
                               dtype=torch.float32).reshape(len(ids), 2)
        emb = table(torch.tensor(ids, dtype=torch.int64))
        if not data.draw(st.booleans(), label="used"):
            continue  # no gradient reaches this lookup's anchor
        loss = loss + (emb * weights).sum()
        entries += len(set(ids))
        for i, w in zip(ids, weights):
            expected[i] = expected.get(i, torch.zeros(2)) + w
            occurrences[i] = occurrences.get(i, 0) + 1
    if isinstance(loss, torch.Tensor):
        loss.backward()
    rows, grads = table.take_grads()
    assert rows.shape == (entries,) and grads.shape == (entries, 2)
    present = rows >= 0
    got = {int(table.keys[r]): g for r, g in zip(rows[present].tolist(), grads[present])}
    assert len(got) == int(present.sum())  # each row once
    assert got.keys() == expected.keys()
    for i, g in expected.items():
        torch.testing.assert_close(got[i], g / occurrences[i] if reduce == "id" else g, rtol=1e-6, atol=0)


def test_grad_reduce_by_id_averages_over_occurrences():
    table = HashTable(1, name="t", grad_reduce_by="id")
    table(torch.tensor([5, 5, 5, 9])).sum().backward()
    rows, grads = table.take_grads()
    rows, grads = rows[rows >= 0], grads[rows >= 0]  # -1: padding
    got = {int(table.keys[r]): float(g) for r, g in zip(rows.tolist(), grads)}
    assert got == {5: 1.0, 9: 1.0}


def test_pending_grads_follow_rows_through_growth_and_eviction():
    table = HashTable(2, block_size=2, name="t", filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 1}))
    first = table(torch.tensor([1, 2]))
    table.advance_step()
    capacity = table.capacity
    second = table(torch.arange(100, 200))  # grows: rows of 1 and 2 move
    assert table.capacity > capacity
    (first.sum() * 2 + second.sum()).backward()
    rows, grads = table.take_grads()
    rows, grads = rows[rows >= 0], grads[rows >= 0]  # -1: padding
    by_id = {int(table.keys[r]): g for r, g in zip(rows.tolist(), grads)}
    assert torch.equal(by_id[1], torch.full((2,), 2.0)) and torch.equal(by_id[150], torch.ones(2))
    third = table(torch.tensor([1, 100]))
    table.advance_step()
    table.lookup(torch.tensor([100]))
    assert table.evict_stale() == 101  # 1, 2 and 101..199: not looked up in the last step
    third.sum().backward()
    rows, _ = table.take_grads()
    rows = rows[rows >= 0]  # -1: padding
    assert table.keys[rows].tolist() == [100]  # the evicted id's gradient is dropped


def test_grad_anchor_is_a_stride_zero_leaf_only_when_training_with_grad():
    table = HashTable(3, name="t", initializer=UniformInitializer())
    rows = table.lookup(torch.tensor([4, 5]))
    anchor = table.grad_anchor(rows, torch.tensor([2, 1]))
    # zeros(()).expand(U, dim): a [U, dim] leaf without memory; the table itself is a plain buffer
    assert anchor.is_leaf and anchor.requires_grad and anchor.shape == (2, 3) and anchor.stride() == (0, 0)
    assert not anchor.any() and not table.embedding.requires_grad
    out = torch.ops.fxrec.table_combine(table.embedding, rows, anchor, torch.tensor([0, 1, 1]), torch.tensor([0, 3]),
                                        None, "sum", 1)
    torch.testing.assert_close(out[0], table.embedding[rows[0]] + 2 * table.embedding[rows[1]], rtol=0, atol=0)
    out.sum().backward()
    assert table.embedding.grad is None and anchor.grad.shape == (2, 3)
    got_rows, grads = table.take_grads()
    got_rows, grads = got_rows[got_rows >= 0], grads[got_rows >= 0]  # -1: padding
    by_id = {int(table.keys[r]): g.tolist() for r, g in zip(got_rows.tolist(), grads)}
    assert by_id == {4: [1.0] * 3, 5: [2.0] * 3}  # summed over the items
    with torch.no_grad():
        assert table.grad_anchor(rows) is None
    table.eval()
    assert table.grad_anchor(rows) is None
    assert table._pending == []


def test_forward_equals_gather():
    table = HashTable(4, name="t", initializer=UniformInitializer())
    ids = torch.tensor([[3, 9, 3], [-2, 0, 9]])
    emb = table(ids)
    assert emb.requires_grad and emb.shape == (2, 3, 4)
    assert torch.equal(emb, table.gather(table.lookup(ids)))
    assert not table.gather(table.lookup(ids)).requires_grad  # a plain read


@pytest.mark.parametrize("mode", ["eval", "read_only"])
def test_no_insert_when_not_admitting(mode):
    hook = AdmitHook("ReadOnly") if mode == "read_only" else None
    table = HashTable(2, name="t", initializer=UniformInitializer(), admit_hook=hook)
    if mode == "read_only":
        table.admit_hook = None
        table.lookup(torch.tensor([3]))
        table.admit_hook = hook
    else:
        table.lookup(torch.tensor([3]))
        table.eval()
    emb = table(torch.tensor([3, 4, 4]))
    assert len(table) == 1
    assert torch.equal(emb[1:], torch.zeros(2, 2)) and torch.equal(emb[0], initial_row(table, 3))
    if mode == "read_only":  # training still trains the seen ids, never the unseen
        emb.sum().backward()
        rows, _ = table.take_grads()
        rows = rows[rows >= 0]  # -1: padding
        assert table.keys[rows].tolist() == [3]
    else:
        assert not emb.requires_grad


def test_state_dict_round_trip():
    table = HashTable(4, block_size=8, name="t", initializer=UniformInitializer(),
                      filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 5}))
    table.slot("exp_avg", 4)
    ids = torch.tensor([3, INT64_MIN, -9, INT64_MAX, 0] + list(range(100, 140)))
    rows = table.lookup(ids)
    table.slots()["exp_avg"][rows] = torch.randn(len(ids), 4)
    table.advance_step()
    table.lookup(ids[:3])
    state = table.state_dict()
    assert sorted(state) == ["embedding", "ids", "last_seen", "slot.exp_avg", "step"]
    assert state["ids"].shape == (45,) and state["embedding"].shape == (45, 4)
    fresh = HashTable(4, block_size=1, name="t", initializer=UniformInitializer(),
                      filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 5}))
    fresh.load_state_dict(state)
    assert len(fresh) == 45 and int(fresh.step) == 1
    for name in ("embedding", "slot.exp_avg", "last_seen"):
        got = dict(zip(fresh.state_dict()["ids"].tolist(), fresh.state_dict()[name]))
        for i, v in zip(state["ids"].tolist(), state[name]):
            assert torch.equal(got[i], v)
    assert fresh.slot("exp_avg", 4) is fresh.slots()["exp_avg"]
    new = fresh.lookup(torch.tensor([999]))  # new ids get the slot's init
    assert torch.equal(fresh.slots()["exp_avg"][new], torch.zeros(1, 4))


def test_reserve_reads_the_count_only_when_its_bound_runs_out():
    table = HashTable(2, block_size=64, name="t")  # capacity 64: room for 32 ids
    table.train()
    ids = torch.arange(10)
    bounds = []
    for _ in range(4):
        table.lookup(ids)
        bounds.append(table.storage.size_bound)
    # each lookup books its 10 ids; the 4th would exceed 32: it reads the count (10) and books on
    assert bounds == [10, 20, 30, 20] and table.capacity == 64 and len(table) == 10
    table.lookup(torch.arange(100, 125))  # 10 + 25 ids > 32: grows
    assert table.capacity == 128 and len(table) == 35 and table.storage.size_bound == 35


class _LandedCopy:
    """A CUDA event's stand-in whose copy has landed (``query``)."""

    def query(self) -> bool:
        return True


def test_reserve_takes_a_landed_snapshot_and_grows_on_the_exact_count():
    # the snapshot branch's arithmetic on CPU: a landed copy of the count, taken at a known bound
    table = HashTable(2, block_size=64, name="t")  # capacity 64: room for 32 ids
    table.train()
    table.lookup(torch.arange(20))
    storage = table.storage
    storage.size_bound = 25  # as if 5 more ids were reserved after a snapshot of the 20 held
    storage._count_snapshot = (torch.tensor(20), _LandedCopy(), 25)
    storage.counts.fill_(1000)  # a device read would see this: the landed snapshot must be used
    storage.reserve(12)  # 25 + 12 > 32: the snapshot's 20 + 12 fits
    assert storage.size_bound == 32 and storage._count_snapshot is None and table.capacity == 64
    storage.counts.fill_(20)
    storage._count_snapshot = (torch.tensor(20), _LandedCopy(), 32)
    storage.reserve(20)  # the snapshot's 20 + 20 > 32: the exact count decides, and it grows
    assert table.capacity == 128 and storage.size_bound == 40 and len(table) == 20


@pytest.mark.gpu
def test_reserve_reads_the_count_from_the_last_lookups_snapshot_without_a_sync():
    table = HashTable(2, block_size=64, name="t").cuda()  # capacity 64: room for 32 ids
    table.train()
    table.lookup(torch.arange(10, device="cuda"))  # books 10, then snapshots the count (10)
    table.lookup(torch.arange(5, 20, device="cuda"))  # books 15 more (25), snapshot: 20 ids held
    torch.cuda.synchronize()  # the snapshot's copy has landed
    torch.cuda.set_sync_debug_mode("error")
    try:
        table.storage.reserve(12)  # 25 + 12 > 32: the bound from the snapshot (20) + 12 fits
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert table.storage.size_bound == 32 and table.capacity == 64
    table.storage.reserve(1)  # the snapshot is used up: this one reads the count (20 + 1 fits)
    assert table.storage.size_bound == 21 and table.capacity == 64
    # a snapshot whose bound leaves no room: growth decided on the exact count
    table.lookup(torch.arange(20, 30, device="cuda"))  # 30 held
    torch.cuda.synchronize()
    table.storage.reserve(3)  # 2 * (30 + 3) > 64: grows to room for 33
    assert table.capacity == 128 and table.storage.size_bound == 33 and len(table) == 30
    assert sorted(table.state_dict()["ids"].tolist()) == list(range(30))


@pytest.mark.gpu
def test_count_snapshots_reuse_landed_buffers_and_stay_exact():
    table = HashTable(2, block_size=64, name="t").cuda()  # capacity 64
    table.train()
    storage = table.storage
    for step in range(4):  # each lookup inserts 5 new ids, then snapshots the count
        table.lookup(torch.arange(5 * step, 5 * step + 5, device="cuda"))
        torch.cuda.synchronize()
        if step == 0:
            landed = storage._snapshot_buffers
        assert storage._snapshot_buffers is landed  # the last copy had landed: its pinned counts and event again
        assert storage._landed_bound() == 5 * (step + 1)  # nothing booked since: the exact count
    # a copy still in flight keeps its buffer: the next snapshot takes new ones
    torch.cuda._sleep(50_000_000)  # keeps the stream busy past both snapshots
    storage.snapshot_count()
    in_flight = storage._snapshot_buffers
    storage.snapshot_count()
    assert storage._snapshot_buffers is not in_flight
    torch.cuda.synchronize()
    assert storage._landed_bound() == 20 and int(in_flight[0].sum()) == 20


def test_new_ids_take_a_slot_init_named_after_a_load():
    # a slot restored by load_state_dict (init 0 until told) then named by an optimizer with
    # another init: ids inserted afterwards start at that init, the loaded ones keep their values
    src = HashTable(3, name="t")
    src.slot("acc", 3, init=0.0)
    src.train()
    rows = src.lookup(torch.tensor([1, 2]))
    src.slots()["acc"][rows] = 7.0
    dst = HashTable(3, name="t")
    dst.load_state_dict(src.state_dict())
    dst.slot("acc", 3, init=0.25)
    dst.train()
    rows = dst.lookup(torch.tensor([1, 2, 3, 4]))
    acc = dst.slots()["acc"]
    assert (acc[rows[:2]] == 7.0).all() and (acc[rows[2:]] == 0.25).all()
    assert (acc[dst.state == EMPTY] == 0.25).all()


def test_state_dict_errors():
    table = HashTable(2, name="t")
    good = {"ids": torch.tensor([1, 2]), "embedding": torch.zeros(2, 2), "last_seen": torch.zeros(2, dtype=torch.int64),
            "step": torch.tensor(0)}
    with pytest.raises(RuntimeError, match="embedding has shape"):
        table.load_state_dict({**good, "embedding": torch.zeros(2, 3)})
    with pytest.raises(RuntimeError, match="duplicate"):
        table.load_state_dict({**good, "ids": torch.tensor([1, 1])})
    with pytest.raises(RuntimeError, match="Missing key"):
        table.load_state_dict({k: v for k, v in good.items() if k != "ids"})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        table.load_state_dict({**good, "junk": torch.zeros(1)})


def test_model_state_dict_nests_tables():
    model = torch.nn.ModuleDict({"a": HashTable(2, name="a"), "lin": torch.nn.Linear(2, 1)})
    model["a"].lookup(torch.tensor([5]))
    state = model.state_dict()
    assert {"a.ids", "a.embedding", "lin.weight"} <= set(state)
    assert [n for n, _ in model.named_parameters()] == ["lin.weight", "lin.bias"]  # no dense optimizer sees tables
    fresh = torch.nn.ModuleDict({"a": HashTable(2, name="a"), "lin": torch.nn.Linear(2, 1)})
    fresh.load_state_dict(state)
    assert len(fresh["a"]) == 1


def test_filter_out_sparse_param():
    shared = HashTable(2, name="s")
    model = torch.nn.Sequential(torch.nn.ModuleDict({"x": shared, "y": HashTable(4, name="y")}),
                                torch.nn.ModuleList([shared]))
    assert filter_out_sparse_param(model) == {"s": shared, "y": model[0]["y"]}
    with pytest.raises(ValueError, match="'s'"):
        filter_out_sparse_param(torch.nn.ModuleList([shared, HashTable(2, name="s")]))


def test_validation():
    with pytest.raises(ValueError, match="embedding_shape"):
        HashTable([2, 3])
    with pytest.raises(ValueError, match="block_size"):
        HashTable(2, block_size=0)
    with pytest.raises(TypeError, match="dtype"):
        HashTable(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="grad_reduce_by"):
        HashTable(2, grad_reduce_by="sum")
    with pytest.raises(TypeError, match="initializer"):
        HashTable(2, initializer=torch.nn.init.zeros_)
    with pytest.raises(ValueError, match="unknown policy"):
        AdmitHook("Bloom")
    with pytest.raises(ValueError, match="filter_step"):
        FilterHook("GlobalStepFilter", {"filter_step": 0})
    with pytest.raises(ValueError, match="params"):
        FilterHook("GlobalStepFilter", {})
    table = HashTable(2, name="feat_table")
    with pytest.raises(TypeError, match="'feat_table'.*int64"):
        table.lookup(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="width"):
        table.slot("m", 2)
        table.slot("m", 3)


@pytest.mark.gpu
def test_cuda_table_equals_cpu_table():
    torch.manual_seed(0)
    batches = [torch.randint(-(2**62), 2**62, (n,)) % m for n, m in [(5000, 3000), (20000, 50000), (1, 7), (0, 1)]]
    tables = {d: HashTable(16, block_size=64, name="t", initializer=TruncNormalInitializer(0, 0.01), device=d)
              for d in ("cpu", "cuda")}
    for b in batches:
        for d, t in tables.items():
            t.lookup(b.to(d))
    cpu, cuda = tables["cpu"].state_dict(), tables["cuda"].state_dict()
    order_cpu, order_cuda = cpu["ids"].argsort(), cuda["ids"].cpu().argsort()
    assert torch.equal(cpu["ids"][order_cpu], cuda["ids"].cpu()[order_cuda])
    assert torch.equal(cpu["embedding"][order_cpu], cuda["embedding"].cpu()[order_cuda])
    ids = torch.cat(batches)
    assert torch.equal(tables["cpu"](ids), tables["cuda"](ids.cuda()).cpu())


@pytest.mark.gpu
def test_cuda_take_grads_equals_cpu():
    # several lookups (merged by a sort on the device, padding -1) and "id" reduction: per id equal
    torch.manual_seed(0)
    lookups = [torch.randint(-50, 50, (n,)) for n in (300, 1, 0, 700)]
    got = {}
    for d in ("cpu", "cuda"):
        table = HashTable(8, name="t", grad_reduce_by="id", initializer=TruncNormalInitializer(0, 0.01), device=d)
        loss = sum((table(ids.to(d)) * torch.arange(8.0, device=d)).sum() * (k + 1) for k, ids in enumerate(lookups))
        loss.backward()
        rows, grads = table.take_grads()
        keep = rows >= 0
        ids = table.keys[rows[keep]].cpu()
        order = ids.argsort()
        got[d] = (ids[order], grads[keep].cpu()[order])
    assert torch.equal(got["cpu"][0], got["cuda"][0])
    torch.testing.assert_close(got["cuda"][1], got["cpu"][1], rtol=1e-6, atol=1e-6)


@given(batches=st.lists(st.lists(st.tuples(st.integers(0, 2), st.lists(st.integers(-4, 4), max_size=30)), max_size=6),
                        min_size=1, max_size=3))
def test_storage_lookup_counts_each_members_distinct_ids(batches):
    """``TableStorage.lookup`` over batches of tagged ids (repeats and all): each member's count
    is its distinct ids so far, and every id reads its member's row."""
    from fxrec.nn.modules.table_storage import coalesce_tables

    tables = [HashTable(2, name=f"t{i}", initializer=UniformInitializer()) for i in range(3)]
    storage = coalesce_tables(tables)
    held: list[set[int]] = [set(), set(), set()]
    for parts in batches:
        ids = torch.tensor([i for _, values in parts for i in values], dtype=torch.int64)
        tags = torch.tensor([t for t, values in parts for _ in values], dtype=torch.int32)
        rows = storage.lookup(ids, tags, tables)
        for t, values in parts:
            held[t].update(values)
        assert storage.counts.tolist() == [len(h) for h in held]
        assert [tables[t].find(torch.tensor([i])).item() for t, values in parts for i in values] == rows.tolist()

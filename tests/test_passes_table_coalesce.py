"""``table_coalesce``: tables of equal layout -> one physical table, one lookup for all their
features (DESIGN.md, "Passes"). The oracle is the unrewritten engine (``passes=False``: one table
per shared_name, one lookup per feature) built from the same options and fed the same batches:
outputs, every logical table's contents per id, ``take_grads`` per id, training with
SparseAdamWTF, checkpoints, eviction and eval must be equal. Rows are numbered differently (one
storage, other insertion order), so tables and gradients are compared per id.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import given, settings
from torch.utils._python_dispatch import TorchDispatchMode

from examples.deepctr.embeddings import get_embedding_conf
from fxrec.framework.checkpoint import CheckpointManager
from fxrec.nn.hashtable_hook import FilterHook
from fxrec.nn.initializers import (
    KaimingNormalInitializer, NormalInitializer, TruncNormalInitializer, UniformInitializer, XavierNormalInitializer,
)
from fxrec.nn.modules.embedding import EmbeddingEngine, EmbeddingOption
from fxrec.nn.modules.hashtable import HashTable, filter_out_sparse_param
from fxrec.nn.modules.table_storage import coalesce_groups, coalesce_tables
from fxrec.optim import SparseAdagrad, SparseAdamWTF, SparseSGD
from fxrec.passes import DEFAULT_EMBEDDING_PASSES, explain, lookup_merge, op_counts, table_coalesce
from embedding_cases import (
    INT64_MAX, INT64_MIN, assert_tables_equal, by_id, cases, check_equal, configs, expected_storages, grads_by_id, loss_of,
    tutorial_batch,
)
from raggedutil import ragged_ids



def engines(options):
    """(unrewritten: the oracle, lookup_merge + table_coalesce: combine_fusion has its own tests)."""
    return EmbeddingEngine(copy.deepcopy(options)), EmbeddingEngine(copy.deepcopy(options),
                                                                    passes=[lookup_merge, table_coalesce])


# -- op counts --------------------------------------------------------------------------------------

def three_tables(**kw):
    common = dict(embedding_dim=3, block_size=4, initializer=NormalInitializer(0.0, 1.0), **kw)
    return {
        "a": EmbeddingOption(shared_name="ta", combiner="sum", **common),
        "b": EmbeddingOption(shared_name="tb", combiner="mean", **common),
        "c": EmbeddingOption(shared_name="tc", combiner="tile", combiner_kwargs={"tile_len": 2}, **common),
        "d": EmbeddingOption(shared_name="ta", combiner="mean", **common),
        "e": EmbeddingOption(shared_name="other", embedding_dim=2, block_size=4),  # another initializer: alone
    }


def test_three_tables_one_lookup():
    plain, coalesced = engines(three_tables())
    assert DEFAULT_EMBEDDING_PASSES[:2] == (lookup_merge, table_coalesce)
    assert op_counts(plain.graph_module) == {"table_lookup": 5, "table_combine": 5}
    assert op_counts(coalesced.graph_module) == {"table_lookup": 2, "table_combine": 5}
    storage = coalesced.tables["ta"].storage
    assert [t.name for t in storage.members] == ["ta", "tb", "tc"]
    assert [coalesced.tables[n].tag for n in ["ta", "tb", "tc", "other"]] == [0, 1, 2, 0]
    assert coalesced.tables["other"].storage is not storage
    text = explain(plain)
    assert any(line.split() == ["table_lookup", "5", "2"] for line in text.splitlines())
    assert len({id(t.storage) for t in plain.tables.values()}) == 4  # explaining changed nothing
    batch = {"a": ragged_ids([[5, 5, -1], [], [INT64_MAX]]), "b": torch.tensor([[5], [7], [INT64_MIN]]),
             "c": ragged_ids([[5, 3, 3], [8], []]), "d": ragged_ids([[5], [1, 2], [3]]), "e": ragged_ids([[5], [], [5]])}
    eval_batch = {"a": ragged_ids([[9, 5]]), "b": torch.tensor([[3]]), "c": ragged_ids([[5, 9]]),
                  "d": ragged_ids([[]]), "e": ragged_ids([[1]])}
    check_equal(plain, coalesced, batch, eval_batch, close_grads=set())


def test_same_id_in_two_tables_two_rows():
    plain, coalesced = engines(three_tables())
    batch = {"a": ragged_ids([[42]]), "b": torch.tensor([[42]]), "c": ragged_ids([[42]]), "d": ragged_ids([[]]),
             "e": ragged_ids([[42]])}
    coalesced(batch), plain(batch)
    ta, tb, tc = (coalesced.tables[n] for n in ["ta", "tb", "tc"])
    rows = [int(t.find(torch.tensor([42]))) for t in (ta, tb, tc)]
    assert len(set(rows)) == 3 and min(rows) >= 0  # one row per (table, id)
    assert [len(t) for t in (ta, tb, tc)] == [1, 1, 1]
    for name, row in zip(["ta", "tb", "tc"], rows):
        expect = plain.tables[name].embedding[plain.tables[name].find(torch.tensor([42]))]
        assert torch.equal(coalesced.tables[name].embedding[row], expect[0])  # the table's own seed
    assert not torch.equal(ta.embedding[rows[0]], tb.embedding[rows[1]])


def test_pure_idempotent():
    options = get_embedding_conf(device=torch.device("cpu"), tile_len=2)
    engine = EmbeddingEngine(options)
    gm = lookup_merge(engine.graph_module)
    code = gm.code
    once = table_coalesce(gm)
    assert gm.code == code and op_counts(gm)["table_lookup"] == 6
    assert op_counts(once)["table_lookup"] == 1
    assert table_coalesce(once).code == once.code
    assert once.tables.sparse2 is engine.tables["sparse2"]  # shares the engine's tables
    # the input graph still runs, on the coalesced tables, with the same results (a layout change)
    assert engine.tables["sparse2"].storage is engine.tables["sparse4"].storage
    with pytest.raises(TypeError, match="GraphModule"):
        table_coalesce(object())


# -- the tutorial -------------------------------------------------------------------------------------

def test_tutorial_embeddings_coalesce():
    """The seed tutorial's 7 features over 6 tables: dims 8 (sparse1, sparse3) and 16 (the other
    four), one initializer: ``explain`` shows 7 lookups -> 1 (lookup_merge alone: 6), the dim-8
    tables' rows padded into the dim-16 storage; each feature keeps its table's width."""
    options = get_embedding_conf(device=torch.device("cpu"), tile_len=3)
    plain, coalesced = engines(options)
    text = explain(plain)
    assert text.splitlines()[0] == "passes: lookup_merge, table_coalesce, combine_fusion"
    assert any(line.split() == ["table_lookup", "7", "1"] for line in text.splitlines())
    assert any(line.split() == ["table_combine", "7", "0"] for line in text.splitlines())
    assert {frozenset(t.name for t in table.storage.members) for table in coalesced.tables.values()} == {
        frozenset(coalesced.tables)}
    assert coalesced.tables["sparse1"].storage.dim == 16 and coalesced.tables["sparse1"].embedding.shape[1] == 8
    check_equal(plain, coalesced, tutorial_batch(6, 0), tutorial_batch(5, 1), close_grads=set())
    out = coalesced(tutorial_batch(4, 7))
    assert out["sparse1"].shape == (4, 8) and out["sparse1"].is_contiguous()
    assert out["sparse4"].shape == (4, 3 * 16) and out["sparse2"].shape == (4, 16)


# -- training, checkpoints, eviction ---------------------------------------------------------------

def train(engine, batches, opt):
    for batch in batches:
        loss_of(engine(batch)).backward()
        opt.step()
        opt.zero_grad()


def test_sparse_adamwtf_training_equal():
    options = get_embedding_conf(device=torch.device("cpu"), tile_len=3)
    plain, coalesced = engines(options)
    opt_a = SparseAdamWTF(filter_out_sparse_param(plain), lr=0.01)
    opt_b = SparseAdamWTF(filter_out_sparse_param(coalesced), lr=0.01)
    batches = [tutorial_batch(b, s) for s, b in enumerate([8, 1, 0, 5, 7])]
    train(plain, batches, opt_a)
    train(coalesced, batches, opt_b)
    assert_tables_equal(plain.tables, coalesced.tables, exact=False)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    for name in plain.tables:
        a, b = by_id(sa["state"][name]), by_id(sb["state"][name])
        assert sorted(a) == sorted(b)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6, msg=f"{name}.{key}")


UPDATE_OPS = (torch.ops.fxrec.sparse_adam_update, torch.ops.fxrec.sparse_adagrad_update,
              torch.ops.fxrec.sparse_sgd_update)


class UpdateCalls(TorchDispatchMode):
    """Counts the sparse optimizers' update op calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.overloadpacket in UPDATE_OPS
        return func(*args, **(kwargs or {}))


def step_update_calls(engine, opt, batch) -> int:
    """Train ``engine`` one step on ``batch``; the optimizer step's update calls."""
    loss_of(engine(batch)).backward()
    with UpdateCalls() as counter:
        opt.step()
    opt.zero_grad()
    return counter.calls


def storages_of(engine) -> list:
    return list({id(t.storage): t.storage for t in engine.tables.values()}.values())


@pytest.mark.parametrize("optimizer, calls", [
    (SparseAdamWTF, [6, 1, 3]), (SparseAdagrad, [6, 1, 3]), (SparseSGD, [6, 1, 3]),
    # row-wise: a row's step is the mean over its columns, so the dim-8 tables' zero padding must
    # not enter it: the mixed-dim storage updates its tables one by one; the dim-16 one stays one
    (functools.partial(SparseAdagrad, rowwise=True), [6, 6, 3]),
])
def test_one_update_per_storage(optimizer, calls):
    """A step updates each storage's rows with ONE op for all its tables (equal scalars), and
    trains as the uncoalesced tables do (one update each); on top of ``test_sparse_adamwtf_training_equal``
    this counts the calls, also when a storage's tables are looked up separately (several
    anchors, rows merged). The tutorial's tables coalesce into one storage of dim 16 (two of
    them dim 8, padded); ``separate`` coalesces the four dim-16 tables only."""
    options = get_embedding_conf(device=torch.device("cpu"), tile_len=3)
    plain, coalesced = engines(options)
    separate = EmbeddingEngine(copy.deepcopy(options))  # coalesced below, its lookups stay per feature
    coalesce_tables([separate.tables[n] for n in ["sparse2", "sparse4", "sparse5", "sparse1_x_sparse2"]])
    engines_opts = [(e, optimizer(filter_out_sparse_param(e), lr=0.01)) for e in (plain, coalesced, separate)]
    assert [len(storages_of(e)) for e, _ in engines_opts] == [6, 1, 3]
    for s, b in enumerate([8, 1, 0, 5]):
        assert [step_update_calls(e, opt, tutorial_batch(b, s)) for e, opt in engines_opts] == calls
    assert_tables_equal(plain.tables, coalesced.tables, exact=False)
    assert_tables_equal(plain.tables, separate.tables, exact=False)


def test_tables_with_different_optimizer_scalars_update_alone():
    """Loaded optimizer state whose tables' scalars differ (one table some steps ahead) splits its
    storage's update into one per table, each with its own bias corrections; training then equals
    the uncoalesced tables'. Loading equal scalars for all joins them again."""
    options = get_embedding_conf(device=torch.device("cpu"), tile_len=2)
    plain, coalesced = engines(options)
    opts = [SparseAdamWTF(filter_out_sparse_param(e), lr=0.01) for e in (plain, coalesced)]
    for e, opt in zip((plain, coalesced), opts):
        train(e, [tutorial_batch(6, 0)], opt)
    ahead = opts[0].state_dict()
    entry = ahead["state"]["sparse4"]  # coalesced with sparse2, sparse5 and sparse1_x_sparse2
    entry["step"] = entry["step"] + 5
    entry["b1p"] = entry["b1p"] * 0.9 ** 5
    entry["b2p"] = entry["b2p"] * 0.999 ** 5
    for opt in opts:
        opt.load_state_dict(copy.deepcopy(ahead))
    for s, b in enumerate([7, 3]):
        assert [step_update_calls(e, opt, tutorial_batch(b, s + 1)) for e, opt in zip((plain, coalesced), opts)] == [6, 6]
    assert_tables_equal(plain.tables, coalesced.tables, exact=False)
    for name in plain.tables:
        for key in ("step", "b1p", "b2p"):
            assert torch.equal(opts[0].table_state[name][key], opts[1].table_state[name][key]), (name, key)
    level = opts[1].state_dict()
    for name in level["state"]:
        for key in ("step", "b1p", "b2p"):
            level["state"][name][key] = level["state"]["sparse1"][key]
    opts[1].load_state_dict(level)
    assert step_update_calls(coalesced, opts[1], tutorial_batch(4, 9)) == 1


@pytest.mark.parametrize("direction", ["plain->coalesced", "coalesced->plain"])
def test_checkpoint_round_trip(direction, tmp_path):
    """A checkpoint (model + sparse optimizer state, through CheckpointManager's files) of one
    layout loads into the other, keys unchanged; training on from it gives the same tables
    either way."""
    options = get_embedding_conf(device=torch.device("cpu"), tile_len=2)
    plain, coalesced = engines(options)
    source, target = (plain, coalesced) if direction == "plain->coalesced" else (coalesced, plain)
    opt_source = SparseAdamWTF(filter_out_sparse_param(source), lr=0.01)
    train(source, [tutorial_batch(6, 0), tutorial_batch(4, 1)], opt_source)
    manager = CheckpointManager(tmp_path)  # the Trainer's parts: model, sparse tables, sparse optimizer
    manager.save(2, {"model": source.state_dict(), "sparse": {n: t.state_dict() for n, t in source.tables.items()},
                     "sparse_optimizer": opt_source.state_dict()})
    parts = manager.load(2)
    model_sd, opt_sd = parts["model"], parts["sparse_optimizer"]
    fresh = EmbeddingEngine(copy.deepcopy(options), passes=target is coalesced)
    fresh(tutorial_batch(3, 9))  # holds other ids before loading: they must go
    opt_target = SparseAdamWTF(filter_out_sparse_param(fresh), lr=0.01)
    assert sorted(fresh.state_dict()) == sorted(model_sd)  # same keys in both layouts
    fresh.load_state_dict(model_sd)
    opt_target.load_state_dict(opt_sd)
    assert_tables_equal(source.tables, fresh.tables)
    for name, table in fresh.tables.items():  # the "sparse" part loads per table, as the Trainer does it
        table.load_state_dict(parts["sparse"][name])
    assert_tables_equal(source.tables, fresh.tables)
    more = [tutorial_batch(5, 2), tutorial_batch(1, 3)]
    train(source, more, opt_source)
    train(fresh, more, opt_target)
    assert_tables_equal(source.tables, fresh.tables, exact=False)


def test_coalescing_live_tables_mid_step():
    """Coalescing tables that hold ids, optimizer slots and pending gradients (after backward,
    before the optimizer step) moves all of it: training on equals never coalescing."""
    options = get_embedding_conf(device=torch.device("cpu"), tile_len=2)
    plain, live = EmbeddingEngine(copy.deepcopy(options)), EmbeddingEngine(copy.deepcopy(options))
    opts = [SparseAdamWTF(filter_out_sparse_param(e), lr=0.01) for e in (plain, live)]
    for engine, opt in zip((plain, live), opts):
        train(engine, [tutorial_batch(6, 0)], opt)
        loss_of(engine(tutorial_batch(4, 1))).backward()  # pending gradients
    storage = coalesce_tables([live.tables[n] for n in ["sparse2", "sparse4", "sparse5", "sparse1_x_sparse2"]])
    assert len(storage.members) == 4 and live.tables["sparse1"].storage is not storage
    assert_tables_equal(plain.tables, live.tables)
    for engine, opt in zip((plain, live), opts):
        opt.step()
        opt.zero_grad()
        train(engine, [tutorial_batch(5, 2)], opt)  # live: its uncoalesced graph, on the coalesced tables
    assert_tables_equal(plain.tables, live.tables, exact=False)


def test_eviction_per_logical_table():
    hook = FilterHook("GlobalStepFilter", {"filter_step": 2})
    common = dict(embedding_dim=2, block_size=4, initializer=UniformInitializer(-1.0, 1.0), filter_hook=hook)
    options = {"a": EmbeddingOption(shared_name="ta", **common), "b": EmbeddingOption(shared_name="tb", **common)}
    plain, coalesced = engines(options)
    assert coalesced.tables["ta"].storage is coalesced.tables["tb"].storage
    opts = [SparseAdamWTF(filter_out_sparse_param(e), lr=0.1) for e in (plain, coalesced)]
    steps = [{"a": ragged_ids([[1, 2, 3]]), "b": ragged_ids([[1, 2]])},
             {"a": ragged_ids([[1]]), "b": ragged_ids([[9]])},
             {"a": ragged_ids([[4]]), "b": ragged_ids([[2]])},
             {"a": ragged_ids([[5, 6, 7, 8, 9, 10, 11]]), "b": ragged_ids([[3]])}]  # growth too
    total = 0
    for batch in steps:
        evicted = []
        for engine, opt in zip((plain, coalesced), opts):
            train(engine, [batch], opt)
            evicted.append({name: t.evict_stale() for name, t in engine.tables.items()})
        assert evicted[0] == evicted[1]
        total += sum(evicted[0].values())
        assert_tables_equal(plain.tables, coalesced.tables, exact=False)
    assert total >= 3  # ta's 2, 3 and tb's 1, 9 went stale


def test_read_only_and_mixed_modes():
    from fxrec.nn.hashtable_hook import AdmitHook

    common = dict(embedding_dim=2, block_size=4, initializer=NormalInitializer(0.0, 1.0))
    options = {"a": EmbeddingOption(shared_name="ta", **common), "b": EmbeddingOption(shared_name="tb", **common),
               "c": EmbeddingOption(shared_name="tc", admit_hook=AdmitHook("ReadOnly"), **common),
               "d": EmbeddingOption(shared_name="td", admit_hook=AdmitHook("ReadOnly"), **common)}
    plain, coalesced = engines(options)
    assert op_counts(coalesced.graph_module)["table_lookup"] == 2  # admit hooks split the groups
    batch = {n: ragged_ids([[1, 2], [2]]) for n in "abcd"}
    check_equal(plain, coalesced, batch, batch, close_grads=set())
    coalesced.tables["ta"].eval()  # one member in eval mode, the other training: a clear error
    with pytest.raises(ValueError, match=r"coalesced tables \['ta', 'tb'\] .* not all in one mode"):
        coalesced(batch)


def test_module_moves_reach_the_storage():
    """``.to()`` of the engine moves every storage (not a registered submodule: a table's
    ``_apply`` forwards to it); DDP / ``named_buffers`` see only the tables' own ``step``."""
    _, coalesced = engines(three_tables())
    assert sorted(name for name, _ in coalesced.named_buffers()) == [f"tables.{n}.step" for n in
                                                                     ["other", "ta", "tb", "tc"]]
    coalesced.to("meta")
    for table in coalesced.tables.values():
        assert {t.device.type for t in (table.keys, table.state, table.embedding, table.last_seen, table.count,
                                        table.step, table.storage.seeds)} == {"meta"}


def test_coalesce_tables_errors():
    a = HashTable([2], name="a")
    with pytest.raises(ValueError, match=r"tables \['a'\] cannot share a storage of dim 5"):
        coalesce_tables([a, HashTable([5], name="b")])
    with pytest.raises(ValueError, match="tables 'a' and 'c' differ in dtype, device, initial values"):
        coalesce_tables([a, HashTable([2], name="c", initializer=NormalInitializer())])
    xavier = dict(initializer=XavierNormalInitializer())  # its std depends on the dim (and block_size)
    with pytest.raises(ValueError, match="tables 'x3' and 'x4' differ in dtype, device, initial values"):
        coalesce_tables([HashTable([3], name="x3", **xavier), HashTable([4], name="x4", **xavier)])
    # equal stds at their own dims (fans 3 + 5 and 4 + 4), but the dim-3 rows drawn 4 wide would not be
    with pytest.raises(ValueError, match=r"tables \['x3'\] cannot share a storage of dim 4"):
        coalesce_tables([HashTable([3], name="x3", block_size=5, **xavier), HashTable([4], name="x4", block_size=4, **xavier)])
    with pytest.raises(ValueError, match="given twice"):
        coalesce_tables([a, a])
    b, c = HashTable([2], name="b"), HashTable([2], name="c")
    storage = coalesce_tables([a, b])
    assert coalesce_tables([a, b]) is storage
    with pytest.raises(ValueError, match=r"table 'a' is already coalesced with \['b'\]"):
        coalesce_tables([a, c])


# -- mixed dims: narrower tables padded into a wider storage ------------------------------------------

def test_coalesce_groups_pad_at_most_twice():
    """Which tables share a storage: one key (dtype, device, initial values for their dim,
    grad_reduce_by, hooks); the widest first with every table at least half as wide, then the
    widest of the rest; initial values whose parameters depend on the dim keep dims apart."""
    def names(tables):
        return [[t.name for t in group] for group in coalesce_groups(tables)]

    trunc = dict(initializer=TruncNormalInitializer(0.0, 0.01))
    dims = [HashTable([d], name=f"d{d}", **trunc) for d in (8, 16, 4, 12, 3, 2, 1)]
    assert names(dims) == [["d8", "d16", "d12"], ["d4", "d3", "d2"], ["d1"]]
    xavier = [HashTable([d], name=n, initializer=XavierNormalInitializer()) for n, d in [("a", 8), ("b", 16), ("c", 8)]]
    assert names(xavier) == [["a", "c"], ["b"]]
    same_std = [HashTable([3], name="x3", block_size=5, initializer=XavierNormalInitializer()),
                HashTable([4], name="x4", block_size=4, initializer=XavierNormalInitializer())]
    assert names(same_std) == [["x4"], ["x3"]]  # one key, but x3's rows drawn 4 wide would differ
    fan_out = [HashTable([d], name=f"k{d}", initializer=KaimingNormalInitializer(mode="fan_out")) for d in (8, 16)]
    fan_in = [HashTable([d], name=f"i{d}", initializer=KaimingNormalInitializer(mode="fan_in")) for d in (8, 16)]
    assert names(fan_out) == [["k8", "k16"]]  # the std depends on block_size only
    assert names(fan_in) == [["i8"], ["i16"]]
    by = [HashTable([8], name="w", **trunc), HashTable([16], name="i", grad_reduce_by="id", **trunc)]
    assert names(by) == [["w"], ["i"]]


MIXED = {  # dims 3 and 5 in one storage: a narrow tile, mean and weighted sum feature, a wide sum
    "a": EmbeddingOption(shared_name="narrow", embedding_dim=3, block_size=4, combiner="tile",
                         combiner_kwargs={"tile_len": 2}, initializer=UniformInitializer(-1.0, 1.0)),
    "b": EmbeddingOption(shared_name="narrow", embedding_dim=3, block_size=4, combiner="mean",
                         initializer=UniformInitializer(-1.0, 1.0)),
    "c": EmbeddingOption(shared_name="wide", embedding_dim=5, block_size=4, initializer=UniformInitializer(-1.0, 1.0)),
    "d": EmbeddingOption(shared_name="narrow", embedding_dim=3, block_size=4, use_weight=True,
                         initializer=UniformInitializer(-1.0, 1.0)),
}


def mixed_batch(seed: int, b: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows = [[int(v) for v in torch.randint(-6, 6, (int(torch.randint(0, 4, (), generator=g)),), generator=g)]
            for _ in range(b)]
    weights = [[float(w) for w in torch.rand(len(r), generator=g)] for r in rows]
    return {"a": ragged_ids(rows), "b": ragged_ids(rows[::-1]), "c": torch.randint(-3, 3, (b, 2), generator=g),
            "d": ragged_ids(rows, weights), "label": torch.zeros(b)}


@pytest.mark.parametrize("optimizer", [SparseAdamWTF, SparseAdagrad, functools.partial(SparseAdagrad, rowwise=True),
                                       SparseSGD])
def test_mixed_dims_train_and_checkpoint_as_separate_tables(optimizer):
    """A dim-3 table padded into a dim-5 storage: its features' outputs are 3 (x tile) columns
    wide and contiguous, and outputs, gradients, training with every sparse optimizer, the
    tables' and the optimizer's state dicts (keys and shapes per table) equal the uncoalesced
    engine's; the optimizer state loads across the two layouts."""
    plain, coalesced = engines(MIXED)
    narrow, wide = coalesced.tables["narrow"], coalesced.tables["wide"]
    assert narrow.storage is wide.storage and narrow.storage.dim == 5 and narrow.embedding.shape[1] == 3
    out, _ = coalesced(mixed_batch(0, 3)), plain(mixed_batch(0, 3))
    assert [tuple(out[k].shape) for k in "abcd"] == [(3, 6), (3, 3), (3, 5), (3, 3)]
    assert all(out[k].is_contiguous() for k in "abcd")
    check_equal(plain, coalesced, mixed_batch(1, 4), mixed_batch(2, 0), close_grads=set(plain.tables))
    opts = [optimizer(filter_out_sparse_param(e), lr=0.05) for e in (plain, coalesced)]
    batches = [mixed_batch(s, b) for s, b in enumerate([4, 1, 0, 5], start=3)]
    train(plain, batches, opts[0])
    train(coalesced, batches, opts[1])
    assert_tables_equal(plain.tables, coalesced.tables, exact=False)
    sa, sb = opts[0].state_dict(), opts[1].state_dict()
    for name in plain.tables:
        a, b = by_id(sa["state"][name]), by_id(sb["state"][name])
        assert sorted(a) == sorted(b)
        for key in a:
            assert a[key].shape == b[key].shape, (name, key)
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in coalesced.state_dict().items()}
    opts[1].load_state_dict(copy.deepcopy(sa))  # the uncoalesced layout's state into the padded storage
    more = [mixed_batch(9, 3)]
    train(plain, more, opts[0])
    train(coalesced, more, opts[1])
    assert_tables_equal(plain.tables, coalesced.tables, exact=False)


def test_coalescing_a_narrower_table_with_pending_gradients_fails():
    """A narrower table's pending gradients are as wide as its rows were: coalescing it into a
    wider storage before they are taken is a clear error, not a wrong-width update later."""
    engine = EmbeddingEngine(copy.deepcopy(MIXED))
    loss_of(engine(mixed_batch(0, 3))).backward()
    with pytest.raises(ValueError, match="table 'narrow' \\(dim 3\\) has pending gradients"):
        coalesce_tables([engine.tables["narrow"], engine.tables["wide"]])
    for table in engine.tables.values():
        table.clear_grads()
    assert coalesce_tables([engine.tables["narrow"], engine.tables["wide"]]).dim == 5


# -- hypothesis: random configs and batches -----------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(cases(configs(tables=(2, 4), dims=(1, 4), features=(2, 5))))
def test_coalesced_equals_uncoalesced(case):
    options, (batch, eval_batch) = case
    plain, coalesced = engines(options)
    groups = expected_storages(options)
    assert op_counts(coalesced.graph_module)["table_lookup"] == len(groups)
    assert sorted(sorted(t.name for t in coalesced.tables[min(g)].storage.members) for g in groups) == sorted(
        sorted(g) for g in groups)
    per_table = {}
    for o in options.values():
        per_table.setdefault(o.shared_name, []).append(o)
    close = {t for t, os in per_table.items() if sum(o.trainable for o in os) > 2}
    coalesced.graph_module.graph.lint()
    check_equal(plain, coalesced, batch, eval_batch, close)
    check_equal(plain, coalesced, eval_batch, batch, close)  # a second step: ids found and new


@pytest.mark.gpu
def test_cuda_equals_cpu():
    """The coalesced tutorial embeddings on CUDA (tagged Triton find-or-insert, per-row-seed
    init_rows) give the CPU's outputs, tables and gradients."""
    cpu_options = get_embedding_conf(device=torch.device("cpu"), tile_len=3)
    cuda_options = get_embedding_conf(device=torch.device("cuda"), tile_len=3)
    cpu, cuda = EmbeddingEngine(cpu_options, passes=True), EmbeddingEngine(cuda_options, passes=True)
    for seed, b in enumerate([64, 1, 0, 33]):
        batch = tutorial_batch(b, seed)
        out_cpu, out_cuda = cpu(batch), cuda({k: v.to("cuda") for k, v in batch.items()})
        for name in out_cpu:
            torch.testing.assert_close(out_cuda[name].cpu(), out_cpu[name], rtol=1e-5, atol=1e-6)
        loss_of(out_cpu).backward()
        loss_of({k: v.cpu() for k, v in out_cuda.items()}).backward()
        for name in cpu.tables:
            (ia, ga), (ib, gb) = grads_by_id(cpu.tables[name]), grads_by_id(cuda.tables[name])
            assert torch.equal(ia, ib.cpu()), name
            torch.testing.assert_close(gb.cpu(), ga, rtol=1e-5, atol=1e-5)
        for name in cpu.tables:
            sa, sb = by_id(cpu.tables[name].state_dict()), by_id(cuda.tables[name].state_dict())
            assert torch.equal(sa["ids"], sb["ids"].cpu()), name
            assert torch.equal(sa["embedding"], sb["embedding"].cpu()), name  # init_rows: bit-identical


# -- torch.compile -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(torch.torch_version.TorchVersion(torch.__version__) < (2, 13),
                    reason="the whole step in one graph (loss.backward() inside it) needs torch >= 2.13: torch "
                           "2.11's Dynamo breaks the graph at the in-graph gradient anchor's requires_grad_() "
                           "(tests/test_compile_step.py says more); fxrec.compile of coalesced tables runs on 2.11 "
                           "(tests/test_tutorial.py::test_example_trains_compiled_with_passes)")
def test_compiled_training_step_equals_eager():
    """A training step over coalesced tables (one tagged lookup, per-row-seed init, SparseAdamWTF)
    compiles to ONE graph without breaks across batch sizes (B=1, empty rows) and equals eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from fxrec.utils.dynamic import dynamic_batch

    common = dict(embedding_dim=2, initializer=UniformInitializer(-0.5, 0.5))
    options = {"a": EmbeddingOption(shared_name="ta", **common),
               "b": EmbeddingOption(shared_name="tb", combiner="tile", combiner_kwargs={"tile_len": 3}, **common),
               "c": EmbeddingOption(shared_name="ta", combiner="mean", **common)}
    data = [{name: ragged_ids([[(7 * b + 3 * i + j) % 11 - 5 for j in range(i % 3 + (i == 0))] for i in range(b)])
             for name in options} for b in [5, 1, 7, 3, 2]]

    def setup():
        engine = EmbeddingEngine(copy.deepcopy(options), passes=True)
        tables = filter_out_sparse_param(engine)
        sparse = SparseAdamWTF(tables, lr=0.05)
        tables["ta"].reserve(100)  # room for every id of the run: no growth inside the graph

        def step(batch):
            loss = loss_of(engine(batch))
            loss.backward()
            sparse.step()
            sparse.zero_grad()
            return loss.detach()

        return engine, step

    eager_engine, eager_step = setup()
    eager_losses = [eager_step(b) for b in data]
    flags = {"capture_scalar_outputs": True, "capture_dynamic_output_shape_ops": True, "trace_autograd_ops": True}
    saved = {k: getattr(torch._dynamo.config, k) for k in flags}
    try:
        for k, v in flags.items():
            setattr(torch._dynamo.config, k, v)
        torch._dynamo.reset()
        counters.clear()
        engine, step = setup()
        compiled = torch.compile(step)
        losses = [compiled(dynamic_batch(b)) for b in data]
        assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    finally:
        for k, v in saved.items():
            setattr(torch._dynamo.config, k, v)
        torch._dynamo.reset()
    torch.testing.assert_close(torch.stack(losses), torch.stack(eager_losses), rtol=1e-5, atol=1e-5)
    assert_tables_equal(eager_engine.tables, engine.tables, exact=False)


# -- several processes: sharded coalesced tables ------------------------------------------------------

_WORKER = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
import torch.distributed as dist
from fxrec.nn.initializers import NormalInitializer
from fxrec.nn.modules.embedding import EmbeddingEngine, EmbeddingOption
from fxrec.nn.modules.hashtable import filter_out_sparse_param
from fxrec.optim import SparseAdamWTF
from fxrec.ragged import RaggedTensor

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", init_method="file://" + os.path.join({out!r}, "store"), rank=rank, world_size=world)
common = dict(embedding_dim=3, block_size=4, initializer=NormalInitializer(0.0, 1.0))
options = {{"a": EmbeddingOption(shared_name="ta", **common), "b": EmbeddingOption(shared_name="tb", combiner="mean", **common)}}
engines = [EmbeddingEngine(options), EmbeddingEngine(options, passes=True)]
opts = [SparseAdamWTF(filter_out_sparse_param(e), lr=0.05) for e in engines]
g = torch.Generator().manual_seed(rank)
for step in range(4):
    batch = {{}}
    for name in "ab":
        lengths = torch.randint(0, 4, (3,), generator=g)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        batch[name] = RaggedTensor(torch.randint(-5, 5, (int(offsets[-1]),), generator=g), offsets)
    for engine, opt in zip(engines, opts):   # both ranks: the same collectives in the same order
        out = engine(batch)
        (out["a"].sum() * 2 + (out["b"] * out["b"]).sum()).backward()
        opt.step()
        opt.zero_grad()
result = {{}}
for kind, engine in zip(["plain", "coalesced"], engines):
    for name, table in engine.tables.items():
        sd = table.state_dict()
        order = torch.argsort(sd["ids"])
        result[kind + "." + name] = {{k: (v[order] if k != "step" else v).tolist() for k, v in sd.items()}}
result["members"] = [t.name for t in engines[1].tables["ta"].storage.members]
with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
    json.dump(result, f)
dist.barrier()
dist.destroy_process_group()
"""


def test_two_processes_sharded_coalesced_tables(tmp_path):
    """gloo, 2 ranks, SparseAdamWTF over row-wise sharded tables: on each rank the coalesced
    engine's tables (one storage, (tag, id) pairs to the owners) equal the uncoalesced engine's
    shards (1e-6): each rank holds exactly the ids it owns, of each logical table
    (tests/test_sharded.py checks sharded + coalesced training against one process)."""
    import json
    import os

    from fxrec.distributed.sharded import owner_of
    from trainer_util import run_ranks

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(repo=repo, out=str(tmp_path)))
    run_ranks(str(script), 2, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(ranks):
        assert result["members"] == ["ta", "tb"]  # coalesced
        for name in ["ta", "tb"]:
            plain, coalesced = result["plain." + name], result["coalesced." + name]
            assert plain["ids"] == coalesced["ids"] and plain["step"] == coalesced["step"] and len(plain["ids"]) > 1
            assert (owner_of(torch.tensor(plain["ids"], dtype=torch.int64), 2) == rank).all()
            for key in plain:
                torch.testing.assert_close(torch.tensor(coalesced[key]), torch.tensor(plain[key]), rtol=1e-6, atol=1e-6)


# -- the row cap: per logical table -------------------------------------------------------------------

def test_row_cap_is_per_logical_table(monkeypatch):
    """FXREC_MAX_ROWS_PER_RANK caps each LOGICAL table's ids (its own count), not its storage's:
    two coalesced tables of 6 ids each fit a cap of 6; the 7th id of one of them, inserted alone
    or by a merged (tagged) lookup of both, or loaded, is a ValueError naming that table."""
    from fxrec.nn.modules.hashtable import MAX_ROWS_ENV

    monkeypatch.setenv(MAX_ROWS_ENV, "6")
    a, b = HashTable(3, name="a"), HashTable(3, name="b")
    storage = coalesce_tables([a, b])
    a.lookup(torch.arange(6))
    b.lookup(torch.arange(6))
    assert len(a) == len(b) == 6 and int(storage.counts.sum()) == 12
    with pytest.raises(ValueError, match="HashTable 'b': 7 ids exceed this rank's cap of 6"):
        b.lookup(torch.tensor([100]))
    a2, b2 = HashTable(3, name="a"), HashTable(3, name="b")
    storage = coalesce_tables([a2, b2])
    ids = torch.arange(7)
    tags = torch.tensor([0, 0, 0, 1, 1, 1, 1], dtype=torch.int32)
    storage.lookup(ids, tags, [a2, b2])  # 3 + 4 ids
    with pytest.raises(ValueError, match="HashTable 'a': 7 ids exceed"):
        storage.lookup(torch.arange(10, 14), torch.zeros(4, dtype=torch.int32), [a2, b2])
    state = HashTable(3, name="a").state_dict()
    state.update(ids=torch.arange(7), embedding=torch.zeros(7, 3), last_seen=torch.zeros(7, dtype=torch.int64))
    a3, b3 = HashTable(3, name="a"), HashTable(3, name="b")
    coalesce_tables([b3, a3])
    b3.lookup(torch.arange(6))
    with pytest.raises(ValueError, match="HashTable 'a': 7 ids exceed"):
        a3.load_state_dict(state)
    state.update(ids=torch.arange(6), embedding=torch.zeros(6, 3), last_seen=torch.zeros(6, dtype=torch.int64))
    a3.load_state_dict(state)  # 6 + 6 ids in the storage: fits
    assert len(a3) == len(b3) == 6

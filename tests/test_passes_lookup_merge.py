"""``lookup_merge``: all lookups into one table -> one dedup + one lookup (DESIGN.md, "Passes").

Merged and unmerged engines are built from the same options (so their tables have the same
seeds) and fed the same batches: outputs, table contents per id and ``take_grads`` per id must
be equal. Row numbers may differ (ids are inserted in another order), so tables and gradients
are compared per id (``table.keys[rows]``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.deepctr.embeddings import get_embedding_conf
from fxrec.nn.initializers import NormalInitializer
from fxrec.nn.modules.embedding import EmbeddingEngine, EmbeddingOption
from fxrec.passes import DEFAULT_EMBEDDING_PASSES, explain, lookup_merge, op_counts, run_passes
from raggedutil import ragged_ids

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
ids_st = st.one_of(st.integers(-3, 3), st.sampled_from([INT64_MIN, INT64_MAX, INT64_MIN + 1, 2**40]))
weights_st = st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0])


def engines(options, **kw):
    return EmbeddingEngine(copy.deepcopy(options)), EmbeddingEngine(copy.deepcopy(options), passes=True, **kw)


def table_by_id(table):
    """(ids sorted, embedding rows, last_seen) of a table, keyed by id, not row."""
    sd = table.state_dict()
    order = torch.argsort(sd["ids"])
    return sd["ids"][order], sd["embedding"][order], sd["last_seen"][order]


def grads_by_id(table):
    rows, grads = table.take_grads()
    ids = table.keys[rows]
    order = torch.argsort(ids)
    return ids[order], grads[order]


def loss_of(out: dict) -> torch.Tensor:
    total = torch.zeros(())
    for i, name in enumerate(sorted(out)):
        v = out[name]
        if isinstance(v, torch.Tensor) and v.requires_grad:
            coef = torch.arange(v.numel(), dtype=v.dtype).reshape(v.shape) % 7 - 3.0 + i
            total = total + (v * coef).sum()
    return total


def check_equal(plain, merged, batch, eval_batch, close_grads: set[str]):
    out_a, out_b = plain(batch), merged(batch)
    assert list(out_a) == list(out_b) == list(batch)
    for name in out_a:
        torch.testing.assert_close(out_a[name], out_b[name], rtol=0, atol=0)
    for name in plain.tables:
        for x, y in zip(table_by_id(plain.tables[name]), table_by_id(merged.tables[name])):
            assert torch.equal(x, y), name
    la, lb = loss_of(out_a), loss_of(out_b)
    if la.requires_grad:
        la.backward()
        lb.backward()
    for name in plain.tables:
        (ia, ga), (ib, gb) = grads_by_id(plain.tables[name]), grads_by_id(merged.tables[name])
        assert torch.equal(ia, ib), name
        # two features' gradients add up exactly either way; three or more in another order
        tol = dict(rtol=1e-6, atol=1e-6) if name in close_grads else dict(rtol=0, atol=0)
        torch.testing.assert_close(ga, gb, **tol)
    plain.eval(), merged.eval()
    sizes = {name: len(t) for name, t in plain.tables.items()}
    out_a, out_b = plain(eval_batch), merged(eval_batch)
    for name in out_a:
        torch.testing.assert_close(out_a[name], out_b[name], rtol=0, atol=0)
    assert {name: len(t) for name, t in merged.tables.items()} == sizes  # eval: no inserts


# -- the tutorial's embeddings ------------------------------------------------------------------------

def tutorial_batch(b: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {"dense2": torch.randint(0, 5, (b, 1), generator=g)}
    for name in ["sparse1", "sparse2", "sparse3", "sparse4", "sparse5", "sparse1_x_sparse2"]:
        rows = [torch.randint(-4, 6, (int(torch.randint(0, 4, (), generator=g)),), generator=g).tolist()
                for _ in range(b)]
        batch[name] = ragged_ids(rows)
    batch["label"] = torch.ones(b)
    return batch


def test_tutorial_seven_lookups_become_six():
    options = get_embedding_conf(device=torch.device("cpu"), tile_len=3)
    plain, merged = engines(options)
    assert op_counts(plain.graph_module)["table_lookup"] == 7
    assert op_counts(merged.graph_module)["table_lookup"] == 6
    assert op_counts(merged.graph_module)["table_combine"] == 7
    assert DEFAULT_EMBEDDING_PASSES == (lookup_merge,)
    text = explain(plain)
    assert "lookup_merge" in text and any(line.split() == ["table_lookup", "7", "6"] for line in text.splitlines())
    assert explain(merged) == text  # "before" is the graph as built, whatever the engine runs
    check_equal(plain, merged, tutorial_batch(6, 0), tutorial_batch(5, 1), close_grads=set())


def test_pure_idempotent_lint():
    options = get_embedding_conf(device=torch.device("cpu"), tile_len=2)
    gm = EmbeddingEngine(options).graph_module
    code = gm.code
    once = lookup_merge(gm)
    assert gm.code == code and op_counts(gm)["table_lookup"] == 7
    twice = lookup_merge(once)
    assert twice.code == once.code
    once.graph.lint()
    assert run_passes(gm, DEFAULT_EMBEDDING_PASSES).code == once.code
    # the rewritten graph shares the engine's tables (it does not copy them)
    assert once.tables.sparse1 is gm.tables.sparse1
    with pytest.raises(TypeError, match="GraphModule"):
        lookup_merge(object())


def test_nothing_to_merge_is_a_copy():
    options = {"a": EmbeddingOption(embedding_dim=2, shared_name="x"), "b": EmbeddingOption(embedding_dim=2, shared_name="y")}
    gm = EmbeddingEngine(options).graph_module
    out = lookup_merge(gm)
    assert out is not gm and out.code == gm.code


def test_passes_flag():
    options = {"a": EmbeddingOption(embedding_dim=2, shared_name="x"), "b": EmbeddingOption(embedding_dim=2, shared_name="x")}
    assert op_counts(EmbeddingEngine(options, passes=[lookup_merge]).graph_module)["table_lookup"] == 1
    assert op_counts(EmbeddingEngine(options, passes=[]).graph_module)["table_lookup"] == 2
    with pytest.raises(TypeError, match="passes must be True, False or a sequence"):
        EmbeddingEngine(options, passes="lookup_merge")
    # errors name the feature in a merged graph too, before any table is touched
    merged = EmbeddingEngine(options, passes=True)
    with pytest.raises(TypeError, match="feature 'b' is a torch.float32 tensor"):
        merged({"a": torch.tensor([1, 2]), "b": torch.tensor([1.0])})
    assert len(merged.tables["x"]) == 0


@pytest.mark.parametrize("grad_reduce_by", ["worker", "id"])
@pytest.mark.parametrize("trainable", [(True, True, True), (True, False, True), (False, True, False), (False, False, False)])
def test_shared_table_trainable_mix(grad_reduce_by, trainable):
    """Three features of one table, some not trainable: the anchor covers the trainable ones' ids
    only (ids read only by a frozen feature get no gradient), with their occurrences ("id")."""
    kw = dict(embedding_dim=2, shared_name="t", block_size=4, grad_reduce_by=grad_reduce_by,
              initializer=NormalInitializer(0.0, 1.0))
    options = {
        "a": EmbeddingOption(trainable=trainable[0], combiner="mean", **kw),
        "b": EmbeddingOption(trainable=trainable[1], combiner="tile", combiner_kwargs={"tile_len": 2}, **kw),
        "c": EmbeddingOption(trainable=trainable[2], use_weight=True, **kw),
    }
    batch = {
        "c": ragged_ids([[5, 5, -1], [], [INT64_MAX]], [[0.5, 2.0, 1.0], [], [-1.0]]),
        "a": torch.tensor([[1, 1], [2, 5], [INT64_MIN, 7]]),
        "b": ragged_ids([[7, 3, 3], [8], []]),
    }
    eval_batch = {"a": torch.tensor([[1, 9]]), "b": ragged_ids([[9]]), "c": ragged_ids([[3, 4]])}
    plain, merged = engines(options)
    assert op_counts(merged.graph_module)["table_lookup"] == 1
    check_equal(plain, merged, batch, eval_batch, close_grads={"t"} if all(trainable) else set())


# -- hypothesis: random configs and batches -----------------------------------------------------------

@st.composite
def configs(draw):
    n_tables = draw(st.integers(1, 2))
    tables = {
        f"t{i}": dict(embedding_dim=draw(st.integers(1, 3)), grad_reduce_by=draw(st.sampled_from(["worker", "id"])))
        for i in range(n_tables)
    }
    options = {}
    for i in range(draw(st.integers(2, 4))):
        shared = draw(st.sampled_from(sorted(tables)))
        combiner = draw(st.sampled_from(["sum", "mean", "tile"]))
        options[f"f{i}"] = EmbeddingOption(
            shared_name=shared, block_size=4, initializer=NormalInitializer(0.0, 1.0), combiner=combiner,
            combiner_kwargs={"tile_len": draw(st.integers(1, 3))} if combiner == "tile" else None,
            use_weight=draw(st.booleans()), trainable=draw(st.booleans()), **tables[shared],
        )
    return options


@st.composite
def values(draw, b: int):
    if draw(st.booleans()):
        rows = draw(st.lists(st.lists(ids_st, max_size=4), min_size=b, max_size=b))
        weights = [[draw(weights_st) for _ in row] for row in rows] if draw(st.booleans()) else None
        return ragged_ids(rows, weights)
    f = draw(st.integers(1, 3))
    return torch.tensor(draw(st.lists(st.lists(ids_st, min_size=f, max_size=f), min_size=b, max_size=b)),
                        dtype=torch.int64).reshape(b, f)


@st.composite
def cases(draw):
    options = draw(configs())
    batches = []
    for _ in range(2):
        b = draw(st.sampled_from([0, 1, 2, 3]))
        batch = {name: draw(values(b)) for name in options}
        batch = dict(sorted(batch.items(), key=lambda kv: draw(st.integers(0, 3))))  # any dict order
        batch["label"] = torch.zeros(b)
        batches.append(batch)
    return options, batches


@settings(max_examples=120, deadline=None)
@given(cases())
def test_merged_equals_unmerged(case):
    options, (batch, eval_batch) = case
    plain, merged = engines(options)
    per_table = {}
    for o in options.values():
        per_table.setdefault(o.shared_name, []).append(o)
    assert op_counts(merged.graph_module)["table_lookup"] == len(per_table)
    close = {t for t, os in per_table.items() if sum(o.trainable for o in os) > 2}
    merged.graph_module.graph.lint()
    check_equal(plain, merged, batch, eval_batch, close)

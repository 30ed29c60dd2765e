"""``combine_fusion``: the ``table_combine`` nodes reading one lookup's (table, rows, anchor) ->
one ``table_combine_multi`` with one ``[U, dim]`` gradient (DESIGN.md, "Passes").

The oracle is the unrewritten engine (``passes=False``) built from the same options and fed the
same batches: outputs equal bit for bit, tables per id exact, ``take_grads`` per id within
rounding (the fused op sums a row's gradient over the features in one buffer, in another order
than autograd). Op counts before and after; the compiled model (``fxrec.compile``) of a fused
graph is one graph without breaks and equals the eager one.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from torch._dynamo.utils import counters

import fxrec
from examples.deepctr.embeddings import get_embedding_conf
from fxrec.nn.initializers import NormalInitializer
from fxrec.nn.modules.embedding import EmbeddingEngine, EmbeddingOption
from fxrec.optim import SparseSGD
from fxrec.nn.modules.hashtable import filter_out_sparse_param
from fxrec.passes import DEFAULT_EMBEDDING_PASSES, combine_fusion, explain, lookup_merge, op_counts, table_coalesce
from embedding_cases import INT64_MAX, cases, check_equal, configs, expected_storages, grads_by_id, tutorial_batch
from raggedutil import ragged_ids


def engines(options):
    """(unrewritten: the oracle, the default passes: lookup_merge, table_coalesce, combine_fusion)."""
    return EmbeddingEngine(copy.deepcopy(options)), EmbeddingEngine(copy.deepcopy(options), passes=True)


def test_tutorial_seven_combines_become_one():
    options = get_embedding_conf(device=torch.device("cpu"), tile_len=3)
    plain, fused = engines(options)
    assert DEFAULT_EMBEDDING_PASSES == (lookup_merge, table_coalesce, combine_fusion)
    assert op_counts(plain.graph_module) == {"table_lookup": 7, "table_combine": 7}
    assert op_counts(fused.graph_module) == {"table_lookup": 1, "table_combine_multi": 1}
    text = explain(plain)
    assert any(line.split() == ["table_combine_multi", "0", "1"] for line in text.splitlines())
    multis = [n for n in fused.graph_module.graph.nodes if n.target is torch.ops.fxrec.table_combine_multi.default]
    assert [len(n.args[3]) for n in multis] == [7]  # the dim-8 tables' rows padded into the dim-16 storage
    check_equal(plain, fused, tutorial_batch(6, 0), tutorial_batch(5, 1), close_grads=set(plain.tables))
    check_equal(plain, fused, tutorial_batch(1, 2), tutorial_batch(0, 3), close_grads=set(plain.tables))


def test_pure_idempotent_lint():
    options = get_embedding_conf(device=torch.device("cpu"), tile_len=2)
    gm = table_coalesce(lookup_merge(EmbeddingEngine(options).graph_module))
    code = gm.code
    once = combine_fusion(gm)
    assert gm.code == code and op_counts(gm)["table_combine"] == 7
    assert op_counts(once)["table_combine_multi"] == 1 and op_counts(once)["table_combine"] == 0
    assert combine_fusion(once).code == once.code
    once.graph.lint()
    # nothing reads a feature's (embedding, rows, anchor) but the fused node: no dead getitems left
    assert all(n.users for n in once.graph.nodes if n.op == "call_function")
    assert once.tables.sparse2 is gm.tables.sparse2  # shares the engine's tables
    with pytest.raises(TypeError, match="GraphModule"):
        combine_fusion(object())


def test_unmerged_lookups_are_left_alone():
    # one lookup per feature (no lookup_merge): each feature has its own anchor, nothing to fuse
    options = {"a": EmbeddingOption(embedding_dim=2, shared_name="x"), "b": EmbeddingOption(embedding_dim=2, shared_name="x")}
    gm = EmbeddingEngine(options).graph_module
    out = combine_fusion(gm)
    assert out is not gm and out.code == gm.code


def one_table(trainable, grad_reduce_by="worker"):
    kw = dict(embedding_dim=2, shared_name="t", block_size=4, grad_reduce_by=grad_reduce_by,
              initializer=NormalInitializer(0.0, 1.0))
    return {
        "a": EmbeddingOption(trainable=trainable[0], combiner="mean", **kw),
        "b": EmbeddingOption(trainable=trainable[1], combiner="tile", combiner_kwargs={"tile_len": 2}, **kw),
        "c": EmbeddingOption(trainable=trainable[2], use_weight=True, **kw),
    }


@pytest.mark.parametrize("grad_reduce_by", ["worker", "id"])
@pytest.mark.parametrize("trainable", [(True, True, True), (True, False, True), (False, True, False), (False, False, False)])
def test_trainable_and_frozen_features_read_other_rows(grad_reduce_by, trainable):
    """Trainable features of a storage read the rows of their own ids through the anchor; frozen
    ones all rows without one: one fused node per kind (a kind of one feature keeps table_combine)."""
    plain, fused = engines(one_table(trainable, grad_reduce_by))
    n_trainable = sum(trainable)
    kinds = [n for n in (n_trainable, 3 - n_trainable) if n]
    assert op_counts(fused.graph_module)["table_combine_multi"] == sum(n > 1 for n in kinds)
    assert op_counts(fused.graph_module)["table_combine"] == sum(n == 1 for n in kinds)
    batch = {
        "c": ragged_ids([[5, 5, -1], [], [INT64_MAX]], [[0.5, 2.0, 1.0], [], [-1.0]]),
        "a": torch.tensor([[1, 1], [2, 5], [5, 7]]),
        "b": ragged_ids([[7, 3, 3], [8], []]),
    }
    eval_batch = {"a": torch.tensor([[1, 9]]), "b": ragged_ids([[9]]), "c": ragged_ids([[3, 4]])}
    check_equal(plain, fused, batch, eval_batch, close_grads={"t"})


# -- hypothesis: random configs and batches -----------------------------------------------------------

@settings(max_examples=80, deadline=None)
@given(cases(configs(tables=(1, 3), dims=(1, 4), features=(2, 5))))
def test_fused_equals_unrewritten(case):
    options, (batch, eval_batch) = case
    plain, fused = engines(options)
    # one node per (storage, trainable) kind of features: a fused node where the kind has several
    storages = [[o.trainable for o in options.values() if o.shared_name in group] for group in expected_storages(options)]
    kinds = [sum(1 for t in flags if t == kind) for flags in storages for kind in (True, False)]
    counts = op_counts(fused.graph_module)
    assert counts["table_combine_multi"] == sum(n > 1 for n in kinds)
    assert counts["table_combine"] == sum(n == 1 for n in kinds)
    check_equal(plain, fused, batch, eval_batch, close_grads=set(plain.tables))


# -- compiled: one graph, no breaks, equal to eager ---------------------------------------------------

class Toy(torch.nn.Module):
    """Three features of one coalesced storage (sum, tile, mean; one table shared by two) and a
    fourth of another dim, through the default passes."""

    def __init__(self, passes: bool) -> None:
        super().__init__()
        kw = dict(embedding_dim=3, block_size=4, initializer=NormalInitializer(0.0, 1.0))
        self.emb = EmbeddingEngine({
            "a": EmbeddingOption(shared_name="ta", **kw),
            "b": EmbeddingOption(shared_name="tb", combiner="tile", combiner_kwargs={"tile_len": 2}, **kw),
            "c": EmbeddingOption(shared_name="ta", combiner="mean", **kw),
            "d": EmbeddingOption(shared_name="td", embedding_dim=2, block_size=4),
        }, passes=passes)
        self.lin = torch.nn.Linear(3 + 6 + 3 + 2, 1)

    def forward(self, batch: dict) -> torch.Tensor:
        e = self.emb(batch)
        label = batch["label"]
        for name in "abcd":
            torch._check(e[name].shape[0] == label.shape[0])
        logits = self.lin(torch.cat([e[name] for name in "abcd"], dim=1))
        return torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], label)


def toy_batch(b: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rows():
        return [torch.randint(0, 6, (int(torch.randint(0, 4, (), generator=g)),), generator=g).tolist() for _ in range(b)]

    return {"a": ragged_ids(rows()), "b": ragged_ids(rows()), "c": ragged_ids(rows()),
            "d": torch.randint(0, 6, (b, 2), generator=g), "label": torch.rand(b, generator=g)}


@pytest.mark.slow
def test_compiled_fused_graph_one_graph_equal_to_eager():
    batches = [toy_batch(b, i) for i, b in enumerate([3, 1, 4, 2, 5])]
    results = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        model = Toy(passes=True)
        assert op_counts(model.emb.graph_module)["table_combine_multi"] == 1
        sparse = SparseSGD(filter_out_sparse_param(model), lr=0.1)
        torch._dynamo.reset()
        counters.clear()
        forward = fxrec.compile(model) if name == "compiled" else model
        losses, grads = [], []
        for batch in batches:
            loss = forward(batch)
            loss.backward()
            losses.append(loss.detach())
            grads.append({t: grads_by_id(table) for t, table in filter_out_sparse_param(model).items()})
            sparse.step()
            sparse.zero_grad()
            model.zero_grad()
        results[name] = (losses, grads, dict(counters["graph_break"]), counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    (eager_losses, eager_grads, _, _), (losses, grads, breaks, graphs) = results["eager"], results["compiled"]
    assert breaks == {} and graphs == 1
    torch.testing.assert_close(torch.stack(losses), torch.stack(eager_losses), rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, eager_grads):
        assert got.keys() == expected.keys()
        for t in expected:
            assert torch.equal(got[t][0], expected[t][0]), t
            torch.testing.assert_close(got[t][1], expected[t][1], rtol=1e-5, atol=1e-6)

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

from examples.deepctr.embeddings import get_embedding_conf
from fxrec.nn.initializers import NormalInitializer
from fxrec.nn.modules.embedding import EmbeddingEngine, EmbeddingOption
from fxrec.passes import DEFAULT_EMBEDDING_PASSES, explain, lookup_merge, op_counts, run_passes
from embedding_cases import INT64_MAX, INT64_MIN, cases, check_equal, configs, tutorial_batch
from raggedutil import ragged_ids



def engines(options):
    """(unrewritten, lookup_merge alone): table_coalesce has its own tests."""
    return EmbeddingEngine(copy.deepcopy(options)), EmbeddingEngine(copy.deepcopy(options), passes=[lookup_merge])


# -- the tutorial's embeddings ------------------------------------------------------------------------

def test_tutorial_seven_lookups_become_six():
    options = get_embedding_conf(device=torch.device("cpu"), tile_len=3)
    plain, merged = engines(options)
    assert op_counts(plain.graph_module)["table_lookup"] == 7
    assert op_counts(merged.graph_module)["table_lookup"] == 6
    assert op_counts(merged.graph_module)["table_combine"] == 7
    assert DEFAULT_EMBEDDING_PASSES[0] is lookup_merge
    text = explain(plain, [lookup_merge])
    assert "lookup_merge" in text and any(line.split() == ["table_lookup", "7", "6"] for line in text.splitlines())
    assert explain(merged, [lookup_merge]) == text  # "before" is the graph as built, whatever the engine runs
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
    assert run_passes(gm, [lookup_merge]).code == once.code
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

@settings(max_examples=120, deadline=None)
@given(cases(configs(tables=(1, 2), dims=(1, 3), features=(2, 4))))
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


def test_trained_lookup_storages_one_per_training_lookup_node():
    """What ``fxrec.compile`` makes a gradient leaf for, per step: one per lookup node that
    trains. Unmerged, a node per trainable feature; merged (and coalesced), one per storage."""
    options = {"a": EmbeddingOption(embedding_dim=2, shared_name="x"),
               "b": EmbeddingOption(embedding_dim=2, shared_name="x"),
               "c": EmbeddingOption(embedding_dim=2, shared_name="y", trainable=False),
               "d": EmbeddingOption(embedding_dim=4, shared_name="z")}
    plain = EmbeddingEngine(options, passes=())
    x, z = plain.tables["x"].storage, plain.tables["z"].storage
    assert plain.trained_lookup_storages() == [x, x, z]
    merged = EmbeddingEngine(options, passes=True)
    storages = merged.trained_lookup_storages()
    assert len(storages) == 1 and storages[0] is merged.tables["x"].storage is merged.tables["z"].storage

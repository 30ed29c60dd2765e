"""Table coalescing: tables that agree on their layout become ONE physical table, and the lookups
of all their features ONE dedup + ONE find-or-insert.

``table_coalesce(gm)`` returns a new ``GraphModule`` (``gm``'s graph and code are left as they
were) in which the lookup nodes of an ``EmbeddingEngine`` graph (``_lookup_unique``, and the
``_lookup_unique_merged`` of ``lookup_merge``) whose tables agree on
``fxrec.nn.modules.table_storage.coalesce_key`` — dtype, device, initial values (initializer
for their dim and block_size), grad_reduce_by, filter and admit hooks — and whose dims fit one
storage (``coalesce_groups``: the widest table's dim, at most ``MAX_PAD`` = 2 times a narrower
table's, whose rows are padded to it) become ONE ``_lookup_unique_merged`` node
over all their features: one ``torch.unique`` of the features' (table tag, id) pairs, one tagged
``fxrec::table_find_or_insert`` (and one ``fxrec::init_rows`` with per-row seeds) into the shared
storage, one grad anchor; each feature's ``fxrec::table_combine`` then reads the ONE physical
``embedding`` through its slice of the inverse (``combine_fusion``, the next default pass, makes
them one ``table_combine_multi`` per storage). The tutorial's 6 tables (7 features; dims 8 and
16, one initializer) need 6 lookups after ``lookup_merge``; coalesced, 1: the dim-8 tables' rows
padded to 16 columns (``tests/test_passes_table_coalesce.py``)::

    >>> explain(EmbeddingEngine(get_embedding_conf()), [lookup_merge, table_coalesce])
    passes: lookup_merge, table_coalesce
    op             before  after
    table_combine       7      7
    table_lookup        7      1
    total              14      8

Why narrower tables join a wider storage: a lookup's host cost (a dedup and its read-back, an
insert, the combines' forward and backward, an optimizer update: ~25 op calls) does not depend on
its size, and a step's host time is what the tutorial's step is bound by. Its dim-8 tables hold
12K of a step's 6.2M ids at B=4096, yet their own lookup cost as much host time as the rest:
padded into the dim-16 storage, the H200 step took 9.1 instead of 12.6 ms (passes, median).
Padding costs memory and bandwidth in the narrow tables' rows only (at most 2x), and a narrow
feature's combined rows are cut to its columns (``_own_columns``: one copy).

The tables themselves are coalesced here (``coalesce_tables``): their ids, rows, slots and pending
gradients move into one ``TableStorage``, each table a tagged member of it. That changes the
tables' physical layout, never what they hold or do: ``gm`` (which reads the same table objects)
still runs and gives the same results, and so does everything that goes through a table
(``state_dict`` per logical table, the sparse optimizer, eviction, eval / ReadOnly lookups). Ids
keep all 64 bits: the table tag lives in the index's state word, not in the id. What the
optimizer needs stays per logical table (its state, keyed by table name; slots are created per
storage and saved per table), so no optimizer field enters the criteria beyond the dtype.

What stays equal to the uncoalesced graph: outputs, each table's contents per id (initial rows
from each table's own seed), ``take_grads`` per table (rows may be numbered differently: compare
by id). Gradients summed over three or more features of one table may differ in the last bit (as
with ``lookup_merge``). Idempotent; a table whose lookups are not ``get_attr`` reads is left alone.

Several processes (row-wise sharded tables, ``fxrec.distributed.sharded``): coalescing applies
the same. Ownership is a function of the id alone (the same for every logical table), so each
rank's storage holds per member exactly the ids that member would hold un-coalesced; the merged
lookup sends each (tag, id) pair to the owner of its id, which does one tagged lookup in its
storage; gradients reduce to the owners per logical table; checkpoints keep one state per
logical table (``sparse.shard<r>``), resharded by slice as any table's (tests:
``test_sharded.py``'s coalesce scenarios, ``test_trainer.py``'s coalesced reshard).
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from fxrec.nn.modules.embedding import _lookup_unique, _lookup_unique_merged
from fxrec.nn.modules.hashtable import HashTable
from fxrec.nn.modules.table_storage import coalesce_groups, coalesce_tables
from fxrec.passes.lookup_merge import rewritten_module

__all__ = ["table_coalesce"]


def _lookup_features(node: torch.fx.Node) -> list[tuple[torch.fx.Node, object, object]] | None:
    """``[(table get_attr node, values, trainable), ...]`` per feature of a lookup node, or None
    if it is not one (or reads a table that is not a ``get_attr``)."""
    if node.op != "call_function" or node.kwargs:
        return None
    if node.target is _lookup_unique and len(node.args) == 3:
        features = [node.args]
    elif node.target is _lookup_unique_merged and len(node.args) == 3:
        tables, values, trainable = node.args
        features = list(zip(tables, values, trainable))
    else:
        return None
    if not all(isinstance(t, torch.fx.Node) and t.op == "get_attr" for t, _, _ in features):
        return None
    return features


def table_coalesce(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule in which the lookups of all tables that can share one storage are one
    lookup into it, those tables coalesced (module docstring)."""
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"table_coalesce takes a torch.fx.GraphModule, got {type(gm).__name__}")
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = gm.graph._codegen
    lookups = [(node, features) for node in graph.nodes if (features := _lookup_features(node)) is not None]
    # the tables (by get_attr target, in graph order), then the groups that can share a storage
    tables: dict[str, HashTable] = {}
    for _, features in lookups:
        for table_node, _, _ in features:
            target = table_node.target
            table = gm.get_submodule(target)
            if not isinstance(table, HashTable):
                raise TypeError(f"table_coalesce: {target!r} is a {type(table).__name__}, not a HashTable")
            tables.setdefault(target, table)
    targets_of = {id(table): target for target, table in tables.items()}
    changed = False
    for group in coalesce_groups(list(tables.values())):
        if len(group) < 2:
            continue
        coalesce_tables(group)
        targets = {targets_of[id(t)] for t in group}
        members = [(node, features) for node, features in lookups if features[0][0].target in targets]
        if len(members) < 2:
            continue  # already one lookup for the whole group
        changed = True
        features = [f for _, fs in members for f in fs]
        with graph.inserting_before(members[0][0]):
            merged = graph.call_function(
                _lookup_unique_merged,
                (tuple(t for t, _, _ in features), [v for _, v, _ in features], tuple(bool(k) for _, _, k in features)),
            )
        offset = 0
        for node, fs in members:
            with graph.inserting_before(node):
                if node.target is _lookup_unique:
                    node.replace_all_uses_with(graph.call_function(operator.getitem, (merged, offset)))
                else:
                    for user in list(node.users):
                        if user.target is not operator.getitem:
                            raise ValueError(f"table_coalesce: {node.name} is used by {user.name}, not by getitem")
                        user.replace_all_uses_with(graph.call_function(operator.getitem, (merged, offset + user.args[1])))
                        graph.erase_node(user)
            graph.erase_node(node)
            offset += len(fs)
    return rewritten_module(gm, graph, reorder=changed)

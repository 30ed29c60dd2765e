"""Same-table lookup merge: all lookups into one table become one dedup and one lookup.

``lookup_merge(gm)`` returns a new ``GraphModule`` (``gm`` is left as it was) in which, for each
table that several ``_lookup_unique`` nodes of an ``EmbeddingEngine`` graph read (the same
``get_attr`` target, ``tables.<shared_name>``), those nodes become ONE ``_lookup_unique_merged``
node (its ``tables`` the one table, once per feature): the features' flat ids concatenated, one ``torch.unique`` (with counts), one
``HashTable.lookup`` (find-or-insert) and one ``grad_anchor``; each feature's ``table_combine``
then reads the shared rows and anchor through its own slice of the inverse (split by the
features' id counts). 7 lookups of the tutorial's features (``dense2`` and ``sparse1`` share the
table ``sparse1``) become 6.

What stays equal: outputs, the table's contents per id, and ``take_grads`` per id (rows and
gradients, ``grad_reduce_by="id"`` counts included) after the same backward. Row numbers may
differ: the unmerged graph inserts one feature's new ids after another, the merged one all at
once; a new id's initial row depends on (table seed, id) alone. Features of one table that
differ in ``trainable`` merge too: the anchor covers the trainable features' ids only, with
their occurrences (``_lookup_unique_merged``). Gradients summed over the features of a table
may differ in the last bit where three or more features add up in another order.

The merged node is placed before the first of the lookups it replaces and the graph is then
re-sorted (stable: each node as early as its inputs allow, in the original order), so the
lookups into one table keep their order relative to each other. Lookups whose table is not a
``get_attr`` are left alone. Idempotent: a merged graph has one lookup per table.
"""

from __future__ import annotations

import heapq
import operator
from collections import defaultdict

import torch
import torch.fx

from fxrec.nn.modules.embedding import _lookup_unique, _lookup_unique_merged

__all__ = ["lookup_merge", "rewritten_module", "stable_toposort"]


def _lookup_args(node: torch.fx.Node):
    """``(table, values, trainable)`` of a ``_lookup_unique`` node, or None if it is not one."""
    if node.op != "call_function" or node.target is not _lookup_unique:
        return None
    names = ("table", "values", "trainable")
    if len(node.args) + len(node.kwargs) != 3 or set(node.kwargs) - set(names[len(node.args):]):
        return None
    args = dict(zip(names, node.args), **node.kwargs)
    table = args["table"]
    if not isinstance(table, torch.fx.Node) or table.op != "get_attr":
        return None
    return table, args["values"], args["trainable"]


def stable_toposort(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A copy of ``graph`` whose nodes follow their inputs, otherwise in their original order."""
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    waiting = {n: len(n.all_input_nodes) for n in nodes}
    ready = [position[n] for n in nodes if waiting[n] == 0]
    heapq.heapify(ready)
    new = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    while ready:
        node = nodes[heapq.heappop(ready)]
        env[node] = new.node_copy(node, env.__getitem__)
        for user in node.users:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, position[user])
    if len(env) != len(nodes):
        raise RuntimeError("stable_toposort: a node was never ready (is the graph a DAG?)")
    new._codegen = graph._codegen
    return new


def lookup_merge(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule in which all lookups into one table are one dedup + one lookup.

    Pure: ``gm`` (graph, code, attributes) is unchanged; the result shares its tables.
    Idempotent: ``lookup_merge(lookup_merge(gm))`` has the same code as one run.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"lookup_merge takes a torch.fx.GraphModule, got {type(gm).__name__}")
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = gm.graph._codegen
    groups: dict[str, list[tuple[torch.fx.Node, tuple]]] = defaultdict(list)
    for node in graph.nodes:
        args = _lookup_args(node)
        if args is not None:
            groups[args[0].target].append((node, args))
    merged_any = False
    for members in groups.values():
        if len(members) < 2:
            continue
        merged_any = True
        first, (table, _, _) = members[0]
        with graph.inserting_before(first):
            merged = graph.call_function(
                _lookup_unique_merged,
                (tuple(table for _ in members), [values for _, (_, values, _) in members],
                 tuple(bool(t) for _, (_, _, t) in members)),
            )
            for i, (node, _) in enumerate(members):
                node.replace_all_uses_with(graph.call_function(operator.getitem, (merged, i)))
        for node, _ in members:
            graph.erase_node(node)
    return rewritten_module(gm, graph, reorder=merged_any)


def rewritten_module(gm: torch.fx.GraphModule, graph: torch.fx.Graph, reorder: bool) -> torch.fx.GraphModule:
    """A GraphModule of ``gm``'s attributes and meta running ``graph`` (a pass's rewrite of a
    copy of ``gm.graph``), re-sorted first where ``reorder`` (merged nodes were inserted before
    some of their inputs), linted."""
    if reorder:
        graph = stable_toposort(graph)
    graph.lint()
    out = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    out.meta.update(gm.meta)
    return out

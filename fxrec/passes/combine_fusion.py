"""Combine fusion: the ``table_combine`` nodes of every feature that reads one (table, rows,
anchor) become ONE ``fxrec::table_combine_multi`` node, whose backward is ONE ``[U, dim]``
gradient.

After ``lookup_merge`` / ``table_coalesce`` the features of one storage share one lookup
(``_lookup_unique_merged``): one embedding, one ``rows [U]``, one grad anchor. Each feature's
``fxrec::table_combine`` still is its own node, so the backward makes one ``[U, dim]`` gradient
per feature (a zero fill and a scatter kernel each) and autograd adds them up: F zero fills, F
scatters, F - 1 adds of ``[U, dim]``, F autograd nodes, and F host dispatches. ``combine_fusion(gm)``
returns a new ``GraphModule`` (``gm`` is left as it was) in which those F nodes are one
``table_combine_multi`` (per feature lists of index, offsets, weight, combiner, tile_len): one
forward op returning every feature's output, one backward op (``segment_combine_backward_multi``)
writing one zero-filled ``[U, dim]`` buffer that every feature's scatter adds into. The
tutorial's 7 ``table_combine`` (one coalesced storage) become 1 ``table_combine_multi``::

    >>> explain(EmbeddingEngine(get_embedding_conf()))     # examples/deepctr/embeddings.py
    passes: lookup_merge, table_coalesce, combine_fusion
    op                   before  after
    table_combine             7      0
    table_combine_multi       0      1
    table_lookup              7      1
    total                    14      2

Which nodes fuse: ``table_combine`` nodes whose (embedding, rows, anchor) are feature ``k``'s
outputs of one ``_lookup_unique_merged`` node, grouped by that node and feature ``k``'s
``trainable`` flag: the merged lookup hands every feature of one flag the same (embedding, rows,
anchor) tensors (its docstring), while trainable and non-trainable features of one storage read
different rows (the anchor covers the trainable ones' ids only). Combiners, weights and
``tile_len`` may differ per feature. A group of one keeps its ``table_combine``; combiners or
tile lengths that are not constants leave a node alone. The fused node is placed before the
first member and the graph re-sorted stably (``lookup_merge.stable_toposort``).

What stays equal: outputs (bit for bit: each feature's forward is the same computation) and the
anchor's gradient, now summed per row in one accumulation buffer instead of by autograd across
features (float rounding may differ in the last bit where features share a row; float16 /
bfloat16 tables round once instead of once per feature). Idempotent.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from fxrec.nn.modules.embedding import _lookup_unique_merged
from fxrec.passes.lookup_merge import rewritten_module

__all__ = ["combine_fusion"]

_TABLE_COMBINE = torch.ops.fxrec.table_combine.default
_TABLE_COMBINE_MULTI = torch.ops.fxrec.table_combine_multi.default


def _feature_output(node, position: int) -> tuple[torch.fx.Node, int] | None:
    """``(merged lookup node, k)`` if ``node`` is ``merged[k][position]``, else None."""
    if not (isinstance(node, torch.fx.Node) and node.target is operator.getitem and node.args[1] == position):
        return None
    feature = node.args[0]
    if not (isinstance(feature, torch.fx.Node) and feature.target is operator.getitem):
        return None
    merged, k = feature.args
    if not (isinstance(merged, torch.fx.Node) and merged.target is _lookup_unique_merged and type(k) is int
            and len(merged.args) == 3 and not merged.kwargs):  # (tables, values, trainable), as the passes build it
        return None
    return merged, k


def _group_key(node: torch.fx.Node) -> tuple | None:
    """``(merged lookup node, trainable)`` of a fusable ``table_combine`` node, else None."""
    if node.op != "call_function" or node.target is not _TABLE_COMBINE or node.kwargs or len(node.args) != 8:
        return None
    combiner, tile_len = node.args[6], node.args[7]
    if not isinstance(combiner, str) or type(tile_len) is not int:
        return None
    sources = [_feature_output(node.args[j], j) for j in range(3)]  # embedding, rows, anchor of one feature
    if sources[0] is None or sources.count(sources[0]) != 3:
        return None
    merged, k = sources[0]
    trainable = merged.args[2]
    return merged, bool(trainable[k])


def combine_fusion(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule in which the ``table_combine`` nodes reading one (table, rows, anchor)
    are one ``table_combine_multi`` node (module docstring)."""
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"combine_fusion takes a torch.fx.GraphModule, got {type(gm).__name__}")
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = gm.graph._codegen
    groups: dict[tuple, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if (key := _group_key(node)) is not None:
            groups.setdefault(key, []).append(node)
    fused_any = False
    for members in groups.values():
        if len(members) < 2:
            continue
        fused_any = True
        first = members[0]
        lists = [[m.args[j] for m in members] for j in range(3, 8)]  # index, offsets, weight, combiner, tile_len
        with graph.inserting_before(first):
            fused = graph.call_function(_TABLE_COMBINE_MULTI, (*first.args[:3], *lists))
            for i, m in enumerate(members):
                m.replace_all_uses_with(graph.call_function(operator.getitem, (fused, i)))
        for m in members:
            # the other members' getitems of (embedding, rows, anchor): the fused node reads the first's
            unread = [] if m is first else m.args[:3]
            graph.erase_node(m)
            for item in unread:
                if not item.users:
                    graph.erase_node(item)
    return rewritten_module(gm, graph, reorder=fused_any)

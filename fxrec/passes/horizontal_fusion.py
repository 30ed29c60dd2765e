"""Horizontal fusion: same-type feature ops of different features become one multi-tensor op.

``horizontal_fusion(gm)`` returns a new ``GraphModule`` (``gm`` is left as it was) in which the
nodes of each fusable op type that can run together become ONE node of the op's multi-tensor
form, one kernel launch on CUDA instead of one per feature:

====================================  ==========================================
``fxrec::mod``                        ``fxrec::mod_multi``
``fxrec::bucketize``                  ``fxrec::bucketize_multi``
``fxrec::hash_bytes``                 ``fxrec::hash_bytes_multi``
``fxrec::hash_int64``                 ``fxrec::hash_int64_multi``
``features.graph.hash_ids``           ``features.graph.hash_ids_multi`` (strings -> one
                                      ``hash_bytes_multi``, ids -> one ``hash_int64_multi``)
``fxrec::sequence_truncate`` (2-D)    ``fxrec::sequence_truncate_multi``
====================================  ==========================================

Each op's scalar arguments (mod value, boundaries, hash type, seq_len, keep_last) become the
multi op's per-feature lists, so features with different parameters fuse too. ``FeatureEngine``
emits ``hash_ids`` (strings or ids is known only from the data's dtype); a graph that calls
``hash_bytes`` / ``hash_int64`` directly is fused the same way.

Which nodes fuse: nodes fuse only if none depends on another, and the fused graph must stay
acyclic across op types too. The pass simulates running the graph: nodes other than fusable ops
run as soon as their inputs are ready; then, repeatedly, one op type runs all its ready nodes as
one node. The type is picked so that waiting would not have gained anything: a type whose every
remaining node is ready goes first; otherwise the type holding the ready node with the longest
chain of fusable ops after it (the critical path). The rewritten graph is emitted in that
simulated order, so every node follows its inputs by construction (``graph.lint()`` holds). On
the tutorial's features this gives one launch per op type and level, as a hand-written stage
would: 4 ``mod`` -> 1 ``mod_multi``, 2 ``sequence_truncate`` -> 1 ``sequence_truncate_multi``.

A group of one keeps its single op. A node whose tuple output is used other than through
``getitem`` with a constant index is left alone. The pass repeats until nothing more fuses, so
running it twice equals running it once. Nodes move along data edges only, which is sound for
functional graphs such as FeatureEngine's (no op writes into its inputs, SPEC §3): a graph with
a mutating op (a schema with ``Tensor(a!)``) is returned unchanged.
"""

from __future__ import annotations

import heapq
import operator
from dataclasses import dataclass

import torch
import torch.fx
from torch.fx.operator_schemas import normalize_function

from fxrec.features import graph as G

__all__ = ["horizontal_fusion", "FusionRule", "RULES"]

_ops = torch.ops.fxrec


@dataclass(frozen=True)
class FusionRule:
    """One fusable op: the single op, its multi form, and how arguments map between them.

    ``params``: the single op's argument names, in the order of the multi op's list arguments
    (the multi op takes one list per parameter, one entry per feature). ``n_outputs``: 1 for an
    op returning a Tensor (the multi op returns a list), k for a k-tuple (the multi op returns k
    lists, each in feature order).
    """

    name: str
    target: object
    multi: object
    params: tuple[str, ...]
    n_outputs: int = 1


RULES: tuple[FusionRule, ...] = (
    FusionRule("mod", _ops.mod.default, _ops.mod_multi.default, ("values", "mod_value")),
    FusionRule("bucketize", _ops.bucketize.default, _ops.bucketize_multi.default, ("values", "boundaries")),
    FusionRule("hash_ids", G.hash_ids, G.hash_ids_multi, ("values", "offsets", "hash_type")),
    FusionRule("hash_bytes", _ops.hash_bytes.default, _ops.hash_bytes_multi.default, ("values", "offsets", "hash_type")),
    FusionRule("hash_int64", _ops.hash_int64.default, _ops.hash_int64_multi.default, ("values", "hash_type")),
    FusionRule(
        "sequence_truncate",
        _ops.sequence_truncate.default,
        _ops.sequence_truncate_multi.default,
        ("values", "offsets", "weight", "seq_len", "keep_last"),
        n_outputs=3,
    ),
)


def _rule_of(target, rules: tuple[FusionRule, ...]) -> FusionRule | None:
    for rule in rules:
        if target is rule.target or target is getattr(rule.target, "overloadpacket", None):
            return rule
    return None


def _member_args(node: torch.fx.Node, rule: FusionRule) -> tuple | None:
    """The node's arguments in ``rule.params`` order, or None if the node cannot be fused."""
    if node.op != "call_function":
        return None
    target = rule.target  # an overload packet binds like its default overload
    try:
        bound = normalize_function(target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    except Exception:  # noqa: BLE001  (arguments that do not bind: leave the node alone)
        return None
    if bound is None or set(bound.kwargs) - set(rule.params):
        return None
    args = tuple(bound.kwargs.get(p) for p in rule.params)
    if rule.n_outputs > 1:
        for user in node.users:
            if not _is_item(user, node, rule.n_outputs):
                return None
    return args


def _is_item(user: torch.fx.Node, node: torch.fx.Node, n: int) -> bool:
    """``user`` is ``node[k]`` for a constant int ``-n <= k < n``."""
    return (
        user.op == "call_function"
        and user.target is operator.getitem
        and len(user.args) == 2
        and not user.kwargs
        and user.args[0] is node
        and type(user.args[1]) is int
        and -n <= user.args[1] < n
    )


@dataclass
class _Group:
    rule: FusionRule
    nodes: list[torch.fx.Node]


def _schedule(graph: torch.fx.Graph, candidates: dict[torch.fx.Node, FusionRule]) -> list:
    """Simulated run order: a list of nodes (emitted as they are) and ``_Group``s (fused)."""
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    # depth: the most fusable ops on a path from the node (itself included) to the output.
    depth: dict[torch.fx.Node, int] = {}
    for n in reversed(nodes):
        depth[n] = (n in candidates) + max((depth[u] for u in n.users), default=0)
    waiting = {n: len(n.all_input_nodes) for n in nodes}
    remaining: dict[FusionRule, int] = {}
    for rule in candidates.values():
        remaining[rule] = remaining.get(rule, 0) + 1
    free: list[tuple[int, torch.fx.Node]] = []  # heap by position: keeps the original order
    ready: dict[FusionRule, list[torch.fx.Node]] = {}
    output = None

    def make_ready(n: torch.fx.Node) -> None:
        nonlocal output
        if n.op == "output":
            output = n
        elif n in candidates:
            ready.setdefault(candidates[n], []).append(n)
        else:
            heapq.heappush(free, (position[n], n))

    def finish(n: torch.fx.Node) -> None:
        for user in n.users:
            waiting[user] -= 1
            if waiting[user] == 0:
                make_ready(user)

    for n in nodes:
        if waiting[n] == 0:
            make_ready(n)
    order: list = []
    while True:
        while free:
            _, n = heapq.heappop(free)
            order.append(n)
            finish(n)
        kinds = [rule for rule, group in ready.items() if group]
        if not kinds:
            break
        complete = [r for r in kinds if len(ready[r]) == remaining[r]]
        if complete:
            rule = min(complete, key=lambda r: min(position[n] for n in ready[r]))
        else:
            rule = max(kinds, key=lambda r: (
                max(depth[n] for n in ready[r]), len(ready[r]), -min(position[n] for n in ready[r])
            ))
        group = sorted(ready.pop(rule), key=position.__getitem__)
        remaining[rule] -= len(group)
        order.append(_Group(rule, group) if len(group) > 1 else group[0])
        for n in group:
            finish(n)
    if output is not None:
        order.append(output)
    if sum(len(x.nodes) if isinstance(x, _Group) else 1 for x in order) != len(nodes):
        raise RuntimeError("horizontal_fusion: a node was never ready (is the graph a DAG?)")
    return order


def _emit(order: list, member_args: dict[torch.fx.Node, tuple]) -> torch.fx.Graph:
    new = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for entry in order:
        if isinstance(entry, torch.fx.Node):
            if entry not in env:  # a getitem of a fused tuple output is mapped already
                env[entry] = new.node_copy(entry, lambda x: env[x])
            continue
        rule, members = entry.rule, entry.nodes
        lists = [
            [torch.fx.map_arg(member_args[m][i], lambda x: env[x]) for m in members]
            for i in range(len(rule.params))
        ]
        fused = new.call_function(rule.multi, tuple(lists))
        if rule.n_outputs == 1:
            for i, m in enumerate(members):
                if m.users:
                    env[m] = new.call_function(operator.getitem, (fused, i))
            continue
        outputs: dict[int, torch.fx.Node] = {}
        for i, m in enumerate(members):
            items: dict[int, torch.fx.Node] = {}
            for user in m.users:
                k = user.args[1] % rule.n_outputs
                if k not in items:
                    if k not in outputs:
                        outputs[k] = new.call_function(operator.getitem, (fused, k))
                    items[k] = new.call_function(operator.getitem, (outputs[k], i))
                env[user] = items[k]
    return new


def _mutates(node: torch.fx.Node) -> bool:
    target = node.target
    return node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable


def _fuse_once(graph: torch.fx.Graph, rules: tuple[FusionRule, ...]) -> torch.fx.Graph | None:
    """The rewritten graph, or None when no two nodes fuse."""
    if any(_mutates(node) for node in graph.nodes):
        return None  # nodes are reordered along data edges only: sound for functional graphs
    candidates: dict[torch.fx.Node, FusionRule] = {}
    args: dict[torch.fx.Node, tuple] = {}
    for node in graph.nodes:
        rule = _rule_of(node.target, rules) if node.op == "call_function" else None
        if rule is None:
            continue
        member_args = _member_args(node, rule)
        if member_args is not None:
            candidates[node], args[node] = rule, member_args
    order = _schedule(graph, candidates)
    if not any(isinstance(entry, _Group) for entry in order):
        return None
    return _emit(order, args)


def _owner(module: torch.nn.Module, target: str) -> tuple[torch.nn.Module | None, str]:
    *path, name = target.split(".")
    for part in path:
        module = getattr(module, part, None)
        if not isinstance(module, torch.nn.Module):
            return None, name
    return module, name


def _graph_module(gm: torch.fx.GraphModule, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """A new GraphModule of ``graph`` sharing ``gm``'s attributes (constants are not copied)."""
    out = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    # GraphModule registers copied buffers as persistent: keep each buffer's persistence.
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        src, name = _owner(gm, node.target)
        dst, _ = _owner(out, node.target)
        if src is not None and dst is not None and name in src._non_persistent_buffers_set:
            dst.register_buffer(name, getattr(dst, name), persistent=False)
    out.meta.update(gm.meta)
    return out


def horizontal_fusion(gm: torch.fx.GraphModule, rules: tuple[FusionRule, ...] = RULES) -> torch.fx.GraphModule:
    """A new GraphModule in which same-type ops of different features are one multi-tensor op.

    Pure: ``gm`` (graph, code, attributes) is unchanged; the result shares its constant tensors.
    Idempotent: ``horizontal_fusion(horizontal_fusion(gm))`` has the same code as one run.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"horizontal_fusion takes a torch.fx.GraphModule, got {type(gm).__name__}")
    graph = gm.graph
    fused_any = False
    while (rewritten := _fuse_once(graph, rules)) is not None:
        graph, fused_any = rewritten, True
    if not fused_any:
        graph = _emit(list(gm.graph.nodes), {})  # a plain copy
    graph._codegen = gm.graph._codegen
    graph.lint()
    return _graph_module(gm, graph)

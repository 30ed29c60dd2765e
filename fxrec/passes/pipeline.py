"""Running passes over a feature graph, and showing what they did.

``run_passes(gm, passes)`` applies passes in order (each a pure ``GraphModule -> GraphModule``);
``explain(x, passes)`` tells, per fxrec op, how many nodes the graph had before and after.

Default passes depend on the graph: ``DEFAULT_PASSES`` (horizontal fusion) for FeatureEngine
graphs, ``DEFAULT_EMBEDDING_PASSES`` (lookup merge, table coalescing, then combine fusion) for
EmbeddingEngine graphs.
"""

from __future__ import annotations

import collections
from typing import Callable, Sequence

import torch
import torch.fx

from fxrec.features import graph as G
from fxrec.nn.modules.embedding import EmbeddingEngine, _lookup_unique, _lookup_unique_merged
from fxrec.passes.combine_fusion import combine_fusion
from fxrec.passes.horizontal_fusion import horizontal_fusion
from fxrec.passes.lookup_merge import lookup_merge
from fxrec.passes.table_coalesce import table_coalesce

__all__ = ["Pass", "DEFAULT_PASSES", "DEFAULT_EMBEDDING_PASSES", "apply_passes", "run_passes", "op_counts", "explain"]

Pass = Callable[[torch.fx.GraphModule], torch.fx.GraphModule]

# FeatureEngine graphs: horizontal fusion. EmbeddingEngine graphs: lookup merge, table coalescing,
# then combine fusion (lookup + combiner fusion, DESIGN.md "Passes": the gather is fused into
# table_combine itself; combine_fusion makes one op, one [U, dim] gradient, per shared lookup).
DEFAULT_PASSES: tuple[Pass, ...] = (horizontal_fusion,)
DEFAULT_EMBEDDING_PASSES: tuple[Pass, ...] = (lookup_merge, table_coalesce, combine_fusion)

# Graph helpers that stand for fxrec ops (which one is chosen at run time by the data's dtype).
_HELPER_OPS = {
    G.hash_ids: "hash_bytes|hash_int64",
    G.hash_ids_multi: "hash_bytes_multi|hash_int64_multi",
    # EmbeddingEngine's lookups (dedup + find-or-insert + grad anchor), one or several features each
    _lookup_unique: "table_lookup",
    _lookup_unique_merged: "table_lookup",
}


def run_passes(gm: torch.fx.GraphModule, passes: Sequence[Pass] = DEFAULT_PASSES) -> torch.fx.GraphModule:
    """``gm`` rewritten by each pass in turn; ``gm`` itself is left unchanged."""
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"run_passes takes a torch.fx.GraphModule, got {type(gm).__name__}")
    for p in passes:
        if not callable(p):
            raise TypeError(f"run_passes: a pass must be callable GraphModule -> GraphModule, got {p!r}")
        out = p(gm)
        if not isinstance(out, torch.fx.GraphModule):
            raise TypeError(f"pass {getattr(p, '__name__', p)!r} returned {type(out).__name__}, not a GraphModule")
        gm = out
    return gm


def apply_passes(gm: torch.fx.GraphModule, passes, defaults: Sequence[Pass], owner: str) -> torch.fx.GraphModule:
    """An engine's ``passes=`` argument applied to its graph: ``False`` none, ``True`` ``defaults``,
    or a sequence of passes; anything else is a ``TypeError`` naming ``owner``."""
    if passes is False:
        return gm
    if passes is True:
        passes = defaults
    elif isinstance(passes, (str, bytes)) or not all(callable(p) for p in passes):
        raise TypeError(f"{owner}: passes must be True, False or a sequence of passes, got {passes!r}")
    return run_passes(gm, tuple(passes))


def op_name(node: torch.fx.Node) -> str | None:
    """``"mod"`` for a ``torch.ops.fxrec.mod`` node (any overload), None for other nodes."""
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        if target.namespace == "fxrec":
            return target.__name__.split(".")[0]
        return None
    try:
        return _HELPER_OPS.get(target)
    except TypeError:  # an unhashable target
        return None


def op_counts(gm: torch.fx.GraphModule) -> collections.Counter:
    """How many nodes of each ``torch.ops.fxrec.*`` op ``gm`` holds (hash helpers included)."""
    return collections.Counter(name for node in gm.graph.nodes if (name := op_name(node)))


def _graph_of(x) -> torch.fx.GraphModule:
    from fxrec.features.feature_engine import FeatureEngine  # features may import passes lazily

    if isinstance(x, torch.fx.GraphModule):
        return x
    if isinstance(x, FeatureEngine):
        # the graph as built from the configs, whether or not the engine runs passes
        return FeatureEngine(x.features).graph_module
    if isinstance(x, EmbeddingEngine):
        # likewise, over fresh tables: table_coalesce coalesces the tables of the graph it rewrites
        return EmbeddingEngine(x.options).build_graph()
    gm = getattr(x, "graph_module", None)
    if isinstance(gm, torch.fx.GraphModule):
        return gm
    raise TypeError(f"explain takes a GraphModule or a module with .graph_module, got {type(x).__name__}")


def explain(x, passes: Sequence[Pass] | None = None, print_: bool = False, code: bool = False) -> str:
    """What ``passes`` do to a graph: a table of fxrec op counts before and after.

    ``x``: a ``GraphModule``, a ``FeatureEngine`` or ``EmbeddingEngine`` (its graph as built from
    the configs, before any pass, over fresh tables: explaining never changes the engine) or any
    module with a ``graph_module`` (whose tables ``table_coalesce`` may coalesce: a layout change,
    results stay the same). ``passes``: default
    ``DEFAULT_EMBEDDING_PASSES`` for an EmbeddingEngine (or its graph), else ``DEFAULT_PASSES``.
    ``code=True`` appends the graph's code before and after. ``print_=True`` prints the text too.
    """
    before = _graph_of(x)
    if passes is None:
        embedding = isinstance(x, EmbeddingEngine) or any(
            n.op == "call_function" and n.target in (_lookup_unique, _lookup_unique_merged) for n in before.graph.nodes
        )
        passes = DEFAULT_EMBEDDING_PASSES if embedding else DEFAULT_PASSES
    after = run_passes(before, passes)
    counts_before, counts_after = op_counts(before), op_counts(after)
    names = sorted(set(counts_before) | set(counts_after))
    width = max([len("op")] + [len(n) for n in names])
    pass_names = ", ".join(getattr(p, "__name__", repr(p)) for p in passes) or "(none)"
    lines = [
        f"passes: {pass_names}",
        f"{'op':<{width}}  before  after",
        *(f"{n:<{width}}  {counts_before[n]:>6}  {counts_after[n]:>5}" for n in names),
        f"{'total':<{width}}  {sum(counts_before.values()):>6}  {sum(counts_after.values()):>5}",
    ]
    if code:
        lines += ["", "before:", before.code.strip("\n"), "", "after:", after.code.strip("\n")]
    text = "\n".join(lines)
    if print_:
        print(text)
    return text

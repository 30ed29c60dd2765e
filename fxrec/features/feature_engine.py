"""``FeatureEngine``: all features' op chains as one ``torch.fx.GraphModule`` of fxrec ops.

The graph takes the selected columns (tensors or RaggedTensors) as placeholders and returns
every feature. Each column is taken apart into ``(values, offsets, weight)`` by the structural
helpers of ``fxrec.features.graph``; feature ops are ``torch.ops.fxrec.*`` nodes on those
parts. It is built once from the configs (``engine.graph_module``), before data is seen, which
is what lets ``torch.compile`` trace a call into one graph and what compiler passes rewrite.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx
import torch.nn as nn

from fxrec.features import graph as G
from fxrec.features.feature import Feature
from fxrec.ops.triton.bucketize import VALUE_DTYPES as BUCKETIZE_DTYPES
from fxrec.features.op import (
    Bucketize,
    FeatureCross,
    FeatureOp,
    Hash,
    Mod,
    SelectFields,
    SequenceTruncate,
)

__all__ = ["FeatureEngine"]


@dataclass
class _Parts:
    """Graph nodes of one feature's current value: values, offsets list (or None), weight."""

    values: torch.fx.Node
    offsets: torch.fx.Node
    weight: torch.fx.Node


def _where(feature: Feature, op: FeatureOp) -> str:
    return f"feature {feature.name!r} ({type(op).__name__})"


class _GraphBuilder:
    def __init__(self, columns: list[str]):
        self.graph = torch.fx.Graph()
        self.root = nn.Module()
        self.columns = {name: self.graph.placeholder(name) for name in columns}

    def call(self, fn, *args) -> torch.fx.Node:
        return self.graph.call_function(fn, args)

    def item(self, node: torch.fx.Node, i: int) -> torch.fx.Node:
        return self.graph.call_function(operator.getitem, (node, i))

    def parts(self, column: str, where: str) -> _Parts:
        triple = self.call(G.column_parts, self.columns[column], where)
        return _Parts(self.item(triple, 0), self.item(triple, 1), self.item(triple, 2))

    def constant(self, name: str, tensor: torch.Tensor) -> torch.fx.Node:
        self.root.register_buffer(name, tensor, persistent=False)
        return self.graph.get_attr(name)

    # -- one method per op config ------------------------------------------------------------
    def mod(self, p: _Parts, op: Mod, where: str) -> _Parts:
        ids = self.call(G.require_dtype, p.values, (torch.int64,), where)
        return _Parts(self.call(torch.ops.fxrec.mod.default, ids, op.mod_value), p.offsets, p.weight)

    def bucketize(self, p: _Parts, op: Bucketize, where: str, name: str) -> _Parts:
        bounds = self.constant(name, torch.tensor(op.boundaries, dtype=torch.float64))
        values = self.call(G.require_dtype, p.values, BUCKETIZE_DTYPES, where)
        bounds = self.call(G.boundaries_on, bounds, values)
        return _Parts(self.call(torch.ops.fxrec.bucketize.default, values, bounds), p.offsets, p.weight)

    def hash(self, p: _Parts, op: Hash, where: str) -> _Parts:
        splits = self.call(G.string_offsets, p.values, p.offsets, p.weight, where)
        ids = self.call(G.hash_ids, p.values, splits, op.hash_type)
        return _Parts(ids, self.call(G.hash_levels, p.values, p.offsets), p.weight)

    def cross(self, x: _Parts, y: _Parts, where: str) -> _Parts:
        xo = self.call(G.last_level, x.offsets, where)
        yo = self.call(G.last_level, y.offsets, where)
        xv = self.call(G.require_dtype, x.values, (torch.int64,), where)
        yv = self.call(G.require_dtype, y.values, (torch.int64,), where)
        out = self.call(torch.ops.fxrec.feature_cross.default, xv, xo, x.weight, yv, yo, y.weight)
        weight = self.call(G.cross_weight, x.weight, y.weight, self.item(out, 2))
        return _Parts(self.item(out, 0), self.call(G.one_level, self.item(out, 1)), weight)

    def truncate(self, p: _Parts, op: SequenceTruncate, where: str) -> _Parts:
        # n_dims=2 works on the last ragged level (rows of items), n_dims=3 on the last two (rows
        # of lists of items); levels above those are dropped.
        inner = self.call(G.last_level, p.offsets, where)
        outer = self.item(self.call(G.outer_levels, p.offsets, where), -1) if op.n_dims == 3 else None
        if not op.truncate:
            if op.check_length:
                checked = self.call(G.check_row_lengths, outer if op.n_dims == 3 else inner, op.seq_len, where)
                outer, inner = (checked, inner) if op.n_dims == 3 else (None, checked)
            offsets = self.call(G.one_level, inner) if op.n_dims == 2 else self.call(G.two_levels, outer, inner)
            return _Parts(self.call(G.cast_values, p.values, op.dtype), offsets, p.weight)
        if op.n_dims == 2:
            out = self.call(
                torch.ops.fxrec.sequence_truncate.default, p.values, inner, p.weight, op.seq_len, op._keep_last
            )
            offsets = self.call(G.one_level, self.item(out, 1))
        else:
            out = self.call(
                torch.ops.fxrec.sequence_truncate_3d.default,
                p.values, outer, inner, p.weight, op.seq_len, op._keep_last,
            )
            offsets = self.call(G.two_levels, self.item(out, 1), self.item(out, 2))
        weight = self.call(G.weight_or_none, p.weight, self.item(out, -1))
        values = self.call(G.cast_values, self.item(out, 0), op.dtype)
        return _Parts(values, offsets, weight)


def _column_names(features: Sequence[Feature]) -> list[str]:
    names: list[str] = []
    for feature in features:
        select = feature.ops[0]
        fields = select.fields if isinstance(select, SelectFields) else [select]
        names.extend(f.name for f in fields if f.name not in names)
    return names


class FeatureEngine(nn.Module):
    """Runs every feature's op chain; returns ``{feature: value}`` plus the untouched columns.

    Output: each feature by name, and every input column that no feature of the same name
    replaced (``label`` and the like) as it came. Ops never write into their inputs; a feature
    that only selects a column returns that column itself.

    ``passes``: ``False`` (default) runs the graph as built from the configs; ``True`` rewrites
    it once, here, with ``fxrec.passes.DEFAULT_PASSES`` (horizontal fusion: one multi-tensor op
    per op type and level, fewer kernel launches on CUDA); a sequence of passes runs those.
    Outputs are the same either way. ``fxrec.passes.explain(engine)`` shows what the passes do.
    """

    def __init__(self, feature_list: Sequence[Feature], passes: bool | Sequence = False):
        super().__init__()
        features = list(feature_list)
        seen: set[str] = set()
        for feature in features:
            if not isinstance(feature, Feature):
                raise TypeError(f"FeatureEngine takes Feature objects, got {type(feature).__name__}")
            if feature.name in seen:
                raise ValueError(f"FeatureEngine: feature {feature.name!r} is defined twice")
            if not feature.ops:
                raise ValueError(f"feature {feature.name!r} has no ops (start with SelectField)")
            seen.add(feature.name)
        self.features = features
        self.columns = _column_names(features)
        self._dims = {
            (f.name, s.name): s.dim
            for f in features
            for s in (f.ops[0].fields if isinstance(f.ops[0], SelectFields) else [f.ops[0]])
            if s.dim is not None
        }
        self.graph_module = self._build()
        self.rewritten = False
        if passes is not False:
            self.rewrite(passes)

    def rewrite(self, passes: bool | Sequence = True) -> None:
        """Rewrite the graph with ``passes`` (``True``: ``fxrec.passes.DEFAULT_PASSES``), as the
        constructor's ``passes`` does; ``fxrec.compile`` rewrites an engine built without."""
        from fxrec.passes import DEFAULT_PASSES, apply_passes  # passes import features: not at the top

        self.graph_module = apply_passes(self.graph_module, passes, DEFAULT_PASSES, "FeatureEngine")
        self.rewritten = self.rewritten or passes is not False

    def _build(self) -> torch.fx.GraphModule:
        b = _GraphBuilder(self.columns)
        outputs = []
        for feature in self.features:
            select = feature.ops[0]
            where = f"feature {feature.name!r}"
            if isinstance(select, SelectFields):
                value = [b.parts(f.name, where) for f in select.fields]
            else:
                value = b.parts(select.name, where)
            for i, op in enumerate(feature.ops[1:], start=1):
                value = self._apply_op(b, feature, op, value, f"{feature.name}_{i}")
            if isinstance(value, list):
                outputs.append([b.call(G.assemble, p.values, p.offsets, p.weight) for p in value])
            else:
                outputs.append(b.call(G.assemble, value.values, value.offsets, value.weight))
        b.graph.output(tuple(outputs))
        b.graph.lint()
        gm = torch.fx.GraphModule(b.root, b.graph, class_name="FeatureGraph")
        # GraphModule copies buffers as persistent ones: config constants stay out of checkpoints.
        for name, tensor in b.root.named_buffers():
            gm.register_buffer(name, tensor, persistent=False)
        return gm

    @staticmethod
    def _apply_op(b: _GraphBuilder, feature: Feature, op: FeatureOp, value, attr_name: str):
        where = _where(feature, op)
        if isinstance(op, FeatureCross):
            if not isinstance(value, list) or len(value) != 2:
                raise ValueError(f"{where}: needs SelectFields of exactly two columns before it")
            return b.cross(value[0], value[1], where)
        if isinstance(value, list):
            raise ValueError(f"{where}: a SelectFields list can only feed FeatureCross")
        if isinstance(op, Mod):
            return b.mod(value, op, where)
        if isinstance(op, Bucketize):
            return b.bucketize(value, op, where, f"boundaries_{attr_name}")
        if isinstance(op, Hash):
            return b.hash(value, op, where)
        if isinstance(op, SequenceTruncate):
            return b.truncate(value, op, where)
        raise TypeError(f"{where}: unsupported feature op {type(op).__name__}")

    def _check_batch(self, batch) -> None:
        if not isinstance(batch, dict):
            raise TypeError(f"FeatureEngine takes a dict of columns, got {type(batch).__name__}")
        for feature in self.features:
            select = feature.ops[0]
            for field in select.fields if isinstance(select, SelectFields) else [select]:
                if field.name not in batch:
                    raise ValueError(
                        f"feature {feature.name!r}: column {field.name!r} is not in the batch "
                        f"(columns: {sorted(batch)})"
                    )
                dim = self._dims.get((feature.name, field.name))
                column = batch[field.name]
                if dim is not None and isinstance(column, torch.Tensor) and column.shape[-1] != dim:
                    raise ValueError(
                        f"feature {feature.name!r}: column {field.name!r} has last dim "
                        f"{column.shape[-1]}, SelectField says dim={dim}"
                    )

    def forward(self, batch: dict) -> dict:
        self._check_batch(batch)
        values = self.graph_module(*[batch[name] for name in self.columns])
        names = {f.name for f in self.features}
        out = {key: value for key, value in batch.items() if key not in names}
        out.update({f.name: v for f, v in zip(self.features, values)})
        return out

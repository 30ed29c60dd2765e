"""``fxrec.compile(model)``: the model's forward under ``torch.compile``, one graph for every batch.

``compiled = fxrec.compile(model)`` returns a ``CompiledModel`` whose ``compiled(batch)`` runs
``model(batch)`` — the features, table lookups, combiners, dense model, loss and metric updates
of a model like the tutorial's ``DeepCTR`` — as ONE Inductor graph with fxrec's custom ops
inside. What it compiles is the engines' rewritten graphs (SPEC §6): every ``FeatureEngine`` and
``EmbeddingEngine`` of the model built without passes is rewritten with the default passes
first (``rewrite_engines``: fused feature ops, one lookup per storage, tables coalesced, one
combine per storage; a layout change whose results are the eager model's; an engine built with
``passes=()`` is kept as built). ``loss.backward()`` runs the backward graph AOTAutograd compiled
with it. Batches of any size (1 included) and any ragged lengths reuse that graph. The optimizer steps stay outside it:
``SparseAdamWTF`` & co. are one fused kernel per table already, and torch's dense optimizers
have their own fused / foreach kernels (``torch.compile`` them separately if wanted).

Before each call, outside the graph and without reading anything back from the device:

- every batch tensor's row dimension is marked unbacked, on aliases of the tensors
  (``fxrec.utils.dynamic.dynamic_batch``; the dense columns and labels share one batch size): no
  guards on sizes, so no recompiles;
- per table, a host-known upper bound of the distinct ids the step can insert is computed from
  the batch's tensor SHAPES and the feature configs (``id_bounds``); per storage (one table, or
  tables coalesced into one), the sum of its tables' bounds: the storage reserves room for that
  many (``TableStorage.reserve``: a table cannot grow inside a graph), and gets one zero gradient
  leaf ``[bound, dim]`` per training lookup into it (``TableStorage.grad_sinks``, dim 0 unbacked; Dynamo
  cannot create a leaf inside the graph on torch 2.11, nor let one outlive it on 2.13). A
  lookup finding more distinct ids than its bound fails a runtime assert instead of writing out
  of bounds. The leaf's gradient is ``[bound, dim]`` (rows past the lookup's ``U`` distinct ids
  are zero): bounded by the step's ids, never by the table's capacity.
  ``reserve`` reads a table's id count only when the storage's host-side upper bound of that
  count (``TableStorage.reserve``) says it might be too full, and then from the copy queued after
  the last step's forward (``TableStorage.snapshot_count``) if it has landed, else with a sync;
  growth is decided on the exact count. Otherwise a step syncs nothing (sharded,
  the room is for every rank's ids: one all-reduce of the bounds, below; with NCCL that is a
  round trip through the device).

Dynamo config, set only while a ``CompiledModel`` runs (``torch._dynamo.config.patch`` around the
call: Dynamo reads it while it traces; nothing global is left set):
``capture_dynamic_output_shape_ops`` and ``capture_scalar_outputs`` True (unique ids, inserts,
truncation: outputs whose size depends on the data), and ``force_nn_module_property_static_shapes``
and ``force_parameter_static_shapes`` False: the gradient leaves are table attributes whose size
changes every step, and a table's row buffers change size when it grows; Dynamo would otherwise
specialize every module tensor's shape (one recompile per growth). The row buffers' capacity is
marked dynamic (``maybe_mark_dynamic``) before each call, so growth costs no recompile; other
module tensors (parameters, metric counters) never change shape and keep static shapes by
Dynamo's default (``assume_static_by_default``).

The ``add_metric`` registry is emptied before each compiled forward (as the ``Trainer`` does
before every forward): Dynamo guards on the keys of that global dict, so a registry that held
the last step's metrics on one call and nothing on another would recompile the graph.

Only tables looked up through an ``EmbeddingEngine`` of the model are prepared so: a
``HashTable`` called directly in a compiled forward gets no room reserved and makes its gradient
leaf inside the graph (a graph break on torch 2.11 and 2.13).

Eval mode (``model.eval()``) runs the eager model: lookups do not insert, no gradient flows, and
evaluation is rare enough not to need a second compiled graph.

Takes a ``DistributedDataParallel`` module (the module itself goes to ``torch.compile``: Dynamo
compiles the wrapped module's forward with its DDP graph splitting; a function calling a DDP module
would break the graph; the tables are found in the wrapped module).

In a process group of several ranks the tables are row-wise sharded (``fxrec.distributed.sharded``)
and every lookup is an exchange with the ids' owners (counts, ids, the owners' lookup, rows back),
traced into the graph as functional all-to-alls whose split sizes are unbacked ints: the compiled
forward is still ONE graph over every batch (the graph breaks only in DDP's own forward wrapper,
as in one process under DDP). A rank's owner lookups insert the ids EVERY rank sends it, and a
table cannot grow inside the graph: before each call the ranks sum their per-storage bounds (one
all-reduce of host ints, ``sharded.owner_bounds``) and each storage reserves room for that sum;
the gradient leaves stay bounded by this rank's own ids. The row gradients go to their owners at
the sparse optimizer's step, outside the graph, as in eager training. Compiled sharded training
equals eager sharded training: losses, dense weights and each rank's table shard
(``tests/test_sharded_compile.py`` and ``tests/test_compile.py``, 2 gloo ranks, separate and
coalesced tables).
"""

from __future__ import annotations

import collections
from typing import Any

import torch
import torch._dynamo
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from fxrec.distributed import sharded
from fxrec.features.feature_engine import FeatureEngine
from fxrec.features.op import Bucketize, FeatureCross, Hash, Mod, SelectField, SelectFields, SequenceTruncate
from fxrec.framework.metrics import clear_metrics
from fxrec.nn.modules.embedding import EmbeddingEngine
from fxrec.nn.modules.hashtable import HashTable
from fxrec.nn.modules.table_storage import TableStorage
from fxrec.ragged import RaggedTensor
from fxrec.utils.dynamic import dynamic_batch

__all__ = ["CompiledModel", "compile", "id_bounds", "rewrite_engines"]


def rewrite_engines(model: nn.Module) -> None:
    """The default passes on every ``FeatureEngine`` and ``EmbeddingEngine`` of ``model`` built
    without passes (``engine.rewrite()``); engines built with passes keep their graphs. Tables
    may be coalesced: call it before wrapping the model in DDP (the ``Trainer`` does)."""
    for engine in model.modules():
        if isinstance(engine, (FeatureEngine, EmbeddingEngine)) and not engine.rewritten:
            engine.rewrite()

DYNAMO_CONFIG = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True,
                 "force_nn_module_property_static_shapes": False, "force_parameter_static_shapes": False}


def _rows(batch: dict) -> int | None:
    """Rows of the batch: the first dense column's first dimension or ragged column's rows."""
    for value in batch.values():
        if isinstance(value, RaggedTensor):
            return value.batch_size()
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _items(column: Any, name: str) -> int:
    """Host-known number of ids a column holds: a ragged column's innermost items (strings, for
    byte columns of two levels), a dense column's elements."""
    if isinstance(column, RaggedTensor):
        offsets = column.offsets()
        return column.values().shape[0] if len(offsets) == 1 else offsets[-1].shape[0] - 1
    if isinstance(column, Tensor):
        return column.numel()
    raise TypeError(f"fxrec.compile: column {name!r} is a {type(column).__name__}, not a Tensor or RaggedTensor")


def _feature_bound(feature, batch: dict, rows: int) -> int:
    """Upper bound of the distinct ids feature ``feature`` (a FeatureEngine feature) yields for
    ``batch``: min(number of ids, number of values its last range-limiting op allows)."""
    select, ops = feature.ops[0], feature.ops[1:]
    if isinstance(select, SelectFields):
        counts = [_items(batch[f.name], f.name) for f in select.fields]
    else:
        counts = [_items(batch[select.name], select.name)]
    count, distinct = counts[0], None
    for op in ops:
        if isinstance(op, FeatureCross):  # a row's pairs: at most the product of the two lengths
            count, distinct = counts[0] * counts[1], None
        elif isinstance(op, Mod):
            distinct = op.mod_value if distinct is None else min(distinct, op.mod_value)
        elif isinstance(op, Bucketize):
            distinct = len(op.boundaries) + 1
        elif isinstance(op, Hash):
            distinct = None
        elif isinstance(op, SequenceTruncate):
            if op.truncate and op.n_dims == 2:
                count = min(count, rows * op.seq_len)
        elif not isinstance(op, SelectField):
            raise TypeError(f"fxrec.compile: feature {feature.name!r}: no id bound for op {type(op).__name__}")
    return count if distinct is None else min(count, distinct)


def id_bounds(model: nn.Module, batch: dict) -> dict[HashTable, int]:
    """Per table of ``model``'s EmbeddingEngines: an upper bound of the distinct ids one forward
    on ``batch`` looks up, from tensor shapes and feature configs only (no device sync). A
    feature made by one of the model's FeatureEngines is bounded through its ops (``Mod(m)``: at
    most m values, ``Bucketize``: len(boundaries) + 1, ``SequenceTruncate``: seq_len per row,
    ``FeatureCross``: the product of its inputs' sizes); any other feature is the batch column
    of its name."""
    return _id_bounds(_bound_sources(model), batch)


def _bound_sources(model: nn.Module) -> tuple[dict[str, Any], list[EmbeddingEngine]]:
    """What ``id_bounds`` reads of ``model``: its FeatureEngines' features by name, its EmbeddingEngines."""
    features = {f.name: f for m in model.modules() if isinstance(m, FeatureEngine) for f in m.features}
    return features, [m for m in model.modules() if isinstance(m, EmbeddingEngine)]


def _id_bounds(sources: tuple[dict[str, Any], list[EmbeddingEngine]], batch: dict) -> dict[HashTable, int]:
    if not isinstance(batch, dict):
        raise TypeError(f"fxrec.compile: a batch must be a dict of columns, got {type(batch).__name__}")
    features, engines = sources
    rows = _rows(batch) or 0
    bounds: dict[HashTable, int] = {}
    for engine in engines:
        for name, option in engine.options.items():
            if name in features:
                n = _feature_bound(features[name], batch, rows)
            elif name in batch:
                n = _items(batch[name], name)
            else:
                raise ValueError(f"fxrec.compile: feature {name!r} of an EmbeddingEngine is neither made by a "
                                 "FeatureEngine of the model nor a column of the batch: no bound for its ids")
            table = engine.tables[option.shared_name]
            bounds[table] = bounds.get(table, 0) + n
    return bounds


class CompiledModel:
    """``model``'s forward compiled (module docstring). Call it as the model; ``.model`` is the
    model given, ``.module`` the unwrapped model (a DDP wrapper's ``.module``)."""

    def __init__(self, model: nn.Module, **compile_options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"fxrec.compile: model must be an nn.Module, got {type(model).__name__}")
        if "fullgraph" in compile_options or "dynamic" in compile_options:
            raise ValueError("fxrec.compile: fullgraph and dynamic are fxrec's to set (a DDP module cannot be "
                             "compiled fullgraph; dynamic dims are marked per batch)")
        self.model = model
        self.module = model.module if isinstance(model, DistributedDataParallel) else model
        rewrite_engines(self.module)
        # The engines are rewritten: what bounds a step's ids, and the training lookups into each
        # storage (a gradient leaf each per step), are fixed from here on, so found once.
        self._bound_sources = _bound_sources(self.module)
        self._lookups = collections.Counter(storage for engine in self._bound_sources[1]
                                            for storage in engine.trained_lookup_storages())

        # The model itself, not a function calling it: Dynamo compiles a DDP module's forward
        # (torch.compile of DDP) but breaks the graph where a compiled function calls one.
        self._compiled = torch.compile(model, **compile_options)

    def _prepare(self, batch: dict) -> list[TableStorage]:
        """Room and gradient leaves for this step's ids (module docstring), per storage (tables
        coalesced by ``fxrec.passes.table_coalesce`` share its room and its merged lookup, whose
        anchor holds the distinct ids of all of them); the storages given room."""
        bounds: dict[TableStorage, int] = {}
        for table, bound in _id_bounds(self._bound_sources, batch).items():
            if table.admits:
                bounds[table.storage] = bounds.get(table.storage, 0) + bound
        # Sharded, a storage's owner lookups insert the ids every rank sends this one: room for
        # every rank's bound (one all-reduce; the sinks stay bounded by this rank's own ids).
        room = sharded.owner_bounds(bounds.values())
        for (storage, bound), n in zip(bounds.items(), room):
            storage.reserve(n)
            for buffer in storage.buffers(recurse=False):  # the row buffers' capacity: a dynamic size
                if buffer.dim() > 0 and buffer.shape[0] == storage.capacity:
                    torch._dynamo.maybe_mark_dynamic(buffer, 0)
            if torch.is_grad_enabled() and self._lookups[storage]:
                zero = storage.embedding.new_zeros(())
                leaves = [zero.expand(bound, storage.dim).requires_grad_() for _ in range(self._lookups[storage])]
                for leaf in leaves:
                    torch._dynamo.decorators.mark_unbacked(leaf, 0)
                storage.grad_sinks = leaves
        return list(bounds)

    def __call__(self, batch: dict):
        if not self.module.training:
            return self.model(batch)
        if not isinstance(batch, dict):
            raise TypeError(f"fxrec.compile: a batch must be a dict of columns, got {type(batch).__name__}")
        storages = self._prepare(batch)
        clear_metrics()
        try:
            with torch._dynamo.config.patch(DYNAMO_CONFIG):
                out = self._compiled(dynamic_batch(batch))  # marked aliases, the caller's tensors unmarked
        finally:
            for storage in storages:
                storage.grad_sinks = []
        for storage in storages:  # the next step's reserve reads the count without a sync
            storage.snapshot_count()
        return out


def compile(model: nn.Module, **compile_options: Any) -> CompiledModel:
    """``model``'s forward under ``torch.compile`` (module docstring); ``compile_options`` go to
    ``torch.compile`` (``backend``, ``mode``, ``options``)."""
    return CompiledModel(model, **compile_options)

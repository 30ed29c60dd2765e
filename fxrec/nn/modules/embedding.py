"""``EmbeddingOption`` and ``EmbeddingEngine`` (SPEC §4.1–4.3), with RecIS's names and defaults.

Data path of one configured feature, one small function per step: ``EmbeddingEngine`` builds
them into ONE ``torch.fx.GraphModule`` at construction (``engine.graph_module``), which compiler
passes (SPEC §6, ``fxrec.passes``) rewrite — ``lookup_merge`` merges the lookups of one table:

1. ``_flat_ids``: the feature's value -> ``(values [N] int64, offsets [B + 1] int64, weight [N] | None)``.
   Accepted: a ``RaggedTensor`` with ONE ragged level (int64 values, optional float weight), a
   dense int64 ``[B, F]`` tensor (``F`` ids per row, SPEC §4.2) or ``[B]`` (one id per row).
   Anything else (two ragged levels, float or int32 values, 3-D tensors, a missing feature) is a
   ``TypeError``/``ValueError`` naming the feature: bad data never silently becomes ids. Floats
   in particular are not ids — bucketize them first (the seed tutorial's ``dense2`` is a float
   column, but its ``Bucketize`` turns it into int64 ``[B, 1]`` before the lookup).
   (``_feature_ids`` adds the check that the ids are on the table's device.)
2. ``_lookup_unique``: ``torch.unique`` -> ``HashTable.lookup`` (find-or-insert, no autograd)
   -> the table's ``embedding`` after the insert, ``rows [U]`` of the distinct ids, each item's
   ``inverse [N]`` into them (in a process group of several ranks the table is row-wise sharded:
   ``fxrec.distributed.sharded.lookup_rows`` fetches the ``[U, dim]`` rows from their owner
   ranks, which then stand for ``embedding``, with rows ``arange(U)``; for coalesced tables it
   sends (tag, id) pairs), and (trainable, training
   mode, grad enabled) ``HashTable.grad_anchor(rows, counts)``: a zero ``[U, dim]`` leaf
   (stride 0, no memory) that requires grad, whose gradient the sparse optimizer takes
   (``take_grads``); otherwise None. No ``[U, dim]`` gather, no ``[capacity, dim]`` gradient.
3. ``table_combine`` (weights through ``_weight_of``): ``torch.ops.fxrec.table_combine(embedding,
   rows, anchor, inverse, offsets, weight, combiner, tile_len)`` -> ``[B, dim]`` (sum / mean) or ``[B, tile_len * dim]``
   (tile): ONE op per lookup, the gather fused with the combiner (its kernels read
   ``table[rows[inverse[i]]]`` per item). Its backward is ``segment_combine_backward`` into the
   anchor: ``[U, dim]`` row gradients, each row's gradient summed over its occurrences.

Decisions:
- One ``HashTable`` per ``shared_name`` (``self.tables[shared_name]``, its ``name`` the shared
  name, so ``filter_out_sparse_param`` and the sparse optimizer key it by that name). Options
  sharing a table must agree on every property that changes the table's rows or gradients:
  ``embedding_dim``, ``block_size`` (the fan of Xavier / Kaiming initializers), ``dtype``,
  ``device``, ``initializer`` (``==``), ``grad_reduce_by``, ``filter_hook``, ``admit_hook``;
  otherwise ``ValueError`` naming both features and the table. Per-lookup properties
  (``trainable``, ``use_weight``, ``combiner``, ``combiner_kwargs``) may differ.
  A ``shared_name`` may not contain ``"."`` (a module name: ``nn.ModuleDict`` forbids it).
- Lookups are deduplicated per feature; two features of one table look it up one after the
  other (the second finds the ids the first inserted) and their gradients are summed per row by
  ``take_grads``. Merging them into one lookup is a compiler pass (``passes=True``), not a
  semantic change; so is coalescing tables of equal layout into one physical table, whose
  features are then all looked up at once (``table_coalesce``; ``HashTable.storage``). Every
  configured feature's ids are checked before any table is touched.
- ``trainable=False``: the feature's ids are still inserted and initialized (training mode), but
  its embeddings are constants: it contributes no gradient (another trainable feature of the
  same table still does).
- ``use_weight=False`` (or no weight): every weight is 1. Weights are data: passed detached.
- Eval mode (``engine.eval()``) and ``AdmitHook("ReadOnly")``: no inserts; an unseen id reads
  as a zero row (it is still an item of its row: it counts in ``mean``'s denominator and takes
  a ``tile`` slot) and gets no gradient.
- ``forward`` returns a new dict and never mutates its input: configured features become dense
  tensors; other entries pass through (a ``RaggedTensor`` as ``to_dense()``, anything else as is).
- Every item of a ragged value is looked up (items outside ``offsets[0]:offsets[-1]``, which
  fxrec's producers never emit, would be inserted and get a zero gradient).
"""

from __future__ import annotations

import itertools
import keyword
import operator
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.fx
from torch import Tensor, nn

from fxrec.distributed import sharded
from fxrec.distributed.env import is_distributed
from fxrec.nn.hashtable_hook import AdmitHook, FilterHook
from fxrec.nn.initializers import DEFAULT_BLOCK_SIZE, ConstantInitializer, Initializer
from fxrec.nn.modules.hashtable import GRAD_REDUCE_BY, HashTable, shared_grad_anchor
from fxrec.nn.modules.table_storage import TableStorage
from fxrec.ops.combine import COMBINERS
from fxrec.ops.table import TAG_SHIFT, tag_dtype, unique_rows, unique_tagged
from fxrec.ragged import RaggedTensor

__all__ = ["EmbeddingEngine", "EmbeddingOption"]

# The combiner_kwargs each combiner takes (all required).
_COMBINER_KWARGS = {"sum": (), "mean": (), "tile": ("tile_len",)}
# Options sharing a table must agree on these (they decide the table's rows and gradients).
_TABLE_FIELDS = ("embedding_dim", "block_size", "dtype", "device", "initializer", "grad_reduce_by",
                 "filter_hook", "admit_hook")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class EmbeddingOption:
    """How one feature is embedded (RecIS's ``EmbeddingOption`` fields and defaults).

    Args:
        embedding_dim: row width (int >= 1).
        block_size: the table's initial capacity hint and the fan of Xavier / Kaiming
            initializers (int >= 1).
        dtype: the table's floating dtype.
        device: the table's device (a ``torch.device`` or a string).
        trainable: whether the feature's lookups produce gradients.
        shared_name: the table's name; features with one ``shared_name`` share one table.
        initializer: the row initializer (``fxrec.nn.initializers``).
        use_weight: whether a ragged input's weights multiply its embeddings (sum / mean).
        combiner: ``"sum"``, ``"mean"`` or ``"tile"`` (SPEC §4.2).
        combiner_kwargs: ``{"tile_len": n}`` (n >= 1) for ``"tile"``; None or ``{}`` otherwise.
        grad_reduce_by: ``"worker"`` or ``"id"`` (SPEC §4.5).
        filter_hook: ``FilterHook`` (eviction) or None.
        admit_hook: ``AdmitHook("ReadOnly")`` or None.
    """

    embedding_dim: int = 16
    block_size: int = DEFAULT_BLOCK_SIZE
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    trainable: bool = True
    shared_name: str = "embedding"
    initializer: Initializer = field(default_factory=lambda: ConstantInitializer(0))
    use_weight: bool = True
    combiner: str = "sum"
    combiner_kwargs: dict | None = None
    grad_reduce_by: str = "worker"
    filter_hook: FilterHook | None = None
    admit_hook: AdmitHook | None = None

    def __post_init__(self) -> None:
        name = f"EmbeddingOption(shared_name={self.shared_name!r})"
        if not isinstance(self.shared_name, str) or not self.shared_name:
            raise TypeError(f"EmbeddingOption: shared_name must be a non-empty str, got {self.shared_name!r}")
        if not _is_int(self.embedding_dim) or self.embedding_dim < 1:
            raise ValueError(f"{name}: embedding_dim must be an int >= 1, got {self.embedding_dim!r}")
        if not _is_int(self.block_size) or self.block_size < 1:
            raise ValueError(f"{name}: block_size must be an int >= 1, got {self.block_size!r}")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"{name}: dtype must be a floating torch.dtype, got {self.dtype!r}")
        try:
            self.device = torch.device(self.device)
        except (TypeError, RuntimeError):
            raise TypeError(f"{name}: device must be a torch.device or a device string, got {self.device!r}") from None
        for flag in ("trainable", "use_weight"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{name}: {flag} must be a bool, got {getattr(self, flag)!r}")
        if not isinstance(self.initializer, Initializer):
            raise TypeError(f"{name}: initializer must be an fxrec.nn.initializers.Initializer, got {self.initializer!r}")
        if self.grad_reduce_by not in GRAD_REDUCE_BY:
            raise ValueError(f"{name}: grad_reduce_by must be one of {GRAD_REDUCE_BY}, got {self.grad_reduce_by!r}")
        if self.filter_hook is not None and not isinstance(self.filter_hook, FilterHook):
            raise TypeError(f"{name}: filter_hook must be a FilterHook or None, got {self.filter_hook!r}")
        if self.admit_hook is not None and not isinstance(self.admit_hook, AdmitHook):
            raise TypeError(f"{name}: admit_hook must be an AdmitHook or None, got {self.admit_hook!r}")
        self._check_combiner(name)

    def _check_combiner(self, name: str) -> None:
        if self.combiner not in COMBINERS:
            raise ValueError(f"{name}: combiner must be one of {COMBINERS}, got {self.combiner!r}")
        kwargs = self.combiner_kwargs
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, dict):
            raise TypeError(f"{name}: combiner_kwargs must be a dict or None, got {kwargs!r}")
        expected = _COMBINER_KWARGS[self.combiner]
        unknown = sorted(set(kwargs) - set(expected), key=str)
        if unknown:
            raise ValueError(
                f"{name}: combiner {self.combiner!r} takes combiner_kwargs {list(expected)}, got unknown {unknown}"
            )
        missing = [k for k in expected if k not in kwargs]
        if missing:
            raise ValueError(f"{name}: combiner {self.combiner!r} needs combiner_kwargs {missing}, e.g. {{'tile_len': 8}}")
        if self.combiner == "tile":
            tile_len = kwargs["tile_len"]
            if not _is_int(tile_len) or tile_len < 1:
                raise ValueError(f"{name}: combiner_kwargs['tile_len'] must be an int >= 1, got {tile_len!r}")

    @property
    def tile_len(self) -> int:
        """``combiner_kwargs["tile_len"]`` for ``"tile"``; 1 (unused) otherwise."""
        return self.combiner_kwargs["tile_len"] if self.combiner == "tile" else 1

    @property
    def output_width(self) -> int:
        """The width of the feature's output: ``tile_len * embedding_dim`` for tile, else the dim."""
        return self.tile_len * self.embedding_dim


def _check_shared(first: tuple[str, EmbeddingOption], other: tuple[str, EmbeddingOption]) -> None:
    """``ValueError`` if two options of one table disagree on a table property."""
    (name_a, a), (name_b, b) = first, other
    for f in _TABLE_FIELDS:
        va, vb = getattr(a, f), getattr(b, f)
        if va != vb:
            raise ValueError(
                f"EmbeddingEngine: features {name_a!r} and {name_b!r} share the table {a.shared_name!r} "
                f"but differ in {f} ({va!r} vs {vb!r})"
            )


def _make_table(option: EmbeddingOption) -> HashTable:
    return HashTable(
        embedding_shape=[option.embedding_dim],
        block_size=option.block_size,
        dtype=option.dtype,
        device=option.device,
        initializer=option.initializer,
        name=option.shared_name,
        grad_reduce_by=option.grad_reduce_by,
        filter_hook=option.filter_hook,
        admit_hook=option.admit_hook,
    )


# -- the per-feature steps (module docstring) ---------------------------------------------------------

def _flat_ids(name: str, value) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(values [N] int64, offsets [B + 1] int64, weight [N] | None)`` of a feature's ids."""
    if isinstance(value, RaggedTensor):
        offsets = value.offsets()
        if len(offsets) != 1:
            raise ValueError(
                f"EmbeddingEngine: feature {name!r} has {len(offsets)} ragged levels; an embedding lookup "
                "takes one (rows of ids)"
            )
        values = value.values()
        if values.dtype != torch.int64:
            raise TypeError(f"EmbeddingEngine: feature {name!r} has {values.dtype} values; ids must be int64")
        if values.dim() != 1:
            raise ValueError(
                f"EmbeddingEngine: feature {name!r} has values of shape {tuple(values.shape)}; ids must be 1-D"
            )
        weight = value.weight()
        if weight is not None and not weight.dtype.is_floating_point:
            raise TypeError(f"EmbeddingEngine: feature {name!r} has {weight.dtype} weights; they must be floating point")
        return values, offsets[0], weight
    if isinstance(value, Tensor):
        if value.dtype != torch.int64:
            hint = " (bucketize float features first)" if value.dtype.is_floating_point else ""
            raise TypeError(f"EmbeddingEngine: feature {name!r} is a {value.dtype} tensor; ids must be int64{hint}")
        if value.dim() not in (1, 2):
            raise ValueError(
                f"EmbeddingEngine: feature {name!r} is a dense tensor of shape {tuple(value.shape)}; "
                "ids must be [B] or [B, F]"
            )
        per_row = value.shape[1] if value.dim() == 2 else 1
        offsets = torch.arange(value.shape[0] + 1, dtype=torch.int64, device=value.device) * per_row
        return value.reshape(-1), offsets, None
    raise TypeError(
        f"EmbeddingEngine: feature {name!r} must be a RaggedTensor or an int64 tensor, got {type(value).__name__}"
    )


def _feature_ids(name: str, value, table: HashTable) -> tuple[Tensor, Tensor, Tensor | None]:
    """``_flat_ids`` of a feature, checked to be on its table's device."""
    values, offsets, weight = _flat_ids(name, value)
    if values.device != table.device:
        raise ValueError(
            f"EmbeddingEngine: feature {name!r} is on {values.device}, its table {table.name!r} "
            f"on {table.device}"
        )
    return values, offsets, weight


def _lookup_unique(table: HashTable, values: Tensor, trainable: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """``(embedding, rows [U], anchor [U, dim] | None, inverse [N])``: the table's embedding after
    the lookup (an insert may have grown, i.e. replaced, it), the table rows of the distinct ids,
    the anchor their gradients reach the table through, and each item's distinct id. Mutates the
    table (inserts, ``last_seen``, a pending gradient): one opaque graph node."""
    uniq, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    embedding, rows = sharded.lookup_rows(table, uniq)
    anchor = sharded.grad_anchor(table, uniq, rows, counts) if trainable else None
    return embedding, rows, anchor, inverse


def _run_tags(runs: list[tuple[int, int]], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Each id's tag, ``runs`` of ``(tag, length)`` laid end to end: one fill per run."""
    return torch.cat([torch.full((n,), tag, dtype=dtype, device=device) for tag, n in runs])


def _lookup_items(storage: TableStorage, members: list[HashTable], flat: Tensor,
                  runs: list[tuple[int, int]] | None) -> tuple:
    """A merged lookup that inserts, in one process: ``(embedding, rows [U], tags [U] | None,
    inverse [N], counts [U] | None)`` of ids ``flat [N]`` of ``members`` (``runs``: their tags as
    runs of ``(tag, length)``; None: all ``members[0]``'s). The index finds (or inserts) the row
    of every id, repeats and all, and the distinct ROWS are the dedup (``fxrec::unique_rows``: a
    mark per slot of the index, no sort of the ids: the (tag, id) sort it replaces took ~0.7 ms
    of GPU time for the 6.2M ids of the tutorial's step on an H200, the host waiting for its
    count). A distinct row is a distinct (tag, id) pair; each row's tag is read from the index.
    ``counts`` (occurrences) only if a member reduces its gradients by id."""
    tags = storage.tags_of(flat, members[0].tag) if runs is None else _run_tags(runs, torch.int32, flat.device)
    rows, inverse = unique_rows(storage.lookup(flat, tags, members), storage.capacity)
    uniq_tags = None if runs is None else (storage.state[rows] >> TAG_SHIFT).to(torch.int32)
    counts = None
    if any(t.grad_reduce_by == "id" for t in members):
        counts = torch.zeros(rows.shape, dtype=torch.int64, device=rows.device).scatter_add_(
            0, inverse, torch.ones_like(inverse))
    return storage.embedding, rows, uniq_tags, inverse, counts


def _lookup_unique_merged(tables: tuple[HashTable, ...], values: list[Tensor], trainable: tuple[bool, ...]) -> tuple:
    """Several features' lookups as ONE dedup and ONE lookup (the ``lookup_merge`` and
    ``table_coalesce`` passes): feature ``i``'s ids ``values[i]`` are of ``tables[i]``, and every
    table is of ONE storage (one table, or tables coalesced into one). Returns ``((embedding,
    rows, anchor, inverse), ...)`` per feature, each feature's ``inverse`` its slice of the shared
    inverse. Ids are deduplicated as (table tag, id) pairs, so the same id of two tables gets two
    rows: in one process, inserting, by their rows after one lookup of every id
    (``_lookup_items``); else (sharded: the pairs are sent to their owners; or not inserting) by
    a sort of the pairs before the lookup. The anchor covers the rows of the trainable features' ids only, with their occurrences
    there, and each table records its own rows of it (``shared_grad_anchor``), so that every
    table's ``take_grads`` returns what the features' own lookups would: a storage both trainable
    and non-trainable features read gives the trainable ones ``rows[used]`` and the inverse
    remapped into it. Features of one ``trainable`` flag get the SAME (embedding, rows, anchor)
    tensors: the ``combine_fusion`` pass combines them in one ``table_combine_multi``."""
    storage = tables[0].storage
    strangers = [t.name for t in tables if t.storage is not storage]
    if strangers:
        raise ValueError(f"EmbeddingEngine: a merged lookup reads tables {strangers} and {tables[0].name!r}, "
                         "which do not share one storage (coalesce them first)")
    members = list({id(t): t for t in tables}.values())
    sizes = [v.shape[0] for v in values]
    flat = torch.cat(values)
    one_tag = len({t.tag for t in tables}) == 1  # one table's ids: no tags to tell apart (or to send)
    # runs of consecutive features of one table: one tag fill per run, not one per feature
    runs = [(tag, sum(n for n, _ in run))
            for tag, run in itertools.groupby(zip(sizes, tables), key=lambda size_table: size_table[1].tag)]
    if tables[0].admits and not is_distributed():
        embedding, rows, uniq_tags, inverse, counts = _lookup_items(storage, members, flat, None if one_tag else runs)
        ids = None
    else:
        if one_tag:
            uniq, inverse, counts = torch.unique(flat, return_inverse=True, return_counts=True)
            uniq_tags = None
        else:
            dtype = tag_dtype(max(t.tag for t in tables))  # the narrowest: a faster tag sort
            uniq, uniq_tags, inverse, counts = unique_tagged(flat, _run_tags(runs, dtype, flat.device))
        # one process: one tagged lookup in the storage; sharded: the (tag, id) pairs go to the
        # ids' owners, each does one tagged lookup in its storage (fxrec.distributed.sharded)
        embedding, rows = sharded.lookup_rows(members, uniq, uniq_tags)
        ids = sharded.anchor_ids(uniq)  # sharded: gradients recorded by id
    inverses = torch.split(inverse, sizes)
    trained_tables = list({id(t): t for t, keep in zip(tables, trainable) if keep}.values())
    if not trained_tables:
        return tuple((embedding, rows, None, inv) for inv in inverses)
    if all(trainable):
        anchor = shared_grad_anchor(trained_tables, rows, uniq_tags, counts, ids)
        return tuple((embedding, rows, anchor, inv) for inv in inverses)
    mask = torch.cat([inverse.new_full((n,), t, dtype=torch.bool) for n, t in zip(sizes, trainable)])
    trained_counts = torch.bincount(inverse[mask], minlength=rows.shape[0])
    used = trained_counts > 0
    trained_rows = rows[used]
    anchor = shared_grad_anchor(trained_tables, trained_rows, None if uniq_tags is None else uniq_tags[used],
                                trained_counts[used], None if ids is None else ids[used])
    if anchor is None:
        return tuple((embedding, rows, None, inv) for inv in inverses)
    remap = torch.cumsum(used, 0) - 1
    return tuple(
        (embedding, trained_rows, anchor, remap[inv]) if t else (embedding, rows, None, inv)
        for inv, t in zip(inverses, trainable)
    )


def _own_columns(out: Tensor, table: HashTable, combiner: str, tile_len: int) -> Tensor:
    """A feature's embedding in its table's ``dim`` columns. ``table_combine`` reads the storage's
    rows at their full width; a table coalesced with wider tables (``table_storage``: mixed dims)
    keeps the first ``dim`` columns of each combined row, of each tile slot with ``"tile"``
    (a copy, contiguous as a combine's output is). ``out`` itself where the widths agree."""
    if table.storage.dim == table.dim:
        return out
    if combiner == "tile":
        return out.unflatten(1, (tile_len, table.storage.dim))[..., :table.dim].flatten(1)
    return table.own_columns(out).contiguous()


def _weight_of(weight: Tensor | None, use_weight: bool) -> Tensor | None:
    """The weights ``table_combine`` takes: detached (data), or None without ``use_weight``."""
    return weight.detach() if (weight is not None and use_weight) else None


def _placeholder_names(features: list[str]) -> list[str]:
    """Python identifiers for the graph's inputs: a feature's name where it is one."""
    names: list[str] = []
    for i, feature in enumerate(features):
        name = feature if feature.isidentifier() and not keyword.iskeyword(feature) else f"feature_{i}"
        while name in names or name in features[i + 1:]:
            name += "_"
        names.append(name)
    return names


class EmbeddingEngine(nn.Module):
    """Looks up every configured feature of a batch dict (module docstring).

    The configured features' data path is ONE ``torch.fx.GraphModule`` (``engine.graph_module``),
    built here from the options before any data is seen, which compiler passes rewrite: its
    inputs are the features' values (in ``options`` order); per feature a ``_feature_ids`` node
    (flat ids, checked, errors naming the feature), then per feature a ``_lookup_unique`` node (one
    opaque node: it mutates the table, ``tables.<shared_name>``, a ``get_attr``), a
    ``fxrec::table_combine`` node and an ``_own_columns`` node (the table's columns of the
    storage's rows: a no-op unless the table is coalesced with wider ones); its outputs are the
    embedded features. Every feature is checked before any table is touched.

    Args:
        options: ``{feature name: EmbeddingOption}``.
        passes: ``False`` (default) runs the graph as built; ``True`` rewrites it once, here, with
            ``fxrec.passes.DEFAULT_EMBEDDING_PASSES`` (lookup merge: one dedup and one lookup per
            table; table coalescing: tables of equal layout share one physical table and one
            lookup; combine fusion: one ``table_combine_multi`` for the features of one lookup,
            one ``[U, dim]`` gradient); a sequence of passes runs those. Outputs and gradients are the same either
            way (row numbers may differ: ids are inserted in another order). ``fxrec.passes.explain(engine)``
            shows what the passes do.
    """

    def __init__(self, options: dict[str, EmbeddingOption], passes: bool | Sequence = False) -> None:
        super().__init__()
        if not isinstance(options, dict):
            raise TypeError(f"EmbeddingEngine: options must be a dict of feature name -> EmbeddingOption, "
                            f"got {type(options).__name__}")
        owners: dict[str, tuple[str, EmbeddingOption]] = {}
        for feature, option in options.items():
            if not isinstance(feature, str) or not feature:
                raise TypeError(f"EmbeddingEngine: feature names must be non-empty str, got {feature!r}")
            if not isinstance(option, EmbeddingOption):
                raise TypeError(f"EmbeddingEngine: feature {feature!r}: expected an EmbeddingOption, got {option!r}")
            if "." in option.shared_name:
                raise ValueError(f"EmbeddingEngine: feature {feature!r}: shared_name {option.shared_name!r} "
                                 "must not contain '.' (it names a submodule)")
            if option.shared_name in owners:
                _check_shared(owners[option.shared_name], (feature, option))
            else:
                owners[option.shared_name] = (feature, option)
        self._options = dict(options)
        self.tables = nn.ModuleDict({shared: _make_table(option) for shared, (_, option) in owners.items()})
        # Not a registered submodule: the graph shares the engine's tables (the same HashTable
        # objects), which must appear once in state_dict / named_modules, under ``tables``.
        object.__setattr__(self, "graph_module", self.build_graph())
        self.rewritten = False
        if passes is not False:
            self.rewrite(passes)

    def rewrite(self, passes: bool | Sequence = True) -> None:
        """Rewrite the graph with ``passes`` (``True``: ``fxrec.passes.DEFAULT_EMBEDDING_PASSES``),
        as the constructor's ``passes`` does; ``fxrec.compile`` rewrites an engine built without."""
        from fxrec.passes import DEFAULT_EMBEDDING_PASSES, apply_passes  # passes import this module

        gm = apply_passes(self.graph_module, passes, DEFAULT_EMBEDDING_PASSES, "EmbeddingEngine")
        object.__setattr__(self, "graph_module", gm)
        self.rewritten = self.rewritten or passes is not False

    def build_graph(self) -> torch.fx.GraphModule:
        """The graph of the configured features as built from the options, before any pass (class
        docstring); it shares this engine's tables."""
        graph = torch.fx.Graph()
        features = list(self._options)
        inputs = [graph.placeholder(name) for name in _placeholder_names(features)]
        tables = {}
        for option in self._options.values():
            if option.shared_name not in tables:
                tables[option.shared_name] = graph.get_attr(f"tables.{option.shared_name}")

        def item(node, i):
            return graph.call_function(operator.getitem, (node, i))

        parts = []
        for feature, value in zip(features, inputs):
            table = tables[self._options[feature].shared_name]
            triple = graph.call_function(_feature_ids, (feature, value, table))
            parts.append((item(triple, 0), item(triple, 1), item(triple, 2)))
        outputs = []
        for feature, (values, offsets, weight) in zip(features, parts):
            option = self._options[feature]
            found = graph.call_function(_lookup_unique, (tables[option.shared_name], values, option.trainable))
            embedding, rows, anchor, inverse = (item(found, i) for i in range(4))
            w = graph.call_function(_weight_of, (weight, option.use_weight))
            combined = graph.call_function(
                torch.ops.fxrec.table_combine.default,
                (embedding, rows, anchor, inverse, offsets, w, option.combiner, option.tile_len),
            )
            table = tables[option.shared_name]
            outputs.append(graph.call_function(_own_columns, (combined, table, option.combiner, option.tile_len)))
        graph.output(tuple(outputs))
        graph.lint()
        return torch.fx.GraphModule(self, graph, class_name="EmbeddingGraph")

    @property
    def options(self) -> dict[str, EmbeddingOption]:
        return dict(self._options)

    def table_of(self, feature: str) -> HashTable:
        """The table the feature looks up."""
        return self.tables[self._options[feature].shared_name]

    def trained_lookup_storages(self) -> list[TableStorage]:
        """The storage of each lookup node of the graph (as rewritten) that trains, i.e. makes one
        gradient anchor per call: what ``fxrec.compile`` gives a gradient leaf each step."""
        storages = []
        for node in self.graph_module.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target is _lookup_unique and node.args[2]:
                table = node.args[0]
            elif node.target is _lookup_unique_merged and any(node.args[2]):
                table = node.args[0][0]  # every table of a merged lookup is of one storage
            else:
                continue
            storages.append(self.graph_module.get_submodule(table.target).storage)
        return storages

    def extra_repr(self) -> str:
        return "features=" + ", ".join(f"{f}->{o.shared_name}" for f, o in self._options.items())

    def lookup(self, name: str, value) -> Tensor:
        """The embedding of one feature: ``[B, dim]`` (sum / mean) or ``[B, tile_len * dim]`` (tile)."""
        option = self._options[name]
        table = self.tables[option.shared_name]
        values, offsets, weight = _feature_ids(name, value, table)
        embedding, rows, anchor, inverse = _lookup_unique(table, values, option.trainable)
        combined = torch.ops.fxrec.table_combine(embedding, rows, anchor, inverse, offsets,
                                                 _weight_of(weight, option.use_weight), option.combiner, option.tile_len)
        return _own_columns(combined, table, option.combiner, option.tile_len)

    def forward(self, samples: dict) -> dict:
        """A new dict: configured features embedded, other entries passed through (RaggedTensors
        as ``to_dense()``). The input dict is not modified."""
        if not isinstance(samples, dict):
            raise TypeError(f"EmbeddingEngine: samples must be a dict, got {type(samples).__name__}")
        missing = [name for name in self._options if name not in samples]
        if missing:
            raise ValueError(f"EmbeddingEngine: features {missing} have an EmbeddingOption but are not in the batch")
        embedded = dict(zip(self._options, self.graph_module(*[samples[name] for name in self._options])))
        out = {}
        for name, value in samples.items():
            if name in embedded:
                out[name] = embedded[name]
            elif isinstance(value, RaggedTensor):
                out[name] = value.to_dense()
            else:
                out[name] = value
        return out

"""``HashTable``: a dynamic embedding table (SPEC §4.4), and ``filter_out_sparse_param``.

Any int64 is an id (0, negatives, INT64_MIN/MAX). The table maps ids to rows through the index
ops ``fxrec::table_find`` / ``fxrec::table_find_or_insert`` (``fxrec.ops.table``: open
addressing, slot == row) and keeps, row for row, the ``embedding [capacity, dim]``, the step that
last looked each row up (``last_seen``, for eviction), and the optimizer's slots (``slot``:
moments, accumulators), tensors that ``.to()``/``.cuda()`` move and no dense optimizer sees.
They live in the table's ``storage`` (``fxrec.nn.modules.table_storage.TableStorage``), the
physical table: its own, or one shared with other tables that ``table_coalesce`` coalesced with
it, where the table's ids carry its ``tag`` in the index. ``keys``, ``state``, ``embedding``,
``last_seen`` and the slots are the storage's (rows of other tables included); ``items()``,
``find()``, ``len()``, ``state_dict()`` and eviction see this table's ids only.

Lookups:
- ``lookup(ids) -> rows``: in training mode (and without ``AdmitHook("ReadOnly")``) unseen ids
  are inserted, their rows initialized by the initializer from (table seed, id) alone
  (``fxrec::init_rows``: the same id gets the same row on CPU and CUDA, in any insertion order);
  otherwise unseen ids get row -1.
- ``grad_anchor(rows, counts) -> anchor | None``: where gradients reach the table. The embedding
  layer reads rows through ``fxrec::table_combine(table.embedding, rows, anchor, ...)`` (the lookup
  fused with the combiner, ``fxrec/ops/combine.py``), whose result is
  ``table[rows] + anchor`` combined: in training mode with grad enabled the anchor is an all-zero
  ``[U, dim]`` leaf that requires grad, the storage's ``zero.expand(U, dim)`` (strides ``(0, 0)``: no
  memory), recorded with its rows as a pending gradient. After ``backward()`` its ``.grad`` is the
  ``[U, dim]`` gradient of the touched rows, which the sparse optimizer takes (``take_grads``):
  never a dense ``[capacity, dim]`` gradient (DESIGN.md); the table itself is a buffer and gets no
  autograd gradient. Otherwise (eval mode, grad disabled) there is no anchor (None). Rows -1 get
  no gradient. This is the only way gradients reach a table. (``dim`` here is the storage's: a
  table coalesced with wider tables reads their full-width rows and keeps its own columns,
  ``table_storage``: mixed dims; its ``take_grads`` and ``embedding`` are its columns.)
  Under ``fxrec.compile`` the anchor cannot be made inside the compiled graph (Dynamo does not
  trace ``requires_grad_()`` on an intermediate on torch 2.11, and on 2.13 breaks the graph when
  such a leaf outlives it, as a pending gradient does): ``fxrec.compile`` gives the table's
  storage, before each step, one zero leaf per training lookup into it, ``[bound, storage dim]``
  (stride 0) with ``bound`` a host-known upper bound of the step's distinct ids
  (``TableStorage.grad_sinks``); the lookup's anchor is its first
  ``U`` rows (a view; for a sharded lookup a copy, ``shared_grad_anchor`` says why), and
  ``take_grads`` reads the first ``U`` rows of its ``.grad``.
- ``forward(ids) -> [*ids.shape, dim]``: the embeddings of ``ids`` (duplicates looked up once):
  ``table_combine`` with one item per output row (the ``tile`` combiner, ``tile_len=1``: a copy),
  so it trains through the same anchor. In a process group of several ranks it is a sharded
  lookup (``fxrec.distributed.sharded``: a collective).
- ``gather(rows) -> [*rows.shape, dim]``: the rows' embeddings, zeros for -1, a plain read
  without gradient (``fxrec::gather_rows``).

Room: the index keeps its load <= 1/2. Before inserting ``n`` ids the table grows (capacity
doubles until it fits) by rebuilding the index and moving every row buffer (``storage.rebuild``); the
gradients waiting in the table follow their rows. Eviction (``evict_stale``, with
``FilterHook("GlobalStepFilter", {"filter_step": N})``) rebuilds the index without the ids not
looked up in the last ``N`` steps (the table's ``step`` counts sparse-optimizer updates,
``advance_step``); their rows become free for new ids.

``state_dict`` holds ``ids [n]``, ``embedding [n, dim]``, ``last_seen [n]``, ``step`` and one
``slot.<name> [n, width]`` per optimizer slot, rows in ascending row order (row numbers are not
state: loading rebuilds the index and may place ids elsewhere).

Row cap: ``FXREC_MAX_ROWS_PER_RANK`` (an int, read when the table is built) caps how many ids one
process's table may hold (a stand-in for one device's memory): an insert or a load beyond it is a
``ValueError`` naming the table. Sharded over W ranks (``fxrec.distributed.sharded``), each rank
holds only the ids it owns, so a table of more rows than the cap trains when spread. The cap is
per LOGICAL table: a table coalesced with others counts its own ids (``count``), not the
storage's.

Host syncs: the table counts its ids on the device (``count``, a 0-d int64 tensor, its entry of
the storage's ``counts``); an eager training lookup reserves room for its ids (``reserve``),
which reads that count (one sync) only when the host's upper bound of the ids held (the last
count plus every reservation since) leaves no room: in a steady state, a sync every few lookups. Under
``torch.compile`` the lookup does not reserve (growth replaces buffers, which a graph cannot): the
caller reserves room for a step's ids before the compiled step, and the lookup syncs nothing.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from fxrec.distributed import sharded
from fxrec.nn.hashtable_hook import AdmitHook, FilterHook
from fxrec.nn.initializers import DEFAULT_BLOCK_SIZE, ConstantInitializer, Initializer
from fxrec.nn.modules.table_storage import TableStorage, capacity_for
from fxrec.ops.table import EMPTY, filled_state, run_starts, table_items

__all__ = ["GRAD_REDUCE_BY", "MAX_ROWS_ENV", "HashTable", "filter_out_sparse_param", "shared_grad_anchor",
           "take_storage_grads"]

GRAD_REDUCE_BY = ("worker", "id")
MAX_ROWS_ENV = "FXREC_MAX_ROWS_PER_RANK"


def _seed_of(name: str) -> int:
    """A stable int64 seed from a table name (the same on every process and run)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little", signed=True)


def _max_rows_per_rank() -> int | None:
    """``FXREC_MAX_ROWS_PER_RANK`` as an int >= 1, or None when unset (module docstring: row cap)."""
    value = os.environ.get(MAX_ROWS_ENV, "")
    if value == "":
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"environment variable {MAX_ROWS_ENV} must be an int >= 1, got {value!r}")
    return int(value)


@dataclass
class _PendingGrad:
    """Rows a lookup read this step, the anchor their gradient accumulates in, and how often each
    occurred."""

    # int64 [U]: the lookup's rows, of every table that shares the anchor (``take_storage_grads``)
    lookup_rows: Tensor
    # [U', dim] zeros (stride 0, U' >= U: a grad sink of fxrec.compile), a leaf that requires
    # grad; after backward the first U rows of .grad are the rows' gradients
    anchor: Tensor
    counts: Tensor  # [U] (int64 from a dedup, or float32), read only by "id" tables and sharded lookups
    tags: Tensor | None  # [U]: each row's table tag where the lookup read several tables, else None
    ids: Tensor | None = None  # int64 [U] for a sharded lookup, whose rows are not this table's (take_id_grads)


class HashTable(nn.Module):
    """A dynamic embedding table (module docstring).

    Args (RecIS's, plus ``admit_hook`` and ``seed``):
        embedding_shape: ``[dim]`` (or an int ``dim``).
        block_size: the initial capacity hint, and the fan-out of Xavier / Kaiming initializers.
        dtype, device: of the embedding.
        initializer: the row initializer (default ``ConstantInitializer(0)``).
        name: the table's name (``EmbeddingOption.shared_name``); keys the sparse optimizer's state.
        grad_reduce_by: ``"worker"`` (sum over occurrences / WORLD_SIZE) or ``"id"`` (mean over
            occurrences), SPEC §4.5.
        filter_hook: ``FilterHook`` for eviction, or None.
        admit_hook: ``AdmitHook("ReadOnly")`` to never insert, or None.
        seed: the int64 table seed of the initializer; default: derived from ``name``.
    """

    def __init__(
        self,
        embedding_shape: list[int] | tuple[int, ...] | int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        initializer: Initializer | None = None,
        name: str = "hashtable",
        grad_reduce_by: str = "worker",
        filter_hook: FilterHook | None = None,
        admit_hook: AdmitHook | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        shape = [embedding_shape] if isinstance(embedding_shape, int) else list(embedding_shape)
        if len(shape) != 1 or isinstance(shape[0], bool) or not isinstance(shape[0], int) or shape[0] < 1:
            raise ValueError(f"HashTable {name!r}: embedding_shape must be [dim] with dim >= 1, got {embedding_shape!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"HashTable {name!r}: block_size must be an int >= 1, got {block_size!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"HashTable {name!r}: dtype must be a floating dtype, got {dtype}")
        initializer = ConstantInitializer(0.0) if initializer is None else initializer
        if not isinstance(initializer, Initializer):
            raise TypeError(f"HashTable {name!r}: initializer must be an fxrec Initializer, got {initializer!r}")
        if grad_reduce_by not in GRAD_REDUCE_BY:
            raise ValueError(f"HashTable {name!r}: grad_reduce_by must be one of {GRAD_REDUCE_BY}, got {grad_reduce_by!r}")
        if filter_hook is not None and not isinstance(filter_hook, FilterHook):
            raise TypeError(f"HashTable {name!r}: filter_hook must be a FilterHook, got {filter_hook!r}")
        if admit_hook is not None and not isinstance(admit_hook, AdmitHook):
            raise TypeError(f"HashTable {name!r}: admit_hook must be an AdmitHook, got {admit_hook!r}")
        self.name = name
        self.dim = shape[0]
        self.dtype = dtype
        self.block_size = block_size
        self.initializer = initializer
        self.grad_reduce_by = grad_reduce_by
        self.filter_hook = filter_hook
        self.admit_hook = admit_hook
        self.seed = _seed_of(name) if seed is None else int(seed)
        self.max_rows = _max_rows_per_rank()
        self._slot_widths: dict[str, int] = {}  # the optimizer slots this table uses (its state_dict's), their widths
        self._pending: list[_PendingGrad] = []
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        storage = TableStorage(self.dim, dtype, capacity_for(block_size // 2), device)
        self.attach(storage, storage.add_member(self))

    # -- the storage (module docstring) ---------------------------------------------------------

    def attach(self, storage: TableStorage, tag: int) -> None:
        """Read and write rows through ``storage`` as its member ``tag`` (``coalesce_tables``)."""
        # Not a submodule: DDP and state_dict must not see the storage's tensors (table_storage).
        object.__setattr__(self, "storage", storage)
        self.tag = tag

    def _apply(self, fn, recurse=True):
        self.storage._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def own_columns(self, rows: Tensor) -> Tensor:
        """This table's columns (its first ``dim``) of ``rows [..., storage dim]``: a view; the
        rows themselves where the storage is as wide as the table (not coalesced with wider
        tables, ``table_storage``)."""
        return rows if self.storage.dim == self.dim else rows[..., :self.dim]

    keys = property(lambda self: self.storage.keys, doc="The storage's index keys (every member's).")
    state = property(lambda self: self.storage.state, doc="The storage's index states (every member's).")
    embedding = property(lambda self: self.own_columns(self.storage.embedding),
                         doc="The storage's rows [capacity, dim]: this table's columns of them.")
    last_seen = property(lambda self: self.storage.last_seen, doc="The step that last looked each row up.")

    @property
    def device(self) -> torch.device:
        return self.storage.keys.device

    @property
    def count(self) -> Tensor:
        """The number of this table's ids, a 0-d int64 tensor on the device (no sync)."""
        return self.storage.counts[self.tag]

    # -- sizes -----------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.storage.capacity

    def __len__(self) -> int:
        """The number of ids in the table (a host sync)."""
        return int(self.count)

    def items(self) -> tuple[Tensor, Tensor]:
        """``(ids, rows)`` of this table's ids, rows ascending."""
        return table_items(self.keys, self.state, self.tag)

    def find(self, ids: Tensor) -> Tensor:
        """The rows of ``ids`` (their shape), -1 where absent: a read (no insert, no ``last_seen``)."""
        return torch.ops.fxrec.table_find(self.keys, self.state, ids, self.storage.tags_of(ids, self.tag))

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, dim={self.dim}, dtype={self.dtype}, size={len(self)}, capacity={self.capacity}, "
            f"initializer={self.initializer!r}, grad_reduce_by={self.grad_reduce_by!r}"
        )

    @property
    def admits(self) -> bool:
        """Whether a lookup now inserts unseen ids: training mode without a ReadOnly admit hook."""
        return self.training and self.admit_hook is None

    # -- optimizer slots ---------------------------------------------------------------------------

    def slot(self, name: str, width: int, init: float = 0.0) -> Tensor:
        """The optimizer slot ``name``: a float32 ``[capacity, width]`` tensor of the storage,
        sharing the row index, created on first use with every row ``init`` (new ids' rows get
        ``init`` too)."""
        self.storage.slot(name, self.storage.slot_width(width, self.dim), init, self.name)
        self._slot_widths[name] = width
        return self._own_slot(name)

    def slots(self) -> dict[str, Tensor]:
        """The slots this table uses, by name (its columns of per-column slots)."""
        return {name: self._own_slot(name) for name in sorted(self._slot_widths)}

    def _own_slot(self, name: str) -> Tensor:
        """The storage's slot ``name``: its first columns, as many as this table asked for (a
        narrower table's own columns of a per-column slot, ``table_storage``: mixed dims)."""
        tensor, width = getattr(self.storage, f"slot_{name}"), self._slot_widths[name]
        return tensor if tensor.shape[1] == width else tensor[:, :width]

    # -- lookup --------------------------------------------------------------------------------------

    def _check_ids(self, ids: Tensor) -> None:
        if not isinstance(ids, Tensor):
            raise TypeError(f"HashTable {self.name!r}: ids must be a Tensor, got {type(ids).__name__}")
        if ids.dtype != torch.int64:
            raise TypeError(f"HashTable {self.name!r}: ids must be int64, got {ids.dtype}")
        if ids.device != self.keys.device:
            raise ValueError(f"HashTable {self.name!r}: ids are on {ids.device}, the table on {self.keys.device}")

    def _check_row_cap(self, n: int) -> None:
        if self.max_rows is not None and n > self.max_rows:
            raise ValueError(
                f"HashTable {self.name!r}: {n} ids exceed this rank's cap of {self.max_rows} rows "
                f"({MAX_ROWS_ENV}); shard the table over more ranks"
            )

    def reserve(self, n: int) -> None:
        """Grow, if needed, so that ``n`` more ids fit at load <= 1/2 (a host sync when the host's
        bound of the ids held leaves no room: ``TableStorage.reserve``)."""
        self.storage.reserve(n)

    def lookup(self, ids: Tensor) -> Tensor:
        """int64 rows of ``ids`` (their shape): unseen ids are inserted when the table admits,
        else get -1 (module docstring)."""
        self._check_ids(ids)
        flat = ids.reshape(-1)
        return self.storage.lookup(flat, self.storage.tags_of(flat, self.tag), [self]).reshape(ids.shape)

    def gather(self, rows: Tensor) -> Tensor:
        """``[*rows.shape, dim]``: the rows' embeddings, zeros where a row is -1. A read: no
        gradient reaches the table through it (``grad_anchor`` / ``forward`` for that)."""
        flat = rows.reshape(-1)
        return self.own_columns(torch.ops.fxrec.gather_rows(self.storage.embedding, flat)).reshape(*rows.shape, self.dim)

    def grad_anchor(self, rows: Tensor, counts: Tensor | None = None, ids: Tensor | None = None) -> Tensor | None:
        """The anchor of ``fxrec::table_combine`` for unique ``rows [U]`` (module docstring): in
        training mode with grad enabled a zero ``[U, dim]`` leaf (stride 0) that requires grad,
        recorded with ``rows`` so that ``take_grads`` finds its gradient; else None. ``counts
        [U]`` (default 1 each): how often each row occurs in the batch, for ``grad_reduce_by="id"``.
        ``ids [U]``: a sharded lookup (``fxrec.distributed.sharded``), whose rows index the rows
        fetched from the owners, not this table: the gradient is recorded by id, for
        ``take_id_grads``."""
        if rows.dim() != 1:
            raise ValueError(f"HashTable {self.name!r}: grad_anchor takes 1-D rows [U], got shape {tuple(rows.shape)}")
        return shared_grad_anchor([self], rows, None, counts, ids)

    def forward(self, ids: Tensor) -> Tensor:
        """The embeddings ``[*ids.shape, dim]`` of ``ids`` (module docstring)."""
        self._check_ids(ids)
        uniq, inverse, counts = torch.unique(ids.reshape(-1), return_inverse=True, return_counts=True)
        embedding, rows = sharded.lookup_rows(self, uniq)
        anchor = sharded.grad_anchor(self, uniq, rows, counts)
        n = inverse.shape[0]
        one_each = torch.arange(n + 1, dtype=torch.int64, device=inverse.device)
        emb = torch.ops.fxrec.table_combine(embedding, rows, anchor, inverse, one_each, None, "tile", 1)
        return self.own_columns(emb).reshape(*ids.shape, self.dim)

    # -- gradients ------------------------------------------------------------------------------------

    def take_grads(self) -> tuple[Tensor, Tensor]:
        """``(rows [R], grads [R, dim])`` of every row the pending lookups touched, each row once,
        gradients reduced per ``grad_reduce_by`` (one process: ``"worker"`` divides by WORLD_SIZE
        = 1); clears the pending lookups. Rows -1 are padding, their gradients meaningless: ids
        without a row, other tables' entries of a shared anchor, and the repeats of a row several
        lookups touched (its sum sits at one entry). No host sync: ``R`` is the pending rows'
        total, known on the host (a dedup to the distinct rows would size its output from the
        device); the sparse update ops skip rows -1. Anchors that got no gradient (unused by the
        loss) are left out. Only lookups recorded by row (unsharded): sharded ones are
        ``take_id_grads``'."""
        pending = [p for p in self._pending if p.anchor.grad is not None and p.ids is None]
        self._pending = []
        return _reduced_grads([(self._own_rows(p), p) for p in pending], self, self.dim)

    def _own_rows(self, p: _PendingGrad) -> Tensor:
        """This table's rows of a pending lookup: -1 at the other tables' entries (made where a
        per-table path reads them: the optimizer's per-storage update reads ``lookup_rows``)."""
        return p.lookup_rows if p.tags is None else torch.where(p.tags == self.tag, p.lookup_rows, -1)

    def take_id_grads(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(ids [R], sums [R, dim], counts [R])`` of the pending lookups recorded by id (sharded
        lookups), each id once: its float32 gradient summed over its occurrences, NOT reduced
        (the owner reduces over every rank's sums, ``fxrec.distributed.sharded``), and its number
        of occurrences; clears the pending lookups. Anchors that got no gradient are left out."""
        pending = [p for p in self._pending if p.anchor.grad is not None and p.ids is not None]
        self._pending = []
        device = self.keys.device
        if not pending:
            return (torch.empty(0, dtype=torch.int64, device=device),
                    torch.empty(0, self.dim, dtype=torch.float32, device=device),
                    torch.empty(0, dtype=torch.float32, device=device))
        # this table's entries only: tables coalesced into one storage share an anchor (rows -1
        # mark the other members' entries, ``shared_grad_anchor``)
        own = [self._own_rows(p) >= 0 for p in pending]
        ids, inverse = torch.unique(torch.cat([p.ids[k] for p, k in zip(pending, own)]), return_inverse=True)
        sums = torch.zeros(ids.numel(), self.dim, dtype=torch.float32, device=device)
        sums.index_add_(0, inverse, torch.cat([self.own_columns(p.anchor.grad[:p.ids.shape[0]][k])
                                               for p, k in zip(pending, own)]).to(torch.float32))
        counts = torch.zeros(ids.numel(), dtype=torch.float32, device=device)
        counts.index_add_(0, inverse, torch.cat([p.counts[k] for p, k in zip(pending, own)]).to(torch.float32))
        return ids, sums, counts

    @torch.no_grad()
    def scale_grads(self, factor: float) -> None:
        """Multiply the pending gradients by ``factor`` (the Trainer's rescale of a partial
        accumulation group)."""
        for p in self._pending:
            if p.anchor.grad is not None:
                # this table's rows only: coalesced tables share an anchor, each scales its rows
                own = self._own_rows(p) >= 0
                p.anchor.grad[:own.shape[0]][own] *= factor  # a compile grad sink has rows past U

    def clear_grads(self) -> None:
        """Drop the pending lookups' gradients (an optimizer's ``zero_grad``)."""
        self._pending = []

    # -- steps and eviction --------------------------------------------------------------------------

    def advance_step(self) -> None:
        """One table step passed."""
        HashTable.advance_steps([self])

    @staticmethod
    @torch.no_grad()
    def advance_steps(tables: list[HashTable], counters: Sequence[Tensor] = ()) -> None:
        """``advance_step`` of every table in ``tables`` (distinct), and ``counters`` (other step
        counters that advance with them: the sparse optimizer's per-table ``step``) ``+= 1``, as
        ONE foreach op (the sparse optimizer calls this at each step)."""
        torch._foreach_add_([table.step for table in tables] + list(counters), 1)

    @torch.no_grad()
    def evict_stale(self) -> int:
        """Evict the ids the filter hook names (not looked up in the last ``filter_step`` steps);
        their rows are free for new ids. Returns how many were evicted (0 without a filter hook)."""
        if self.filter_hook is None:
            return 0
        mine = self.state == filled_state(self.tag)
        stale = mine & (self.step - self.last_seen >= self.filter_hook.filter_step)
        evicted = int(stale.count_nonzero())
        if evicted:
            self.storage.rebuild(self.capacity, (self.state != EMPTY) & ~stale)
        return evicted

    def remap_pending(self, remap: Tensor) -> None:
        """The storage moved rows: ``remap [old capacity + 1]`` maps each old row (and -1) to its
        new row (-1: dropped)."""
        for p in self._pending:
            if p.ids is None:  # sharded lookups' rows are not this table's
                p.lookup_rows = remap[p.lookup_rows]  # a shared anchor's: each member remaps its own copy

    # -- state_dict -----------------------------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        ids, rows = self.items()
        destination[prefix + "ids"] = ids
        destination[prefix + "embedding"] = self.embedding[rows]
        destination[prefix + "last_seen"] = self.last_seen[rows]
        destination[prefix + "step"] = self.step.clone()
        for name, t in self.slots().items():
            destination[prefix + f"slot.{name}"] = t[rows]

    @torch.no_grad()
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        required = ["ids", "embedding", "last_seen", "step"]
        missing = [prefix + k for k in required if prefix + k not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        ids = state_dict[prefix + "ids"].to(self.keys.device)
        embedding = state_dict[prefix + "embedding"]
        n = ids.numel()
        self._check_row_cap(n)
        if ids.dtype != torch.int64 or ids.dim() != 1:
            error_msgs.append(f"HashTable {self.name!r}: {prefix}ids must be 1-D int64, got {ids.dtype} {tuple(ids.shape)}")
            return
        if tuple(embedding.shape) != (n, self.dim):
            error_msgs.append(
                f"HashTable {self.name!r}: {prefix}embedding has shape {tuple(embedding.shape)}, expected ({n}, {self.dim})"
            )
            return
        if torch.unique(ids).numel() != n:
            error_msgs.append(f"HashTable {self.name!r}: {prefix}ids holds duplicate ids")
            return
        slot_keys = [k for k in state_dict if k.startswith(prefix + "slot.") and "." not in k[len(prefix) + 5:]]
        self._pending = []
        # this table's rows only: a coalesced storage keeps the other members' rows
        rows = self.storage.replace_member_rows(self.tag, ids)
        device = self.keys.device
        self.embedding[rows] = embedding.to(device=device, dtype=self.dtype)
        self.last_seen[rows] = state_dict[prefix + "last_seen"].to(device)
        self.step = state_dict[prefix + "step"].to(device=device, dtype=torch.int64).clone()
        for key in slot_keys:
            name, values = key[len(prefix) + 5:], state_dict[key]
            if values.dim() != 2 or values.shape[0] != n:
                error_msgs.append(f"HashTable {self.name!r}: {key} has shape {tuple(values.shape)}, expected ({n}, width)")
                continue
            init = self.storage._slot_init.get(name, 0.0)
            self.slot(name, values.shape[1], init)[rows] = values.to(device, torch.float32)
        for key in state_dict:
            if key.startswith(prefix) and key not in slot_keys and key[len(prefix):] not in required and "." not in key[len(prefix):]:
                unexpected_keys.append(key)


def _reduced_grads(pending: list[tuple[Tensor, _PendingGrad]], table: HashTable, width: int) -> tuple[Tensor, Tensor]:
    """``take_grads``' result for the pending lookups ``(rows, entry)`` (their gradients taken at
    ``rows``) of ``table`` (or of the storage ``table`` is a member of: ``take_storage_grads``),
    the gradients' first ``width`` columns (the table's, or the storage's)."""
    if not pending:
        device = table.keys.device
        return (torch.empty(0, dtype=torch.int64, device=device),
                torch.empty(0, width, dtype=torch.float32, device=device))
    by_id = table.grad_reduce_by == "id"  # only then are the occurrence counts needed
    if len(pending) == 1:  # one lookup's rows are distinct but for -1: as they are
        rows, p = pending[0]
        counts = p.counts
        grads = p.anchor.grad[:rows.shape[0], :width].to(torch.float32)
    else:
        rows, grads, counts = _merge_rows(
            torch.cat([rows for rows, _ in pending]),
            torch.cat([p.anchor.grad[:rows.shape[0], :width] for rows, p in pending]).to(torch.float32),
            torch.cat([p.counts.to(torch.float32) for _, p in pending]) if by_id else None,
        )
    if by_id:
        grads = grads / counts.to(torch.float32).clamp_min(1.0)[:, None]
    return rows, grads


def take_storage_grads(tables: list[HashTable]) -> tuple[Tensor, Tensor]:
    """``(rows, grads)`` of every row the pending lookups of ``tables`` -- ALL the members of one
    storage -- touched, each row once (rows -1: padding), and clears their pending lookups: what
    each member's ``take_grads`` gives, in one result whose update serves them all (the sparse
    optimizer's one update per storage). A lookup of several members (one anchor they share) is
    read once, with every member's rows, where ``take_grads`` reads it once per member, the other
    members' entries -1. Lookups recorded by row only (unsharded)."""
    pending, seen = [], set()
    for table in tables:
        for p in table._pending:
            if p.anchor.grad is not None and p.ids is None and id(p.anchor) not in seen:
                seen.add(id(p.anchor))
                pending.append((p.lookup_rows, p))
        table._pending = []
    return _reduced_grads(pending, tables[0], tables[0].storage.dim)


def _merge_rows(rows: Tensor, grads: Tensor, counts: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(rows, grads, counts)`` of the same length with each row once: the entries sorted by row,
    each run of one row summed into its first entry, the run's other entries row -1 (padding), no
    host sync (a sort, a cumulative max and an ``index_add_`` per summed input). ``counts`` None:
    not summed (None returned). The sort is stable, so a row's sum adds its entries in the order
    given (on CPU: the same bits whichever other rows the entries hold)."""
    sorted_rows, order = torch.sort(rows, stable=True)
    starts = run_starts(sorted_rows)
    positions = torch.arange(sorted_rows.shape[0], device=rows.device)
    run_start = torch.where(starts, positions, 0).cummax(0).values
    summed = torch.zeros_like(grads).index_add_(0, run_start, grads[order])
    occurrences = None if counts is None else torch.zeros_like(counts).index_add_(0, run_start, counts[order])
    return torch.where(starts, sorted_rows, -1), summed, occurrences


def shared_grad_anchor(tables: list[HashTable], rows: Tensor, tags: Tensor | None,
                       counts: Tensor | None, ids: Tensor | None = None) -> Tensor | None:
    """The anchor of ``fxrec::table_combine`` for unique ``rows [U]`` of one storage that
    ``tables`` read (``tags [U]``: each row's table tag; None: all rows ``tables[0]``'s): in
    training mode with grad enabled ONE zero ``[U, dim]`` leaf (stride 0) that requires grad, and
    each table records it as a pending gradient with the lookup's rows and tags (its own rows:
    those of its tag, the others' -1), so that its ``take_grads`` returns what its own lookup
    would; else None. ``counts [U]`` (default 1 each):
    how often each row occurs, for ``grad_reduce_by="id"``. ``ids [U]``: a sharded lookup
    (``fxrec.distributed.sharded``), whose ``rows`` index the rows fetched from the owners: each
    table records the gradient by id (its own entries: rows >= 0), for ``take_id_grads``."""
    first = tables[0]
    if not (first.training and torch.is_grad_enabled()):
        return None
    storage = first.storage
    if storage.grad_sinks:
        # fxrec.compile: a leaf made outside the graph (bounded by all the storage's tables'
        # ids), its first U rows
        leaf = storage.grad_sinks[0]
        storage.grad_sinks = storage.grad_sinks[1:]
        torch._check(rows.shape[0] <= leaf.shape[0])  # more distinct ids than fxrec.compile's bound: fails
        anchor = leaf.narrow(0, 0, rows.shape[0])
    else:
        leaf = anchor = storage.zero.expand(rows.shape[0], storage.dim).requires_grad_()
    # as given (a dedup's int64 counts): converted where read, by "id" tables and sharded lookups only
    counts = torch.ones(rows.shape, dtype=torch.float32, device=rows.device) if counts is None else counts.reshape(-1)
    for table in tables:
        # A new list, not an append: under torch.compile an anchor put into the list object that
        # existed before the graph would escape it ("requires_grad_() intermediate leaked as
        # output"); a list made in the graph and dropped by take_grads / clear_grads does not.
        table._pending = [*table._pending, _PendingGrad(rows, leaf, counts, tags, ids)]
    return anchor


def filter_out_sparse_param(model: nn.Module) -> dict[str, HashTable]:
    """``{name: table}`` of every ``HashTable`` in ``model`` (what the sparse optimizer takes).
    Two distinct tables with one name are a ``ValueError``: the optimizer keys its state by name."""
    tables: dict[str, HashTable] = {}
    for module in model.modules():
        if isinstance(module, HashTable):
            other = tables.setdefault(module.name, module)
            if other is not module:
                raise ValueError(f"filter_out_sparse_param: two different tables are named {module.name!r}")
    return tables

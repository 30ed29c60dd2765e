"""``TableStorage``: the physical table behind one or more logical ``HashTable``s, and
``coalesce_tables``, which puts several logical tables into one storage (``table_coalesce``).

A storage owns the index (``keys``/``state``, ``fxrec.ops.table``) and every per-row buffer:
``embedding [capacity, dim]``, ``last_seen [capacity]`` and the optimizer slots
(``slot_<name> [capacity, width]``); ``counts [members]`` holds each member's number of ids and
``seeds [members]`` their initializer seeds. Its members are the logical tables; member ``i`` has
tag ``i`` in the index, so the same id in two members has two rows and ids keep all 64 bits
(RecIS truncated ids to 52 bits to tag tables). A table alone owns a storage of one member, tag 0
(untagged index ops: tag 0 is the untagged index), so a coalesced table and a lone one run the
same code.

Ownership (why storage here, and logical tables as views): a table's buffers move to the storage;
the ``HashTable`` keeps what is logical — its name, seed, initializer, hooks, eviction clock
(``step``), pending gradients, and which optimizer slots it uses — and reads and writes its rows
through the storage, restricted to its tag (``state == filled_state(tag)``). What this buys over
keeping buffers per logical table with only the index shared: one index op, one ``init_rows``
and one row space, so the lookups of all features of coalesced tables are ONE dedup + ONE
find-or-insert (``_lookup_unique_merged``) whose rows every feature's ``table_combine`` reads
from the ONE ``embedding``; with per-table buffers a shared index would still need one gather per
table (slot == row). What stays per logical table, and equal to an un-coalesced run: initial
values (``init_rows`` with per-row seeds: each row its own table's seed), ``state_dict``
(per table: its ids, rows and slots only; the format unchanged), ``load_state_dict`` (replaces
that table's rows only), eviction (``evict_stale`` drops that table's stale ids), ``take_grads``
and the sparse optimizer's per-table state. Growth and rebuilds are per storage: every member's
rows move together and every member's pending gradients follow them.

Free rows (slots no id holds) hold each slot's initial value (``slot(name, width, init)``): the
slot is created full of it, ``rebuild`` fills the rows it frees with it, and a slot whose init
changes (a slot restored by ``load_state_dict`` before the optimizer named its init) refills its
free rows. Rows leave the free set only by an insert, so a new id's slots already hold their
initial values and an insert writes only the embedding (ONE ``fxrec::init_rows``, rows -1 for the
ids already present: no host sync, no slot writes).

Mixed dims: tables of different dims share a storage as wide as the widest of them, each
table's rows in its first ``dim`` columns (``HashTable.embedding`` is that view; the other columns
pad the row), provided the padding at most doubles a row (``MAX_PAD``) and the initializer's
parameters do not depend on the dim (``init_rows`` draws column ``j`` of a row independently of
the width, so a padded row's own columns are the row the table alone would get). Everything that
runs per storage runs at the full width: the lookup hands ``table_combine`` the full rows and a
``[U, storage dim]`` anchor, and a narrow feature keeps its own columns of the combined rows
(``embedding._own_columns``); the padding columns get zero gradients, so a per-storage optimizer
update leaves them meaningless but harmless (nothing reads or saves them), except for an update
that couples a row's columns (row-wise Adagrad), which updates such a storage's tables one by one
(``SparseOptimizer._couples_columns``). Optimizer slots with a value per column (``width ==`` the
member's dim) span the storage's dim (``slot_width``); per table, ``take_grads``, ``slots()`` and
``state_dict`` give the table's own columns.

Row cap (``FXREC_MAX_ROWS_PER_RANK``, ``fxrec.nn.modules.hashtable``): per LOGICAL table, each
member's own count, checked after an insert for the members a lookup inserted for; the error
names the table.

Sharded (a process group of several ranks, ``fxrec.distributed.sharded``): a rank's storage
holds, per member, the ids of that member the rank owns; ownership is a function of the id alone
(not of the tag), so coalescing changes no id's owner, and a merged lookup sends (tag, id) pairs
to the owners, who look them up here with their tags.

The storage is not a registered submodule of its members (DDP, ``state_dict`` and
``named_buffers`` see no storage tensors; the members' ``state_dict`` covers their rows), so a
member's ``_apply`` (``.to()``, ``.cuda()``) applies to the storage too (once per member:
conversions are idempotent).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor, nn

from fxrec.ops.table import EMPTY, TAG_SHIFT, new_index

if TYPE_CHECKING:
    from fxrec.nn.modules.hashtable import HashTable

__all__ = ["TableStorage", "capacity_for", "coalesce_groups", "coalesce_key", "coalesce_tables", "MAX_PAD"]

_MIN_CAPACITY = 16
# A table narrower than its storage pads each row to the storage's dim: at most to this many
# times its own dim (module docstring: mixed dims).
MAX_PAD = 2


def coalesce_key(table: HashTable) -> tuple:
    """What logical tables must agree on to share a storage: the rows' type and place (dtype,
    device), their initial values up to the seed (the initializer's op and parameters for the
    table's dim and block_size: Xavier / Kaiming fans differ), the gradients (grad_reduce_by)
    and what a lookup does (filter / admit hooks). The dim need not agree (``coalesce_groups``)."""
    return (table.dtype, table.device, table.initializer.row_spec(table.dim, table.block_size), table.grad_reduce_by,
            table.filter_hook, table.admit_hook)


def _fits(table: HashTable, dim: int) -> bool:
    """Whether ``table`` can live in a storage of ``dim`` columns: its rows padded at most
    ``MAX_PAD`` times, and its initial rows, drawn at that width, the same in its own columns
    (``init_rows`` draws column ``j`` independently of the width; the parameters must not
    depend on it)."""
    spec = table.initializer.row_spec
    return table.dim <= dim <= MAX_PAD * table.dim and spec(dim, table.block_size) == spec(table.dim, table.block_size)


def coalesce_groups(tables: Sequence[HashTable]) -> list[list[HashTable]]:
    """``tables`` split into the groups that ``coalesce_tables`` takes, each in the given order:
    tables of one ``coalesce_key``, the widest first picking every table that fits its dim
    (``_fits``), then the widest of the rest, and so on."""
    groups: list[list[HashTable]] = []
    by_key: list[tuple[tuple, list[HashTable]]] = []
    for table in tables:
        key = coalesce_key(table)
        same = next((s for k, s in by_key if k == key), None)  # == : hooks compare by value
        if same is None:
            by_key.append((key, [table]))
        else:
            same.append(table)
    for _, same in by_key:
        while same:
            dim = max(t.dim for t in same)
            group = [t for t in same if _fits(t, dim)]
            groups.append(group)
            same = [t for t in same if not any(t is g for g in group)]
    return groups


def capacity_for(n: int) -> int:
    """The smallest power of two >= max(2 n, _MIN_CAPACITY): load <= 1/2."""
    return max(_MIN_CAPACITY, 1 << max(0, 2 * n - 1).bit_length())


class TableStorage(nn.Module):
    """The index and row buffers of one or more logical tables (module docstring)."""

    def __init__(self, dim: int, dtype: torch.dtype, capacity: int, device: torch.device | str | None) -> None:
        super().__init__()
        self.dim, self.dtype = dim, dtype
        self.members: list[HashTable] = []
        self._slot_init: dict[str, float] = {}
        keys, state = new_index(capacity, device)
        self.register_buffer("keys", keys)
        self.register_buffer("state", state)
        self.register_buffer("embedding", torch.zeros(capacity, dim, dtype=dtype, device=device))
        self.register_buffer("last_seen", torch.zeros(capacity, dtype=torch.int64, device=device))
        # the base of every gradient anchor (``shared_grad_anchor``: a stride-0 view of it per
        # lookup; nothing writes it): one zero, not a fill kernel per lookup
        self.register_buffer("zero", torch.zeros((), dtype=dtype, device=device))
        # -1, no row: ``torch.where``'s other operand (a Python -1 is a tensor made per lookup)
        self.register_buffer("no_row", torch.full((), -1, dtype=torch.int64, device=device))
        # per member, on the device: inserts count into them without a host sync
        self.register_buffer("counts", torch.zeros(0, dtype=torch.int64, device=device))
        self.register_buffer("seeds", torch.zeros(0, dtype=torch.int64, device=device))
        # >= the ids held (counts.sum()), known on the host: inserts come after a reserve (``reserve``)
        self.size_bound = 0
        # the ids held as of a point in the stream, copied to the host without waiting
        # (``snapshot_count``): (pinned counts, its copy's event, size_bound then), or None
        self._count_snapshot: tuple[Tensor, torch.cuda.Event, int] | None = None
        # the pinned counts and event the last snapshot used, for the next one to reuse
        self._snapshot_buffers: tuple[Tensor, torch.cuda.Event] | None = None
        # zero leaves [bound, dim] that fxrec.compile hands the next training lookups, one each
        # (``fxrec.nn.modules.hashtable``'s docstring: why not made in the graph)
        self.grad_sinks: list[Tensor] = []

    @property
    def capacity(self) -> int:
        return self.keys.numel()

    def add_member(self, table: HashTable) -> int:
        """Make ``table`` a member, holding no ids yet (its inserts count them); its tag."""
        self.members.append(table)
        device = self.keys.device
        self.counts = torch.cat([self.counts, torch.zeros(1, dtype=torch.int64, device=device)])
        self.seeds = torch.cat([self.seeds, torch.tensor([table.seed], dtype=torch.int64, device=device)])
        return len(self.members) - 1

    def tags_of(self, ids: Tensor, tag: int) -> Tensor | None:
        """The ``tags`` argument of the index ops for ``ids`` of one member: None for tag 0."""
        return None if tag == 0 else torch.full(ids.shape, tag, dtype=torch.int32, device=ids.device)

    # -- optimizer slots ---------------------------------------------------------------------------

    def slot_width(self, width: int, member_dim: int) -> int:
        """The storage's width of a slot that a member of ``member_dim`` asks for with ``width``:
        a slot with a value per column (``width == member_dim``) spans the storage's dim, as the
        embedding does; any other width (a value per row) is kept."""
        return self.dim if width == member_dim else width

    def slot(self, name: str, width: int, init: float, owner: str) -> Tensor:
        """The slot ``name`` (created on first use, every row ``init``); ``owner`` names the table
        in errors."""
        attr = f"slot_{name}"
        existing = getattr(self, attr, None)
        if existing is None:
            self.register_buffer(attr, torch.full((self.capacity, width), init, dtype=torch.float32,
                                                  device=self.keys.device))
        elif existing.shape[1] != width:
            raise ValueError(f"HashTable {owner!r}: slot {name!r} has width {existing.shape[1]}, asked for width {width}")
        elif self._slot_init.get(name) != init:
            # a slot restored by load_state_dict learns its init here: its free rows take it
            with torch.no_grad():
                existing[self.state == EMPTY] = init
        self._slot_init[name] = init
        return getattr(self, attr)

    # -- lookup -------------------------------------------------------------------------------------

    def reserve(self, n: int) -> None:
        """Grow, if needed, so that ``n`` more ids fit at load <= 1/2, and book them: the host
        keeps an upper bound of the ids held (``size_bound``: exact after a count or a rebuild,
        plus every reservation since), and reads the count only when that bound leaves no room
        for ``n`` more: from the last ``snapshot_count`` if its copy has landed, else from the
        device (a host sync), and from the device before it grows."""
        if 2 * (self.size_bound + n) > self.capacity:
            landed = self._landed_bound()
            if landed is not None and 2 * (landed + n) <= self.capacity:
                self.size_bound = landed
            else:  # the device count (a host sync), on which growth is decided
                self.size_bound = int(self.counts.sum())
                if 2 * (self.size_bound + n) > self.capacity:
                    self.rebuild(capacity_for(self.size_bound + n), self.state != EMPTY)
        self.size_bound += n

    def snapshot_count(self) -> None:
        """Queue a copy of the ids held to the host, so that the next ``reserve`` needing the
        count reads it without a host sync (a step's own GPU work is then queued behind the last
        step's instead of waiting for it). Called after each training lookup (eager) or compiled
        forward; on CPU, reading the count costs no sync and this does nothing."""
        if self.counts.device.type != "cuda":
            return
        # The last snapshot's pinned counts and event, once its copy has landed (as it has by the
        # next step's, which waited at the lookup's read-back): a pinned allocation, a sum kernel
        # and an event less per step. A copy still in flight (another stream may order it after
        # this one) keeps its buffer: this snapshot takes new ones.
        buffers = self._snapshot_buffers
        if buffers is None or buffers[0].shape != self.counts.shape or not buffers[1].query():
            buffers = self._snapshot_buffers = (torch.empty(self.counts.shape, dtype=torch.int64, pin_memory=True),
                                                torch.cuda.Event())
        host, event = buffers
        host.copy_(self.counts, non_blocking=True)  # summed on the host when read
        event.record()
        self._count_snapshot = (host, event, self.size_bound)

    def _landed_bound(self) -> int | None:
        """An upper bound of the ids held without a sync: the snapshot's count plus every
        reservation since, if its copy has landed; else None. Uses the snapshot up."""
        snapshot, self._count_snapshot = self._count_snapshot, None
        if snapshot is None or not snapshot[1].query():
            return None
        host, _, bound_then = snapshot
        return int(host.sum()) + self.size_bound - bound_then

    @torch.no_grad()
    def lookup(self, ids: Tensor, tags: Tensor | None, members: Sequence[HashTable]) -> Tensor:
        """Rows of flat ``ids`` under ``tags`` (None: tag 0), as the members' ``lookup`` gives
        them: ``members`` (the tables the ids belong to, with one training mode) decide whether
        unseen ids are inserted (initialized from each row's table seed) or get -1. The ids may
        repeat (all occurrences of an id get one row)."""
        first = members[0]
        modes = {(t.training, t.admits) for t in members}
        if len(modes) > 1:
            raise ValueError(f"HashTable: coalesced tables {[t.name for t in members]} are looked up together but "
                             "are not all in one mode (training / eval, admitting or not): set the mode on all")
        member = None if tags is None else tags.long()  # each id's member (its tag) as an index, converted once
        if not first.admits:
            rows = torch.ops.fxrec.table_find(self.keys, self.state, ids, tags)
            if first.training:
                found = rows >= 0
                steps = self._steps(member)
                self.last_seen[rows[found]] = steps if member is None else steps[found]
            return rows
        if not torch.compiler.is_compiling():
            # Growth replaces the buffers: it cannot run inside a compiled graph, whose caller
            # reserves room for the step's ids beforehand (``reserve``). A compiled lookup into a
            # table without room fails in ``table_find_or_insert`` (a full index).
            self.reserve(ids.numel())
        # the op adds each member's inserts to its count (``counts``: per tag)
        rows, inserted = torch.ops.fxrec.table_find_or_insert(self.keys, self.state, ids, tags, self.counts)
        # The new rows as a mask over all ids (-1: not new, skipped), not ``rows[inserted]``: a
        # boolean index is a host sync per lookup and, compiled, a data-dependent size. ONE op
        # writes the new rows' initial values straight into the embedding; their optimizer slots
        # already hold the slots' initial values (free rows do: class docstring).
        new_rows = torch.where(inserted, rows, self.no_row)
        if member is None:
            first.initializer.write_rows(self.embedding, new_rows, ids, self.members[0].seed, first.block_size)
        else:
            first.initializer.write_rows(self.embedding, new_rows, ids, 0, first.block_size, self.seeds[member])
        self.last_seen[rows] = self._steps(member)
        for table in {id(t): t for t in members}.values():  # the row cap: per logical table (its count)
            if table.max_rows is not None:
                table._check_row_cap(int(table.count))
        if not torch.compiler.is_compiling():  # compiled: fxrec.compile takes it after the forward
            self.snapshot_count()
        return rows

    def _steps(self, member: Tensor | None) -> Tensor:
        """The table step of each id's member (``member``: int64 member indices, the tags), or
        member 0's (0-d) without."""
        if member is None:
            return self.members[0].step
        return torch.stack([t.step for t in self.members])[member]

    # -- rebuilds -----------------------------------------------------------------------------------

    @torch.no_grad()
    def rebuild(self, capacity: int, keep: Tensor) -> None:
        """A fresh index of ``capacity`` slots holding the ids at ``keep`` (bool [old capacity]),
        every row buffer moved along, every member's pending gradients remapped (dropped rows
        become -1), counts recounted."""
        old_rows = keep.nonzero().squeeze(1)
        ids = self.keys[old_rows]
        tags = (self.state[old_rows] >> TAG_SHIFT).to(torch.int32)
        keys, state = new_index(capacity, self.keys.device)
        counts = torch.zeros(len(self.members), dtype=torch.int64, device=keys.device)  # recounted by the inserts
        new_rows, _ = torch.ops.fxrec.table_find_or_insert(keys, state, ids, tags if len(self.members) > 1 else None,
                                                           counts)
        remap = torch.full((self.capacity + 1,), -1, dtype=torch.int64, device=keys.device)  # [-1] -> -1
        remap[old_rows] = new_rows
        fill = {"embedding": 0.0, "last_seen": 0, **{f"slot_{s}": init for s, init in self._slot_init.items()}}
        for name, value in fill.items():  # free rows: 0, a slot's its initial value (class docstring)
            old = getattr(self, name)
            moved = old.new_full((capacity, *old.shape[1:]), value)
            moved[new_rows] = old[old_rows]
            setattr(self, name, moved)
        self.keys, self.state = keys, state
        self.counts = counts
        self.size_bound = old_rows.numel()
        self._count_snapshot = None  # taken against the bound just replaced
        for table in self.members:
            table.remap_pending(remap)

    @torch.no_grad()
    def replace_member_rows(self, tag: int, ids: Tensor) -> Tensor:
        """Drop member ``tag``'s ids and insert ``ids`` (distinct) for it; their rows, whose
        embedding and ``last_seen`` are 0 and slots their initial values (free rows' values: the
        caller fills them)."""
        keep = (self.state != EMPTY) & ((self.state >> TAG_SHIFT) != tag)
        others = int(keep.count_nonzero())
        self.rebuild(capacity_for(others + ids.numel()), keep)
        rows, _ = torch.ops.fxrec.table_find_or_insert(self.keys, self.state, ids, self.tags_of(ids, tag), self.counts)
        self.size_bound += ids.numel()
        return rows


def coalesce_tables(tables: Sequence[HashTable]) -> TableStorage:
    """Put ``tables`` (logical tables of one ``coalesce_key`` whose dims fit one storage:
    ``coalesce_groups``) into ONE storage of their largest dim, member
    ``i`` tag ``i``, moving every table's ids, rows, slots and pending gradients there; returns it.
    Idempotent: tables already sharing a storage of exactly them keep it. A table already
    coalesced with other tables is a ``ValueError``."""
    names = [t.name for t in tables]
    if not tables:
        raise ValueError("coalesce_tables: no tables")
    if len({id(t) for t in tables}) != len(tables):
        raise ValueError(f"coalesce_tables: a table is given twice in {names}")
    first = tables[0]
    for table in tables[1:]:
        if coalesce_key(table) != coalesce_key(first):
            raise ValueError(f"coalesce_tables: tables {first.name!r} and {table.name!r} differ in dtype, device, "
                             "initial values, grad_reduce_by or hooks: they cannot share one storage")
    dim = max(t.dim for t in tables)
    narrow = [t.name for t in tables if not _fits(t, dim)]
    if narrow:
        raise ValueError(f"coalesce_tables: tables {narrow} cannot share a storage of dim {dim} (rows padded more "
                         f"than {MAX_PAD}x, or initial values that depend on the dim)")
    storage = first.storage
    if all(t.storage is storage for t in tables) and len(storage.members) == len(tables):
        return storage
    for table in tables:
        if len(table.storage.members) > 1:
            others = [t.name for t in table.storage.members if t is not table]
            raise ValueError(f"coalesce_tables: table {table.name!r} is already coalesced with {others}")
        if table.dim < dim and table._pending:  # its gradients are [U, dim] wide, the storage's rows wider
            raise ValueError(f"coalesce_tables: table {table.name!r} (dim {table.dim}) has pending gradients; "
                             f"take them (optimizer step or zero_grad) before coalescing it into dim {dim}")
    total = sum(len(t) for t in tables)
    merged = TableStorage(dim, first.dtype, capacity_for(total), first.keys.device)
    slot_widths: dict[str, tuple[int, float]] = {}
    for table in tables:
        for name, init in table.storage._slot_init.items():
            width = merged.slot_width(getattr(table.storage, f"slot_{name}").shape[1], table.dim)
            if slot_widths.setdefault(name, (width, init))[0] != width:
                raise ValueError(f"coalesce_tables: slot {name!r} has width {width} in table {table.name!r}, "
                                 f"{slot_widths[name][0]} in another")
    for name, (width, init) in slot_widths.items():
        merged.slot(name, width, init, first.name)
    with torch.no_grad():
        for table in tables:
            old = table.storage
            ids, old_rows = table.items()
            tag = merged.add_member(table)
            rows, _ = torch.ops.fxrec.table_find_or_insert(merged.keys, merged.state, ids, merged.tags_of(ids, tag),
                                                           merged.counts)
            merged.size_bound += ids.numel()
            merged.embedding[rows, :table.dim] = old.embedding[old_rows]
            merged.last_seen[rows] = old.last_seen[old_rows]
            for name in old._slot_init:
                values = getattr(old, f"slot_{name}")[old_rows]
                getattr(merged, f"slot_{name}")[rows, :values.shape[1]] = values
            remap = torch.full((old.capacity + 1,), -1, dtype=torch.int64, device=rows.device)
            remap[old_rows] = rows
            table.remap_pending(remap)
            table.attach(merged, tag)
    return merged

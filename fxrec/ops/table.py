"""``fxrec::table_find`` / ``fxrec::table_find_or_insert``: the id → row index of a dynamic table.

The index is two arrays the caller owns (``new_index``): ``keys: int64 [capacity]`` and
``state: int32 [capacity]`` (``EMPTY`` 0, ``WRITING`` 1 — a CUDA insert in flight, transient —,
``FILLED`` 3). ``capacity`` is a power of two. Every int64 is a valid id (0, negatives,
INT64_MIN/MAX): occupancy lives in ``state``, not in reserved key values. The slot index IS the
row of the id in the table's slot tensors (embedding, optimizer moments), which the caller keeps.

An id's probe sequence is ``(mix64(id + tag * GAMMA) + k) & (capacity - 1)``, ``k = 0, 1, ...`` (``mix64``:
splitmix64's finalizer, on uint64; linear probing). These ops never delete: eviction and growth
rebuild the index outside them (the caller re-inserts the surviving ids into fresh arrays), so
there are no tombstones and a filled slot never changes — an id is absent exactly when its probe
reaches an empty slot first.

Tags: one index may hold several tables' ids (``table_coalesce``): the optional ``tags`` (int32,
``ids``' shape, each in ``[0, MAX_TAG]``) names each id's table, and an entry is the pair
``(tag, id)`` — the same id under two tags has two rows, and ids keep all 64 bits. The tag lives
in the state word's free bits: a filled slot's state is ``filled_state(tag) = FILLED | tag <<
TAG_SHIFT`` (occupancy is ``state & OCCUPANCY``), so a lookup matches key AND state, and the
probe starts at ``mix64(id + tag * GAMMA)`` (so one id under many tags does not pile up on one
home slot). ``tags=None`` is tag 0 for every id: ``filled_state(0) == FILLED`` and the home slot
is ``mix64(id)``, so an untagged index is a tagged one whose ids all have tag 0.

- ``table_find(keys, state, ids, tags=None) -> rows``: int64, ``ids``' shape, -1 where absent.
  Read-only.
- ``table_find_or_insert(keys, state, ids, tags, counts) -> (rows, inserted)``: the row of every id, inserting
  the absent ones in place (``keys``/``state`` are mutated; all occurrences of an id in one call
  get one row). ``inserted`` (bool, ``ids``' shape) is True on exactly one occurrence of each id
  (pair) this call inserted, so the caller initializes each new row once: the FIRST occurrence on CPU,
  whichever occurrence claimed the slot on CUDA. ``counts`` (int64 ``[T]``, or None; mutated):
  ``counts[tag] +=`` the ids this call inserted under ``tag`` (the caller's ids held per table),
  counted where the inserts happen: a count the caller derived from ``inserted`` would be a
  reduction over every id, per tag, which Inductor lowers into one program per reduction for an
  unbacked length (~0.65 ms each over the 6.2M ids of the tutorial's step on an H200). Tags must lie
  in ``[0, T)`` (the CPU kernel raises; on CUDA an insert under another tag is not counted).
  ``tags`` and ``counts`` have no defaults (pass None): torch 2.11's custom-op layer reads a
  mutated argument by position, where the dispatcher leaves out trailing arguments equal to
  their defaults; and a None mutated argument before others breaks Inductor's call (torch 2.13).
  A mutating op carries no autograd (DESIGN): the differentiable gather is a separate op on the
  returned rows.
- ``unique_tagged(ids, tags) -> (ids, tags, inverse, counts)``: the distinct (tag, id) pairs of
  a tagged lookup (its dedup), ascending by tag then id; one read-back of their number. The same
  torch kernel on every device (sorts and a scan: torch's own device kernels are the fast ones).
  Its ``tags`` may be uint8, int16 or int32: the tag sort's radix passes scale with the width, so
  callers pass the narrowest type their tags fit (``tag_dtype``); the distinct tags come back as
  int32, what the index ops take.

Room: the caller grows the index (keeping the load <= 0.5) before a batch could fill it. If a
call would still overflow, the CPU kernel raises ``ValueError`` before writing anything; on CUDA
(no host sync) a lane that probes every slot without finding its id or an empty slot gives up and
its row is -1 (other ids of the call are still inserted).

CPU kernel (vectorized torch): ``torch.unique`` de-duplicates the ids (the (tag, id) pairs); a read-only probe finds
the present ones and, for each absent one, the probe distance ``k`` of the first empty slot
(filled slots never change, so insertion resumes there). Then rounds, each over all unplaced
ids at once: a slot filled (by another id of this call) moves its id to ``k + 1``; ids landing on
an empty slot compete, the smallest id (pair) per slot wins (deterministic, independent of input order)
and writes key + ``FILLED``; the losers retry the same ``k``, now filled, next round. There is
always room, so every id is placed within ``2 * capacity`` rounds (a few, at low load).
CUDA kernel: ``fxrec.ops.triton.table`` (one lane per id, slots claimed by compare-and-swap).
Which slot an id gets depends on insertion order (CPU vs CUDA, batch order): compare indexes by
content (``table_items``), not slot by slot.
"""

import torch
from torch import Tensor

from fxrec.ops.uint64 import GAMMA, as_int64, mix64
from fxrec.ops.triton.table import (
    EMPTY, FILLED, MAX_TAG, OCCUPANCY, TAG_SHIFT, WRITING, filled_state, table_find_or_insert_triton,
    table_find_triton,
)

__all__ = ["EMPTY", "FILLED", "MAX_TAG", "OCCUPANCY", "TAG_SHIFT", "WRITING", "filled_state", "new_index", "table_find",
           "table_find_or_insert", "table_items", "tag_dtype", "unique_rows", "unique_tagged"]


def _home_slots(ids: Tensor, tags: Tensor | None, capacity: int) -> Tensor:
    """``mix64(uint64(id + tag * GAMMA)) & (capacity - 1)`` (int64 wrap-around arithmetic ==
    uint64's)."""
    if tags is not None:
        ids = ids + tags.to(torch.int64) * as_int64(GAMMA)
    return mix64(ids) & (capacity - 1)


def _wanted_states(tags: Tensor | None) -> Tensor | int:
    """The state of a slot holding each id: ``filled_state(tag)`` per id, or ``FILLED``."""
    return FILLED if tags is None else (tags << TAG_SHIFT) | FILLED


# ---------------------------------------------------------------------------------------------
# helpers (plain Python)


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def new_index(capacity: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """An empty index ``(keys, state)`` of ``capacity`` (a power of two) slots."""
    if not _is_power_of_two(capacity):
        raise ValueError(f"fxrec.ops.table.new_index: capacity must be a power of two, got {capacity}")
    keys = torch.zeros(capacity, dtype=torch.int64, device=device)
    return keys, torch.full((capacity,), EMPTY, dtype=torch.int32, device=device)


def _predecessors(values: Tensor, first: int) -> Tensor:
    """1-D ``values`` shifted one place: entry ``i`` holds ``values[i - 1]``, entry 0 ``first``.
    A shifted copy (padded in front, then ``narrow`` to the same length), not ``values[:-1]``:
    torch 2.11's Inductor fails to lower that slice of an unbacked length (``KeyError:
    'unbacked_bindings'``)."""
    return torch.nn.functional.pad(values, (1, 0), value=first).narrow(0, 0, values.shape[0])


def run_starts(values: Tensor) -> Tensor:
    """bool ``[n]``: True where an entry of 1-D ``values`` starts a run of equal entries (the first,
    and each that differs from its predecessor: ``_predecessors`` says why a shifted copy)."""
    first = torch.arange(values.shape[0], device=values.device) == 0
    return (values != _predecessors(values, 0)) | first


def _unique_tagged_torch(ids: Tensor, tags: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``fxrec::unique_tagged``'s kernel (every device): a lexicographic sort of the pairs (two
    stable sorts) and their run boundaries. A pair starts a run where its tag or its id differs
    from its predecessor's; the first pair always starts one. (Slices, not ``_predecessors``: this
    body runs only inside the ops' kernels, which Inductor never lowers.)"""
    ids_by_id, by_id = torch.sort(ids, stable=True)
    sorted_tags, by_tag = torch.sort(tags[by_id], stable=True)
    order, sorted_ids = by_id[by_tag], ids_by_id[by_tag]
    starts = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    torch.ne(sorted_tags[1:], sorted_tags[:-1], out=starts[1:])
    starts[1:] |= sorted_ids[1:] != sorted_ids[:-1]
    run = torch.cumsum(starts, 0) - 1
    inverse = torch.empty_like(run).scatter_(0, order, run)
    # the run starts' positions: the one read-back of the pairs' count (a boolean index per
    # output, or bincount's max, would each read again); a run's length is the distance to the
    # next start (no atomics on the long runs of hot ids)
    first_of_run = starts.nonzero().squeeze(1)
    uniq_ids, uniq_tags = sorted_ids[first_of_run], sorted_tags[first_of_run].to(torch.int32)
    counts = torch.diff(first_of_run, append=first_of_run.new_full((1,), ids.shape[0]))
    return uniq_ids, uniq_tags, inverse, counts


def tag_dtype(max_tag: int) -> torch.dtype:
    """The narrowest tags type of ``unique_tagged`` that holds tags ``0..max_tag``: uint8, int16
    or int32 (on an H200 a stable sort of 6.2M tags took 0.11 / 0.16 / 0.29 ms)."""
    if not 0 <= max_tag <= MAX_TAG:
        raise ValueError(f"fxrec.ops.table.tag_dtype: max_tag must lie in [0, {MAX_TAG}], got {max_tag}")
    return torch.uint8 if max_tag <= 0xFF else torch.int16 if max_tag <= 0x7FFF else torch.int32


def table_items(keys: Tensor, state: Tensor, tag: int = 0) -> tuple[Tensor, Tensor]:
    """``(ids, rows)`` of the slots filled with tag ``tag``, rows ascending (what a ``state_dict``
    stores)."""
    _check_index("table_items", keys, state)
    rows = (state == filled_state(tag)).nonzero().squeeze(1)
    return keys[rows], rows


# ---------------------------------------------------------------------------------------------
# CPU kernel


def _probe(keys: Tensor, state: Tensor, ids: Tensor, wanted: Tensor | int, home: Tensor) -> tuple[Tensor, Tensor]:
    """Read-only probe of flat ``ids`` whose slots would hold state ``wanted`` (per id, or one
    int): ``(rows, k)``, rows -1 where absent; for an absent id, ``k`` is the probe distance of
    the first empty slot (``capacity``: none, the table is full)."""
    capacity = keys.numel()
    rows = torch.full_like(ids, -1)
    k = torch.zeros_like(ids)
    pending = torch.arange(ids.numel())
    while pending.numel() > 0:
        slot = (home[pending] + k[pending]) & (capacity - 1)
        slot_state = state[slot]
        filled = (slot_state & OCCUPANCY) == FILLED
        wanted_here = wanted if isinstance(wanted, int) else wanted[pending]
        hit = filled & (slot_state == wanted_here) & (keys[slot] == ids[pending])
        rows[pending[hit]] = slot[hit]
        pending = pending[filled & ~hit]
        k[pending] += 1
        pending = pending[k[pending] < capacity]
    return rows, k


def _find_torch(keys: Tensor, state: Tensor, ids: Tensor, tags: Tensor | None) -> Tensor:
    flat = ids.reshape(-1)
    flat_tags = None if tags is None else tags.reshape(-1)
    rows, _ = _probe(keys, state, flat, _wanted_states(flat_tags), _home_slots(flat, flat_tags, keys.numel()))
    return rows.reshape(ids.shape)


def _find_or_insert_torch(keys: Tensor, state: Tensor, ids: Tensor, tags: Tensor | None,
                          counts: Tensor | None) -> tuple[Tensor, Tensor]:
    capacity = keys.numel()
    flat = ids.reshape(-1)
    if tags is None:
        uniq, inverse = torch.unique(flat, return_inverse=True)  # ascending
        uniq_tags = None
    else:  # (tag, id) pairs, ascending
        uniq, uniq_tags, inverse, _ = _unique_tagged_torch(flat, tags.reshape(-1))
    home = _home_slots(uniq, uniq_tags, capacity)
    filled_as = _wanted_states(uniq_tags)
    rows, k = _probe(keys, state, uniq, filled_as, home)
    new = (rows < 0).nonzero().squeeze(1)
    inserted = torch.zeros(flat.shape, dtype=torch.bool)
    if new.numel() == 0:
        return rows[inverse].reshape(ids.shape), inserted.reshape(ids.shape)
    free = capacity - int(torch.count_nonzero(state != EMPTY))
    if new.numel() > free:
        raise ValueError(
            f"fxrec::table_find_or_insert: {new.numel()} new ids do not fit the {free} free slots of "
            f"keys/state (capacity {capacity}); grow the index first"
        )
    if counts is not None:
        new_tags = torch.zeros_like(new) if uniq_tags is None else uniq_tags[new].long()
        counts.add_(torch.bincount(new_tags, minlength=counts.numel()))
    pending = new  # ascending unique indices == ascending ids (pairs)
    while pending.numel() > 0:
        slot = (home[pending] + k[pending]) & (capacity - 1)
        filled = state[slot] != EMPTY  # by an id placed earlier in this call: move on
        k[pending[filled]] += 1
        contenders, wanted = pending[~filled], slot[~filled]
        slots, which = torch.unique(wanted, return_inverse=True)
        winners = torch.full_like(slots, uniq.numel()).scatter_reduce_(0, which, contenders, "amin")
        keys[slots] = uniq[winners]
        state[slots] = filled_as if isinstance(filled_as, int) else filled_as[winners]
        rows[winners] = slots
        pending = pending[rows[pending] < 0]
    positions = torch.arange(flat.numel())
    first = torch.full_like(uniq, flat.numel()).scatter_reduce_(0, inverse, positions, "amin")
    inserted[first[new]] = True
    return rows[inverse].reshape(ids.shape), inserted.reshape(ids.shape)


# ---------------------------------------------------------------------------------------------
# the ops


def _check_index(op: str, keys: Tensor, state: Tensor) -> None:
    if keys.dtype != torch.int64 or keys.dim() != 1:
        raise TypeError(f"{op}: keys must be a 1-D int64 tensor, got {keys.dtype} of shape {tuple(keys.shape)}")
    if state.dtype != torch.int32 or state.dim() != 1:
        raise TypeError(f"{op}: state must be a 1-D int32 tensor, got {state.dtype} of shape {tuple(state.shape)}")
    if state.shape[0] != keys.shape[0]:
        raise ValueError(f"{op}: state has {state.shape[0]} slots, keys {keys.shape[0]}: they must match")
    capacity = keys.shape[0]
    if isinstance(capacity, int) and not _is_power_of_two(capacity):  # symbolic under tracing
        raise ValueError(f"{op}: the capacity (len(keys)) must be a power of two, got {capacity}")
    if state.device != keys.device:
        raise ValueError(f"{op}: state is on {state.device}, keys on {keys.device}: they must match")
    if not (keys.is_contiguous() and state.is_contiguous()):
        raise ValueError(f"{op}: keys and state must be contiguous (they are the index, updated in place)")


def _check_args(op: str, keys: Tensor, state: Tensor, ids: Tensor, tags: Tensor | None) -> None:
    _check_index(op, keys, state)
    if ids.dtype != torch.int64:
        raise TypeError(f"{op}: ids must be int64, got {ids.dtype}")
    if ids.device != keys.device:
        raise ValueError(f"{op}: ids are on {ids.device}, keys/state on {keys.device}: they must match")
    if tags is not None:
        if tags.dtype != torch.int32:
            raise TypeError(f"{op}: tags must be int32, got {tags.dtype}")
        if tags.shape != ids.shape:
            raise ValueError(f"{op}: tags has shape {tuple(tags.shape)}, ids {tuple(ids.shape)}: they must match")
        if tags.device != keys.device:
            raise ValueError(f"{op}: tags are on {tags.device}, keys/state on {keys.device}: they must match")


def _check_counts(op: str, keys: Tensor, counts: Tensor | None) -> None:
    if counts is None:
        return
    if counts.dtype != torch.int64 or counts.dim() != 1:
        raise TypeError(f"{op}: counts must be a 1-D int64 tensor, got {counts.dtype} of shape {tuple(counts.shape)}")
    if counts.device != keys.device:
        raise ValueError(f"{op}: counts are on {counts.device}, keys/state on {keys.device}: they must match")
    if not counts.is_contiguous():
        raise ValueError(f"{op}: counts must be contiguous (updated in place)")


def _check_tag_values(op: str, tags: Tensor | None, counts: Tensor | None = None) -> None:
    """The CPU kernels' content check (a CUDA kernel does not sync to check: out-of-range tags
    alias other tags there, and go uncounted)."""
    top = MAX_TAG if counts is None else min(MAX_TAG, counts.numel() - 1)
    if tags is None:
        if top < 0:
            raise ValueError(f"{op}: counts is empty; it needs an entry per tag (tag 0 without tags)")
    elif tags.numel() and not bool(((tags >= 0) & (tags <= top)).all()):
        held = "" if top == MAX_TAG else f" (counts has {counts.numel()} entries, one per tag)"
        raise ValueError(f"{op}: tags must lie in [0, {top}]{held}")


@torch.library.custom_op("fxrec::table_find", mutates_args=())
def table_find(keys: Tensor, state: Tensor, ids: Tensor, tags: Tensor | None = None) -> Tensor:
    """int64 rows of ``ids`` (their shape; under ``tags``), -1 where absent. Read-only (module
    docstring)."""
    _check_args("fxrec::table_find", keys, state, ids, tags)
    _check_tag_values("fxrec::table_find", tags)
    return _find_torch(keys, state, ids, tags)


@table_find.register_kernel("cuda")
def _table_find_cuda(keys: Tensor, state: Tensor, ids: Tensor, tags: Tensor | None = None) -> Tensor:
    _check_args("fxrec::table_find", keys, state, ids, tags)
    return table_find_triton(keys, state, ids, tags).reshape(ids.shape)


@table_find.register_fake
def _table_find_fake(keys: Tensor, state: Tensor, ids: Tensor, tags: Tensor | None = None) -> Tensor:
    _check_args("fxrec::table_find", keys, state, ids, tags)
    return torch.empty_like(ids, memory_format=torch.contiguous_format)


@torch.library.custom_op("fxrec::table_find_or_insert", mutates_args=("keys", "state", "counts"))
def table_find_or_insert(keys: Tensor, state: Tensor, ids: Tensor, tags: Tensor | None,
                         counts: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(rows, inserted)`` of ``ids`` (their shape; under ``tags``), inserting absent ids into
    ``keys``/``state`` in place; ``inserted`` marks the first occurrence of each new id;
    ``counts[tag]`` grows by the ids inserted under ``tag`` (module docstring)."""
    _check_args("fxrec::table_find_or_insert", keys, state, ids, tags)
    _check_counts("fxrec::table_find_or_insert", keys, counts)
    _check_tag_values("fxrec::table_find_or_insert", tags, counts)
    return _find_or_insert_torch(keys, state, ids, tags, counts)


@table_find_or_insert.register_kernel("cuda")
def _table_find_or_insert_cuda(
    keys: Tensor, state: Tensor, ids: Tensor, tags: Tensor | None, counts: Tensor | None
) -> tuple[Tensor, Tensor]:
    _check_args("fxrec::table_find_or_insert", keys, state, ids, tags)
    _check_counts("fxrec::table_find_or_insert", keys, counts)
    rows, inserted = table_find_or_insert_triton(keys, state, ids, tags, counts)
    return rows.reshape(ids.shape), inserted.reshape(ids.shape)


@table_find_or_insert.register_fake
def _table_find_or_insert_fake(
    keys: Tensor, state: Tensor, ids: Tensor, tags: Tensor | None, counts: Tensor | None
) -> tuple[Tensor, Tensor]:
    _check_args("fxrec::table_find_or_insert", keys, state, ids, tags)
    _check_counts("fxrec::table_find_or_insert", keys, counts)
    rows = torch.empty_like(ids, memory_format=torch.contiguous_format)
    return rows, torch.empty_like(rows, dtype=torch.bool)


_TAG_DTYPES = (torch.uint8, torch.int16, torch.int32)


def _check_unique_tagged(ids: Tensor, tags: Tensor) -> None:
    op = "fxrec::unique_tagged"
    if ids.dtype != torch.int64 or ids.dim() != 1:
        raise TypeError(f"{op}: ids must be a 1-D int64 tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
    if tags.dtype not in _TAG_DTYPES or tags.dim() != 1:
        raise TypeError(f"{op}: tags must be a 1-D uint8, int16 or int32 tensor, got {tags.dtype} of shape "
                        f"{tuple(tags.shape)}")
    if tags.shape != ids.shape:
        raise ValueError(f"{op}: tags has shape {tuple(tags.shape)}, ids {tuple(ids.shape)}: they must match")
    if tags.device != ids.device:
        raise ValueError(f"{op}: tags are on {tags.device}, ids on {ids.device}: they must match")


# One op, not its torch body inline: Inductor would lower the body's cumsum over an unbacked
# length into a single-program scan (~3 ms at 6M pairs on an H200, where torch's device scan takes
# tens of microseconds) and its scatter into a sorting index_put; opaque, the body runs as in
# eager mode, and it reads the data back once either way.
@torch.library.custom_op("fxrec::unique_tagged", mutates_args=())
def unique_tagged(ids: Tensor, tags: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``torch.unique`` of the (tag, id) pairs of 1-D ``ids`` (int64) and ``tags`` (table tags:
    uint8, int16 or int32, ``tag_dtype``): ``(ids, tags, inverse, counts)`` of the U distinct
    pairs, ascending by tag, then id, their tags int32; ``inverse [N]`` maps each pair to its
    distinct pair, ``counts [U]`` its occurrences."""
    _check_unique_tagged(ids, tags)
    return _unique_tagged_torch(ids, tags)


@unique_tagged.register_fake
def _unique_tagged_fake(ids: Tensor, tags: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_unique_tagged(ids, tags)
    n_unique = torch.library.get_ctx().new_dynamic_size()
    uniq_tags = tags.new_empty(n_unique, dtype=torch.int32)
    return ids.new_empty(n_unique), uniq_tags, ids.new_empty(ids.shape), ids.new_empty(n_unique)


# Above this many slots per looked-up entry, the marks' pass over the index costs more than
# sorting the entries (torch.unique): the two give the same result.
UNIQUE_ROWS_MAX_SLOTS_PER_ENTRY = 8


def _check_unique_rows(rows: Tensor) -> None:
    if rows.dtype != torch.int64 or rows.dim() != 1:
        raise TypeError(f"fxrec::unique_rows: rows must be a 1-D int64 tensor, got {rows.dtype} of shape "
                        f"{tuple(rows.shape)}")


def _unique_rows_torch(rows: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """``fxrec::unique_rows``'s kernel (every device). Rows index ``capacity`` slots, so a slot
    mark per row, its nonzero positions and their ranks scattered back give the distinct rows
    ascending and each entry's rank without sorting the entries; for a sparse lookup into a large
    index, ``torch.unique`` (a sort of the entries). One read-back of the distinct count either way."""
    if capacity > UNIQUE_ROWS_MAX_SLOTS_PER_ENTRY * rows.shape[0]:
        return torch.unique(rows, sorted=True, return_inverse=True)
    slot = rows + 1  # -1 (no row) -> slot 0
    marked = torch.zeros(capacity + 1, dtype=torch.bool, device=rows.device)
    marked.index_fill_(0, slot, True)  # the value a kernel argument (``marked[slot] = True`` copies it to the device)
    distinct = marked.nonzero().squeeze(1)
    rank = torch.empty(capacity + 1, dtype=torch.int64, device=rows.device)
    rank[distinct] = torch.arange(distinct.shape[0], device=rows.device)
    return distinct - 1, rank[slot]


# One op: opaque, its body runs as in eager mode (Inductor would lower the scatters of its marks
# and ranks over an unbacked length), and its one read-back stays inside.
@torch.library.custom_op("fxrec::unique_rows", mutates_args=())
def unique_rows(rows: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """The distinct entries of 1-D ``rows`` (int64, rows of an index of ``capacity`` slots, or -1)
    ascending, ``[U]``, and ``inverse [N]``: each entry's position among them. A lookup that
    finds its rows first (``table_find_or_insert`` takes duplicate ids) deduplicates them here:
    without sorting the entries when ``capacity`` is at most ``UNIQUE_ROWS_MAX_SLOTS_PER_ENTRY``
    slots per entry."""
    _check_unique_rows(rows)
    if capacity < 1:
        raise ValueError(f"fxrec::unique_rows: capacity must be >= 1, got {capacity}")
    return _unique_rows_torch(rows, capacity)


@unique_rows.register_fake
def _unique_rows_fake(rows: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    _check_unique_rows(rows)  # capacity: a symbolic size when compiled (a table's grows)
    n_unique = torch.library.get_ctx().new_dynamic_size()
    return rows.new_empty(n_unique), rows.new_empty(rows.shape)

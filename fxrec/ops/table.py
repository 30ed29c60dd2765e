"""``fxrec::table_find`` / ``fxrec::table_find_or_insert``: the id → row index of a dynamic table.

The index is two arrays the caller owns (``new_index``): ``keys: int64 [capacity]`` and
``state: int32 [capacity]`` (``EMPTY`` 0, ``WRITING`` 1 — a CUDA insert in flight, transient —,
``FILLED`` 3). ``capacity`` is a power of two. Every int64 is a valid id (0, negatives,
INT64_MIN/MAX): occupancy lives in ``state``, not in reserved key values. The slot index IS the
row of the id in the table's slot tensors (embedding, optimizer moments), which the caller keeps.

An id's probe sequence is ``(mix64(id) + k) & (capacity - 1)``, ``k = 0, 1, ...`` (``mix64``:
splitmix64's finalizer, on uint64; linear probing). These ops never delete: eviction and growth
rebuild the index outside them (the caller re-inserts the surviving ids into fresh arrays), so
there are no tombstones and a filled slot never changes — an id is absent exactly when its probe
reaches an empty slot first.

- ``table_find(keys, state, ids) -> rows``: int64, ``ids``' shape, -1 where absent. Read-only.
- ``table_find_or_insert(keys, state, ids) -> (rows, inserted)``: the row of every id, inserting
  the absent ones in place (``keys``/``state`` are mutated; all occurrences of an id in one call
  get one row). ``inserted`` (bool, ``ids``' shape) is True on exactly one occurrence of each id
  this call inserted, so the caller initializes each new row once: the FIRST occurrence on CPU,
  whichever occurrence claimed the slot on CUDA. A mutating op carries no autograd (DESIGN): the
  differentiable gather is a separate op on the returned rows.

Room: the caller grows the index (keeping the load <= 0.5) before a batch could fill it. If a
call would still overflow, the CPU kernel raises ``ValueError`` before writing anything; on CUDA
(no host sync) a lane that probes every slot without finding its id or an empty slot gives up and
its row is -1 (other ids of the call are still inserted).

CPU kernel (vectorized torch): ``torch.unique`` de-duplicates the ids; a read-only probe finds
the present ones and, for each absent one, the probe distance ``k`` of the first empty slot
(filled slots never change, so insertion resumes there). Then rounds, each over all unplaced
ids at once: a slot filled (by another id of this call) moves its id to ``k + 1``; ids landing on
an empty slot compete, the smallest id per slot wins (deterministic, independent of input order)
and writes key + ``FILLED``; the losers retry the same ``k``, now filled, next round. There is
always room, so every id is placed within ``2 * capacity`` rounds (a few, at low load).
CUDA kernel: ``fxrec.ops.triton.table`` (one lane per id, slots claimed by compare-and-swap).
Which slot an id gets depends on insertion order (CPU vs CUDA, batch order): compare indexes by
content (``table_items``), not slot by slot.
"""

import torch
from torch import Tensor

from fxrec.ops.uint64 import mix64
from fxrec.ops.triton.table import EMPTY, FILLED, WRITING, table_find_or_insert_triton, table_find_triton

__all__ = ["EMPTY", "FILLED", "WRITING", "new_index", "table_find", "table_find_or_insert", "table_items"]


def _home_slots(ids: Tensor, capacity: int) -> Tensor:
    """``mix64(uint64(id)) & (capacity - 1)`` (int64 wrap-around multiply == uint64's)."""
    return mix64(ids) & (capacity - 1)


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


def table_items(keys: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """``(ids, rows)`` of the filled slots, rows ascending (what a ``state_dict`` stores)."""
    _check_index("table_items", keys, state)
    rows = (state == FILLED).nonzero().squeeze(1)
    return keys[rows], rows


# ---------------------------------------------------------------------------------------------
# CPU kernel


def _probe(keys: Tensor, state: Tensor, ids: Tensor, home: Tensor) -> tuple[Tensor, Tensor]:
    """Read-only probe of flat ``ids``: ``(rows, k)``, rows -1 where absent; for an absent id,
    ``k`` is the probe distance of the first empty slot (``capacity``: none, the table is full)."""
    capacity = keys.numel()
    rows = torch.full_like(ids, -1)
    k = torch.zeros_like(ids)
    pending = torch.arange(ids.numel())
    while pending.numel() > 0:
        slot = (home[pending] + k[pending]) & (capacity - 1)
        filled = state[slot] == FILLED
        hit = filled & (keys[slot] == ids[pending])
        rows[pending[hit]] = slot[hit]
        pending = pending[filled & ~hit]
        k[pending] += 1
        pending = pending[k[pending] < capacity]
    return rows, k


def _find_torch(keys: Tensor, state: Tensor, ids: Tensor) -> Tensor:
    flat = ids.reshape(-1)
    rows, _ = _probe(keys, state, flat, _home_slots(flat, keys.numel()))
    return rows.reshape(ids.shape)


def _find_or_insert_torch(keys: Tensor, state: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    capacity = keys.numel()
    flat = ids.reshape(-1)
    uniq, inverse = torch.unique(flat, return_inverse=True)  # ascending
    home = _home_slots(uniq, capacity)
    rows, k = _probe(keys, state, uniq, home)
    new = (rows < 0).nonzero().squeeze(1)
    inserted = torch.zeros(flat.shape, dtype=torch.bool)
    if new.numel() == 0:
        return rows[inverse].reshape(ids.shape), inserted.reshape(ids.shape)
    free = capacity - int(torch.count_nonzero(state == FILLED))
    if new.numel() > free:
        raise ValueError(
            f"fxrec::table_find_or_insert: {new.numel()} new ids do not fit the {free} free slots of "
            f"keys/state (capacity {capacity}); grow the index first"
        )
    pending = new  # ascending unique indices == ascending ids
    while pending.numel() > 0:
        slot = (home[pending] + k[pending]) & (capacity - 1)
        filled = state[slot] == FILLED  # by an id placed earlier in this call: move on
        k[pending[filled]] += 1
        contenders, wanted = pending[~filled], slot[~filled]
        slots, which = torch.unique(wanted, return_inverse=True)
        winners = torch.full_like(slots, uniq.numel()).scatter_reduce_(0, which, contenders, "amin")
        keys[slots] = uniq[winners]
        state[slots] = FILLED
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


def _check_args(op: str, keys: Tensor, state: Tensor, ids: Tensor) -> None:
    _check_index(op, keys, state)
    if ids.dtype != torch.int64:
        raise TypeError(f"{op}: ids must be int64, got {ids.dtype}")
    if ids.device != keys.device:
        raise ValueError(f"{op}: ids are on {ids.device}, keys/state on {keys.device}: they must match")


@torch.library.custom_op("fxrec::table_find", mutates_args=())
def table_find(keys: Tensor, state: Tensor, ids: Tensor) -> Tensor:
    """int64 rows of ``ids`` (their shape), -1 where absent. Read-only (module docstring)."""
    _check_args("fxrec::table_find", keys, state, ids)
    return _find_torch(keys, state, ids)


@table_find.register_kernel("cuda")
def _table_find_cuda(keys: Tensor, state: Tensor, ids: Tensor) -> Tensor:
    _check_args("fxrec::table_find", keys, state, ids)
    return table_find_triton(keys, state, ids).reshape(ids.shape)


@table_find.register_fake
def _table_find_fake(keys: Tensor, state: Tensor, ids: Tensor) -> Tensor:
    _check_args("fxrec::table_find", keys, state, ids)
    return torch.empty_like(ids, memory_format=torch.contiguous_format)


@torch.library.custom_op("fxrec::table_find_or_insert", mutates_args=("keys", "state"))
def table_find_or_insert(keys: Tensor, state: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows, inserted)`` of ``ids`` (their shape), inserting absent ids into ``keys``/``state``
    in place; ``inserted`` marks the first occurrence of each new id (module docstring)."""
    _check_args("fxrec::table_find_or_insert", keys, state, ids)
    return _find_or_insert_torch(keys, state, ids)


@table_find_or_insert.register_kernel("cuda")
def _table_find_or_insert_cuda(keys: Tensor, state: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    _check_args("fxrec::table_find_or_insert", keys, state, ids)
    rows, inserted = table_find_or_insert_triton(keys, state, ids)
    return rows.reshape(ids.shape), inserted.reshape(ids.shape)


@table_find_or_insert.register_fake
def _table_find_or_insert_fake(keys: Tensor, state: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    _check_args("fxrec::table_find_or_insert", keys, state, ids)
    rows = torch.empty_like(ids, memory_format=torch.contiguous_format)
    return rows, torch.empty_like(rows, dtype=torch.bool)

"""Triton kernels for ``fxrec::table_find`` / ``fxrec::table_find_or_insert`` (open addressing).

The index is ``keys: int64 [capacity]`` and ``state: int32 [capacity]`` (``EMPTY``, ``WRITING``,
``FILLED``); an id's probe sequence is ``(mix64(id) + k) & (capacity - 1)``, ``k = 0, 1, ...``
(``mix64``: splitmix64's finalizer). The semantics are documented in ``fxrec.ops.table``.

One lane per id, no de-duplication: lanes inserting the same id (in one block, across blocks, or
across concurrent launches on several streams) converge on one slot through the slot's state:

- ``old = atomic_cas(state[slot], EMPTY, WRITING)``, acquire-release. It is also the lane's read
  of the slot's state: one atomic per probe, and its acquire orders the key load after it.
- ``old == EMPTY``: the lane owns the slot: it stores the key, then publishes it with
  ``atomic_xchg(state[slot], FILLED)`` (release: the key store is visible before the state);
  the id was inserted.
- ``old == FILLED``: the key is loaded with ``volatile=True`` (no stale L1 line; the acquire above
  orders it after the state read). The id's key: found. Another key: next slot (no deletions, so
  a filled slot never changes).
- ``old == WRITING``: another lane is publishing that slot (within the same loop iteration, which
  never waits): the lane re-reads the same slot in the next iteration.

Triton's control flow is per program, so the probe loop is a ``while`` over "any lane of the
program unresolved", with per-lane masks. ``tl.atomic_cas`` takes no mask: lanes that are done
compare against ``-1`` (never a state), which reads their last slot and writes nothing.
A lane that probes all ``capacity`` slots without finding its id or an empty slot (a full table)
gives up: its row is -1. The caller keeps the load low (it grows the index before it fills up).

``table_find`` is read-only and needs no atomics: a slot whose state is not ``FILLED`` ends the
probe (absent). It is ordered after inserts launched before it on the same stream; it is not
ordered against inserts running concurrently on other streams (the caller synchronizes those).

The launchers work on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (programs then
run one after another: the interpreter checks the logic, not the races).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from fxrec.ops.triton.uint64 import mix64

__all__ = ["EMPTY", "FILLED", "WRITING", "table_find_or_insert_triton", "table_find_triton"]

EMPTY, WRITING, FILLED = 0, 1, 2
_EMPTY, _WRITING, _FILLED = tl.constexpr(EMPTY), tl.constexpr(WRITING), tl.constexpr(FILLED)

_BLOCK = 256  # ids per program: small, so one long probe holds back few lanes


@triton.jit
def _home_slot(ids, mask):
    """``mix64(uint64(id)) & mask`` as int64."""
    z = mix64(ids.to(tl.uint64, bitcast=True))
    return (z & mask.to(tl.uint64)).to(tl.int64, bitcast=True)


@triton.jit
def _find_kernel(keys_ptr, state_ptr, ids_ptr, rows_ptr, n, capacity, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    ids = tl.load(ids_ptr + offs, mask=in_range, other=0)
    mask = tl.cast(capacity, tl.int64) - 1  # tl.cast: capacity 1 arrives as a constexpr
    slot = _home_slot(ids, mask)
    probes = tl.zeros((BLOCK,), tl.int64)
    rows = tl.full((BLOCK,), -1, tl.int64)
    active = in_range
    while tl.max(active.to(tl.int32), axis=0) > 0:
        state = tl.load(state_ptr + slot, mask=active, other=_EMPTY)
        key = tl.load(keys_ptr + slot, mask=active & (state == _FILLED), other=0)
        found = active & (state == _FILLED) & (key == ids)
        rows = tl.where(found, slot, rows)
        probes += 1
        # done: found, an empty slot (absent), or every slot probed (full table, absent)
        active = active & (state == _FILLED) & (key != ids) & (probes < capacity)
        slot = (slot + 1) & mask
    tl.store(rows_ptr + offs, rows, mask=in_range)


@triton.jit
def _find_or_insert_kernel(
    keys_ptr, state_ptr, ids_ptr, rows_ptr, inserted_ptr, n, capacity, BLOCK: tl.constexpr
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    ids = tl.load(ids_ptr + offs, mask=in_range, other=0)
    mask = tl.cast(capacity, tl.int64) - 1  # tl.cast: capacity 1 arrives as a constexpr
    slot = _home_slot(ids, mask)
    probes = tl.zeros((BLOCK,), tl.int64)
    rows = tl.full((BLOCK,), -1, tl.int64)
    inserted = tl.zeros((BLOCK,), tl.int1)
    active = in_range
    while tl.max(active.to(tl.int32), axis=0) > 0:
        # claim the slot if empty; in any case read its state (see the module docstring)
        cmp = tl.where(active, _EMPTY, -1)
        old = tl.atomic_cas(state_ptr + slot, cmp, tl.full((BLOCK,), _WRITING, tl.int32), sem="acq_rel")
        won = active & (old == _EMPTY)
        tl.store(keys_ptr + slot, ids, mask=won)
        tl.atomic_xchg(state_ptr + slot, tl.full((BLOCK,), _FILLED, tl.int32), mask=won, sem="release")
        filled = active & (old == _FILLED)
        key = tl.load(keys_ptr + slot, mask=filled, other=0, volatile=True)
        found = filled & (key == ids)
        rows = tl.where(won | found, slot, rows)
        inserted = inserted | won
        moves_on = filled & (key != ids)  # WRITING: stay on the slot, re-read it next iteration
        probes += moves_on.to(tl.int64)
        active = active & (old != _EMPTY) & ~found & (probes < capacity)
        slot = tl.where(moves_on, (slot + 1) & mask, slot)
    tl.store(rows_ptr + offs, rows, mask=in_range)
    tl.store(inserted_ptr + offs, inserted, mask=in_range)


def table_find_triton(keys: Tensor, state: Tensor, ids: Tensor) -> Tensor:
    """int64 rows of flat int64 ``ids`` (-1 where absent); validated, contiguous index arrays."""
    ids = ids.reshape(-1).contiguous()
    rows = torch.empty_like(ids)
    if ids.numel() > 0:
        grid = (triton.cdiv(ids.numel(), _BLOCK),)
        _find_kernel[grid](keys, state, ids, rows, ids.numel(), keys.numel(), BLOCK=_BLOCK)
    return rows


def table_find_or_insert_triton(keys: Tensor, state: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, inserted) of flat int64 ``ids``, inserting absent ids into ``keys``/``state`` in
    place. ``inserted`` marks one occurrence (whichever lane claimed the slot) per new id."""
    ids = ids.reshape(-1).contiguous()
    rows = torch.empty_like(ids)
    inserted = torch.empty(ids.shape, dtype=torch.bool, device=ids.device)
    if ids.numel() > 0:
        grid = (triton.cdiv(ids.numel(), _BLOCK),)
        _find_or_insert_kernel[grid](keys, state, ids, rows, inserted, ids.numel(), keys.numel(), BLOCK=_BLOCK)
    return rows, inserted

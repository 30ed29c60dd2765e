"""Triton kernels for ``fxrec::table_find`` / ``fxrec::table_find_or_insert`` (open addressing).

The index is ``keys: int64 [capacity]`` and ``state: int32 [capacity]`` (``EMPTY``, ``WRITING``,
``FILLED``, the tag of a filled slot's id in the bits from ``TAG_SHIFT`` up); an id's probe
sequence is ``(mix64(id + tag * GAMMA) + k) & (capacity - 1)``, ``k = 0, 1, ...`` (``mix64``:
splitmix64's finalizer; tag 0 without tags). The semantics are documented in ``fxrec.ops.table``.

One lane per id, no de-duplication: lanes inserting the same id (in one block, across blocks, or
across concurrent launches on several streams) converge on one slot through the slot's state.
The states are bit sets (``EMPTY`` 0b00, ``WRITING`` 0b01, ``FILLED`` 0b11) so that a CLAIM is
``atomic_or(state[slot], WRITING)``, which leaves ``WRITING`` and ``FILLED`` unchanged and turns
``EMPTY`` into ``WRITING``; unlike ``atomic_cas``, ``atomic_or`` takes a mask, so only lanes that
saw an empty slot issue an atomic. Each probe step:

- read ``state[slot]`` (plain ``volatile`` load: no stale L1 line). ``FILLED`` (its occupancy
  bits): load the key
  (``volatile``; the load's mask depends on the state just read, so it is issued after that read
  returned, and the writer's release below made the key visible first). The id's key and the
  state of the id's tag: found. Otherwise: next slot (no deletions, so a filled slot never changes).
- ``EMPTY``: claim it, ``old = atomic_or(state[slot], WRITING)`` (acquire-release). ``old == EMPTY``:
  the lane owns the slot: it stores the key, then publishes it with ``atomic_xchg(state[slot],
  FILLED | tag << TAG_SHIFT)`` (release: the key store is visible before the state); the id was inserted. Otherwise
  (another lane claimed it first) the lane re-reads the same slot next iteration.
- ``WRITING``: another lane is publishing that slot (a claim is published in the same loop
  iteration, which never waits): the lane re-reads the same slot next iteration.

An id already present costs plain loads only; a new id costs one claim and one publish.
Triton's control flow is per program, so the probe loop is a ``while`` over "any lane of the
program unresolved", with per-lane masks.
A lane that probes all ``capacity`` slots without finding its id or an empty slot (a full table)
gives up: its row is -1. The caller keeps the load low (it grows the index before it fills up).

Insert counts (``counts``, optional): each program adds its lanes' inserts under the tag of its
smallest in-range lane with ONE atomic (the callers' ids come in runs of one tag, so a program
mostly holds one tag), and a lane of another tag adds its own; tags outside ``[0, len(counts))``
are not counted. Per-lane adds into a few counters would queue millions of atomics on the same
addresses when a step inserts millions of ids.

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
from fxrec.ops.uint64 import GAMMA

__all__ = ["EMPTY", "FILLED", "MAX_TAG", "OCCUPANCY", "TAG_SHIFT", "WRITING", "filled_state",
           "table_find_or_insert_triton", "table_find_triton"]

EMPTY, WRITING, FILLED = 0, 1, 3  # bit sets: see the module docstring
OCCUPANCY = 3  # the state bits that say EMPTY / WRITING / FILLED; the tag lies above them
TAG_SHIFT = 2
MAX_TAG = (1 << (31 - TAG_SHIFT)) - 1  # the state stays a non-negative int32
_EMPTY, _WRITING, _FILLED = tl.constexpr(EMPTY), tl.constexpr(WRITING), tl.constexpr(FILLED)
_OCCUPANCY, _TAG_SHIFT, _GAMMA = tl.constexpr(OCCUPANCY), tl.constexpr(TAG_SHIFT), tl.constexpr(GAMMA)

_BLOCK = 256  # ids per program: small, so one long probe holds back few lanes


def filled_state(tag: int) -> int:
    """The state word of a slot filled with an id of tag ``tag`` (``FILLED`` for tag 0)."""
    return FILLED | (tag << TAG_SHIFT)


@triton.jit
def _home_slot(ids, tags, mask):
    """``mix64(uint64(id + tag * GAMMA)) & mask`` as int64."""
    z = mix64(ids.to(tl.uint64, bitcast=True) + tags.to(tl.uint64) * _GAMMA)
    return (z & mask.to(tl.uint64)).to(tl.int64, bitcast=True)


@triton.jit
def _load_ids(ids_ptr, tags_ptr, offs, in_range, HAS_TAGS: tl.constexpr):
    """``(ids, tags, the state of a slot holding each)``: tag 0 without tags."""
    ids = tl.load(ids_ptr + offs, mask=in_range, other=0)
    if HAS_TAGS:
        tags = tl.load(tags_ptr + offs, mask=in_range, other=0)
    else:
        tags = tl.zeros(ids.shape, tl.int32)
    return ids, tags, (tags << _TAG_SHIFT) | _FILLED


@triton.jit
def _find_kernel(keys_ptr, state_ptr, ids_ptr, tags_ptr, rows_ptr, n, capacity, BLOCK: tl.constexpr,
                 HAS_TAGS: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    ids, tags, wanted = _load_ids(ids_ptr, tags_ptr, offs, in_range, HAS_TAGS)
    mask = tl.cast(capacity, tl.int64) - 1  # tl.cast: capacity 1 arrives as a constexpr
    slot = _home_slot(ids, tags, mask)
    probes = tl.zeros((BLOCK,), tl.int64)
    rows = tl.full((BLOCK,), -1, tl.int64)
    active = in_range
    while tl.max(active.to(tl.int32), axis=0) > 0:
        state = tl.load(state_ptr + slot, mask=active, other=_EMPTY)
        filled = active & ((state & _OCCUPANCY) == _FILLED)
        key = tl.load(keys_ptr + slot, mask=filled, other=0)
        found = filled & (state == wanted) & (key == ids)
        rows = tl.where(found, slot, rows)
        probes += 1
        # done: found, an empty slot (absent), or every slot probed (full table, absent)
        active = filled & ~found & (probes < capacity)
        slot = (slot + 1) & mask
    tl.store(rows_ptr + offs, rows, mask=in_range)


@triton.jit
def _find_or_insert_kernel(
    keys_ptr, state_ptr, ids_ptr, tags_ptr, rows_ptr, inserted_ptr, counts_ptr, n, capacity, num_counts,
    BLOCK: tl.constexpr, HAS_TAGS: tl.constexpr, HAS_COUNTS: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    ids, tags, wanted = _load_ids(ids_ptr, tags_ptr, offs, in_range, HAS_TAGS)
    mask = tl.cast(capacity, tl.int64) - 1  # tl.cast: capacity 1 arrives as a constexpr
    slot = _home_slot(ids, tags, mask)
    probes = tl.zeros((BLOCK,), tl.int64)
    rows = tl.full((BLOCK,), -1, tl.int64)
    inserted = tl.zeros((BLOCK,), tl.int1)
    active = in_range
    while tl.max(active.to(tl.int32), axis=0) > 0:
        state = tl.load(state_ptr + slot, mask=active, other=_EMPTY, volatile=True)
        filled = active & ((state & _OCCUPANCY) == _FILLED)
        key = tl.load(keys_ptr + slot, mask=filled, other=0, volatile=True)
        found = filled & (state == wanted) & (key == ids)
        claim = active & (state == _EMPTY)
        old = tl.atomic_or(state_ptr + slot, tl.full((BLOCK,), _WRITING, tl.int32), mask=claim, sem="acq_rel")
        won = claim & (old == _EMPTY)
        tl.store(keys_ptr + slot, ids, mask=won)
        tl.atomic_xchg(state_ptr + slot, wanted, mask=won, sem="release")
        rows = tl.where(won | found, slot, rows)
        inserted = inserted | won
        moves_on = filled & ~found  # another id (or tag) there: next slot
        probes += moves_on.to(tl.int64)
        # WRITING, or a lost claim: re-read the slot next iteration
        active = active & ~found & ~won & (probes < capacity)
        slot = tl.where(moves_on, (slot + 1) & mask, slot)
    tl.store(rows_ptr + offs, rows, mask=in_range)
    tl.store(inserted_ptr + offs, inserted, mask=in_range)
    if HAS_COUNTS:
        counted = inserted & (tags >= 0) & (tags < num_counts)
        lead = tl.min(tl.where(in_range, tags, 0x7FFFFFFF), axis=0)  # the program's smallest tag
        with_lead = tl.sum((counted & (tags == lead)).to(tl.int64), axis=0)
        tl.atomic_add(counts_ptr + lead, with_lead, mask=with_lead > 0, sem="relaxed")
        tl.atomic_add(counts_ptr + tags, tl.full((BLOCK,), 1, tl.int64), mask=counted & (tags != lead),
                      sem="relaxed")


def _flat(ids: Tensor, tags: Tensor | None) -> tuple[Tensor, Tensor]:
    """Contiguous flat ``ids`` and the tags pointer argument (``ids`` itself, unread, without tags)."""
    ids = ids.reshape(-1).contiguous()
    return ids, ids if tags is None else tags.reshape(-1).contiguous()


def table_find_triton(keys: Tensor, state: Tensor, ids: Tensor, tags: Tensor | None = None) -> Tensor:
    """int64 rows of flat int64 ``ids`` under int32 ``tags`` (-1 where absent); validated,
    contiguous index arrays."""
    ids, tags_arg = _flat(ids, tags)
    rows = torch.empty_like(ids)
    if ids.numel() > 0:
        grid = (triton.cdiv(ids.numel(), _BLOCK),)
        _find_kernel[grid](keys, state, ids, tags_arg, rows, ids.numel(), keys.numel(), BLOCK=_BLOCK,
                           HAS_TAGS=tags is not None)
    return rows


def table_find_or_insert_triton(
    keys: Tensor, state: Tensor, ids: Tensor, tags: Tensor | None = None, counts: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(rows, inserted) of flat int64 ``ids`` under int32 ``tags``, inserting absent ids into
    ``keys``/``state`` in place. ``inserted`` marks one occurrence (whichever lane claimed the
    slot) per new (tag, id); ``counts[tag]`` (int64, contiguous, optional) grows by the ids
    inserted under ``tag``."""
    ids, tags_arg = _flat(ids, tags)
    rows = torch.empty_like(ids)
    inserted = torch.empty(ids.shape, dtype=torch.bool, device=ids.device)
    if ids.numel() > 0:
        grid = (triton.cdiv(ids.numel(), _BLOCK),)
        _find_or_insert_kernel[grid](keys, state, ids, tags_arg, rows, inserted, ids if counts is None else counts,
                                     ids.numel(), keys.numel(), 0 if counts is None else counts.numel(),
                                     BLOCK=_BLOCK, HAS_TAGS=tags is not None, HAS_COUNTS=counts is not None)
    return rows, inserted

"""Row-wise sharded tables (SPEC §8): every id has ONE owner rank, which alone holds its row,
its optimizer slots and its eviction clock; lookups and row gradients travel over all-to-all.

Ownership: ``owner_of(ids, W) = slice_of(ids) * W // NUM_SLICES``, where ``slice_of`` is the top
16 bits of the splitmix64 finalizer of the id (a bijective 64-bit mix). The mix is what makes
structured ids (multiples of 65536, ids with a tag in the high bits) spread evenly; RecIS took
the raw low 16 bits, which put such ids all on one rank. Slices map to ranks in contiguous
ranges (rank ``r`` owns slices ``[ceil(r S / W), ceil((r + 1) S / W))``), so a checkpoint written
at one world size is resharded at another by slice ranges: a rank reads only the old shards whose
slice ranges overlap its own (``fxrec.distributed.checkpoint``).

When tables are sharded: whenever a process group of more than one rank is running
(``is_distributed()``); every table, every lookup. A lookup is then a COLLECTIVE: every rank
must look up the same tables in the same order (every rank runs the same model), with its own
ids, possibly none.

One lookup of the distinct ids ``uniq [U]`` of a batch (``lookup_rows``):

1. each id goes to its owner: ids sorted by owner, the per-rank counts exchanged first (an
   all-to-all of ``W`` sizes; the split sizes are host ints, one sync), then the ids
   (``all_to_all_single``, a functional collective: below);
2. the owner deduplicates what it received (two ranks may ask for one id) and looks the ids up in
   its table: ``HashTable.lookup`` — find-or-insert in training mode (new rows initialized from
   (table seed, id), ``last_seen`` updated: eviction runs on the owner), find only in eval mode
   or under ``AdmitHook("ReadOnly")`` (unseen ids: zero rows) — and gathers their rows;
3. the rows go back the same way (``[U, dim]``, in ``uniq`` order).

The received ``[U, dim]`` rows are what ``fxrec::table_combine`` reads as its "table", with rows
``arange(U)`` (``lookup_rows`` returns both), so the fused combiners run unchanged. The gradient
anchor (``grad_anchor``) is recorded by id instead of by row (``HashTable.grad_anchor(...,
ids=uniq)``): after ``backward()`` its ``[U, dim]`` gradient is per id.

Under ``torch.compile`` (``fxrec.compile``) the whole exchange is traced into the model's graph:
one implementation, eager and compiled. The all-to-alls are functional collectives
(``torch.distributed._functional_collectives.all_to_all_single``, a graph node); the split sizes'
``.tolist()`` gives unbacked ints (``capture_scalar_outputs``), which size the received tensors.
What that asks of the code: the per-rank counts are a ``scatter_add`` into ``W`` zeros, not
``bincount(minlength=W)``, whose length is data-dependent (``.tolist()`` of it cannot be traced);
the answered rows return to ``uniq`` order by a gather through the inverse permutation, not by
``out[order] = rows`` (Inductor lowers that ``index_put`` of an unbacked row count into a kernel
that divides by zero for no rows: ``fxrec/ops/gather.py``); the traffic counters are a tensor
(Dynamo guards on the values of a dict of ints: a recompile every step). The owner's
find-or-insert cannot grow its table inside a graph, and a rank receives ids from every rank:
``fxrec.compile`` reserves room before each call for every rank's bound of the step's ids
(``owner_bounds``: one all-reduce of host ints). The fetched rows carry no gradient in either mode
(the exchange runs under ``no_grad``); the anchor does, and the backward's exchange stays outside
the graph, eager, at the sparse optimizer's step:

Backward, at the sparse optimizer's step (``reduce_grads_to_owners``, a collective over every
table, called before the update; its docstring says which messages): each rank sums its pending gradients per id over its
occurrences (``HashTable.take_id_grads``: all micro-batches of a gradient-accumulation group,
all lookups of the table), sends (id, gradient sum, occurrence count) to the owner, and the owner
reduces over all ranks (SPEC §4.5): ``"worker"``: ``sum / W`` (DDP's mean over ranks of dense
gradients: the gradient of the mean of the ranks' losses); ``"id"``: ``sum / W / occurrences``
over every rank's occurrences, i.e. what one process would get on the ranks' batches
concatenated. Ids the owner does not hold (ReadOnly or eval misses, evicted since the lookup) get
no update. Sending the ids again, rather than remembering each lookup's exchange, costs 8 bytes
an id and makes one exchange per table and step however many lookups and micro-batches fed it.

Coalesced tables (``fxrec.passes.table_coalesce``: several logical tables in one
``TableStorage``, each id under its table's tag): ownership stays a function of the 64-bit id
alone, the same for every logical table, so each rank's storage holds, per member, exactly the
ids that member would hold un-coalesced, and each logical table's ``state_dict`` (the
checkpoint's per-table shard) reshards by slice as any table's. A merged lookup of several
members (``lookup_rows(tables, uniq, tags)``, one dedup of (tag, id) pairs) sends each pair to
the owner of its id as 3 int32 words (id, tag): one all-to-all, counted as ``"ids"`` (8 bytes)
and ``"tags"`` (4 bytes); the owner deduplicates the pairs and does ONE tagged lookup in its
storage. Lookups of one member send no tags (the owner knows the table). The one anchor of a
merged lookup is recorded by each member for its own ids (``shared_grad_anchor``), and
gradients reduce per LOGICAL table as above (``take_id_grads`` / ``reduce_grads_to_owners``: one
message per table; the owner finds the rows under the table's tag).

Tensors travel on the table's device where the backend can take them there (NCCL: CUDA), else
through the CPU (gloo; ``collective_device``). ``traffic()`` counts the bytes this process SENT
to other ranks by all-to-all (its own share stays local), by kind: ``"sizes"``, ``"ids"``,
``"tags"`` (a coalesced group's table tags), ``"rows"``, ``"grads"`` (the backward's ids,
gradients and counts); ``reset_traffic()`` zeroes
the counters (a benchmark reads them per step).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from fxrec.distributed.env import collective_device, is_distributed
from fxrec.ops.table import tag_dtype, unique_tagged

if TYPE_CHECKING:
    from fxrec.nn.modules.hashtable import HashTable

__all__ = ["NUM_SLICES", "anchor_ids", "grad_anchor", "lookup_rows", "mix64", "owner_bounds", "owner_of",
           "reduce_grads_to_owners", "reset_traffic", "slice_of", "slice_range", "traffic"]

NUM_SLICES = 1 << 16
_SLICE_BITS = 16

# splitmix64's finalizer constants as the int64 with the same bits
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)

# bytes sent, by kind: a tensor that a compiled graph adds to (module docstring: compiled)
_KINDS = ("sizes", "ids", "tags", "rows", "grads")
_traffic = torch.zeros(len(_KINDS), dtype=torch.int64)


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic: it copies the sign bit)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(ids: Tensor) -> Tensor:
    """splitmix64's finalizer of int64 ``ids`` (as uint64 bits, wrapping), int64: a bijection whose
    every output bit depends on every input bit."""
    if ids.dtype != torch.int64:
        raise TypeError(f"mix64: ids must be int64, got {ids.dtype}")
    z = (ids ^ _shr(ids, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def slice_of(ids: Tensor) -> Tensor:
    """The slice (int64 in ``[0, NUM_SLICES)``) of each id: the top 16 bits of ``mix64``."""
    return _shr(mix64(ids), 64 - _SLICE_BITS)


def _check_world(world: int) -> None:
    if isinstance(world, bool) or not isinstance(world, int) or not 1 <= world <= NUM_SLICES:
        raise ValueError(f"world size must be an int in [1, {NUM_SLICES}], got {world!r}")


def owner_of(ids: Tensor, world: int) -> Tensor:
    """The owner rank (int64) of each id at world size ``world``: slices in contiguous ranges."""
    _check_world(world)
    return slice_of(ids) * world // NUM_SLICES


def slice_range(rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)``: the slices ``rank`` owns at world size ``world``."""
    _check_world(world)
    if not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, {world}), got {rank}")
    return -(-rank * NUM_SLICES // world), -(-(rank + 1) * NUM_SLICES // world)


def traffic() -> dict[str, int]:
    """Bytes this process sent to other ranks through all-to-all since ``reset_traffic``, by kind
    (module docstring)."""
    return dict(zip(_KINDS, _traffic.tolist()))


def reset_traffic() -> None:
    _traffic.zero_()


def _all_to_all(send: Tensor, send_splits: list[int], recv_splits: list[int], kind: str | dict[str, int]) -> Tensor:
    """``all_to_all_single`` of ``send`` (rows split by ``send_splits``, one part per rank), on the
    backend's device for ``send``'s; the received rows on ``send``'s device. ``kind``: the traffic
    counter the bytes go to, or ``{kind: bytes of each row}`` for rows of several kinds. A
    functional collective, traced by ``torch.compile``; the split sizes may be unbacked ints there
    (module docstring)."""
    comm = collective_device(send.device)
    out = funcol.wait_tensor(funcol.all_to_all_single(send.contiguous().to(comm), recv_splits, send_splits,
                                                      dist.group.WORLD))
    me = dist.get_rank()
    sent = sum(send_splits) - send_splits[me]
    if isinstance(kind, str):
        kind = {kind: send.element_size() * math.prod(send.shape[1:])}
    for k, row_bytes in kind.items():
        _traffic[_KINDS.index(k)] += sent * row_bytes
    return out.to(send.device)


def _exchange_counts(counts: Tensor) -> list[int]:
    """Every rank sends ``counts[r]`` to rank ``r``; returns what each rank sent this one (host ints)."""
    recv = _all_to_all(counts, [1] * counts.numel(), [1] * counts.numel(), "sizes")
    return recv.tolist()


def _route(ids: Tensor) -> tuple[Tensor, list[int], list[int]]:
    """``(order, send_splits, recv_splits)``: ``ids[order]`` grouped by owner rank, how many go
    to each rank, how many come from each."""
    world = dist.get_world_size()
    owners = owner_of(ids, world)
    order = torch.argsort(owners, stable=True)
    # not bincount(minlength=world): its length is data-dependent, and compiled, .tolist() needs a known one
    counts = torch.zeros(world, dtype=torch.int64, device=ids.device).scatter_add_(0, owners, torch.ones_like(owners))
    return order, counts.tolist(), _exchange_counts(counts)


def _local_rows(tables: Sequence[HashTable], uniq: Tensor, tags: Tensor | None) -> Tensor:
    """This process's rows of ``uniq`` (under ``tags``; None: all ``tables[0]``'s) in the tables'
    storage, inserting or not as the tables' lookup does."""
    first = tables[0]
    if len(tables) == 1 and tags is None:
        return first.lookup(uniq)
    storage = first.storage
    return storage.lookup(uniq, storage.tags_of(uniq, first.tag) if tags is None else tags, tables)


@torch.no_grad()
def _sharded_rows(tables: Sequence[HashTable], uniq: Tensor, tags: Tensor | None) -> Tensor:
    """The ``[U, dim]`` rows of the distinct ids (or (tag, id) pairs) ``uniq`` from their owners
    (module docstring), eagerly or traced into a compiled graph. Eager, the owner's lookup
    reserves room for the ids it received (``TableStorage.lookup``); compiled, ``fxrec.compile``
    reserved it before the call (``owner_bounds``)."""
    order, send_splits, recv_splits = _route(uniq)
    if tags is None:
        asked = _all_to_all(uniq[order], send_splits, recv_splits, "ids")
        owned, inverse = torch.unique(asked, return_inverse=True)
        owned_tags = None
    else:  # (id, tag) as 3 int32 words a pair: one message
        words = torch.cat([_as_int32(uniq), tags.to(torch.int32)[:, None]], 1)[order]
        got = _all_to_all(words, send_splits, recv_splits, {"ids": 8, "tags": 4})
        asked = _ids_of(got)
        asked_tags = got[:, 2].to(tag_dtype(max(t.tag for t in tables))).contiguous()  # narrowest: faster sort
        owned, owned_tags, inverse, _ = unique_tagged(asked, asked_tags)
    local = _local_rows(tables, owned, owned_tags)
    # Row gathers through fxrec::gather_rows, not ``rows[index]``: Inductor (torch 2.11) lowers
    # an index of [n, dim] rows with an unbacked n into a 2-D kernel whose launch grid divides by
    # zero when n is 0 (a rank asked for no rows of a table this step: seen on 4 GPUs).
    rows = torch.ops.fxrec.gather_rows(tables[0].storage.embedding, local[inverse])
    answered = _all_to_all(rows, recv_splits, send_splits, "rows")
    # back to uniq order by a gather through the inverse permutation (module docstring: compiled)
    back = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
    return torch.ops.fxrec.gather_rows(answered, back)


def lookup_rows(tables: HashTable | Sequence[HashTable], uniq: Tensor, tags: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(embedding, rows)`` for ``fxrec::table_combine`` of the distinct ids ``uniq [U]`` of
    ``tables`` (one table, or distinct tables of ONE storage, coalesced): ``tags [U]`` (int32)
    each id's table tag, the ids distinct as (tag, id) pairs; None: every id is ``tables[0]``'s.
    Unsharded (one process), the storage's ``embedding`` after the lookup and those rows;
    sharded, the ``[U, dim]`` rows fetched from their owners and ``arange(U)``: the pairs go to
    the owner of the id (module docstring: coalesced tables)."""
    tables = [tables] if not isinstance(tables, (list, tuple)) else list(tables)
    if not is_distributed():
        rows = _local_rows(tables, uniq, tags)
        return tables[0].storage.embedding, rows
    return _sharded_rows(tables, uniq, tags), torch.arange(uniq.shape[0], dtype=torch.int64, device=uniq.device)


def owner_bounds(bounds: Sequence[int]) -> list[int]:
    """``fxrec.compile``'s room (module docstring: compiled): given this rank's upper bounds of the
    distinct ids its lookups of each storage send in a step (one int per storage, in the order
    every rank uses), the upper bounds of the ids its owner lookups of each can receive: every
    rank's bounds summed, by one all-reduce of host ints (a collective: every rank calls it). One
    process: ``bounds``."""
    bounds = list(bounds)
    for b in bounds:
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"owner_bounds: bounds must be ints, got {b!r} in {bounds}")
        if b < 0:
            raise ValueError(f"owner_bounds: bounds must be >= 0, got {b} in {bounds}")
    if not is_distributed():
        return bounds
    total = torch.tensor(bounds, dtype=torch.int64, device=collective_device())
    dist.all_reduce(total)
    return total.tolist()


def anchor_ids(uniq: Tensor) -> Tensor | None:
    """The ``ids`` argument of ``HashTable.grad_anchor`` / ``shared_grad_anchor`` for a lookup
    of ``uniq`` through ``lookup_rows``: ``uniq`` when sharded (gradients recorded by id), else
    None (by row)."""
    return uniq if is_distributed() else None


def grad_anchor(table: HashTable, uniq: Tensor, rows: Tensor, counts: Tensor) -> Tensor | None:
    """The gradient anchor of the ids ``uniq`` at ``rows`` (``lookup_rows``'s), with ``counts``
    occurrences each: recorded by row when unsharded, by id when sharded (module docstring)."""
    return table.grad_anchor(rows, counts, ids=anchor_ids(uniq))


def _as_int32(t: Tensor) -> Tensor:
    """``[R, k]`` int32 words of a ``[R]`` int64 / float32 or ``[R, d]`` float32 tensor's bits."""
    return (t[:, None] if t.dim() == 1 else t).contiguous().view(torch.int32)


def _ids_of(words: Tensor) -> Tensor:
    """The ``[R]`` int64 ids in the first two int32 words of each row of ``words [R, k]``
    (``_as_int32``'s). A row-major copy, not ``.contiguous()``: a single row keeps its stride
    ``k`` there (it counts as contiguous), and an odd ``k`` cannot be viewed as int64 (an owner sent
    one (id, tag) pair failed so)."""
    return words[:, :2].clone(memory_format=torch.contiguous_format).view(torch.int64).reshape(-1)


def _owner_grads(table: HashTable, got: Tensor, world: int) -> tuple[Tensor, Tensor]:
    """``(rows, grads)`` of this rank's table from the received ``[R, 2 + dim + 1]`` int32 words
    (id, gradient sum, count per row; several rows per id when several ranks sent it), reduced
    per ``grad_reduce_by`` (module docstring)."""
    ids = _ids_of(got)
    sums_counts = got[:, 2:].contiguous().view(torch.float32)
    owned, inverse = torch.unique(ids, return_inverse=True)
    merged = torch.zeros(owned.shape[0], table.dim + 1, dtype=torch.float32, device=got.device)
    merged.index_add_(0, inverse, sums_counts)
    grads = merged[:, :-1] / world
    if table.grad_reduce_by == "id":
        grads /= merged[:, -1:].clamp_min(1.0)
    rows = table.find(owned)  # this table's rows: its tag in a coalesced storage
    held = rows >= 0
    return rows[held], grads[held]


@torch.no_grad()
def reduce_grads_to_owners(tables: list[HashTable]) -> list[tuple[Tensor, Tensor]]:
    """Per table, ``(rows [R], grads [R, dim])`` of THIS rank's table: every rank's pending
    gradients of the ids it owns, reduced per ``grad_reduce_by`` (module docstring); clears the
    pending gradients. A collective: every rank calls it with the same tables in the same order.

    Messages, all tables together: ONE all-to-all of the ``[W, T]`` per-table row counts (one host
    sync for the split sizes), then one all-to-all per table of its rows, each row's id, gradient
    sum and count as int32 words (bit copies: one message instead of an id message and a float
    message, and no float ever reinterprets an id)."""
    if not tables:
        return []
    world = dist.get_world_size()
    taken = [table.take_id_grads() for table in tables]
    owners = [owner_of(ids, world) for ids, _, _ in taken]
    device = taken[0][0].device
    counts = torch.stack([torch.bincount(o, minlength=world).to(device) for o in owners])  # [T, W]
    per_rank = counts.T.contiguous().reshape(-1)  # rank-major: what goes to rank r, table by table
    got_counts = _all_to_all(per_rank, [len(tables)] * world, [len(tables)] * world, "sizes")
    send = counts.T.tolist()  # [W][T]
    recv = got_counts.reshape(world, len(tables)).tolist()
    out = []
    for t, (table, (ids, sums, occurrences), own) in enumerate(zip(tables, taken, owners)):
        order = torch.argsort(own, stable=True)
        payload = torch.cat([_as_int32(ids), _as_int32(sums), _as_int32(occurrences)], 1)[order]
        got = _all_to_all(payload, [row[t] for row in send], [row[t] for row in recv], "grads")
        out.append(_owner_grads(table, got, world))
    return out

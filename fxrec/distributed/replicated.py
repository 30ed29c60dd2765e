"""Replicated sparse tables: every rank holds every id, and every rank applies every rank's row
gradients, so the replicas stay identical (until row-wise sharding, SPEC §8, replaces this).

Why replicas stay identical:

- Initial rows are a pure function of (table seed, id) (``fxrec::init_rows``), so an id inserted
  on two ranks, at different times and in different orders, starts with the same row.
- ``sync_replicated_grads`` (called by ``SparseOptimizer.step`` when a process group of more
  than one rank is running) all-gathers every table's touched ids and row gradients from every
  rank. Each rank then merges the SAME gathered data in the SAME order: the union of ids, sorted
  (``torch.unique``), gradients summed rank by rank (rank 0's first; one ``index_add_`` per rank,
  whose indices are distinct, so even CUDA's atomic adds are deterministic), and inserts the ids it
  has not seen. Every rank therefore updates the same ids with bit-identical gradients, and the
  per-table optimizer state (``step``, Adam's ``b1p``/``b2p``) advances on the same steps.
- Reduction, DDP's convention (the gradient of the mean of the ranks' losses, i.e. what one
  process would get on all ranks' batches concatenated): ``"worker"`` tables' gradients come out
  of ``HashTable.take_grads`` already divided by WORLD_SIZE, so their sum over ranks is the mean
  over ranks, as DDP averages dense gradients (nothing is divided twice). ``"id"`` tables'
  gradients are per-rank means over occurrences; the merge weighs them by their occurrence counts
  and divides by WORLD_SIZE too: ``sum_r(g_r * n_r) / sum_r(n_r) / W``, the mean over every rank's
  occurrences of each occurrence's gradient of the mean loss.
- Eviction (``GlobalStepFilter``) counts from ``last_seen``: every gathered id gets
  ``last_seen = table.step`` on every rank, so every rank evicts the same ids at the same step.
  Known gap: an id looked up on some ranks only through non-trainable features (no gradient)
  refreshes ``last_seen`` on those ranks only, so it can be evicted at different steps on
  different ranks (its row is re-initialized identically, but trained values may then differ).

Communication per optimizer step, all tables together: one ``all_gather`` of the per-table row
counts, then one ``all_gather`` of a byte buffer (every table's ids, then every table's float32
gradients and counts) padded to the longest rank's. ``all_gather_object`` (pickling) would be far
slower for large gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fxrec.nn.modules.hashtable import HashTable

__all__ = ["sync_replicated_grads"]


def _as_bytes(t: Tensor) -> Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@torch.no_grad()
def _rows_for(table: HashTable, ids: Tensor) -> Tensor:
    """Rows of ``ids`` in ``table``, inserting those it lacks (when it admits); -1 for the rest.
    Every id found gets ``last_seen = table.step``."""
    rows = table.find(ids)
    missing = rows < 0
    if table.admits and bool(missing.any()):
        table.lookup(ids[missing])  # inserts and initializes rows and slots; may grow the table
        rows = table.find(ids)
    table.last_seen[rows[rows >= 0]] = table.step
    return rows


@torch.no_grad()
def sync_replicated_grads(
    items: list[tuple[HashTable, Tensor, Tensor, Tensor]],
) -> list[tuple[Tensor, Tensor]]:
    """Merge every rank's sparse gradients (module docstring).

    Args:
        items: per table, in the same table order on every rank: ``(table, rows [R], grads [R, dim],
            counts [R])`` as ``table.take_grads(return_counts=True)`` gives them (this rank's).

    Returns:
        per table, ``(rows [U], grads [U, dim])``: the union of all ranks' ids as rows of this
        rank's table (inserted where new), each once, with the merged float32 gradients —
        the same ids and the same gradient bits on every rank.

    Every rank must call it, with the same tables in the same order, even when it has no
    gradient rows (it then sends none).
    """
    world = dist.get_world_size()
    if not items:
        return []
    device = items[0][0].keys.device
    ids_parts, float_parts, lengths = [], [], []
    for table, rows, grads, counts in items:
        if table.keys.device != device:
            raise ValueError(f"sync_replicated_grads: table {table.name!r} is on {table.keys.device}, "
                             f"table {items[0][0].name!r} on {device}; replicated tables share one device")
        ids_parts.append(table.keys[rows])
        float_parts.append(grads.to(torch.float32).reshape(-1))
        if table.grad_reduce_by == "id":
            float_parts.append(counts.to(torch.float32))
        lengths.append(rows.numel())
    n = torch.tensor(lengths, dtype=torch.int64, device=device)
    gathered_n = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(gathered_n, n)
    counts_per_rank = torch.stack(gathered_n).tolist()  # [world][tables]

    def payload_bytes(ns: list[int]) -> tuple[int, int]:
        floats = sum(k * (table.dim + (1 if table.grad_reduce_by == "id" else 0))
                     for k, (table, *_rest) in zip(ns, items))
        return 8 * sum(ns), 4 * floats

    sizes = [sum(payload_bytes(ns)) for ns in counts_per_rank]
    longest = -(-max(sizes) // 8) * 8  # a multiple of 8: every rank's slice starts int64-aligned
    payload = torch.zeros(longest, dtype=torch.uint8, device=device)
    mine = torch.cat([_as_bytes(torch.cat(ids_parts)), _as_bytes(torch.cat(float_parts))])
    payload[: mine.numel()] = mine
    gathered = torch.empty(world * longest, dtype=torch.uint8, device=device)
    dist.all_gather(list(gathered.chunk(world)), payload)

    # decode: per rank, per table (ids, grads, counts)
    per_table: list[list[tuple[Tensor, Tensor, Tensor | None]]] = [[] for _ in items]
    for r, ns in enumerate(counts_per_rank):
        id_bytes, float_bytes = payload_bytes(ns)
        base = r * longest
        ids_all = gathered[base: base + id_bytes].view(torch.int64)
        floats = gathered[base + id_bytes: base + id_bytes + float_bytes].view(torch.float32)
        i = f = 0
        for t, (k, (table, *_rest)) in enumerate(zip(ns, items)):
            ids = ids_all[i: i + k]
            i += k
            grads = floats[f: f + k * table.dim].reshape(k, table.dim)
            f += k * table.dim
            counts = None
            if table.grad_reduce_by == "id":
                counts = floats[f: f + k]
                f += k
            per_table[t].append((ids, grads, counts))

    out = []
    for (table, *_rest), ranks in zip(items, per_table):
        uniq, inverse = torch.unique(torch.cat([ids for ids, _, _ in ranks]), return_inverse=True)
        merged = torch.zeros(uniq.numel(), table.dim, dtype=torch.float32, device=device)
        total = torch.zeros(uniq.numel(), dtype=torch.float32, device=device) if table.grad_reduce_by == "id" else None
        start = 0
        for ids, grads, counts in ranks:  # rank order; indices distinct within a rank
            index = inverse[start: start + ids.numel()]
            start += ids.numel()
            if total is None:
                merged.index_add_(0, index, grads)
            else:
                merged.index_add_(0, index, grads * counts[:, None])
                total.index_add_(0, index, counts)
        if total is not None:
            merged /= total.clamp_min(1.0)[:, None] * world
        rows = _rows_for(table, uniq)
        keep = rows >= 0
        out.append((rows[keep], merged[keep]))
    return out

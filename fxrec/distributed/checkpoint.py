"""Checkpoints of row-wise sharded tables (SPEC §7.1, §8): each rank saves its shard; loading
reshards to any world size.

Why each rank writes its own shard rather than rank 0 gathering them: a sharded table may not fit
one process (that is what sharding is for), so no process may need all of it at once, and the
write bandwidth of W writers adds up. The price: the checkpoint directory must be a file system
every rank sees (one host, or a shared file system across hosts).

A checkpoint written at world size W holds, per rank ``r``, the parts ``sparse.shard<r>``
(``{table name: HashTable.state_dict()}``: the ids that rank owned, their rows, ``last_seen``
and optimizer slots, the table step) and ``sparse_optimizer.shard<r>`` (that rank's sparse
optimizer ``state_dict``: per table the scalars — the same on every rank — and the slots of its
ids). ``save_sharded``: rank 0 opens the temp dir (``CheckpointManager.begin_save``) and
broadcasts its name, every rank writes its shard parts into it, rank 0 gathers their index
entries, writes the dense parts and commits (``finish_save``): the crc32c index covers every
file, and the checkpoint becomes visible only complete, as with one writer. A failure on any rank
removes the temp dir and raises on every rank.

Loading at world size W' (``shards_to_read``, then ``merge_shards``; ``load_shards`` does both):
the saved world size is the number of ``sparse.shard<k>`` parts. Owners are slices in contiguous ranges
(``fxrec.distributed.sharded``), so rank ``r`` reads only the old shards whose slice ranges
overlap its own, and keeps the ids it owns under W'. Per-id tensors (first dimension = the number
of ids) are concatenated; everything else (table step, optimizer scalars, param groups) is the
same in every shard and taken from the first one read.
"""

from __future__ import annotations

import pathlib
import re
import shutil
from typing import Any

import torch
import torch.distributed as dist

from fxrec.distributed.env import is_distributed
from fxrec.distributed.sharded import owner_of, slice_range
from fxrec.framework.checkpoint import CheckpointManager

__all__ = ["SHARDED_PARTS", "is_shard_part", "load_shards", "merge_shards", "save_sharded", "shard_part",
           "shards_to_read"]

SHARDED_PARTS = ("sparse", "sparse_optimizer")
_SHARD_RE = re.compile(r"(sparse|sparse_optimizer)\.shard(0|[1-9][0-9]*)")


def shard_part(kind: str, rank: int) -> str:
    """The part name of ``rank``'s shard of ``kind`` (``"sparse"`` or ``"sparse_optimizer"``)."""
    if kind not in SHARDED_PARTS:
        raise ValueError(f"shard_part: kind must be one of {SHARDED_PARTS}, got {kind!r}")
    return f"{kind}.shard{rank}"


def is_shard_part(name: str) -> bool:
    return _SHARD_RE.fullmatch(name) is not None


def save_sharded(manager: CheckpointManager, step: int, parts: dict[str, Any], shard: dict[str, Any]) -> pathlib.Path | None:
    """Save checkpoint ``step``: rank 0's ``parts`` and every rank's ``shard`` parts (module
    docstring). A collective; returns the checkpoint directory on rank 0, None elsewhere."""
    if not is_distributed():
        return manager.save(step, {**parts, **shard})
    rank = dist.get_rank()
    error: BaseException | None = None
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = str(manager.begin_save(step))
        except BaseException as e:  # tell the other ranks before raising
            error = e
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        raise error if error is not None else RuntimeError(f"checkpoint {step}: rank 0 failed to start the save")
    tmp = pathlib.Path(box[0])
    files: dict[str, dict] = {}
    try:
        for name, state in shard.items():
            files.update(manager.write_part(tmp, name, state))
    except BaseException as e:
        error = e
    written: list[Any] = [None] * dist.get_world_size()
    why = None if error is None else f"{type(error).__name__}: {error}"
    dist.all_gather_object(written, (list(shard), files, why))
    path = None
    if rank == 0:
        try:
            failed = [(r, w) for r, (_, _, w) in enumerate(written) if w is not None]
            if failed:
                raise RuntimeError(f"checkpoint {step}: rank {failed[0][0]} failed to write its shard: {failed[0][1]}")
            for name, state in parts.items():
                files.update(manager.write_part(tmp, name, state))
            names = list(parts)
            for their_names, their_files, _ in written:
                names += their_names
                files.update(their_files)
            path = manager.finish_save(step, tmp, names, files)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = error or e
    ok: list[Any] = [error is None]
    dist.broadcast_object_list(ok, src=0)
    if error is not None:
        raise error
    if not ok[0]:
        raise RuntimeError(f"checkpoint {step}: rank 0 failed to save it (see its log)")
    return path


def _merge(entries: list[dict], rank: int, world: int, what: str) -> dict:
    """One state from shards' states that hold ``ids`` (module docstring): the per-id tensors of
    the ids ``rank`` owns at ``world``, concatenated; the rest from the first shard."""
    out: dict[str, Any] = {}
    keeps = []
    for entry in entries:
        ids = entry.get("ids")
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
            raise ValueError(f"{what}: a shard's ids must be a 1-D int64 tensor")
        keeps.append(owner_of(ids, world) == rank)
    for key, first in entries[0].items():
        if isinstance(first, torch.Tensor) and first.dim() >= 1 and first.shape[0] == entries[0]["ids"].shape[0]:
            pieces = []
            for entry, keep in zip(entries, keeps):
                value = entry.get(key)
                if not isinstance(value, torch.Tensor) or value.shape[0] != keep.shape[0]:
                    raise ValueError(f"{what}: {key} must have one entry per id in every shard")
                pieces.append(value[keep.to(value.device)])
            out[key] = torch.cat(pieces)
        else:
            out[key] = first
    return out


def shards_to_read(names: list[str], rank: int, world: int, kinds: tuple[str, ...] = SHARDED_PARTS) -> list[str]:
    """Of a checkpoint's part ``names``, the shard parts of ``kinds`` that ``rank`` of ``world``
    must read: those of the saved ranks whose slice ranges overlap its own (module docstring)."""
    tables = [n for n in names if n.startswith("sparse.shard")]
    saved_world = len(tables)
    if tables != [shard_part("sparse", s) for s in range(saved_world)]:
        raise ValueError(f"a checkpoint's table shards must be sparse.shard0..sparse.shard<W-1>, got {tables}")
    lo, hi = slice_range(rank, world)
    overlapping = [s for s in range(saved_world)
                   if slice_range(s, saved_world)[0] < hi and lo < slice_range(s, saved_world)[1]]
    return [shard_part(k, s) for k in kinds for s in overlapping if shard_part(k, s) in names]


def merge_shards(parts: dict[str, Any], rank: int, world: int, kinds: tuple[str, ...] = SHARDED_PARTS,
                 what: str = "checkpoint") -> dict[str, Any]:
    """``{kind: state}`` for ``rank`` of ``world`` from the loaded shard ``parts``
    (``shards_to_read``'s): ``"sparse"``: ``{table: HashTable state}``; ``"sparse_optimizer"``:
    the sparse optimizer's ``state_dict``; None for a kind without shards."""
    out: dict[str, Any] = {}
    for kind in kinds:
        shards = [state for name, state in parts.items() if name.startswith(kind + ".shard") and is_shard_part(name)]
        where = f"{what}: {kind}"
        if not shards:
            out[kind] = None
        elif kind == "sparse":
            out[kind] = {table: _merge([sh[table] for sh in shards], rank, world, f"{where} table {table!r}")
                         for table in shards[0]}
        else:
            state = {table: _merge([sh["state"][table] for sh in shards], rank, world, f"{where} table {table!r}")
                     for table in shards[0]["state"]}
            out[kind] = {"state": state, "param_groups": shards[0]["param_groups"]}
    return out


def load_shards(manager: CheckpointManager, step: int, rank: int, world: int, kinds: tuple[str, ...] = SHARDED_PARTS,
                map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``merge_shards`` of checkpoint ``step``'s shards that ``rank`` of ``world`` must read."""
    parts = manager.load(step, parts=shards_to_read(manager.part_names(step), rank, world, kinds),
                         map_location=map_location)
    return merge_shards(parts, rank, world, kinds, f"checkpoint {step} of {manager.output_dir}")

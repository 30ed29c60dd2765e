"""The IO state: which rows of a worker's shard have been delivered, as plain JSON-able data.

The state is the position of the first row not yet delivered, ``(file_index, row)`` in the
shard's file list, plus the epoch (completed passes over the shard, which also seeds the file
order under ``shuffle=True``). Data order does not depend on the thread count, so a run resumed
from a state, at any ``read_threads_num``, delivers exactly the rows an uninterrupted run would.

The state also records what it was taken on (worker index/count, number of files in the shard,
name of the next file) so that loading it into a dataset over other files fails loudly instead
of skipping or repeating rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fxrec.io.packing import Position

__all__ = ["IOState"]

_FORMAT = "fxrec.io/1"


@dataclass(frozen=True)
class IOState:
    epoch: int
    position: Position

    @classmethod
    def start(cls, epoch: int = 0) -> "IOState":
        return cls(epoch, Position(0, 0))

    def to_dict(self, worker_idx: int, worker_num: int, shard: list[str]) -> dict:
        index = self.position.file_index
        return {
            "format": _FORMAT,
            "epoch": self.epoch,
            "file_index": index,
            "row": self.position.row,
            "worker_idx": worker_idx,
            "worker_num": worker_num,
            "num_files": len(shard),
            "file": os.path.basename(shard[index]) if index < len(shard) else None,
        }

    @classmethod
    def from_dict(cls, state: dict) -> "IOState":
        """Parse a dumped state (structure only; ``check`` compares it with the shard)."""
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"not an fxrec IO state (expected a dict with format={_FORMAT!r}): {state!r}")
        for key in ("epoch", "file_index", "row", "worker_idx", "worker_num", "num_files"):
            value = state.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"IO state field {key!r} must be an int >= 0, got {value!r}")
        return cls(state["epoch"], Position(state["file_index"], state["row"]))

    @staticmethod
    def check(state: dict, worker_idx: int, worker_num: int, shard: list[str]) -> None:
        """Raise ``ValueError`` unless ``state`` was dumped over this worker's shard."""
        problems = []
        if (state["worker_idx"], state["worker_num"]) != (worker_idx, worker_num):
            problems.append(
                f"it is for worker {state['worker_idx']} of {state['worker_num']}, this is worker {worker_idx} "
                f"of {worker_num}"
            )
        if state["num_files"] != len(shard):
            problems.append(f"it was taken over {state['num_files']} files, this shard has {len(shard)}")
        else:
            index = state["file_index"]
            expected = os.path.basename(shard[index]) if index < len(shard) else None
            if index > len(shard) or state.get("file") != expected:
                problems.append(f"its next file is {state.get('file')!r}, this shard's is {expected!r}")
        if problems:
            raise ValueError("cannot resume from this IO state: " + "; ".join(problems))

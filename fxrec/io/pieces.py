"""Decoded rows of one column, as numpy views of Arrow buffers, and their packing into tensors.

A *piece* holds some consecutive rows of one column of one file. Its arrays are views of the
Arrow buffers that pyarrow decoded into (no copy); slicing a piece by rows makes new views.
``concat`` packs the pieces of one batch into torch tensors:

- a batch whose rows lie in one decoded record batch, in the delivered dtype and not bound for
  pinned memory, gets tensors over the Arrow buffers themselves (zero copy: the tensor keeps the
  buffer alive; batches of one record batch cover disjoint ranges of it, so a consumer writing
  into one batch never changes another);
- otherwise (rows from several record batches or files, a dtype cast, pinned / GPU delivery)
  each array is packed with ONE ``np.concatenate`` written straight into the output tensor's
  memory, pinned when the batch goes to the GPU: that is the single copy on the read path, and
  it also casts.

Offsets are always fresh int64 arrays (Arrow's are int32 and not rebased), which is small.

- ``DensePiece``: a ``[rows, dim]`` array (fixed-length columns).
- ``RaggedPiece``: ``values`` plus one offsets array per ragged level (outer -> inner), an
  optional ``weight`` parallel to ``values``, and the row range it covers. The arrays are whole
  Arrow buffers with absolute positions, so a row slice only moves the range, and ``concat``
  rebases the offsets to start at 0 per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from fxrec.ragged import RaggedTensor

__all__ = ["DensePiece", "RaggedPiece", "numpy_dtype", "ragged_to_sparse_coo"]

_NUMPY_DTYPES = {
    torch.int8: np.int8,
    torch.int64: np.int64,
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
}


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype that stages ``dtype`` (float32 for bfloat16, which numpy lacks)."""
    return np.dtype(_NUMPY_DTYPES.get(dtype, np.float32))


def _empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> tuple[torch.Tensor, np.ndarray]:
    """A fresh tensor (pinned if asked) of ``dtype``'s staging type and its numpy view."""
    staging = dtype if dtype in _NUMPY_DTYPES else torch.float32
    out = torch.empty(shape, dtype=staging, pin_memory=pin)
    return out, out.numpy()


def _finish(out: torch.Tensor, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    if out.dtype == dtype:
        return out
    out = out.to(dtype)  # dtypes numpy lacks (bfloat16): one more cast
    return out.pin_memory() if pin else out


def _concat_into(parts: list[np.ndarray], shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    if len(parts) == 1 and not pin:
        (part,) = parts
        as_is = dtype in _NUMPY_DTYPES and part.dtype == numpy_dtype(dtype)
        if as_is and part.flags.writeable and part.flags.c_contiguous:
            # One piece already in the delivered dtype: hand over the Arrow memory itself.
            return torch.from_numpy(part).view(shape)
    out, view = _empty(shape, dtype, pin)
    # same_kind: float64 -> float32 and int32 -> int64 are intended; a float into an integer
    # tensor is a bug upstream and must fail here rather than truncate.
    np.concatenate(parts, axis=0, out=view, casting="same_kind")
    return _finish(out, dtype, pin)


@dataclass(frozen=True)
class DensePiece:
    """Rows of a fixed-length column: ``values[rows, dim]``, delivered as ``dtype``."""

    values: np.ndarray
    dtype: torch.dtype

    @property
    def num_rows(self) -> int:
        return self.values.shape[0]

    @property
    def signature(self) -> str:
        """What the column becomes: pieces packed into one column must agree on it."""
        return f"dense {str(self.dtype).removeprefix('torch.')} [rows, {self.values.shape[1]}]"

    def slice(self, start: int, stop: int) -> "DensePiece":
        return DensePiece(self.values[start:stop], self.dtype)

    @staticmethod
    def concat(pieces: list["DensePiece"], pin: bool) -> torch.Tensor:
        rows = sum(p.num_rows for p in pieces)
        dim = pieces[0].values.shape[1]
        return _concat_into([p.values for p in pieces], (rows, dim), pieces[0].dtype, pin)


@dataclass(frozen=True)
class RaggedPiece:
    """Rows ``start:stop`` of a ragged column. ``offsets[0][start:stop + 1]`` are the rows;
    ``offsets[k]`` indexes level ``k + 1`` (``values`` for the last level). The arrays are the
    whole decoded buffers and the positions absolute, so a row slice only moves ``start:stop``."""

    values: np.ndarray
    offsets: tuple[np.ndarray, ...]
    dtype: torch.dtype
    weight: np.ndarray | None = None
    weight_dtype: torch.dtype | None = None
    start: int = 0
    stop: int = -1  # -1: all rows of offsets[0]

    def __post_init__(self):
        if self.stop < 0:
            object.__setattr__(self, "stop", len(self.offsets[0]) - 1)

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    @property
    def signature(self) -> str:
        text = f"ragged {str(self.dtype).removeprefix('torch.')}, {len(self.offsets)} offset level(s)"
        if self.weight is not None:
            text += f", weight {str(self.weight_dtype).removeprefix('torch.')}"
        return text

    def slice(self, start: int, stop: int) -> "RaggedPiece":
        return replace(self, start=self.start + start, stop=self.start + stop)

    def _levels(self) -> tuple[list[np.ndarray], tuple[int, int]]:
        """Each level's entries for this piece's rows, and the range of ``values`` they cover."""
        lo, hi = self.start, self.stop
        levels = []
        for level in self.offsets:
            entries = level[lo : hi + 1]
            levels.append(entries)
            lo, hi = int(entries[0]), int(entries[-1])
        return levels, (lo, hi)

    @staticmethod
    def concat(pieces: list["RaggedPiece"], pin: bool) -> RaggedTensor:
        first = pieces[0]
        walked = [p._levels() for p in pieces]
        offsets = []
        for k in range(len(first.offsets)):
            total = sum(len(levels[k]) - 1 for levels, _ in walked)
            out, view = _empty((total + 1,), torch.int64, pin)
            view[0] = 0
            pos, base = 1, 0
            for levels, _ in walked:
                entries = levels[k]
                n = len(entries) - 1
                # rebase (this piece starts at `base`) and widen to int64 in one pass
                np.subtract(entries[1:], np.int64(int(entries[0]) - base), out=view[pos : pos + n])
                pos += n
                base += int(entries[-1]) - int(entries[0])
            offsets.append(out)
        ranges = [value_range for _, value_range in walked]
        num_values = sum(hi - lo for lo, hi in ranges)
        values = _concat_into(
            [p.values[lo:hi] for p, (lo, hi) in zip(pieces, ranges)], (num_values,), first.dtype, pin
        )
        weight = None
        if first.weight is not None:
            weight = _concat_into(
                [p.weight[lo:hi] for p, (lo, hi) in zip(pieces, ranges)], (num_values,), first.weight_dtype, pin
            )
        return RaggedTensor(values, offsets, weight)


def ragged_to_sparse_coo(rt: RaggedTensor, column: str) -> torch.Tensor:
    """``ragged_format=False`` delivery: a ``torch.sparse_coo_tensor`` of shape ``[B, L1, ..., Lk]``
    (each ragged dim = its longest row) whose indices are (row, position in row, ...)."""
    if rt.weight() is not None:
        raise ValueError(
            f"column {column!r} has weights, which a sparse COO tensor cannot carry beside the ids: "
            "use ragged_format=True"
        )
    offsets = rt.offsets()
    position = torch.arange(rt.values().shape[0], device=rt.device)
    index = []
    shape = []
    for level in reversed(offsets):  # inner -> outer: which row of this level owns each item
        owner = torch.searchsorted(level, position, right=True) - 1
        index.append(position - level[owner])
        lengths = level[1:] - level[:-1]
        shape.append(int(lengths.max()) if lengths.numel() else 0)
        position = owner
    index.append(position)
    shape.append(rt.batch_size())
    # built sorted and unique by construction, so the (costly) invariant check is skipped
    return torch.sparse_coo_tensor(
        torch.stack(index[::-1]), rt.values(), tuple(shape[::-1]), is_coalesced=True, check_invariants=False
    )

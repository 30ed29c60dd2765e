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
- ``HashedStringPiece``: a string-list column hashed at read time; it keeps the Arrow string
  buffers and ``concat`` hashes them into the batch's int64 ids (the ids' only write).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from fxrec.io.hashing import hash_strings
from fxrec.ragged import RaggedTensor

__all__ = ["DensePiece", "HashedStringPiece", "RaggedPiece", "numpy_dtype", "ragged_to_sparse_coo"]

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


class _RowRange:
    """Rows ``start:stop`` of a ragged piece's whole decoded buffers: a row slice only moves the
    range (no copy). ``stop = -1``: every row of ``_row_offsets()``."""

    def __post_init__(self):
        if self.stop < 0:
            object.__setattr__(self, "stop", len(self._row_offsets()) - 1)

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    def slice(self, start: int, stop: int):
        return replace(self, start=self.start + start, stop=self.start + stop)


def _weight_suffix(piece) -> str:
    return "" if piece.weight is None else f", weight {str(piece.weight_dtype).removeprefix('torch.')}"


@dataclass(frozen=True)
class RaggedPiece(_RowRange):
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

    def _row_offsets(self) -> np.ndarray:
        return self.offsets[0]

    @property
    def signature(self) -> str:
        text = f"ragged {str(self.dtype).removeprefix('torch.')}, {len(self.offsets)} offset level(s)"
        return text + _weight_suffix(self)

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
        offsets = [_rebased([levels[k] for levels, _ in walked], pin) for k in range(len(first.offsets))]
        ranges = [value_range for _, value_range in walked]
        num_values = sum(hi - lo for lo, hi in ranges)
        values = _concat_into(
            [p.values[lo:hi] for p, (lo, hi) in zip(pieces, ranges)], (num_values,), first.dtype, pin
        )
        return RaggedTensor(values, offsets, _concat_weights(pieces, ranges, num_values, pin))


@dataclass(frozen=True)
class HashedStringPiece(_RowRange):
    """Rows ``start:stop`` of a string-list column hashed at read time (``hash_type``), delivered
    as int64 ids with one offsets level. Holds the Arrow buffers (``offsets``: row -> string,
    ``string_offsets``: string -> byte, both absolute; ``data``: the bytes) and hashes when the
    batch is packed, straight into the batch's memory: hashing at decode time wrote each id into
    a fresh array that packing then copied (bench/README.md, "Reading")."""

    data: np.ndarray
    offsets: np.ndarray
    string_offsets: np.ndarray
    hash_type: str
    hash_bucket: int
    weight: np.ndarray | None = None  # parallel to the strings
    weight_dtype: torch.dtype | None = None
    start: int = 0
    stop: int = -1  # -1: all rows of offsets

    def _row_offsets(self) -> np.ndarray:
        return self.offsets

    @property
    def signature(self) -> str:
        text = f"ragged int64 hashed from strings ({self.hash_type}, bucket {self.hash_bucket}), 1 offset level"
        return text + _weight_suffix(self)

    @staticmethod
    def concat(pieces: list["HashedStringPiece"], pin: bool) -> RaggedTensor:
        entries = [p.offsets[p.start : p.stop + 1] for p in pieces]
        ranges = [(int(e[0]), int(e[-1])) for e in entries]
        num_values = sum(hi - lo for lo, hi in ranges)
        ids, view = _empty((num_values,), torch.int64, pin)
        pos = 0
        for piece, (lo, hi) in zip(pieces, ranges):
            hash_strings(piece.data, piece.string_offsets[lo : hi + 1], piece.hash_type, piece.hash_bucket,
                         out=view[pos : pos + hi - lo])
            pos += hi - lo
        return RaggedTensor(ids, [_rebased(entries, pin)], _concat_weights(pieces, ranges, num_values, pin))


def _rebased(entries: list[np.ndarray], pin: bool) -> torch.Tensor:
    """One offsets level of a batch from its pieces' absolute ``entries`` (each ``rows + 1``):
    rebased to start at 0 and continue across pieces, widened to int64."""
    out, view = _empty((sum(len(e) - 1 for e in entries) + 1,), torch.int64, pin)
    view[0] = 0
    pos, base = 1, 0
    for e in entries:
        n = len(e) - 1
        # rebase (this piece starts at `base`) and widen to int64 in one pass
        np.subtract(e[1:], np.int64(int(e[0]) - base), out=view[pos : pos + n])
        pos += n
        base += int(e[-1]) - int(e[0])
    return out


def _concat_weights(pieces: list, ranges: list[tuple[int, int]], num_values: int, pin: bool) -> torch.Tensor | None:
    """The pieces' weights over their value ``ranges``, packed, or None for an unweighted column."""
    first = pieces[0]
    if first.weight is None:
        return None
    return _concat_into([p.weight[lo:hi] for p, (lo, hi) in zip(pieces, ranges)], (num_values,), first.weight_dtype, pin)


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

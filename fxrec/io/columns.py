"""Declared columns (``fixedlen_feature`` / ``varlen_feature``) and their Arrow -> piece decoding.

Each declared column checks a file's Arrow type once (``decoder``) and returns a function that
turns the column's array for some rows into a piece (``fxrec.io.pieces``) of zero-copy numpy
views of the Arrow buffers: list offsets, child values, string offsets and bytes are read from
``Array.buffers()`` at the array's slice offset; nothing goes through Python objects. Copies
happen only where the data must change: read-time hashing (whose ids are written once, into the
batch, when it is packed: ``HashedStringPiece``), a fixed-length column with empty rows
(defaults filled in), and list rows that are null but backed by items (the items dropped).

Semantics (SPEC §2):
- a null list row is an empty row; a null item inside a list (number, string, key or value) is
  an error naming file, column and row, since a silently wrong id is the worst outcome;
- integer items -> int64 (uint64 reinterpreted, i.e. ids keep their 64 bits), float items ->
  the dataset's ``dtype``;
- string lists -> hashed int64 ids (``hash_type``) or int8 bytes with two offset levels
  (``trans_int8``); ``list<struct<key, value>>`` / ``map<key, value>`` -> ids from ``key`` and
  ``weight`` (``dtype``) from ``value``;
- fixed-length: each row has exactly ``len(default_value)`` items, or none (-> the default).
  A plain numeric column is accepted when ``len(default_value) == 1`` (null -> the default).
"""

from __future__ import annotations

from typing import Callable, Union

import numpy as np
import pyarrow as pa
import torch

from fxrec.io.errors import DataError
from fxrec.io.hashing import HASH_TYPES
from fxrec.io.pieces import DensePiece, HashedStringPiece, RaggedPiece, numpy_dtype

__all__ = ["Column", "Decoder", "FixedLenColumn", "VarLenColumn"]

Piece = Union[DensePiece, RaggedPiece, HashedStringPiece]
# (the column's array for some rows, the file row of its first row) -> piece
Decoder = Callable[[pa.Array, int], Piece]


# -- Arrow type predicates --------------------------------------------------------------------
def _is_list(t: pa.DataType) -> bool:
    return (
        pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_map(t)
    )


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _key_value_types(t: pa.DataType) -> tuple[pa.DataType, pa.DataType] | None:
    """(key, value) types of a ``struct<key, value>`` list item, else None."""
    if not pa.types.is_struct(t):
        return None
    names = [t.field(i).name for i in range(t.num_fields)]
    if "key" not in names or "value" not in names:
        return None
    return t.field("key").type, t.field("value").type


def _item_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_map(t):
        return pa.struct([pa.field("key", t.key_type), pa.field("value", t.item_type)])
    return t.value_type


# -- zero-copy views of Arrow buffers ---------------------------------------------------------
def _number_view(arr: pa.Array) -> np.ndarray:
    """The value slots of a numeric array (null slots hold arbitrary values): a view, no copy."""
    dtype = np.dtype(arr.type.to_pandas_dtype())
    if len(arr) == 0:
        return np.empty(0, dtype)
    view = np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr), offset=arr.offset * dtype.itemsize)
    return view.view(np.int64) if dtype == np.uint64 else view


def _offsets_view(arr: pa.Array, large: bool) -> np.ndarray:
    """The ``len + 1`` offsets of a list / string array, at its slice offset: a view, no copy."""
    dtype = np.dtype(np.int64 if large else np.int32)
    buffer = arr.buffers()[1]
    if buffer is None:  # an empty array may have no offsets buffer
        return np.zeros(1, dtype)
    return np.frombuffer(buffer, dtype=dtype, count=len(arr) + 1, offset=arr.offset * dtype.itemsize)


def _bytes_view(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(int8 data buffer, absolute string offsets into it) of a string / binary array."""
    large = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    data = arr.buffers()[2]
    data = np.empty(0, np.int8) if data is None else np.frombuffer(data, dtype=np.int8)
    return data, _offsets_view(arr, large)


def _valid_mask(arr: pa.Array) -> np.ndarray:
    return arr.is_valid().to_numpy(zero_copy_only=False)


def _list_rows(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(offsets, child): row ``i`` holds ``child[offsets[i]:offsets[i + 1]]``, null rows empty."""
    t = arr.type
    if pa.types.is_fixed_size_list(t):
        offsets = (np.arange(len(arr) + 1, dtype=np.int64) + arr.offset) * t.list_size
    else:
        offsets = _offsets_view(arr, pa.types.is_large_list(t))
    child = arr.values
    if arr.null_count:
        valid = _valid_mask(arr)
        lengths = np.diff(offsets)
        if lengths[~valid].any():
            # Null rows backed by items (always so for fixed-size lists): drop those items.
            lo, hi = int(offsets[0]), int(offsets[-1])
            child = child.slice(lo, hi - lo).filter(pa.array(np.repeat(valid, lengths)))
            offsets = np.concatenate([[0], np.cumsum(np.where(valid, lengths, 0))])
    return offsets, child


def _check_no_null_items(child: pa.Array, offsets: np.ndarray, path: str, name: str, first_row: int, what: str):
    if child.null_count == 0:
        return
    lo, hi = int(offsets[0]), int(offsets[-1])
    window = child.slice(lo, hi - lo)
    if window.null_count == 0:
        return
    item = lo + int(np.flatnonzero(~_valid_mask(window))[0])
    row = int(np.searchsorted(offsets, item, side="right")) - 1
    raise DataError(path, name, f"null {what} inside a list (a null id cannot be read)", row=first_row + row)


# -- declared columns -------------------------------------------------------------------------
class FixedLenColumn:
    """``fixedlen_feature(name, default_value)``: a dense ``[rows, len(default_value)]`` column."""

    def __init__(self, name: str, default_value, dtype: torch.dtype):
        if isinstance(default_value, (int, float)) and not isinstance(default_value, bool):
            default_value = [default_value]  # RecIS's docs also pass a bare number
        if (
            not isinstance(default_value, (list, tuple))
            or not default_value
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in default_value)
        ):
            raise ValueError(
                f"fixedlen_feature({name!r}): default_value must be a non-empty list of numbers, got {default_value!r}"
            )
        self.name = name
        self.default = tuple(default_value)
        self.dtype = dtype

    @property
    def dim(self) -> int:
        return len(self.default)

    def decoder(self, t: pa.DataType, path: str) -> Decoder:
        if _is_list(t) and _is_number(_item_type(t)):
            item = _item_type(t)
            decode_rows = self._decode_list
        elif _is_number(t) and self.dim == 1:
            item = t
            decode_rows = self._decode_scalar
        else:
            raise DataError(
                path,
                self.name,
                f"fixedlen_feature needs a list of numbers (or a plain number when default_value has one "
                f"item), got {t}",
            )
        target = torch.int64 if pa.types.is_integer(item) else self.dtype
        default = np.asarray(self.default, dtype=numpy_dtype(target))
        if target == torch.int64 and not np.array_equal(default, np.asarray(self.default)):
            raise DataError(path, self.name, f"default_value {list(self.default)} does not fit the integer column {t}")
        return lambda arr, first_row: decode_rows(arr, first_row, path, target, default)

    def _decode_list(self, arr, first_row, path, target, default) -> DensePiece:
        offsets, child = _list_rows(arr)
        _check_no_null_items(child, offsets, path, self.name, first_row, "number")
        items = _number_view(child)
        lengths = np.diff(offsets)
        lo, hi = int(offsets[0]), int(offsets[-1])
        full = lengths == self.dim
        if full.all():
            return DensePiece(items[lo:hi].reshape(len(lengths), self.dim), target)
        bad = np.flatnonzero(~full & (lengths != 0))
        if bad.size:
            row = int(bad[0])
            raise DataError(
                path,
                self.name,
                f"has {int(lengths[row])} items but fixedlen_feature declared {self.dim} "
                "(an empty row takes the default)",
                row=first_row + row,
            )
        dense = np.empty((len(lengths), self.dim), dtype=default.dtype)
        dense[:] = default
        dense[full] = items[lo:hi].reshape(-1, self.dim)  # empty rows hold no items
        return DensePiece(dense, target)

    def _decode_scalar(self, arr, first_row, path, target, default) -> DensePiece:
        values = _number_view(arr).reshape(len(arr), 1)
        if arr.null_count:
            valid = _valid_mask(arr)
            filled = np.empty((len(arr), 1), dtype=default.dtype)
            filled[:] = default
            filled[valid] = values[valid]  # null slots hold arbitrary bits: never cast them
            values = filled
        return DensePiece(values, target)


class VarLenColumn:
    """``varlen_feature(name, hash_type, hash_bucket, trans_int8)``: a ``RaggedTensor`` column."""

    def __init__(self, name: str, hash_type: str | None, hash_bucket: int, trans_int8: bool, dtype: torch.dtype):
        if hash_type is not None and hash_type not in HASH_TYPES:
            raise ValueError(
                f"varlen_feature({name!r}): hash_type must be one of {HASH_TYPES} or None, got {hash_type!r}"
            )
        if not isinstance(hash_bucket, int) or isinstance(hash_bucket, bool) or not 0 <= hash_bucket < 2**64:
            raise ValueError(f"varlen_feature({name!r}): hash_bucket must be an int in [0, 2**64), got {hash_bucket!r}")
        if hash_bucket and hash_type is None:
            raise ValueError(f"varlen_feature({name!r}): hash_bucket={hash_bucket} needs a hash_type")
        if hash_type is not None and trans_int8:
            raise ValueError(
                f"varlen_feature({name!r}): hash_type hashes the strings at read time and trans_int8 delivers "
                "their bytes; choose one"
            )
        self.name = name
        self.hash_type = hash_type
        self.hash_bucket = hash_bucket
        self.trans_int8 = bool(trans_int8)
        self.dtype = dtype

    def decoder(self, t: pa.DataType, path: str) -> Decoder:
        item = _item_type(t) if _is_list(t) else None
        if item is None or not (_is_number(item) or _is_bytes(item) or _key_value_types(item)):
            raise DataError(
                path, self.name, f"varlen_feature needs a list of numbers, strings or struct<key, value>, got {t}"
            )
        key_value = _key_value_types(item)
        ids = key_value[0] if key_value else item
        if key_value and not _is_number(key_value[1]):
            raise DataError(path, self.name, f"the weights (struct field 'value') must be numbers, got {t}")
        if _is_bytes(ids):
            if self.hash_type is None and not self.trans_int8:
                raise DataError(
                    path,
                    self.name,
                    f"is {t}: strings can't become tensors; declare hash_type='farm'|'murmur' (ids) "
                    "or trans_int8=True (bytes for the Hash op)",
                )
            if self.trans_int8 and key_value:
                raise DataError(
                    path,
                    self.name,
                    "trans_int8 cannot carry one weight per string (weights follow values); use hash_type",
                )
        elif not _is_number(ids):
            raise DataError(path, self.name, f"the ids (struct field 'key') must be numbers or strings, got {t}")
        elif self.hash_type is not None or self.trans_int8:
            raise DataError(path, self.name, f"hash_type / trans_int8 apply to string columns; this one is {t}")
        id_dtype = self.dtype if pa.types.is_floating(ids) else (torch.int8 if self.trans_int8 else torch.int64)
        return lambda arr, first_row: self._decode(arr, first_row, path, key_value is not None, id_dtype)

    def _decode(self, arr: pa.Array, first_row: int, path: str, weighted: bool, id_dtype: torch.dtype) -> RaggedPiece:
        offsets, child = _list_rows(arr)
        weight = None
        if weighted:
            _check_no_null_items(child, offsets, path, self.name, first_row, "struct<key, value>")
            keys, values = child.field("key"), child.field("value")
            _check_no_null_items(values, offsets, path, self.name, first_row, "value")
            weight = _number_view(values)
            child = keys
        _check_no_null_items(child, offsets, path, self.name, first_row, "item")
        if not _is_bytes(child.type):
            return RaggedPiece(_number_view(child), (offsets,), id_dtype, weight, self.dtype)
        data, string_offsets = _bytes_view(child)
        if self.trans_int8:
            return RaggedPiece(data, (offsets, string_offsets), torch.int8)
        # hashed when the batch is packed, into the batch's memory (HashedStringPiece)
        return HashedStringPiece(data, offsets, string_offsets, self.hash_type, self.hash_bucket, weight, self.dtype)


Column = Union[FixedLenColumn, VarLenColumn]

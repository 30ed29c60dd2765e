"""Structural helpers that appear as nodes in the feature graph.

The feature graph is built once, from configs, before any batch is seen: whether a column is
dense or ragged, how many offset levels it has and whether it carries weights is only known
when data arrives. These small functions take a column apart and put a result back together
at run time, validating with the feature's name; under ``torch.compile`` they are plain Python
that Dynamo traces away (dtype and structure checks become guards). The ops themselves are
``torch.ops.fxrec.*`` nodes between them, which is what the compiler passes rewrite.

The engine inserts each helper as a ``call_function`` node.
"""

from __future__ import annotations

import torch

from fxrec.ragged import RaggedTensor

__all__ = [
    "column_parts",
    "require_dtype",
    "last_level",
    "outer_levels",
    "one_level",
    "two_levels",
    "weight_or_none",
    "cross_weight",
    "boundaries_on",
    "string_offsets",
    "hash_ids",
    "hash_ids_multi",
    "hash_levels",
    "check_row_lengths",
    "cast_values",
    "assemble",
]


def column_parts(column, where: str):
    """``(values, offsets list or None, weight or None)`` of a dense tensor or a RaggedTensor."""
    if isinstance(column, RaggedTensor):
        return column.values(), column.offsets(), column.weight()
    if isinstance(column, torch.Tensor):
        return column, None, None
    raise TypeError(f"{where}: expected a Tensor or RaggedTensor, got {type(column).__name__}")


def require_dtype(values: torch.Tensor, dtypes: tuple, where: str) -> torch.Tensor:
    if values.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{where}: needs values of dtype {names}, got {values.dtype}")
    return values


def last_level(offsets, where: str) -> torch.Tensor:
    if offsets is None:
        raise ValueError(f"{where}: needs a ragged input (RaggedTensor), got a dense tensor")
    return offsets[-1]


def outer_levels(offsets, where: str) -> list:
    """Offsets left after the innermost level is consumed (each string became one id)."""
    if offsets is None or len(offsets) < 2:
        raise ValueError(
            f"{where}: needs string bytes with two ragged levels (rows -> strings -> bytes), "
            f"got {0 if offsets is None else len(offsets)} level(s)"
        )
    return offsets[:-1]


def one_level(offsets: torch.Tensor) -> list:
    return [offsets]


def two_levels(outer: torch.Tensor, inner: torch.Tensor) -> list:
    return [outer, inner]


def weight_or_none(weight_in, weight_out: torch.Tensor):
    """Ops return a placeholder weight when given none; keep ``None`` in that case."""
    return None if weight_in is None else weight_out


def cross_weight(x_weight, y_weight, weight_out: torch.Tensor):
    return None if x_weight is None and y_weight is None else weight_out


def boundaries_on(boundaries: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Bucket boundaries follow the data's device (no copy when they are already there)."""
    return boundaries.to(values.device)


def string_offsets(values: torch.Tensor, offsets, weight, where: str):
    """Hash input: the offsets that split strings for int8 bytes, ``None`` for int64 ids."""
    if values.dtype == torch.int8:
        if weight is not None:
            raise ValueError(f"{where}: string bytes cannot carry per-byte weights")
        if offsets is None or len(offsets) < 2:
            raise ValueError(
                f"{where}: string bytes need two ragged levels (rows -> strings -> bytes), "
                f"got {0 if offsets is None else len(offsets)}"
            )
        return offsets[-1]
    if values.dtype == torch.int64:
        return None
    raise TypeError(f"{where}: hashes int8 string bytes or int64 ids, got {values.dtype}")


def hash_ids(values: torch.Tensor, offsets, hash_type: str) -> torch.Tensor:
    """Strings (``offsets`` split the bytes) or int64 ids (``offsets is None``) -> int64 hashes.

    The graph is built before data is seen, so whether a ``Hash`` reads strings or ids (the
    column's dtype) is decided here: ``fxrec::hash_bytes`` or ``fxrec::hash_int64``.
    """
    if offsets is None:
        return torch.ops.fxrec.hash_int64(values, hash_type)
    return torch.ops.fxrec.hash_bytes(values, offsets, hash_type)


def hash_ids_multi(values: list, offsets: list, hash_types: list) -> list:
    """``[hash_ids(v, o, t) for ...]`` with one multi-tensor op per input kind.

    What the horizontal fusion pass (``fxrec.passes``) puts in place of several ``hash_ids``
    nodes: whether a feature hashes strings or ids is only known from its data's dtype, so the
    split happens here, at run time (a guard under ``torch.compile``): every string feature goes
    through one ``fxrec::hash_bytes_multi``, every id feature through one ``hash_int64_multi``
    (the single op where a kind has one feature). Outputs are in feature order.
    """
    out: list = [None] * len(values)
    strings = [i for i, o in enumerate(offsets) if o is not None]
    ids = [i for i, o in enumerate(offsets) if o is None]
    if len(strings) == 1:
        (i,) = strings
        out[i] = torch.ops.fxrec.hash_bytes(values[i], offsets[i], hash_types[i])
    elif strings:
        hashed = torch.ops.fxrec.hash_bytes_multi(
            [values[i] for i in strings], [offsets[i] for i in strings], [hash_types[i] for i in strings]
        )
        for i, h in zip(strings, hashed):
            out[i] = h
    if len(ids) == 1:
        (i,) = ids
        out[i] = torch.ops.fxrec.hash_int64(values[i], hash_types[i])
    elif ids:
        hashed = torch.ops.fxrec.hash_int64_multi([values[i] for i in ids], [hash_types[i] for i in ids])
        for i, h in zip(ids, hashed):
            out[i] = h
    return out


def hash_levels(values: torch.Tensor, offsets):
    """Offsets after hashing: strings collapse one level, ids keep their structure."""
    return offsets if values.dtype != torch.int8 else offsets[:-1]


def check_row_lengths(offsets: torch.Tensor, max_len: int, where: str) -> torch.Tensor:
    return torch.ops.fxrec.check_row_lengths(offsets, max_len, where)


def cast_values(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return values if values.dtype == dtype else values.to(dtype)


def assemble(values: torch.Tensor, offsets, weight):
    """Put a feature back together: a RaggedTensor when it has offsets, else the dense tensor."""
    if offsets is None:
        return values
    return RaggedTensor(values, offsets, weight)


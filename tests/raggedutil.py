"""Build RaggedTensors from Python lists and back (test-side, independent of fxrec's ops)."""

from __future__ import annotations

import itertools

import torch

from fxrec.ragged import RaggedTensor


def offsets_of(lengths) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)


def ragged_ids(rows, weights=None) -> RaggedTensor:
    values = torch.tensor([x for row in rows for x in row], dtype=torch.int64)
    weight = None
    if weights is not None:
        weight = torch.tensor([w for row in weights for w in row], dtype=torch.float32)
    return RaggedTensor(values, offsets_of(len(r) for r in rows), weight)


def ragged_strings(rows) -> RaggedTensor:
    """rows of lists of bytes -> int8 bytes with offsets [row -> strings, string -> bytes]."""
    strings = [s for row in rows for s in row]
    data = b"".join(strings)
    values = torch.frombuffer(bytearray(data), dtype=torch.int8) if data else torch.empty(0, dtype=torch.int8)
    return RaggedTensor(values, [offsets_of(len(r) for r in rows), offsets_of(len(s) for s in strings)])


def rows_of(rt: RaggedTensor):
    """Innermost rows as lists (one offsets level)."""
    (offsets,) = rt.offsets()
    values = rt.values().tolist()
    o = offsets.tolist()
    return [values[o[i]:o[i + 1]] for i in range(len(o) - 1)]


def weight_rows_of(rt: RaggedTensor):
    (offsets,) = rt.offsets()
    weights = rt.weight().tolist()
    o = offsets.tolist()
    return [weights[o[i]:o[i + 1]] for i in range(len(o) - 1)]

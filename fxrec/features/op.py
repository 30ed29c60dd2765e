"""Feature op configs (RecIS's ``recis.features.op``): what each step of a feature does.

A config only validates and holds its parameters; ``FeatureEngine`` turns the configs of all
features into one FX graph of ``torch.ops.fxrec.*`` calls (see ``feature_engine.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = [
    "FeatureOp",
    "SelectField",
    "SelectFields",
    "Mod",
    "Bucketize",
    "Hash",
    "FeatureCross",
    "SequenceTruncate",
]

HASH_TYPES = ("farm", "murmur")


class FeatureOp:
    """Base of every feature op config."""


@dataclass
class SelectField(FeatureOp):
    """Take column ``name`` from the batch.

    ``dim``, if given, must equal the last dimension of a dense column (checked on the first
    batch). ``dtype`` and ``from_dict`` are accepted for RecIS compatibility: values keep the
    dtype the dataset produced (the tutorial selects float columns with the default
    ``dtype=torch.long``), and columns always come from the batch dict.
    """

    name: str
    dtype: torch.dtype = torch.long
    dim: int | None = None
    from_dict: bool = True

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"SelectField needs a column name, got {self.name!r}")
        if self.dim is not None and (not isinstance(self.dim, int) or self.dim <= 0):
            raise ValueError(f"SelectField({self.name!r}): dim must be a positive int, got {self.dim!r}")


@dataclass
class SelectFields(FeatureOp):
    """Take several columns; the feature's value is the list of their values (for FeatureCross)."""

    fields: list[SelectField]

    def __post_init__(self):
        fields = list(self.fields)
        if not fields or not all(isinstance(f, SelectField) for f in fields):
            raise ValueError(f"SelectFields needs a non-empty list of SelectField, got {self.fields!r}")
        self.fields = fields


@dataclass
class Mod(FeatureOp):
    """``int64(uint64(x) % uint64(mod_value))`` on int64 ids (dense or ragged)."""

    mod_value: int

    def __post_init__(self):
        if isinstance(self.mod_value, bool) or not isinstance(self.mod_value, int):
            raise ValueError(f"Mod: mod_value must be an int, got {self.mod_value!r}")
        if not 0 < self.mod_value < 2**63:
            raise ValueError(f"Mod: mod_value must be in [1, 2**63), got {self.mod_value}")


@dataclass
class Bucketize(FeatureOp):
    """Bucket index ``#{b in boundaries : b <= v}`` (a value on a boundary goes up; NaN -> last)."""

    boundaries: Sequence[float]

    def __post_init__(self):
        try:
            bounds = [float(b) for b in self.boundaries]
        except (TypeError, ValueError):
            raise ValueError(f"Bucketize: boundaries must be numbers, got {self.boundaries!r}") from None
        if not bounds:
            raise ValueError("Bucketize: boundaries must not be empty")
        if any(math.isnan(b) for b in bounds):
            raise ValueError(f"Bucketize: boundaries must not contain NaN, got {bounds}")
        if any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"Bucketize: boundaries must be strictly increasing, got {bounds}")
        self.boundaries = bounds


@dataclass
class Hash(FeatureOp):
    """Strings (int8 bytes, last ragged level splits strings) or int64 ids -> int64 hash ids.

    ``farm`` = farmhash Fingerprint64, ``murmur`` = MurmurHash64A seed 0; the raw 64-bit value,
    unmasked. On int64 ids the hash is over each id's 8 little-endian bytes.
    """

    hash_type: str = "farm"

    def __post_init__(self):
        if self.hash_type not in HASH_TYPES:
            raise ValueError(f"Hash: hash_type must be one of {HASH_TYPES}, got {self.hash_type!r}")


@dataclass
class FeatureCross(FeatureOp):
    """Per-row cartesian product of two ragged id features, each pair hashed to one id."""


@dataclass
class SequenceTruncate(FeatureOp):
    """Keep at most ``seq_len`` items per row (``"right"``: the first ones, ``"left"``: the last).

    ``n_dims=2`` works on the last ragged level (outer levels are dropped); ``n_dims=3`` keeps
    ``seq_len`` inner lists per row and pads with empty lists to exactly ``seq_len``.
    ``truncate=False`` passes rows through; then ``check_length`` rejects rows longer than
    ``seq_len``. ``dtype`` is the dtype of the output values.
    """

    seq_len: int = 64
    check_length: bool = True
    truncate: bool = True
    truncate_side: str = "left"
    n_dims: int = 2
    dtype: torch.dtype = torch.long
    _keep_last: bool = field(init=False, repr=False)

    def __post_init__(self):
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len <= 0:
            raise ValueError(f"SequenceTruncate: seq_len must be a positive int, got {self.seq_len!r}")
        if self.truncate_side not in ("left", "right"):
            raise ValueError(
                f"SequenceTruncate: truncate_side must be 'left' or 'right', got {self.truncate_side!r}"
            )
        if self.n_dims not in (2, 3):
            raise ValueError(f"SequenceTruncate: n_dims must be 2 or 3, got {self.n_dims!r}")
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"SequenceTruncate: dtype must be a torch.dtype, got {self.dtype!r}")
        self._keep_last = self.truncate_side == "left"

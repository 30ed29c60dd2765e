"""RaggedTensor: a batch of variable-length rows as flat values plus offsets.

``RaggedTensor(values, offsets, weight=None)`` holds ``values`` (the items of every row,
concatenated), ``offsets`` (one int64 tensor per ragged level, ordered outer -> inner;
``offsets[-1]`` indexes ``values``) and an optional per-item ``weight`` (float, same length
as ``values``). Row ``i`` of the innermost level is ``values[offsets[-1][i]:offsets[-1][i+1]]``.

It is registered as a pytree node, so FX, Dynamo and ``torch.utils._pytree`` see its tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.utils._pytree as pytree

__all__ = ["RaggedTensor"]


def _as_offsets(offsets) -> list[torch.Tensor]:
    levels = [offsets] if isinstance(offsets, torch.Tensor) else list(offsets)
    if not levels:
        raise ValueError("RaggedTensor needs at least one offsets tensor")
    out = []
    for i, level in enumerate(levels):
        if not isinstance(level, torch.Tensor):
            raise TypeError(f"RaggedTensor offsets[{i}] must be a tensor, got {type(level).__name__}")
        if level.dtype.is_floating_point or level.dtype.is_complex or level.dtype == torch.bool:
            raise TypeError(f"RaggedTensor offsets[{i}] must be an integer tensor, got {level.dtype}")
        # Shape checks read sizes that are unbacked symbols under torch.compile: eager only.
        if level.dim() != 1 or (not torch.compiler.is_compiling() and level.numel() == 0):
            raise ValueError(
                f"RaggedTensor offsets[{i}] must be 1-D with at least one element (rows + 1), "
                f"got shape {tuple(level.shape)}"
            )
        out.append(level.to(torch.int64))
    return out


class RaggedTensor:
    """Variable-length rows: ``values`` + ``offsets`` (outer -> inner) + optional ``weight``.

    Construction checks types and that ``weight`` matches ``values``; it does not read offsets'
    contents (that would sync a GPU), so monotonicity is the producer's contract.
    """

    __slots__ = ("_values", "_offsets", "_weight")

    def __init__(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor | Sequence[torch.Tensor],
        weight: torch.Tensor | None = None,
    ):
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"RaggedTensor values must be a tensor, got {type(values).__name__}")
        self._values = values
        self._offsets = _as_offsets(offsets)
        if weight is not None:
            if not isinstance(weight, torch.Tensor):
                raise TypeError(f"RaggedTensor weight must be a tensor, got {type(weight).__name__}")
            if not weight.dtype.is_floating_point:
                raise TypeError(f"RaggedTensor weight must be floating point, got {weight.dtype}")
            if not torch.compiler.is_compiling() and weight.shape[:1] != values.shape[:1]:
                raise ValueError(
                    f"RaggedTensor weight has {weight.shape[0]} items but values has {values.shape[0]}"
                )
        self._weight = weight

    # -- accessors (RecIS names) -------------------------------------------------------------
    def values(self) -> torch.Tensor:
        return self._values

    def offsets(self) -> list[torch.Tensor]:
        return self._offsets

    def weight(self) -> torch.Tensor | None:
        return self._weight

    @property
    def dtype(self) -> torch.dtype:
        return self._values.dtype

    @property
    def device(self) -> torch.device:
        return self._values.device

    def batch_size(self) -> int:
        return self._offsets[0].shape[0] - 1

    def real_shape(self) -> torch.Size:
        """Dense shape: each ragged dim resolved to its longest row (reads offsets: syncs a GPU)."""
        dims = [self.batch_size()]
        for level in self._offsets:
            lengths = level[1:] - level[:-1]
            dims.append(int(lengths.max()) if lengths.numel() else 0)
        return torch.Size(dims + list(self._values.shape[1:]))

    @property
    def shape(self) -> torch.Size:
        return self.real_shape()

    def dim(self) -> int:
        return len(self._offsets) + self._values.dim()

    # -- conversions -------------------------------------------------------------------------
    def to_dense(self, default: float = 0) -> torch.Tensor:
        """Pad every ragged level to its longest row with ``default``: ``[B, L1, ..., *item]``."""
        dense = self._values
        for level in reversed(self._offsets):
            dense = torch.ops.fxrec.ragged_to_dense(dense, level, -1, float(default))
        return dense

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> "RaggedTensor":
        """``[B, L]`` -> one ragged level, each row with its trailing zeros stripped."""
        if not isinstance(dense, torch.Tensor) or dense.dim() != 2:
            raise ValueError(f"RaggedTensor.from_dense needs a 2-D tensor, got {getattr(dense, 'shape', dense)}")
        values, offsets = torch.ops.fxrec.dense_to_ragged(dense)
        return cls(values, offsets)

    def _map(self, fn) -> "RaggedTensor":
        weight = None if self._weight is None else fn(self._weight)
        return RaggedTensor(fn(self._values), [fn(o) for o in self._offsets], weight)

    def to(self, *args, **kwargs) -> "RaggedTensor":
        """Like ``Tensor.to``: a device move applies to every part; a dtype to values only
        (offsets stay int64, weights keep their float dtype)."""
        dtype = kwargs.pop("dtype", None)
        rest = []
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                rest.append(arg)
        out = self._map(lambda t: t.to(*rest, **kwargs)) if rest or kwargs else self
        if dtype is not None:
            out = RaggedTensor(out._values.to(dtype), out._offsets, out._weight)
        return out

    def cuda(self, device=None, non_blocking: bool = False) -> "RaggedTensor":
        return self._map(lambda t: t.cuda(device, non_blocking=non_blocking))

    def cpu(self) -> "RaggedTensor":
        return self._map(lambda t: t.cpu())

    def pin_memory(self) -> "RaggedTensor":
        return self._map(lambda t: t.pin_memory())

    def clone(self) -> "RaggedTensor":
        return self._map(lambda t: t.clone())

    def __repr__(self) -> str:
        return (
            f"RaggedTensor(values={self._values}, offsets={self._offsets}"
            + (f", weight={self._weight}" if self._weight is not None else "")
            + ")"
        )


def _flatten(rt: RaggedTensor):
    # The context says whether a weight is present, so that no ``None`` leaf appears.
    has_weight = rt._weight is not None
    return [rt._values, rt._offsets] + ([rt._weight] if has_weight else []), has_weight


def _flatten_with_keys(rt: RaggedTensor):
    children, has_weight = _flatten(rt)
    names = ["_values", "_offsets", "_weight"][: len(children)]
    return [(pytree.GetAttrKey(n), c) for n, c in zip(names, children)], has_weight


def _unflatten(children, has_weight: bool) -> RaggedTensor:
    out = RaggedTensor.__new__(RaggedTensor)
    out._values, out._offsets = children[0], list(children[1])
    out._weight = children[2] if has_weight else None
    return out


pytree.register_pytree_node(
    RaggedTensor,
    _flatten,
    _unflatten,
    serialized_type_name="fxrec.ragged.RaggedTensor",
    flatten_with_keys_fn=_flatten_with_keys,
)

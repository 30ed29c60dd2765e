"""``Feature``: a named chain of feature op configs, starting with a column selection."""

from __future__ import annotations

from fxrec.features.op import FeatureOp, SelectField, SelectFields

__all__ = ["Feature"]


class Feature:
    """``Feature(name).add_op(SelectField(...)).add_op(Mod(...))...`` (RecIS's builder API)."""

    def __init__(self, name: str):
        if not isinstance(name, str) or not name:
            raise ValueError(f"Feature needs a non-empty name, got {name!r}")
        self.name = name
        self.ops: list[FeatureOp] = []

    def add_op(self, op: FeatureOp) -> "Feature":
        if not isinstance(op, FeatureOp):
            raise TypeError(f"feature {self.name!r}: add_op takes a feature op config, got {type(op).__name__}")
        is_select = isinstance(op, (SelectField, SelectFields))
        if not self.ops and not is_select:
            raise ValueError(
                f"feature {self.name!r}: the first op must be SelectField or SelectFields, got {type(op).__name__}"
            )
        if self.ops and is_select:
            raise ValueError(f"feature {self.name!r}: {type(op).__name__} may only be the first op")
        self.ops.append(op)
        return self

    def __repr__(self) -> str:
        return f"Feature({self.name!r}, ops={self.ops})"

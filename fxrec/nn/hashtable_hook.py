"""Admission and eviction policies of a dynamic table, with RecIS's names
(``recis.nn.hashtable_hook``): ``AdmitHook("ReadOnly")`` and
``FilterHook("GlobalStepFilter", {"filter_step": N})``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["AdmitHook", "FilterHook"]

_ADMIT_POLICIES = ("ReadOnly",)
_FILTER_POLICIES = {"GlobalStepFilter": ("filter_step",)}


@dataclass(frozen=True)
class AdmitHook:
    """Which unseen ids a training lookup inserts. ``"ReadOnly"``: none — unseen ids read as zero
    rows without gradient, as in eval mode."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in _ADMIT_POLICIES:
            raise ValueError(f"AdmitHook: unknown policy {self.name!r}; known: {list(_ADMIT_POLICIES)}")


@dataclass(frozen=True)
class FilterHook:
    """Which ids a table evicts. ``"GlobalStepFilter"`` with ``{"filter_step": N}``: the ids no
    lookup has touched in the last ``N`` table steps (``N >= 1``)."""

    name: str
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in _FILTER_POLICIES:
            raise ValueError(f"FilterHook: unknown policy {self.name!r}; known: {list(_FILTER_POLICIES)}")
        expected = _FILTER_POLICIES[self.name]
        if sorted(self.params) != sorted(expected):
            raise ValueError(f"FilterHook({self.name!r}): params must be exactly {list(expected)}, got {self.params}")
        step = self.params["filter_step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"FilterHook({self.name!r}): filter_step must be an int >= 1, got {step!r}")

    @property
    def filter_step(self) -> int:
        return self.params["filter_step"]

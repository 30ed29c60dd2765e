"""Streaming metrics (SPEC §5.2, §5.3): ``AUROC`` (TF-style binned AUC) and ``Gauc`` (group AUC)."""

from fxrec.metrics.auroc import AUROC
from fxrec.metrics.gauc import Gauc

__all__ = ["AUROC", "Gauc"]

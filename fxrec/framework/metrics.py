"""A process-global registry of named metric values (RecIS's ``recis.framework.metrics``).

The model calls ``add_metric("auc", auc)`` in its forward; the ``Trainer`` reads
``get_log_metrics()`` at its log steps. Tensors are stored detached (no graph is kept alive) and
as they are: nothing is synchronised or copied to the host here (that would cost a GPU sync every
step); the reader converts them when it logs. A name added again replaces the old value.
"""

from __future__ import annotations

from typing import Any

import torch

GLOBAL_METRICS: dict[str, Any] = {}


def add_metric(name: str, value: Any) -> None:
    """Store ``value`` under ``name`` (a tensor detached; anything else as is)."""
    GLOBAL_METRICS[name] = value.detach() if isinstance(value, torch.Tensor) else value


def get_log_metrics() -> dict[str, Any]:
    """A copy of the registry: ``{name: latest value}``."""
    return dict(GLOBAL_METRICS)


get_metrics = get_log_metrics


def clear_metrics() -> None:
    """Empty the registry."""
    GLOBAL_METRICS.clear()

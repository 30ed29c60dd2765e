"""Compiler passes over fxrec's FX graphs: each a pure function ``GraphModule -> GraphModule``.

- ``horizontal_fusion``: same-type feature ops of different features -> one multi-tensor op.

``run_passes(gm, passes=DEFAULT_PASSES)`` applies them in order; ``explain(x)`` shows the fxrec
op counts before and after. ``FeatureEngine(features, passes=True)`` runs its graph through
``DEFAULT_PASSES`` when it is built (off by default).
"""

from fxrec.passes.horizontal_fusion import horizontal_fusion
from fxrec.passes.pipeline import DEFAULT_PASSES, Pass, explain, op_counts, run_passes

__all__ = ["DEFAULT_PASSES", "Pass", "explain", "horizontal_fusion", "op_counts", "run_passes"]

"""Compiler passes over fxrec's FX graphs: each a pure function ``GraphModule -> GraphModule``.

- ``horizontal_fusion``: same-type feature ops of different features -> one multi-tensor op.
- ``lookup_merge``: all lookups into one embedding table -> one dedup + one lookup.
- ``table_coalesce``: tables of equal layout -> one physical table (ids keep 64 bits: tables are
  tagged in the index), the lookups of all their features -> one dedup + one lookup.
- ``combine_fusion``: the ``table_combine`` of every feature reading one lookup's (table, rows,
  anchor) -> one ``table_combine_multi`` (one ``[U, dim]`` gradient).

``run_passes(gm, passes=DEFAULT_PASSES)`` applies them in order; ``explain(x)`` shows the fxrec
op counts before and after. ``FeatureEngine(features, passes=True)`` runs its graph through
``DEFAULT_PASSES`` when it is built (off by default); ``EmbeddingEngine(options, passes=True)``
likewise with ``DEFAULT_EMBEDDING_PASSES``.
"""

from fxrec.passes.combine_fusion import combine_fusion
from fxrec.passes.horizontal_fusion import horizontal_fusion
from fxrec.passes.lookup_merge import lookup_merge
from fxrec.passes.table_coalesce import table_coalesce
from fxrec.passes.pipeline import (
    DEFAULT_EMBEDDING_PASSES, DEFAULT_PASSES, Pass, apply_passes, explain, op_counts, run_passes,
)

__all__ = ["DEFAULT_EMBEDDING_PASSES", "DEFAULT_PASSES", "Pass", "apply_passes", "combine_fusion", "explain",
           "horizontal_fusion", "lookup_merge", "op_counts", "run_passes", "table_coalesce"]

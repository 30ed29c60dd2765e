"""fxrec.nn: embedding building blocks (RecIS's ``recis.nn`` paths).

``fxrec.nn.initializers``: per-id deterministic row initializers.
``fxrec.nn.modules.embedding``: ``EmbeddingOption`` and ``EmbeddingEngine`` (also here).
``fxrec.nn.modules.hashtable``: ``HashTable`` (dynamic tables), ``filter_out_sparse_param``.
"""

from fxrec.nn import initializers
from fxrec.nn.modules.embedding import EmbeddingEngine, EmbeddingOption

__all__ = ["EmbeddingEngine", "EmbeddingOption", "initializers"]

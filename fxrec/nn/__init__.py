"""fxrec.nn: embedding building blocks (RecIS's ``recis.nn`` paths).

``fxrec.nn.initializers``: per-id deterministic row initializers.
"""

from fxrec.nn import initializers  # noqa: F401

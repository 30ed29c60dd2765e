"""fxrec's custom ops, ``torch.ops.fxrec.*``: one module per family, Triton kernels in ``triton/``.

Importing this package registers every op (CPU kernel, fake kernel, CUDA kernel, autograd).
"""

from fxrec.ops import (  # noqa: F401
    auroc, bucketize, check, combine, cross, dense, gather, hash, init_rows, mod, sparse_update, table, truncate,
)

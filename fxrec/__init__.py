"""fxrec: sparse recommendation training in PyTorch, compiled."""

from fxrec import ops  # noqa: F401  (registers torch.ops.fxrec.*)
from fxrec.compiler import compile
from fxrec.ragged import RaggedTensor

__all__ = ["RaggedTensor", "compile"]
__version__ = "0.1.0"

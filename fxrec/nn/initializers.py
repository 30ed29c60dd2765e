"""Row initializers for embedding tables, with RecIS's class names, parameters and defaults.

An initializer gives the initial row of every id of a table: ``init.init_rows(ids, dim, seed)``,
a pure function of (table seed, id, column) computed by ``torch.ops.fxrec.init_rows`` (counter-
based RNG, identical on CPU and CUDA, independent of batch composition and insertion order;
SPEC §4.4); ``init.write_rows(out, rows, ids, seed)`` writes them straight into a table's rows
(the insert's one op). RecIS drew a whole ``[block_size, dim]`` block from a ``torch.Generator`` instead,
so a row depended on when its id was inserted; fxrec keeps RecIS's constructors, not that.

Decisions (RecIS differs or is unclear):

- ``TruncNormalInitializer(mean, std, a, b)``: ``a``/``b`` are ABSOLUTE bounds, as in
  ``torch.nn.init.trunc_normal_`` and in what RecIS's C++ kernel runs (its docstring says "in
  units of std", its code clamps to ``[a, b]``). The defaults ``(0, 1, -2, 2)`` agree either way.
- Xavier / Kaiming fans: RecIS builds its generator for a ``[block_size, dim]`` block and applies
  ``torch.nn.init`` to it, so ``fan_in = dim`` and ``fan_out = block_size``; fxrec does the same
  (``block_size`` is the table's ``EmbeddingOption.block_size``, default 10240).
- ``KaimingNormalInitializer`` samples a normal (RecIS built a uniform generator for it: a bug),
  and takes no leading ``shape``/``dtype`` arguments (unused in RecIS).
- ``nonlinearity`` takes ``torch.nn.init.calculate_gain``'s names, and RecIS's spellings
  (``liner``, ``sigmod``, ``conv_1d``, ...).
- ``generator``: where given, its ``initial_seed()`` is mixed into the table seed (the stream
  itself is never drawn from), so a seeded generator still pins the initial values.
- ``ConstantInitializer(dtype=...)`` is accepted and unused, as in RecIS: the table's dtype decides.

Two initializers are equal (``==``, ``hash``) when they are of the same class with the same
parameters: what "same initializer" means for options that share a table.
"""

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from fxrec.ops.init_rows import GAMMA

__all__ = [
    "ConstantInitializer",
    "Initializer",
    "KaimingNormalInitializer",
    "KaimingUniformInitializer",
    "NormalInitializer",
    "TruncNormalInitializer",
    "UniformInitializer",
    "XavierNormalInitializer",
    "XavierUniformInitializer",
]

DEFAULT_BLOCK_SIZE = 10240  # EmbeddingOption's default: the fan_out of Xavier / Kaiming

# RecIS's nonlinearity spellings -> torch.nn.init.calculate_gain's.
_RECIS_NONLINEARITY = {
    "liner": "linear",
    "sigmod": "sigmoid",
    "conv_1d": "conv1d",
    "conv_2d": "conv2d",
    "conv_3d": "conv3d",
    "conv_transpose_1d": "conv_transpose1d",
    "conv_transpose_2d": "conv_transpose2d",
    "conv_transpose_3d": "conv_transpose3d",
}


def _finite(cls: str, **values: float) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{cls}: {name} must be a finite number, got {v!r}")


def _positive_std(cls: str, std: float) -> None:
    if not std > 0:
        raise ValueError(f"{cls}: std must be > 0, got {std}")


def _ordered(cls: str, a: float, b: float) -> None:
    if not a < b:
        raise ValueError(f"{cls}: needs a < b, got a={a}, b={b}")


class Initializer(ABC):
    """A row initializer: ``kind`` and ``params`` of ``torch.ops.fxrec.init_rows`` for a table.

    Subclasses set ``_config`` (constructor parameters, for ``==`` and ``repr``) and implement
    ``row_spec``.
    """

    _config: dict

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self._generator_seed = None if generator is None else generator.initial_seed()

    @abstractmethod
    def row_spec(self, dim: int, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[str, list[float]]:
        """``(kind, params)`` of the op for rows of ``dim`` in a table of ``block_size``."""

    @property
    def kind(self) -> str:
        """The op's distribution kind: constant, uniform, normal or trunc_normal."""
        return self.row_spec(1)[0]

    def init_rows(
        self,
        ids: Tensor,
        dim: int,
        seed: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        dtype: torch.dtype = torch.float32,
        seeds: Tensor | None = None,
    ) -> Tensor:
        """Initial rows ``[*ids.shape, dim]`` of ``dtype`` for int64 ``ids`` of a table seeded
        ``seed`` (an int64); on the device of ``ids``. ``seeds`` (int64, ``ids``' shape): id ``i``
        is of a table seeded ``seed + seeds[i]`` (mod 2**64; tables coalesced into one)."""
        self._check_sizes(dim, block_size)
        if not dtype.is_floating_point:
            raise ValueError(f"{self!r}: dtype must be a floating dtype, got {dtype}")
        if seeds is not None and seeds.shape != ids.shape:
            raise ValueError(f"{self!r}: seeds has shape {tuple(seeds.shape)}, ids {tuple(ids.shape)}: they must match")
        flat = ids.reshape(-1)
        out = torch.empty((flat.shape[0], dim), dtype=dtype, device=ids.device)
        rows = torch.arange(flat.shape[0], dtype=torch.int64, device=ids.device)
        self.write_rows(out, rows, flat, seed, block_size, None if seeds is None else seeds.reshape(-1))
        return out.reshape(*ids.shape, dim)

    def write_rows(
        self, out: Tensor, rows: Tensor, ids: Tensor, seed: int, block_size: int = DEFAULT_BLOCK_SIZE,
        seeds: Tensor | None = None,
    ) -> None:
        """In place: ``out[rows[i]] =`` the initial row of ``ids[i]`` (1-D int64 ``rows`` and
        ``ids`` of one length; rows -1 skipped) for a table of ``out``'s width seeded ``seed``
        (``seeds``: per id, as in ``init_rows``). What a table's insert runs: one op."""
        dim = out.shape[1] if out.dim() == 2 else 0
        self._check_sizes(dim, block_size)
        kind, params = self.row_spec(dim, block_size)
        if self._generator_seed is not None:
            seed = (seed + (self._generator_seed + 1) * GAMMA) % (1 << 64)
            seed -= (seed >> 63) << 64
        torch.ops.fxrec.init_rows(out, rows, ids, seed, kind, params, seeds)

    def _check_sizes(self, dim: int, block_size: int) -> None:
        if dim < 1 or block_size < 1:
            raise ValueError(f"{self!r}: dim and block_size must be positive, got {dim}, {block_size}")

    def _key(self) -> tuple:
        return (type(self), tuple(sorted(self._config.items())), self._generator_seed)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Initializer) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config.items())
        if self._generator_seed is not None:
            args += f", generator_seed={self._generator_seed}"
        return f"{type(self).__name__}({args})"

    __str__ = __repr__


class ConstantInitializer(Initializer):
    """Every value ``init_val``."""

    def __init__(self, init_val: float = 0.0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        _finite(type(self).__name__, init_val=init_val)
        self._config = {"init_val": float(init_val)}

    def row_spec(self, dim, block_size=DEFAULT_BLOCK_SIZE):
        return "constant", [self._config["init_val"]]


class UniformInitializer(Initializer):
    """Uniform on ``[a, b)``."""

    def __init__(self, a: float = 0.0, b: float = 1.0, generator: torch.Generator | None = None) -> None:
        super().__init__(generator)
        name = type(self).__name__
        _finite(name, a=a, b=b)
        _ordered(name, a, b)
        self._config = {"a": float(a), "b": float(b)}

    def row_spec(self, dim, block_size=DEFAULT_BLOCK_SIZE):
        return "uniform", [self._config["a"], self._config["b"]]


class NormalInitializer(Initializer):
    """Normal ``(mean, std)``."""

    def __init__(self, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None) -> None:
        super().__init__(generator)
        name = type(self).__name__
        _finite(name, mean=mean, std=std)
        _positive_std(name, std)
        self._config = {"mean": float(mean), "std": float(std)}

    def row_spec(self, dim, block_size=DEFAULT_BLOCK_SIZE):
        return "normal", [self._config["mean"], self._config["std"]]


class TruncNormalInitializer(Initializer):
    """Normal ``(mean, std)`` truncated to the absolute interval ``[a, b]`` (torch's
    ``trunc_normal_``; see the module docstring)."""

    def __init__(
        self,
        mean: float = 0.0,
        std: float = 1.0,
        a: float = -2.0,
        b: float = 2.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(generator)
        name = type(self).__name__
        _finite(name, mean=mean, std=std, a=a, b=b)
        _positive_std(name, std)
        _ordered(name, a, b)
        self._config = {"mean": float(mean), "std": float(std), "a": float(a), "b": float(b)}

    def row_spec(self, dim, block_size=DEFAULT_BLOCK_SIZE):
        c = self._config
        return "trunc_normal", [c["mean"], c["std"], c["a"], c["b"]]


def _xavier_std(gain: float, dim: int, block_size: int) -> float:
    return gain * math.sqrt(2.0 / (dim + block_size))


class XavierUniformInitializer(Initializer):
    """Uniform on ``±gain √(6 / (fan_in + fan_out))``, ``fan_in = dim``, ``fan_out = block_size``."""

    def __init__(self, gain: float = 1.0, generator: torch.Generator | None = None) -> None:
        super().__init__(generator)
        _finite(type(self).__name__, gain=gain)
        if not gain > 0:
            raise ValueError(f"{type(self).__name__}: gain must be > 0, got {gain}")
        self._config = {"gain": float(gain)}

    def row_spec(self, dim, block_size=DEFAULT_BLOCK_SIZE):
        bound = math.sqrt(3.0) * _xavier_std(self._config["gain"], dim, block_size)
        return "uniform", [-bound, bound]


class XavierNormalInitializer(XavierUniformInitializer):
    """Normal ``(0, gain √(2 / (fan_in + fan_out)))``, ``fan_in = dim``, ``fan_out = block_size``."""

    def row_spec(self, dim, block_size=DEFAULT_BLOCK_SIZE):
        return "normal", [0.0, _xavier_std(self._config["gain"], dim, block_size)]


class KaimingUniformInitializer(Initializer):
    """Uniform on ``±√3 gain / √fan`` with torch's ``calculate_gain(nonlinearity, a)``; ``fan`` is
    ``dim`` (``mode="fan_in"``) or ``block_size`` (``mode="fan_out"``)."""

    def __init__(
        self,
        a: float = 0.0,
        mode: str = "fan_in",
        nonlinearity: str = "leaky_relu",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(generator)
        name = type(self).__name__
        _finite(name, a=a)
        mode, nonlinearity = mode.lower(), nonlinearity.lower()
        nonlinearity = _RECIS_NONLINEARITY.get(nonlinearity, nonlinearity)
        if mode not in ("fan_in", "fan_out"):
            raise ValueError(f"{name}: mode must be 'fan_in' or 'fan_out', got {mode!r}")
        try:
            gain = torch.nn.init.calculate_gain(nonlinearity, a)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        self._gain = gain
        self._config = {"a": float(a), "mode": mode, "nonlinearity": nonlinearity}

    def _std(self, dim: int, block_size: int) -> float:
        fan = dim if self._config["mode"] == "fan_in" else block_size
        return self._gain / math.sqrt(fan)

    def row_spec(self, dim, block_size=DEFAULT_BLOCK_SIZE):
        bound = math.sqrt(3.0) * self._std(dim, block_size)
        return "uniform", [-bound, bound]


class KaimingNormalInitializer(KaimingUniformInitializer):
    """Normal ``(0, gain / √fan)``, parameters as ``KaimingUniformInitializer``."""

    def row_spec(self, dim, block_size=DEFAULT_BLOCK_SIZE):
        return "normal", [0.0, self._std(dim, block_size)]

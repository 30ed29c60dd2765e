"""Packing decoded chunks into batches of exactly ``batch_size`` rows, across file boundaries.

``pack`` walks the chunks (decoded rows of one file, in file order) and cuts them into batch
plans: lists of chunk slices (views, no copy) that add up to ``batch_size`` rows, each with the
position of the first row after it, which is the exact IO state once that batch is delivered.
``assemble`` turns a plan into tensors with one concatenation per array per column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Union

import torch

from fxrec.io.errors import DataError
from fxrec.io.pieces import DensePiece, HashedStringPiece, RaggedPiece
from fxrec.ragged import RaggedTensor

__all__ = ["Chunk", "Position", "assemble", "pack"]

Piece = Union[DensePiece, RaggedPiece, HashedStringPiece]


@dataclass(frozen=True)
class Position:
    """A row of the shard: ``row`` of file ``file_index`` (its index in the shard's file list)."""

    file_index: int
    row: int


@dataclass(frozen=True)
class Chunk:
    """Rows ``[row_start, row_start + num_rows)`` of one file, decoded column by column."""

    file_index: int
    path: str
    row_start: int
    num_rows: int
    columns: dict[str, Piece]

    def slice(self, start: int, stop: int) -> "Chunk":
        if start == 0 and stop == self.num_rows:
            return self
        return Chunk(
            self.file_index,
            self.path,
            self.row_start + start,
            stop - start,
            {name: piece.slice(start, stop) for name, piece in self.columns.items()},
        )


def pack(chunks: Iterable[Chunk], batch_size: int, drop_remainder: bool) -> Iterator[tuple[list[Chunk], Position]]:
    """Yield ``(parts, next_position)`` for each batch: ``parts`` hold exactly ``batch_size``
    rows (fewer only for the last batch, which is dropped iff ``drop_remainder``).

    Every file must decode each column the same way (same dtype, levels, weights, dim) as the
    first file did, else the batches of one run would change type midway: ``DataError``.
    """
    reference: dict[str, tuple[str, str]] = {}
    parts: list[Chunk] = []
    rows = 0
    position = None
    for chunk in chunks:
        for name, piece in chunk.columns.items():
            signature = piece.signature
            expected, first_path = reference.setdefault(name, (signature, chunk.path))
            if signature != expected:
                raise DataError(
                    chunk.path,
                    name,
                    f"decodes as {signature}, but as {expected} in {first_path!r}: "
                    "every file must have the same column types",
                )
        start = 0
        while start < chunk.num_rows:
            take = min(batch_size - rows, chunk.num_rows - start)
            parts.append(chunk.slice(start, start + take))
            rows += take
            start += take
            position = Position(chunk.file_index, chunk.row_start + start)
            if rows == batch_size:
                yield parts, position
                parts, rows = [], 0
    if rows and not drop_remainder:
        yield parts, position


def assemble(parts: list[Chunk], names: list[str], pin: bool) -> dict[str, torch.Tensor | RaggedTensor]:
    """One batch: per column, the parts' pieces packed into fresh (pinned if ``pin``) tensors."""
    batch = {}
    for name in names:
        pieces = [part.columns[name] for part in parts]
        batch[name] = type(pieces[0]).concat(pieces, pin)
    return batch

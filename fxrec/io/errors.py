"""The one error type for bad input data: it names the file, the column and, where known, the row."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad input data: unreadable file, missing column, wrong column type, bad row.

    A ``ValueError`` (what callers of a RecIS dataset catch) whose message starts with the file,
    then the column and row when they are known, so a failure in a reader thread still says
    exactly which input to look at once it reaches the consumer.
    """

    def __init__(self, path: str, column: str | None, message: str, row: int | None = None):
        self.path = path
        self.column = column
        self.row = row
        where = [f"file {path!r}"]
        if column is not None:
            where.append(f"column {column!r}")
        if row is not None:
            where.append(f"row {row}")
        super().__init__(f"{', '.join(where)}: {message}")

"""``ParquetDataset``: the ``OrcDataset`` API over Parquet files.

Parquet specifics live here: files are decoded row group by row group in record batches of
``decode_batch_rows`` rows (``ParquetFile.iter_batches``; a few MB, so packing overlaps
decoding), with pyarrow's own thread pool off so that ``read_threads_num`` is the decode
concurrency; a resumed read starts at the row group holding the resume row (row counts come from
the Parquet metadata).
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from fxrec.io.dataset import DatasetBase, decode_batch_rows

__all__ = ["ParquetDataset"]


class _ParquetFile:
    def __init__(self, path: str):
        self._file = pq.ParquetFile(path)
        self.schema: pa.Schema = self._file.schema_arrow
        metadata = self._file.metadata
        self.num_rows: int = metadata.num_rows
        self._group_rows = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        self._batch_rows = decode_batch_rows(path, self.num_rows)

    def batches(self, start_row: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
        first_group, group_start = 0, 0
        while first_group < len(self._group_rows) and group_start + self._group_rows[first_group] <= start_row:
            group_start += self._group_rows[first_group]
            first_group += 1
        if first_group == len(self._group_rows):
            return
        skip = start_row - group_start
        for batch in self._file.iter_batches(
            batch_size=self._batch_rows,
            row_groups=range(first_group, len(self._group_rows)),
            columns=columns,
            use_threads=False,
        ):
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            yield batch.slice(skip) if skip else batch
            skip = 0


class ParquetDataset(DatasetBase):
    """Batches from Parquet files; the API and arguments of ``DatasetBase`` / ``OrcDataset``."""

    file_suffix = ".parquet"
    format_name = "Parquet"

    @staticmethod
    def open_file(path: str) -> _ParquetFile:
        return _ParquetFile(path)

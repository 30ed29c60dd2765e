"""``OrcDataset``: RecIS's ORC reader (``fxrec.io.orc_dataset.OrcDataset``).

ORC specifics live here: files are decoded stripe by stripe (``ORCFile.read_stripe``), and a
resumed read starts at the stripe holding the resume row. pyarrow does not expose per-stripe
row counts, so they are read from the file tail (``StripeInformation.numberOfRows`` in ORC's
``Footer`` protobuf: a fixed, documented part of the ORC format).
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.orc as orc

from fxrec.io.dataset import DatasetBase
from fxrec.io.errors import DataError

__all__ = ["OrcDataset"]

# ORC protobuf field numbers: FileTail.footer = 2, Footer.stripes = 3,
# StripeInformation.numberOfRows = 5.
_TAIL_FOOTER, _FOOTER_STRIPES, _STRIPE_ROWS = 2, 3, 5


def _varint(buffer: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buffer[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _protobuf_fields(buffer: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a serialized protobuf message, top level only."""
    pos = 0
    while pos < len(buffer):
        key, pos = _varint(buffer, pos)
        wire_type = key & 7
        if wire_type == 0:
            value, pos = _varint(buffer, pos)
        elif wire_type == 2:
            size, pos = _varint(buffer, pos)
            value, pos = buffer[pos : pos + size], pos + size
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, pos = buffer[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        yield key >> 3, value


def _stripe_rows(file: orc.ORCFile, path: str) -> list[int]:
    try:
        tail = file.reader.serialized_file_tail()
        footer = next(value for field, value in _protobuf_fields(tail) if field == _TAIL_FOOTER)
        rows = [
            dict(_protobuf_fields(stripe)).get(_STRIPE_ROWS, 0)
            for field, stripe in _protobuf_fields(footer)
            if field == _FOOTER_STRIPES
        ]
    except (IndexError, StopIteration, ValueError) as error:
        raise DataError(path, None, f"cannot parse the ORC footer (corrupt or truncated?): {error!r}") from error
    if len(rows) != file.nstripes or sum(rows) != file.nrows:
        raise DataError(path, None, f"ORC footer lists {len(rows)} stripes / {sum(rows)} rows, "
                        f"the reader {file.nstripes} / {file.nrows}")
    return rows


class _OrcFile:
    def __init__(self, path: str):
        self._path = path
        self._file = orc.ORCFile(path)
        self.schema: pa.Schema = self._file.schema
        self.num_rows: int = self._file.nrows
        self._stripe_rows = _stripe_rows(self._file, path)

    def batches(self, start_row: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
        stripe_start = 0
        for index, rows in enumerate(self._stripe_rows):
            if stripe_start + rows > start_row and rows:
                batch = self._file.read_stripe(index, columns=columns)
                if batch.num_rows != rows:
                    problem = f"stripe {index} decoded {batch.num_rows} rows, its footer says {rows}"
                    raise DataError(self._path, None, problem)
                skip = start_row - stripe_start
                yield batch.slice(skip) if skip > 0 else batch
            stripe_start += rows


class OrcDataset(DatasetBase):
    """Batches from ORC files; the API and arguments of ``DatasetBase`` (RecIS's ``OrcDataset``).

    Example (the seed tutorial)::

        dataset = OrcDataset(1024, read_threads_num=2, prefetch=1, drop_remainder=True,
                             transform_fn=[lambda x: x[0]], device="cuda")
        dataset.add_path("./fake_data/")
        dataset.fixedlen_feature("label", [0.0])
        dataset.varlen_feature("sparse4")
        dataset.varlen_feature("sparse5", hash_type=None, trans_int8=True)
    """

    file_suffix = ".orc"
    format_name = "ORC"

    @staticmethod
    def open_file(path: str) -> _OrcFile:
        return _OrcFile(path)

"""``OrcDataset``: RecIS's ORC reader (``fxrec.io.orc_dataset.OrcDataset``).

ORC specifics live here: a file is decoded as a stream of record batches of a few MB
(pyarrow.dataset's ORC scan, which runs liborc's row reader batch by batch), not stripe by stripe
(``ORCFile.read_stripe`` decodes a whole stripe, tens to hundreds of MB, into one liborc batch).
Small batches decode with a third less CPU (bench/README.md, "Reading"): liborc reuses one
batch's buffers for the next, where a stripe-sized batch is freshly mapped memory, page-faulted
in on every stripe; and batch packing starts while the rest of the file still decodes. The scan
decodes on pyarrow's IO thread pool, which iteration grows to ``read_threads_num`` threads. A
resumed read decodes the file holding the resume row from its start and skips the rows before
it (one file at most: the ORC scan can't seek to a stripe).
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as fs
import pyarrow.orc as orc

from fxrec.io.dataset import DatasetBase, decode_batch_rows

__all__ = ["OrcDataset"]

_FORMAT = ds.OrcFileFormat()
_LOCAL = fs.LocalFileSystem()


class _OrcFile:
    def __init__(self, path: str):
        self._path = path
        file = orc.ORCFile(path)
        self.schema: pa.Schema = file.schema
        self.num_rows: int = file.nrows
        self._batch_rows = decode_batch_rows(path, file.nrows)

    def batches(self, start_row: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
        fragment = _FORMAT.make_fragment(self._path, filesystem=_LOCAL)
        row = 0
        for batch in fragment.to_batches(columns=columns, batch_size=self._batch_rows, use_threads=False):
            if row + batch.num_rows > start_row:
                yield batch.slice(start_row - row) if start_row > row else batch
            row += batch.num_rows


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

    def __iter__(self):
        # The ORC scan decodes on pyarrow's IO thread pool (8 threads by default) while the reader
        # thread that asked waits: with fewer pool threads than readers, files would decode
        # read_threads_num at a time no longer. The pool is process-wide; it only ever grows here.
        if pa.io_thread_count() < self._read_threads_num:
            pa.set_io_thread_count(self._read_threads_num)
        return super().__iter__()

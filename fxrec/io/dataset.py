"""``DatasetBase``: RecIS's dataset API over columnar files, shared by ORC and Parquet.

The read path of one iteration::

    shard files (sorted, i % worker_num == worker_idx, then by DataLoader worker)
      -> read_threads_num files decoded at once on a pool of threads: open, check the declared
         columns' types, decode in record batches of a few MB (``decode_batch_rows``) into
         zero-copy pieces (fxrec.io.columns); chunks consumed in file order
         (fxrec.io.threads.ordered_parallel), up to ``_CHUNKS_AHEAD`` of a file held before the
         consumer reaches it
      -> cut into batches of exactly batch_size rows across file boundaries (fxrec.io.packing)
      -> packed into tensors (zero copy within a decoded batch, else one concatenation per column),
         pinned and sent to the GPU if asked, on ``pack_threads_num`` threads, ``prefetch``
         batches ahead, delivered in order
      -> [dict] (RecIS's shape) -> transform_fn -> the consumer.

The order of rows never depends on thread count or timing, which is what makes the IO state
(``dump_io_state`` / ``load_io_state``, fxrec.io.state) exact: a resumed run delivers exactly
the rows an uninterrupted run would have delivered after the dumped batch.

Iteration semantics: each ``iter(dataset)`` is one pass over the shard. It starts at the first
row of the current epoch, or, right after ``load_io_state``, at the loaded position. A pass
that runs to its end moves the state to the start of the next epoch; a pass abandoned midway
(``break``) leaves the state at its last delivered batch, which ``dump_io_state`` reports.
"""

from __future__ import annotations

import functools
import glob
import os
import random
import threading
from abc import abstractmethod
from typing import Callable, Iterator, Protocol, Sequence

import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from fxrec.io.columns import Column, FixedLenColumn, VarLenColumn
from fxrec.io.errors import DataError
from fxrec.io.packing import Chunk, assemble, pack
from fxrec.io.pieces import ragged_to_sparse_coo
from fxrec.io.state import IOState
from fxrec.io.threads import ordered_parallel
from fxrec.ragged import RaggedTensor

__all__ = ["DataFile", "DatasetBase", "decode_batch_rows"]

# Encoded (on-disk) bytes per decoded record batch, and the bounds of its rows. A few MB: the
# decoder reuses one batch's buffers for the next, where a batch of a whole stripe / row group is
# fresh memory page-faulted in every time, and packing starts while the file still decodes
# (bench/README.md, "Reading").
DECODE_BATCH_BYTES = 2 << 20
DECODE_BATCH_ROWS = (64, 65536)


def decode_batch_rows(path: str, num_rows: int) -> int:
    """Rows per decoded record batch of the file at ``path``: DECODE_BATCH_BYTES of its encoded
    bytes, within DECODE_BATCH_ROWS."""
    bytes_per_row = os.path.getsize(path) / max(num_rows, 1)
    low, high = DECODE_BATCH_ROWS
    return int(min(max(DECODE_BATCH_BYTES / max(bytes_per_row, 1.0), low), high))


# Decoded record batches a reader may hold before the consumer reaches its file, so readers of
# later files decode while earlier files are consumed (with 2, the readers of files that decode
# into many batches ran one at a time); at ~2 MB a batch, about what two whole 64 MB stripes held
# when files were decoded stripe by stripe.
_CHUNKS_AHEAD = 64

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class DataFile(Protocol):
    """One opened file of a format (ORC, Parquet)."""

    schema: pa.Schema
    num_rows: int

    def batches(self, start_row: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """The file's rows from ``start_row`` on, in order, in record batches of
        ``decode_batch_rows`` rows (memory stays bounded by a batch, not a file)."""


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class DatasetBase(IterableDataset):
    """RecIS-compatible dataset over columnar files (subclasses: ``OrcDataset``,
    ``ParquetDataset``). Yields what ``transform_fn`` makes of ``[batch]``, where ``batch`` maps
    each declared column (in declaration order) to a ``[B, dim]`` tensor (``fixedlen_feature``)
    or a ``RaggedTensor`` (``varlen_feature``).

    Args (RecIS's names and defaults):
        batch_size: rows per batch; batches are packed across file boundaries.
        worker_idx, worker_num: this worker's shard is file ``i`` of the sorted file list iff
            ``i % worker_num == worker_idx``; inside a ``DataLoader`` with workers, each worker
            takes every ``num_workers``-th file of that shard.
        read_threads_num: files decoded at once (threads: pyarrow releases the GIL).
        pack_threads_num: threads that pack batches (slice the decoded pieces, concatenate them
            into tensors, pin, copy to the GPU), in parallel, delivered in order. None:
            ``max(1, read_threads_num // 2)`` (packing costs about a quarter of decoding).
        prefetch: batches packed ahead of the consumer, at least ``pack_threads_num`` (packing
            always runs on the pack threads, never on the consumer's thread).
        is_compressed: accepted, no effect: ORC / Parquet compression is recorded in each file
            and undone by the decoder.
        drop_remainder: drop the last batch of a pass if it has fewer than ``batch_size`` rows.
        worker_slice_batch_num: accepted, no effect (RecIS uses it to slice ODPS tables; a file
            is the unit of sharding here).
        shuffle: shuffle the shard's file order, per epoch, seeded by the epoch number (so a
            resumed run sees the same order); rows inside a file keep their order.
        ragged_format: True: varlen columns are ``RaggedTensor``; False: ``torch.sparse_coo``
            tensors ``[B, L1, ...]`` as RecIS's ``ragged_to_sparse`` (no weighted columns).
        transform_fn: a callable or a list of callables applied in order to ``[batch]`` (on the
            consumer's thread); its result is what iteration yields.
        save_interval: accepted, no effect: the IO state is exact after every batch.
        dtype: dtype of float columns (fixed-length values, float lists, weights).
        device: ``"cpu"``; ``"pin"`` (pinned host memory); ``"cuda"`` / ``"cuda:N"`` (copied
            from pinned memory with ``non_blocking=True`` on the current stream of the pack
            thread, i.e. the default stream).
    """

    file_suffix: str = ""
    format_name: str = ""

    @staticmethod
    @abstractmethod
    def open_file(path: str) -> DataFile:
        """Open one file of the subclass's format."""

    def __init__(
        self,
        batch_size,
        worker_idx=0,
        worker_num=1,
        read_threads_num=4,
        pack_threads_num=None,
        prefetch=1,
        is_compressed=False,
        drop_remainder=False,
        worker_slice_batch_num=None,
        shuffle=False,
        ragged_format=True,
        transform_fn=None,
        save_interval=100,
        dtype=torch.float32,
        device="cpu",
    ) -> None:
        super().__init__()
        self._batch_size = _positive_int("batch_size", batch_size)
        self._worker_num = _positive_int("worker_num", worker_num)
        if not isinstance(worker_idx, int) or not 0 <= worker_idx < worker_num:
            raise ValueError(f"worker_idx must be an int in [0, worker_num={worker_num}), got {worker_idx!r}")
        self._worker_idx = worker_idx
        self._read_threads_num = _positive_int("read_threads_num", read_threads_num)
        self._prefetch = _positive_int("prefetch", prefetch or 0, minimum=0)
        self._pack_threads_num = (
            max(1, self._read_threads_num // 2)
            if pack_threads_num is None
            else _positive_int("pack_threads_num", pack_threads_num)
        )
        self._drop_remainder = bool(drop_remainder)
        self._shuffle = bool(shuffle)
        self._ragged_format = bool(ragged_format)
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be a floating torch dtype {_FLOAT_DTYPES}, got {dtype!r}")
        self._dtype = dtype
        if not isinstance(device, str) or not (device in ("cpu", "pin", "cuda") or device.startswith("cuda:")):
            raise ValueError(f"device must be 'cpu', 'pin', 'cuda' or 'cuda:N', got {device!r}")
        self._device = device
        if transform_fn is None:
            transform_fn = []
        elif callable(transform_fn):
            transform_fn = [transform_fn]
        if not isinstance(transform_fn, (list, tuple)) or not all(callable(f) for f in transform_fn):
            raise TypeError(f"transform_fn must be a callable or a list of callables, got {transform_fn!r}")
        self._transform_fn: list[Callable] = list(transform_fn)
        # Accepted for RecIS compatibility; see the class docstring for why they do nothing.
        del is_compressed, worker_slice_batch_num, save_interval

        self._files: list[str] = []
        self._columns: dict[str, Column] = {}
        self._state = IOState.start()
        self._resume: dict | None = None

    # -- inputs -------------------------------------------------------------------------------
    def add_path(self, path) -> None:
        """Add a directory (every ``*{suffix}`` file below it), a file, or a glob pattern."""
        path = os.fspath(path)
        if os.path.isfile(path):
            found = [path]
        elif os.path.isdir(path) or glob.has_magic(path):
            roots = [path] if os.path.isdir(path) else sorted(glob.glob(path, recursive=True))
            if not roots:
                raise FileNotFoundError(f"no file or directory matches {path!r}")
            found = []
            for root in roots:
                if os.path.isdir(root):
                    found += glob.glob(os.path.join(glob.escape(root), "**", "*" + self.file_suffix), recursive=True)
                else:
                    found.append(root)
            found = [f for f in found if os.path.isfile(f)]
            if not found:
                raise FileNotFoundError(f"no *{self.file_suffix} file under {path!r}")
        else:
            raise FileNotFoundError(f"no such file or directory: {path!r}")
        # Sorted (RecIS used os.walk order, which differs between machines) and deduplicated.
        self._files = sorted(set(self._files) | {os.path.abspath(f) for f in found})

    def add_paths(self, paths: Sequence) -> None:
        for path in paths:
            self.add_path(path)

    # -- columns ------------------------------------------------------------------------------
    def fixedlen_feature(self, name: str, default_value) -> None:
        """Read list column ``name`` as a dense ``[B, len(default_value)]`` tensor (``dtype`` for
        floats, int64 for integers); an empty or null row takes ``default_value``."""
        self._declare(FixedLenColumn(name, default_value, self._dtype))

    def varlen_feature(self, name: str, hash_type=None, hash_bucket=0, trans_int8=False) -> None:
        """Read list column ``name`` as a ``RaggedTensor`` (see ``fxrec.io.columns``)."""
        self._declare(VarLenColumn(name, hash_type, hash_bucket, trans_int8, self._dtype))

    def _declare(self, column: Column) -> None:
        if column.name in self._columns:
            raise ValueError(f"column {column.name!r} is declared twice")
        # Check the type now against the first file this worker reads, when files are known:
        # e.g. a string column declared without hash_type / trans_int8 fails here, not mid-run.
        shard = self._files[self._worker_idx :: self._worker_num]
        if shard:
            data_file = self._open(shard[0])
            if data_file.num_rows:
                column.decoder(self._field_type(data_file, column.name, shard[0]), shard[0])
        self._columns[column.name] = column

    # -- IO state -----------------------------------------------------------------------------
    def dump_io_state(self) -> dict:
        """Where this dataset is: the first row not yet delivered (plain JSON-able dict)."""
        return self._state.to_dict(self._worker_idx, self._worker_num, self._shard(self._state.epoch))

    def load_io_state(self, io_state: dict | None) -> None:
        """Make the next iteration start at the first row ``io_state`` had not delivered.
        ``None`` or ``{}`` is ignored (as RecIS does)."""
        if not io_state:
            return
        self._state = IOState.from_dict(io_state)
        self._resume = dict(io_state)

    def reset(self) -> None:
        """Back to the first row of epoch 0 (RecIS's ``reset``)."""
        self._state = IOState.start()
        self._resume = None

    # -- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        if not self._files:
            raise ValueError("no input files: call add_path / add_paths first")
        if not self._columns:
            raise ValueError("no columns declared: call fixedlen_feature / varlen_feature first")
        if self._device != "cpu" and not torch.cuda.is_available():
            raise RuntimeError(
                f"device={self._device!r} needs CUDA (pinned memory is CUDA host memory), and it is not available"
            )
        if self._resume is not None:
            IOState.check(self._resume, self._worker_idx, self._worker_num, self._shard(self._state.epoch))
            self._resume = None
        else:
            self._state = IOState.start(self._state.epoch)
        return self._iterate(self._state)

    def _shard(self, epoch: int) -> list[str]:
        shard = self._files[self._worker_idx :: self._worker_num]
        info = get_worker_info()
        if info is not None:
            shard = shard[info.id :: info.num_workers]
        if self._shuffle:
            random.Random(epoch).shuffle(shard)
        return shard

    def _iterate(self, start: IOState) -> Iterator:
        batches = self._batches(self._shard(start.epoch), start)
        try:
            for batch, position in batches:
                self._state = IOState(start.epoch, position)  # before the yield: delivered
                out = [batch]
                for fn in self._transform_fn:
                    out = fn(out)
                yield out
        finally:
            batches.close()
        self._state = IOState.start(start.epoch + 1)

    def _batches(self, shard: list[str], start: IOState) -> Iterator:
        """(batch, position after it) in order: files decoded on the read pool, cut into batch
        plans (on whichever pack thread asks for the next plan), batches packed on the pack pool."""
        stop = threading.Event()  # stops both pools when the consumer goes away
        first = start.position
        reads = (
            functools.partial(self._read_file, index, shard[index], first.row if index == first.file_index else 0)
            for index in range(first.file_index, len(shard))
        )
        chunks = ordered_parallel(
            reads, self._read_threads_num, max_ahead=2 * self._read_threads_num, queue_size=_CHUNKS_AHEAD, stop=stop
        )
        plans = pack(chunks, self._batch_size, self._drop_remainder)
        packs = (functools.partial(self._pack, parts, position) for parts, position in plans)
        try:
            # queue_size 2: a batch and its end marker, so a pack thread never waits on the consumer
            yield from ordered_parallel(
                packs, self._pack_threads_num, max_ahead=self._prefetch, queue_size=2, stop=stop
            )
        finally:
            stop.set()

    def _pack(self, parts: list[Chunk], position, put: Callable) -> None:
        put((self._deliver(assemble(parts, list(self._columns), pin=self._device != "cpu")), position))

    def _deliver(self, batch: dict) -> dict:
        if self._device.startswith("cuda"):
            batch = {name: value.to(self._device, non_blocking=True) for name, value in batch.items()}
        if not self._ragged_format:
            batch = {
                name: ragged_to_sparse_coo(value, name) if isinstance(value, RaggedTensor) else value
                for name, value in batch.items()
            }
        return batch

    # -- one file (runs on a reader thread) ------------------------------------------------------
    def _open(self, path: str) -> DataFile:
        try:
            return self.open_file(path)
        except DataError:
            raise
        except (pa.ArrowException, OSError, ValueError) as error:
            problem = f"cannot open as {self.format_name} (corrupt or truncated?): {error}"
            raise DataError(path, None, problem) from error

    @staticmethod
    def _field_type(data_file: DataFile, name: str, path: str) -> pa.DataType:
        index = data_file.schema.get_field_index(name)
        if index < 0:
            names = data_file.schema.names
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            problem = "appears more than once" if name in names else f"not found (the file has: {shown})"
            raise DataError(path, name, f"column {problem}")
        return data_file.schema.field(index).type

    def _read_file(self, file_index: int, path: str, start_row: int, put: Callable[[Chunk], None]) -> None:
        data_file = self._open(path)
        if data_file.num_rows == 0:
            return  # empty part files (often schema-less, e.g. from Hive) hold no rows to check
        if start_row > data_file.num_rows:
            problem = f"the IO state resumes at row {start_row}, past the file's {data_file.num_rows} rows"
            raise DataError(path, None, problem)
        names = list(self._columns)
        decoders = {
            name: column.decoder(self._field_type(data_file, name, path), path)
            for name, column in self._columns.items()
        }
        row = start_row
        batches = data_file.batches(start_row, names)
        while True:
            try:
                batch = next(batches, None)
            except DataError:
                raise
            except (pa.ArrowException, OSError, ValueError) as error:
                raise DataError(
                    path, None, f"cannot decode columns {names} from row {row} (corrupt or truncated?): {error}"
                ) from error
            if batch is None:
                break
            if batch.num_rows:
                columns = {name: decoders[name](batch.column(name), row) for name in names}
                put(Chunk(file_index, path, row, batch.num_rows, columns))
            row += batch.num_rows
        if row != data_file.num_rows:
            problem = f"decoded {row} rows but the file says it has {data_file.num_rows} (truncated?)"
            raise DataError(path, None, problem)

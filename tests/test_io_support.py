"""Helpers for the fxrec.io tests: random columns, file writers, an oracle from pyarrow's own
``to_pylist`` (independent of fxrec's buffer handling), and a hang-proof batch collector."""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq
import torch

from fxrec.io import OrcDataset, ParquetDataset
from fxrec.io import dataset as dataset_module
from fxrec.ragged import RaggedTensor
from oracles import hash_string

FORMATS = {"orc": OrcDataset, "parquet": ParquetDataset}
DIM = 3  # fixed-length columns of the random schemas
# str_list is read as trans_int8 bytes, hashed_str_list hashed at read time (farm)
KINDS = ("int_list", "float_list", "str_list", "hashed_str_list", "kv_list", "fixed_list", "fixed_scalar")
DEFAULTS = {"fixed_list": [-1.0, -2.0, -3.0], "fixed_scalar": [-7.0]}


@contextlib.contextmanager
def decoding_in_batches_of(rows: int | None):
    """Readers decode every file in record batches of ``rows`` rows (None: their own choice), so
    that small test files still decode in several batches."""
    if rows is None:
        yield
        return
    saved = dataset_module.DECODE_BATCH_ROWS
    dataset_module.DECODE_BATCH_ROWS = (rows, rows)
    try:
        yield
    finally:
        dataset_module.DECODE_BATCH_ROWS = saved


# -- data ---------------------------------------------------------------------------------------
def _lengths(rng, n, max_len):
    lengths = rng.integers(0, max_len + 1, n)
    if max_len > 100:  # long sequences: mostly short rows, a few long ones
        lengths = np.where(rng.random(n) < 0.1, lengths, lengths % 8)
    return lengths


def random_column(kind: str, n: int, rng: np.random.Generator, max_len: int = 5, null_p: float = 0.0) -> pa.Array:
    """``n`` rows of a column of ``kind``; list rows are null with probability ``null_p``."""
    mask = rng.random(n) < null_p if null_p else None
    if kind == "fixed_scalar":
        return pa.array(rng.normal(size=n), mask=mask)
    if kind == "fixed_list":
        lengths = np.where(rng.random(n) < 0.2, 0, DIM)  # some empty rows: they take the default
    else:
        lengths = _lengths(rng, n, max_len)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    total = int(lengths.sum())
    if kind == "int_list":
        items = pa.array(rng.integers(-(2**62), 2**62, total))
    elif kind in ("float_list", "fixed_list"):
        items = pa.array(rng.normal(size=total))
    elif kind in ("str_list", "hashed_str_list"):
        vocab = ["", "a", "bc", "héllo", "x" * 40] + [f"s{i}" for i in range(50)]
        items = pa.array([vocab[i] for i in rng.integers(0, len(vocab), total)], pa.string())
    elif kind == "kv_list":
        items = pa.StructArray.from_arrays(
            [pa.array(rng.integers(-1000, 1000, total)), pa.array(rng.random(total).astype(np.float32))],
            names=["key", "value"],
        )
    else:
        raise ValueError(kind)
    return pa.ListArray.from_arrays(offsets, items, mask=pa.array(mask) if mask is not None else None)


def random_table(kinds: dict[str, str], n: int, rng, max_len: int = 5, null_p: float = 0.0) -> pa.Table:
    return pa.table({name: random_column(kind, n, rng, max_len, null_p) for name, kind in kinds.items()})


def write(table: pa.Table, path, fmt: str, unit_rows: int = 1024) -> str:
    """Write ``table`` with units (ORC stripes / Parquet row groups) of ``unit_rows`` rows."""
    path = os.fspath(path)
    if fmt == "orc":
        orc.write_table(table, path, batch_size=max(unit_rows, 1), stripe_size=1)
    else:
        pq.write_table(table, path, row_group_size=max(unit_rows, 1))
    return path


def write_files(tmp_path, tables: list[pa.Table], fmt: str, unit_rows: int = 1024) -> list[str]:
    suffix = ".orc" if fmt == "orc" else ".parquet"
    return [write(t, tmp_path / f"part-{i:03d}{suffix}", fmt, unit_rows) for i, t in enumerate(tables)]


def declare(ds, kinds: dict[str, str]) -> None:
    for name, kind in kinds.items():
        if kind in DEFAULTS:
            ds.fixedlen_feature(name, DEFAULTS[kind])
        elif kind == "str_list":
            ds.varlen_feature(name, trans_int8=True)
        elif kind == "hashed_str_list":
            ds.varlen_feature(name, hash_type="farm")
        else:
            ds.varlen_feature(name)


# -- oracle: rows as python values, from pyarrow's to_pylist ---------------------------------
def f32(x) -> float:
    """``x`` rounded to float32, as the python float that ``Tensor.tolist`` gives back."""
    return float(np.float32(x))


@functools.cache
def read_time_farm_id(s: bytes) -> int:
    return hash_string(s, "farm") & (2**63 - 1)


def expected_rows(kind: str, column: pa.Array | pa.ChunkedArray, float_dtype=f32) -> list:
    rows = column.to_pylist()
    if kind == "fixed_scalar":
        return [[float_dtype(DEFAULTS[kind][0] if v is None else v)] for v in rows]
    if kind == "fixed_list":
        return [[float_dtype(x) for x in (r if r else DEFAULTS[kind])] for r in rows]
    rows = [r or [] for r in rows]
    if kind == "float_list":
        return [[float_dtype(x) for x in r] for r in rows]
    if kind == "str_list":
        return [[s.encode() if isinstance(s, str) else s for s in r] for r in rows]
    if kind == "hashed_str_list":
        return [[read_time_farm_id(s.encode()) for s in r] for r in rows]
    if kind == "kv_list":
        return [[(d["key"], float_dtype(d["value"])) for d in r] for r in rows]
    return rows


def expected_table(kinds: dict[str, str], tables: list[pa.Table], float_dtype=f32) -> dict[str, list]:
    return {
        name: [row for t in tables for row in expected_rows(kind, t[name], float_dtype)] for name, kind in kinds.items()
    }


# -- delivered tensors -> rows ------------------------------------------------------------------
def _checked_offsets(offsets: torch.Tensor, length: int) -> list[int]:
    assert offsets.dtype == torch.int64
    out = offsets.tolist()
    assert out[0] == 0 and out[-1] == length and all(a <= b for a, b in zip(out, out[1:]))
    return out


def rows_of(value) -> list:
    """Rows of a delivered column, checking the offsets' invariants on the way."""
    if isinstance(value, torch.Tensor):
        assert value.dim() == 2
        return value.tolist()
    assert isinstance(value, RaggedTensor)
    values, levels = value.values(), value.offsets()
    if len(levels) == 2:  # trans_int8 strings: rows -> strings -> bytes
        assert values.dtype == torch.int8
        strings_at = _checked_offsets(levels[1], values.shape[0])
        raw = values.numpy().tobytes()
        strings = [raw[a:b] for a, b in zip(strings_at, strings_at[1:])]
        at = _checked_offsets(levels[0], len(strings))
        return [strings[a:b] for a, b in zip(at, at[1:])]
    at = _checked_offsets(levels[0], values.shape[0])
    items = values.tolist()
    if value.weight() is not None:
        items = list(zip(items, value.weight().tolist()))
    return [items[a:b] for a, b in zip(at, at[1:])]


def delivered_rows(batches: list[dict], names) -> dict[str, list]:
    out = {name: [] for name in names}
    for batch in batches:
        for name in names:
            out[name] += rows_of(batch[name])
    return out


def collect(iterable, limit: int | None = None, timeout: float = 60.0):
    """Up to ``limit`` items of ``iter(iterable)``, read on a thread so that a hang fails the
    test instead of the suite. Returns (items, exception or None)."""
    items, error = [], []

    def run():
        try:
            for item in iterable:
                items.append(item)
                if limit is not None and len(items) >= limit:
                    break
        except BaseException as e:  # noqa: BLE001
            error.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"reading did not finish within {timeout} s (hang)"
    return items, (error[0] if error else None)


def read_all(ds, timeout: float = 60.0) -> list:
    items, error = collect(ds, timeout=timeout)
    if error is not None:
        raise error
    return items

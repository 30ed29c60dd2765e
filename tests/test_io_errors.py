"""Bad input: a clear error naming file and column, raised to the consumer (never a hang, at any
thread count / prefetch), after exactly the batches that precede the bad data."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from fxrec.io import DataError, OrcDataset, ParquetDataset
from test_io_support import FORMATS, collect, rows_of, write

PIPELINES = [dict(read_threads_num=1, prefetch=0), dict(read_threads_num=4, prefetch=3)]


def ids_table(start: int, n: int, **extra) -> pa.Table:
    return pa.table({"id": pa.array([[i] for i in range(start, start + n)]), **extra})


def good_then(tmp_path, fmt, bad_writer, **kwargs):
    """A dataset over a good file of 10 rows and then a bad file (written by ``bad_writer``)."""
    suffix = ".orc" if fmt == "orc" else ".parquet"
    write(ids_table(0, 10, s=pa.array([["a"]] * 10)), tmp_path / f"a{suffix}", fmt)
    bad = str(tmp_path / f"b{suffix}")
    bad_writer(bad)
    ds = FORMATS[fmt](4, **kwargs)
    ds.add_path(tmp_path)
    return ds, bad


def assert_fails_after_good_batches(ds, bad: str, column: str | None, message: str):
    """Two full batches (rows 0-7) come out, then the error: rows 8-9 are neither delivered in a
    partial batch nor silently dropped, and the IO state points at row 8."""
    batches, error = collect(ds, timeout=30)
    assert [rows_of(b[0]["id"]) for b in batches] == [[[i] for i in range(4)], [[i] for i in range(4, 8)]]
    assert isinstance(error, DataError), repr(error)
    assert error.path == bad and error.column == column
    assert message in str(error) and repr(bad) in str(error)
    state = ds.dump_io_state()
    assert (state["file_index"], state["row"]) == (0, 8)


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_missing_column_in_one_file(tmp_path, fmt, pipeline):
    ds, bad = good_then(tmp_path, fmt, lambda p: write(pa.table({"id": pa.array([[1]] * 5)}), p, fmt), **pipeline)
    ds.varlen_feature("id")
    ds.varlen_feature("s", trans_int8=True)
    assert_fails_after_good_batches(ds, bad, "s", "column not found (the file has: id)")


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_wrong_column_type_in_one_file(tmp_path, fmt, pipeline):
    other = lambda p: write(ids_table(10, 5, s=pa.array([[1]] * 5)), p, fmt)  # noqa: E731
    ds, bad = good_then(tmp_path, fmt, other, **pipeline)
    ds.varlen_feature("id")
    ds.varlen_feature("s", trans_int8=True)
    assert_fails_after_good_batches(ds, bad, "s", "apply to string columns")


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_schema_differing_from_the_first_file(tmp_path, pipeline):
    # list<double> here, list<int64> in the first file: both readable, but batches would change type
    other = lambda p: write(pa.table({"id": pa.array([[0.5]] * 5), "s": pa.array([["a"]] * 5)}), p, "orc")  # noqa: E731
    ds, bad = good_then(tmp_path, "orc", other, **pipeline)
    ds.varlen_feature("id")
    assert_fails_after_good_batches(ds, bad, "id", "decodes as ragged float32")


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_wrong_dense_length_names_the_row(tmp_path, pipeline):
    dense = pa.array([[1.0, 2.0]] * 3 + [[1.0]] + [[1.0, 2.0]])
    bad_file = lambda p: write(ids_table(10, 5, s=pa.array([["a"]] * 5), d=dense), p, "orc")  # noqa: E731
    ds, bad = good_then(tmp_path, "orc", bad_file, **pipeline)
    write(ids_table(0, 10, s=pa.array([["a"]] * 10), d=pa.array([[0.0, 0.0]] * 10)), tmp_path / "a.orc", "orc")
    ds.varlen_feature("id")
    ds.fixedlen_feature("d", [0.0, 0.0])
    batches, error = collect(ds, timeout=30)
    assert len(batches) == 2 and isinstance(error, DataError)
    assert str(error) == (
        f"file {bad!r}, column 'd', row 3: has 1 items but fixedlen_feature declared 2 (an empty row takes the default)"
    )


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_corrupt_file(tmp_path, fmt, pipeline):
    garbage = lambda p: open(p, "wb").write(np.random.default_rng(0).bytes(5000))  # noqa: E731
    ds, bad = good_then(tmp_path, fmt, garbage, **pipeline)
    ds.varlen_feature("id")
    assert_fails_after_good_batches(ds, bad, None, "corrupt or truncated")


@pytest.mark.parametrize("cut", [0.5, 0.97])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_truncated_file(tmp_path, fmt, cut):
    def truncated(path):
        write(ids_table(10, 3000, s=pa.array([["abc" * 20]] * 3000)), path, fmt, unit_rows=500)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: int(len(data) * cut)])

    ds, bad = good_then(tmp_path, fmt, truncated, read_threads_num=2)
    ds.varlen_feature("id")
    assert_fails_after_good_batches(ds, bad, None, "corrupt or truncated")


def test_corrupt_data_inside_a_valid_footer(tmp_path):
    """Bytes of a stripe overwritten: the footer still parses, decoding the stripe must fail."""
    def damaged(path):
        write(ids_table(10, 3000, s=pa.array([["abc" * 20]] * 3000)), path, "orc", unit_rows=500)
        data = bytearray(open(path, "rb").read())
        data[3:2000] = np.random.default_rng(1).bytes(1997)
        open(path, "wb").write(bytes(data))

    ds, bad = good_then(tmp_path, "orc", damaged, read_threads_num=2)
    ds.varlen_feature("id")
    ds.varlen_feature("s", trans_int8=True)
    batches, error = collect(ds, timeout=30)
    assert len(batches) <= 2 + 3000 // 4
    assert isinstance(error, DataError) and error.path == bad, repr(error)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_null_inside_a_list(tmp_path, pipeline):
    bad_file = lambda p: write(pa.table({"id": pa.array([[1], [2], [3, None]])}), p, "orc")  # noqa: E731
    ds, bad = good_then(tmp_path, "orc", bad_file, **pipeline)
    ds.varlen_feature("id")
    assert_fails_after_good_batches(ds, bad, "id", "row 2: null item inside a list")


def test_missing_paths(tmp_path):
    ds = OrcDataset(4)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        ds.add_path(tmp_path / "nope.orc")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.orc file under"):
        ds.add_path(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    write(ids_table(0, 2), tmp_path / "other" / "x.parquet", "parquet")
    with pytest.raises(FileNotFoundError, match=r"no \*\.orc file under"):
        ds.add_path(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="no file or directory matches"):
        ds.add_path(tmp_path / "*.orc")
    ds.add_path(tmp_path / "other" / "x.parquet")  # an explicit file is read whatever its name
    with pytest.raises(FileNotFoundError):
        ParquetDataset(4).add_path(tmp_path / "empty")


def test_nothing_to_read():
    with pytest.raises(ValueError, match="no input files"):
        iter(OrcDataset(4))


def test_no_columns(tmp_path):
    ds = OrcDataset(4)
    ds.add_path(write(ids_table(0, 2), tmp_path / "a.orc", "orc"))
    with pytest.raises(ValueError, match="no columns declared"):
        iter(ds)


def test_declaration_is_checked_against_the_first_file(tmp_path):
    ds = OrcDataset(4)
    ds.add_path(write(ids_table(0, 2, s=pa.array([["x"], ["y"]])), tmp_path / "a.orc", "orc"))
    with pytest.raises(DataError, match=r"column 's': is list<item: string>: strings can't become tensors"):
        ds.varlen_feature("s")
    with pytest.raises(DataError, match=r"column 'zz': column not found"):
        ds.fixedlen_feature("zz", [0.0])
    ds.varlen_feature("id")
    with pytest.raises(ValueError, match="declared twice"):
        ds.varlen_feature("id")


def test_empty_files_are_skipped(tmp_path):
    write(pa.table({"other": pa.array([], pa.int64())}), tmp_path / "a.orc", "orc")
    write(ids_table(0, 5), tmp_path / "b.orc", "orc")
    ds = OrcDataset(2)
    ds.add_path(tmp_path)
    ds.varlen_feature("id")
    batches, error = collect(ds)
    assert error is None and sum(len(rows_of(b[0]["id"])) for b in batches) == 5


def test_state_past_the_end_of_a_file(tmp_path):
    write(ids_table(0, 5), tmp_path / "a.orc", "orc")
    ds = OrcDataset(2)
    ds.add_path(tmp_path)
    ds.varlen_feature("id")
    ds.load_io_state(dict(ds.dump_io_state(), row=6))
    _, error = collect(ds)
    assert isinstance(error, DataError) and "past the file's 5 rows" in str(error)


def test_transform_error_reaches_the_consumer(tmp_path):
    write(ids_table(0, 5), tmp_path / "a.orc", "orc")

    def boom(batch):
        raise KeyError("boom")

    ds = OrcDataset(2, transform_fn=boom, read_threads_num=3, prefetch=2)
    ds.add_path(tmp_path)
    ds.varlen_feature("id")
    _, error = collect(ds)
    assert isinstance(error, KeyError)

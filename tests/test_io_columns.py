"""Arrow -> tensor conversion of every column kind (fxrec.io.columns / pieces), against what
pyarrow itself reads (``to_pylist``): values and offsets equal, nulls, slices, zero copy."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxrec.io import DataError
from fxrec.io.columns import FixedLenColumn, VarLenColumn
from test_io_support import (
    DEFAULTS,
    FORMATS,
    KINDS,
    declare,
    expected_rows,
    random_column,
    random_table,
    read_all,
    rows_of,
    write_files,
)


KV_TYPE = pa.list_(pa.struct([("key", pa.int64()), ("value", pa.float32())]))


def column_for(kind: str, dtype=torch.float32):
    if kind in DEFAULTS:
        return FixedLenColumn(kind, DEFAULTS[kind], dtype)
    return VarLenColumn(kind, "farm" if kind == "hashed_str_list" else None, 0, kind == "str_list", dtype)


def decode(column, arr: pa.Array, first_row: int = 0):
    piece = column.decoder(arr.type, "mem.orc")(arr, first_row)
    return type(piece).concat([piece], pin=False)


# -- in-memory arrays: every kind, with nulls, sliced anywhere ---------------------------------
@settings(max_examples=80)
@given(
    kind=st.sampled_from(KINDS),
    n=st.integers(0, 60),
    max_len=st.sampled_from([0, 1, 4, 2000]),
    null_p=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_decode_matches_pyarrow(kind, n, max_len, null_p, seed, data):
    arr = random_column(kind, n, np.random.default_rng(seed), max_len, null_p)
    start = data.draw(st.integers(0, n))
    arr = arr.slice(start, data.draw(st.integers(0, n - start)))
    assert rows_of(decode(column_for(kind), arr)) == expected_rows(kind, arr)


def test_long_rows_and_empty_rows():
    lengths = [0, 3000, 0, 1, 0, 1500]
    arr = pa.array([list(range(k)) for k in lengths], pa.list_(pa.int64()))
    rt = decode(column_for("int_list"), arr)
    assert rt.offsets()[0].tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert rt.values().tolist() == [i for k in lengths for i in range(k)]


@pytest.mark.parametrize(
    "item_type, values, expected",
    [
        (pa.int32(), [[1, -2], [3]], [[1, -2], [3]]),
        (pa.int8(), [[-128, 127]], [[-128, 127]]),
        (pa.uint32(), [[2**32 - 1]], [[2**32 - 1]]),
        (pa.uint64(), [[2**64 - 1, 5]], [[-1, 5]]),  # uint64 ids keep their 64 bits
        (pa.int64(), [[-(2**63), 2**63 - 1]], [[-(2**63), 2**63 - 1]]),
    ],
)
def test_integer_items_become_int64(item_type, values, expected):
    rt = decode(column_for("int_list"), pa.array(values, pa.list_(item_type)))
    assert rt.values().dtype == torch.int64
    assert rows_of(rt) == expected


@pytest.mark.parametrize(
    "list_type",
    [pa.list_(pa.int64()), pa.large_list(pa.int64()), pa.list_(pa.int64(), 2)],
    ids=["list", "large", "fixed"],
)
def test_list_layouts(list_type):
    rows = [[1, 2], None, [3, 4], [5, 6]]
    arr = pa.array(rows, list_type).slice(1)
    assert rows_of(decode(column_for("int_list"), arr)) == [[], [3, 4], [5, 6]]
    dense = decode(FixedLenColumn("d", [9, 9], torch.float32), arr)
    assert dense.dtype == torch.int64 and dense.tolist() == [[9, 9], [3, 4], [5, 6]]


def test_null_rows_backed_by_items_are_empty():
    offsets = pa.array([0, 2, 4, 6], pa.int32())
    arr = pa.ListArray.from_arrays(offsets, pa.array([1, 2, 3, 4, 5, 6]), mask=pa.array([False, True, False]))
    assert rows_of(decode(column_for("int_list"), arr)) == [[1, 2], [], [5, 6]]
    strings = pa.ListArray.from_arrays(offsets, pa.array(list("abcdef")), mask=pa.array([True, False, False]))
    assert rows_of(decode(column_for("str_list"), strings)) == [[], [b"c", b"d"], [b"e", b"f"]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_float_dtype(dtype):
    arr = pa.array([[0.5, 1.25], [], [3.0]], pa.list_(pa.float64()))
    rt = decode(VarLenColumn("f", None, 0, False, dtype), arr)
    assert rt.values().dtype == dtype and rows_of(rt) == [[0.5, 1.25], [], [3.0]]
    dense = decode(FixedLenColumn("f", [7.0], dtype), pa.array([1.5, None], pa.float32()))
    assert dense.dtype == dtype and dense.tolist() == [[1.5], [7.0]]


def test_key_value_lists_and_maps():
    kv = pa.array(
        [[{"key": 1, "value": 0.5}, {"key": -2, "value": 2.0}], None, [{"key": 3, "value": 1.0}]],
        pa.list_(pa.struct([("key", pa.int64()), ("value", pa.float64())])),
    )
    m = pa.array([[(1, 0.5), (-2, 2.0)], None, [(3, 1.0)]], pa.map_(pa.int64(), pa.float32()))
    for arr in (kv, m, kv.slice(1), m.slice(1)):
        rt = decode(column_for("kv_list"), arr)
        assert rt.weight().dtype == torch.float32
        expected = [[(1, 0.5), (-2, 2.0)], [], [(3, 1.0)]][3 - len(arr) :]
        assert rows_of(rt) == expected


def test_fixedlen_scalar_and_defaults():
    assert decode(FixedLenColumn("x", [4], torch.float32), pa.array([1, None, 3])).tolist() == [[1], [4], [3]]
    assert decode(FixedLenColumn("x", 2.5, torch.float32), pa.array([1.0, None])).tolist() == [[1.0], [2.5]]
    arr = pa.array([[1.0, 2.0], [], None, [3.0, 4.0]])
    assert decode(FixedLenColumn("x", [8.0, 9.0], torch.float32), arr).tolist() == [
        [1.0, 2.0], [8.0, 9.0], [8.0, 9.0], [3.0, 4.0]
    ]


def test_pieces_are_views_of_arrow_buffers():
    ints = pa.array([[1, 2], [3], [4, 5, 6]]).slice(1)
    piece = column_for("int_list").decoder(ints.type, "f")(ints, 0)
    assert np.shares_memory(piece.values, np.frombuffer(ints.values.buffers()[1], np.int64))
    assert np.shares_memory(piece.offsets[0], np.frombuffer(ints.buffers()[1], np.int32))
    strings = pa.array([["ab", "c"], ["def"]])
    piece = column_for("str_list").decoder(strings.type, "f")(strings, 0)
    assert np.shares_memory(piece.values, np.frombuffer(strings.values.buffers()[2], np.int8))
    dense = pa.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    piece = column_for("fixed_list").decoder(dense.type, "f")(dense, 0)
    assert np.shares_memory(piece.values, np.frombuffer(dense.values.buffers()[1], np.float64))
    # one piece in the delivered dtype is handed over as is; several pieces are packed (one copy)
    out = decode(column_for("int_list"), ints)
    assert np.shares_memory(out.values().numpy(), np.frombuffer(ints.values.buffers()[1], np.int64))
    piece = column_for("int_list").decoder(ints.type, "f")(ints, 0)
    packed = type(piece).concat([piece.slice(0, 1), piece.slice(1, 2)], pin=False)
    assert not np.shares_memory(packed.values().numpy(), np.frombuffer(ints.values.buffers()[1], np.int64))
    assert rows_of(packed) == [[3], [4, 5, 6]]
    floats = pa.array([[1.0, 2.0]])  # float64 -> float32: cast, hence a copy
    out = decode(column_for("float_list"), floats)
    assert not np.shares_memory(out.values().numpy(), np.frombuffer(floats.values.buffers()[1], np.float64))


@pytest.mark.parametrize(
    "kind, arr, row",
    [
        ("int_list", pa.array([[1], [2, None], [3]]), 1),
        ("float_list", pa.array([[1.0], [], [None]]), 2),
        ("str_list", pa.array([["a"], ["b", None]]), 1),
        ("fixed_list", pa.array([[1.0, 2.0, 3.0], [1.0, None, 3.0]]), 1),
        ("kv_list", pa.array([[{"key": 1, "value": None}]], KV_TYPE), 0),
        ("kv_list", pa.array([[], [{"key": None, "value": 1.0}]], KV_TYPE), 1),
    ],
)
def test_null_items_inside_lists_raise(kind, arr, row):
    with pytest.raises(DataError, match=rf"file 'mem.orc', column '{kind}', row {100 + row}: null"):
        decode(column_for(kind), arr, first_row=100)


def test_fixedlen_wrong_length_names_row():
    arr = pa.array([[1.0, 2.0, 3.0], [], [1.0, 2.0]])
    with pytest.raises(DataError, match=r"column 'fixed_list', row 12: has 2 items but fixedlen_feature declared 3"):
        decode(column_for("fixed_list"), arr, first_row=10)


@pytest.mark.parametrize(
    "column, arrow_type, message",
    [
        (VarLenColumn("c", None, 0, False, torch.float32), pa.list_(pa.string()), "strings can't become tensors"),
        (VarLenColumn("c", None, 0, False, torch.float32), pa.int64(), "needs a list"),
        (VarLenColumn("c", None, 0, False, torch.float32), pa.list_(pa.bool_()), "needs a list"),
        (VarLenColumn("c", "farm", 0, False, torch.float32), pa.list_(pa.int64()), "apply to string columns"),
        (VarLenColumn("c", None, 0, True, torch.float32), pa.list_(pa.int64()), "apply to string columns"),
        (
            VarLenColumn("c", None, 0, True, torch.float32),
            pa.list_(pa.struct([("key", pa.string()), ("value", pa.float32())])),
            "trans_int8 cannot carry",
        ),
        (
            VarLenColumn("c", None, 0, False, torch.float32),
            pa.list_(pa.struct([("key", pa.int64()), ("value", pa.string())])),
            "must be numbers",
        ),
        (FixedLenColumn("c", [0.0, 0.0], torch.float32), pa.float64(), "plain number when default_value has one"),
        (FixedLenColumn("c", [0.0], torch.float32), pa.list_(pa.string()), "needs a list of numbers"),
        (FixedLenColumn("c", [0.5], torch.float32), pa.list_(pa.int64()), "does not fit the integer column"),
    ],
)
def test_wrong_column_types(column, arrow_type, message):
    with pytest.raises(DataError, match=message) as info:
        column.decoder(arrow_type, "x.orc")
    assert "file 'x.orc', column 'c'" in str(info.value)


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(hash_type="md5"), "hash_type must be one of"),
        (dict(hash_bucket=-1), "hash_bucket must be an int in"),
        (dict(hash_type="farm", hash_bucket=2**64), "hash_bucket must be an int in"),
        (dict(hash_bucket=10), "needs a hash_type"),
        (dict(hash_type="farm", trans_int8=True), "choose one"),
    ],
)
def test_varlen_declaration_errors(args, message):
    full = dict(hash_type=None, hash_bucket=0, trans_int8=False) | args
    with pytest.raises(ValueError, match=message):
        VarLenColumn("c", full["hash_type"], full["hash_bucket"], full["trans_int8"], torch.float32)


@pytest.mark.parametrize("default", [[], "0", [True], None, [[1.0]]])
def test_fixedlen_declaration_errors(default):
    with pytest.raises(ValueError, match="default_value must be a non-empty list of numbers"):
        FixedLenColumn("c", default, torch.float32)


# -- through files: every kind in both formats --------------------------------------------------
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_kind_round_trips_through_files(tmp_path, fmt):
    rng = np.random.default_rng(7)
    kinds = {kind: kind for kind in KINDS}
    tables = [random_table(kinds, n, rng, max_len=2500, null_p=0.1) for n in (37, 0, 150)]
    write_files(tmp_path, tables, fmt, unit_rows=16)
    ds = FORMATS[fmt](25, read_threads_num=2)
    ds.add_path(tmp_path)
    declare(ds, kinds)
    batches = [b[0] for b in read_all(ds)]
    assert [b["int_list"].batch_size() for b in batches] == [25] * 7 + [12]
    for name, kind in kinds.items():
        expected = [row for t in tables for row in expected_rows(kind, t[name])]
        assert [row for b in batches for row in rows_of(b[name])] == expected, name


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_format_specific_types(tmp_path, fmt):
    table = pa.table(
        {
            "i32": pa.array([[1, 2], None, [3]], pa.list_(pa.int32())),
            "map": pa.array([[(1, 0.5)], [], [(2, 1.5), (3, 2.5)]], pa.map_(pa.int64(), pa.float64())),
            "label": pa.array([1, None, 0], pa.int64()),
            "f32": pa.array([[0.25], [], [1.5]], pa.list_(pa.float32())),
        }
    )
    write_files(tmp_path, [table], fmt)
    ds = FORMATS[fmt](4)
    ds.add_path(tmp_path)
    ds.varlen_feature("i32")
    ds.varlen_feature("map")
    ds.fixedlen_feature("label", [-1])
    ds.fixedlen_feature("f32", [9.0])
    (batch,) = [b[0] for b in read_all(ds)]
    assert rows_of(batch["i32"]) == [[1, 2], [], [3]]
    assert rows_of(batch["map"]) == [[(1, 0.5)], [], [(2, 1.5), (3, 2.5)]]
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [[1], [-1], [0]]
    assert batch["f32"].tolist() == [[0.25], [9.0], [1.5]]

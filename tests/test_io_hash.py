"""Read-time string hashing (``varlen_feature(hash_type=..., hash_bucket=...)``) against pure-Python
farmhash / MurmurHash64A: ``h & (2**63 - 1)`` without a bucket, ``uint64(h) % hash_bucket`` with one."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oracles import hash_string
from test_io_support import FORMATS, read_all, rows_of, write_files

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.fxrec, "hash_bytes"), reason="torch.ops.fxrec.hash_bytes is not registered"
)


def expected_id(s: bytes, hash_type: str, bucket: int) -> int:
    h = hash_string(s, hash_type)
    return h & (2**63 - 1) if bucket == 0 else (h % 2**64) % bucket  # python ints: exact uint64


def read(tmp_path, fmt, tables, batch_size=7, **feature):
    write_files(tmp_path, tables, fmt, unit_rows=5)
    ds = FORMATS[fmt](batch_size, read_threads_num=2)
    ds.add_path(tmp_path)
    ds.varlen_feature("s", **feature)
    return [row for b in read_all(ds) for row in rows_of(b[0]["s"])]


@pytest.mark.parametrize("bucket", [0, 1, 1000, 10**9 + 7, 2**63 + 5])
@pytest.mark.parametrize("hash_type", ["farm", "murmur"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_hashed_string_lists(tmp_path, fmt, hash_type, bucket):
    rows = [["a", "", "héllo"], None, [], ["x" * 100, "a"], ["k"] * 3] * 4
    table = pa.table({"s": pa.array(rows, pa.list_(pa.string()))})
    got = read(tmp_path, fmt, [table], hash_type=hash_type, hash_bucket=bucket)
    expected = [[expected_id(s.encode(), hash_type, bucket) for s in (r or [])] for r in rows]
    assert got == expected
    if bucket:
        assert all(0 <= i < bucket or bucket > 2**63 for r in got for i in r)


def test_negative_hashes_bucket_as_unsigned(tmp_path):
    strings = [f"s{i}" for i in range(200)]
    negative = [s for s in strings if hash_string(s.encode(), "farm") < 0]
    assert negative, "need strings whose farm hash is negative"
    got = read(tmp_path, "orc", [pa.table({"s": pa.array([negative])})], hash_type="farm", hash_bucket=1000)
    assert got == [[(hash_string(s.encode(), "farm") + 2**64) % 1000 for s in negative]]
    assert got != [[hash_string(s.encode(), "farm") % 1000 for s in negative]]  # signed modulo differs


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_hashed_keys_keep_their_weights(tmp_path, fmt):
    rows = [[("a", 0.5), ("bb", 1.5)], [], None, [("c", 2.0)]]
    arr = pa.array(rows, pa.map_(pa.string(), pa.float32()))
    got = read(tmp_path, fmt, [pa.table({"s": arr})], batch_size=3, hash_type="murmur", hash_bucket=97)
    assert got == [[(expected_id(k.encode(), "murmur", 97), w) for k, w in (r or [])] for r in rows]


@settings(max_examples=25)
@given(
    rows=st.lists(st.none() | st.lists(st.binary(max_size=80), max_size=12), max_size=40),
    hash_type=st.sampled_from(["farm", "murmur"]),
    bucket=st.sampled_from([0, 7, 2**40]),
    batch_size=st.integers(1, 16),
)
def test_hashing_matches_oracle(tmp_path_factory, rows, hash_type, bucket, batch_size):
    table = pa.table({"s": pa.array(rows, pa.list_(pa.binary()))})
    path = tmp_path_factory.mktemp("h")
    got = read(path, "parquet", [table], batch_size=batch_size, hash_type=hash_type, hash_bucket=bucket)
    assert got == [[expected_id(s, hash_type, bucket) for s in (r or [])] for r in rows]


def test_read_time_hash_equals_hash_op_on_trans_int8_bytes(tmp_path):
    rows = [["a", "bc"], [], ["héllo", "x" * 70]]
    write_files(tmp_path, [pa.table({"s": pa.array(rows)})], "orc")
    hashed = FORMATS["orc"](3)
    hashed.add_path(tmp_path)
    hashed.varlen_feature("s", hash_type="farm")
    raw = FORMATS["orc"](3)
    raw.add_path(tmp_path)
    raw.varlen_feature("s", trans_int8=True)
    ids = read_all(hashed)[0][0]["s"]
    bytes_rt = read_all(raw)[0][0]["s"]
    op = torch.ops.fxrec.hash_bytes(bytes_rt.values(), bytes_rt.offsets()[1], "farm")
    assert torch.equal(ids.values(), op & np.int64(2**63 - 1).item())
    assert torch.equal(ids.offsets()[0], bytes_rt.offsets()[0])

"""Read-time string hashing (``varlen_feature(hash_type=..., hash_bucket=...)``) against pure-Python
farmhash / MurmurHash64A: ``h & (2**63 - 1)`` without a bucket, ``uint64(h) % hash_bucket`` with one."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oracles import hash_string, to_int64
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


# The C loop (fxrec/io/hash_strings.c) directly, and the op fallback where it can't be built.

from fxrec.io import hashing  # noqa: E402
from fxrec.utils.native import NativeUnavailable, load_library  # noqa: E402


def packed(strings, lead=0, dtype=np.int64):
    """(int8 data, absolute offsets) with ``lead`` unrelated bytes before the first string."""
    data = np.frombuffer(b"\xab" * lead + b"".join(strings), dtype=np.int8)
    offsets = lead + np.concatenate([[0], np.cumsum([len(s) for s in strings], dtype=np.int64)])
    return data, offsets.astype(dtype)


@pytest.fixture
def without_compiler(monkeypatch):
    monkeypatch.setenv("CC", "fxrec-no-such-compiler")
    hashing._native_kernels.cache_clear()
    yield
    hashing._native_kernels.cache_clear()


def test_the_c_loop_is_built_here():
    # CI machines have a C compiler (torch.compile on CPU needs one too): the fast path is tested.
    assert hashing._native_kernels() is not None


@settings(max_examples=60, deadline=None)
@given(
    strings=st.lists(st.binary(max_size=200), max_size=50),
    hash_type=st.sampled_from(["farm", "murmur"]),
    bucket=st.sampled_from([0, 1, 7, 2**40, 2**63 + 5, 2**64 - 1]),
    lead=st.integers(0, 9),
    dtype=st.sampled_from([np.int32, np.int64]),
)
def test_hash_strings_matches_oracle(strings, hash_type, bucket, lead, dtype):
    data, offsets = packed(strings, lead, dtype)
    got = hashing.hash_strings(data, offsets, hash_type, bucket)
    assert got.dtype == np.int64 and got.shape == (len(strings),)
    assert got.tolist() == [to_int64(expected_id(s, hash_type, bucket)) for s in strings]


@settings(max_examples=60, deadline=None)
@given(
    strings=st.lists(st.binary(min_size=8, max_size=16) | st.binary(max_size=20), max_size=40),
    bucket=st.sampled_from([0, 7, 2**63 + 5]),
    dtype=st.sampled_from([np.int32, np.int64]),
)
def test_hash_strings_four_at_a_time(strings, bucket, dtype):
    # farm hashes groups of four 8..16-byte strings side by side; any other length in a group
    # sends it through the one-string loop: mixes of both, at every position of a group
    data, offsets = packed(strings, 3, dtype)
    got = hashing.hash_strings(data, offsets, "farm", bucket)
    assert got.tolist() == [to_int64(expected_id(s, "farm", bucket)) for s in strings]


@pytest.mark.parametrize("hash_type", ["farm", "murmur"])
def test_hash_strings_long_strings_and_every_length_class(hash_type):
    rng = np.random.default_rng(5)
    strings = [bytes(rng.integers(0, 256, n, dtype=np.uint8)) for n in [*range(0, 130), 1000, 4097, 70000]]
    data, offsets = packed(strings, lead=3)
    got = hashing.hash_strings(data, offsets, hash_type, 0)
    assert got.tolist() == [expected_id(s, hash_type, 0) for s in strings]


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize(
    "offsets, bad",
    [
        ([0, 2, 1, 3], "string 1"),
        ([0, 2, 9], "string 0"),
        ([-1, 2], "string 0"),
        ([0, 10, 20, 15, 30, 40], "string 2"),  # inside a group of four 8..16-byte strings
        ([0, 10, 20, 30, 40, 45], "string 0"),  # the last string ends past the data
    ],
)
def test_hash_strings_rejects_bad_offsets(dtype, offsets, bad):
    data = np.zeros(40 if offsets[-1] >= 40 else 4, np.int8)
    with pytest.raises(ValueError, match=f"{bad}'s offsets .* {data.size}-byte data buffer"):
        hashing.hash_strings(data, np.array(offsets, dtype), "farm", 0)


def test_without_a_compiler_the_op_hashes_with_a_warning(without_compiler):
    strings = [b"", b"a", b"x" * 70, "héllo".encode()]
    data, offsets = packed(strings, lead=2, dtype=np.int32)
    with pytest.warns(RuntimeWarning, match="fxrec-no-such-compiler"):
        got = hashing.hash_strings(data, offsets, "murmur", 1000)
    assert got.tolist() == [expected_id(s, "murmur", 1000) for s in strings]


@pytest.mark.parametrize("compiler", ["native", "op fallback"])
def test_hash_strings_writes_into_a_slice_of_out(compiler, request):
    # Packing hashes each piece into its slice of the batch: the rest of the batch stays as it is.
    if compiler == "op fallback":
        request.getfixturevalue("without_compiler")
    strings = [b"", b"a", b"x" * 70, "héllo".encode()]
    data, offsets = packed(strings, lead=2, dtype=np.int32)
    batch = np.full(8, -7, np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's warning, tested above
        got = hashing.hash_strings(data, offsets, "murmur", 2**63 + 5, out=batch[3:7])
    assert got.base is batch
    expected = [to_int64(expected_id(s, "murmur", 2**63 + 5)) for s in strings]
    assert batch.tolist() == [-7] * 3 + expected + [-7]


@pytest.mark.parametrize(
    "out", [np.empty(3, np.int64), np.empty(4, np.int32), np.empty(8, np.int64)[::2]], ids=["short", "int32", "strided"]
)
def test_hash_strings_rejects_an_unfit_out(out):
    data, offsets = packed([b"a", b"b", b"c", b"d"])
    with pytest.raises(ValueError, match="out must be a writable contiguous int64 array of 4 entries"):
        hashing.hash_strings(data, offsets, "farm", 0, out=out)


def test_load_library_builds_once_and_reports_compiler_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("FXREC_CACHE_DIR", str(tmp_path / "cache"))
    good = tmp_path / "twice.c"
    good.write_text("long fxrec_twice(long x) { return 2 * x; }\n")
    assert load_library(good).fxrec_twice(21) == 42
    built = sorted((tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].name.startswith("twice-") and built[0].suffix == ".so"
    assert load_library(good).fxrec_twice(4) == 8
    assert sorted((tmp_path / "cache").iterdir()) == built  # no rebuild, no leftover partial file
    broken = tmp_path / "broken.c"
    broken.write_text("int fxrec_broken( {\n")
    with pytest.raises(NativeUnavailable, match="failed to build .*broken.c"):
        load_library(broken)
    assert sorted((tmp_path / "cache").iterdir()) == built

"""OrcDataset / ParquetDataset: batching across files, threads, prefetch, sharding, exact resume,
delivery (transform_fn, ragged_format, devices) and the seed tutorial's get_dataset."""

from __future__ import annotations

import gc
import json
import os
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.deepctr.data import generate_data
from examples.deepctr.dataset import IOArgs, get_dataset
from fxrec.io import OrcDataset, ParquetDataset
from fxrec.io.threads import ordered_parallel
from fxrec.ragged import RaggedTensor
from test_io_support import (
    FORMATS,
    KINDS,
    collect,
    declare,
    decoding_in_batches_of,
    delivered_rows,
    expected_table,
    random_table,
    read_all,
    rows_of,
    write,
    write_files,
)

HAS_CUDA = torch.cuda.is_available()


def make(fmt, paths, kinds, batch_size, **kwargs):
    ds = FORMATS[fmt](batch_size, **kwargs)
    ds.add_paths(paths)
    declare(ds, kinds)
    return ds


def batches_of(items):
    return [item[0] for item in items]  # no transform_fn: each item is [batch]


# -- everything read equals what pyarrow reads, however it is batched and threaded ---------------
@settings(max_examples=80)
@given(
    fmt=st.sampled_from(sorted(FORMATS)),
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=4),
    file_rows=st.lists(st.integers(0, 120), min_size=1, max_size=4),
    unit_rows=st.integers(1, 64),
    max_len=st.sampled_from([0, 3, 2000]),
    batch_size=st.integers(1, 100),
    threads=st.integers(1, 4),
    prefetch=st.integers(0, 3),
    drop_remainder=st.booleans(),
    decode_rows=st.none() | st.integers(1, 50),
    seed=st.integers(0, 2**32 - 1),
)
def test_batches_match_pyarrow(
    tmp_path_factory, fmt, kinds, file_rows, unit_rows, max_len, batch_size, threads, prefetch, drop_remainder,
    decode_rows, seed
):
    rng = np.random.default_rng(seed)
    kinds = {f"c{i}": kind for i, kind in enumerate(kinds)}
    tables = [random_table(kinds, n, rng, max_len=max_len, null_p=0.1) for n in file_rows]
    paths = write_files(tmp_path_factory.mktemp("d"), tables, fmt, unit_rows)
    ds = make(fmt, paths, kinds, batch_size, read_threads_num=threads, prefetch=prefetch, drop_remainder=drop_remainder)
    with decoding_in_batches_of(decode_rows):
        batches = batches_of(read_all(ds))

    total = sum(file_rows)
    sizes = [len(rows_of(b["c0"])) for b in batches]
    full, rest = divmod(total, batch_size)
    assert sizes == [batch_size] * full + ([rest] if rest and not drop_remainder else [])
    expected = expected_table(kinds, tables)
    assert delivered_rows(batches, kinds) == {name: rows[: sum(sizes)] for name, rows in expected.items()}
    assert list(batches[0]) == list(kinds) if batches else True


# -- exact resume ----------------------------------------------------------------------------------
RESUME_KINDS = {"ids": "int_list", "s": "str_list", "h": "hashed_str_list", "d": "fixed_list", "kv": "kv_list"}


@settings(max_examples=60)
@given(
    fmt=st.sampled_from(sorted(FORMATS)),
    file_rows=st.lists(st.integers(0, 90), min_size=1, max_size=5),
    unit_rows=st.integers(1, 40),
    batch_size=st.integers(1, 70),
    threads=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    prefetch=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    shuffle=st.booleans(),
    decode_rows=st.none() | st.integers(1, 30),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_resume_is_exact(
    tmp_path_factory, fmt, file_rows, unit_rows, batch_size, threads, prefetch, shuffle, decode_rows, seed, data
):
    with decoding_in_batches_of(decode_rows):
        check_resume_is_exact(tmp_path_factory, fmt, file_rows, unit_rows, batch_size, threads, prefetch, shuffle, seed, data)


def check_resume_is_exact(tmp_path_factory, fmt, file_rows, unit_rows, batch_size, threads, prefetch, shuffle, seed, data):
    rng = np.random.default_rng(seed)
    tables = [random_table(RESUME_KINDS, n, rng, max_len=6, null_p=0.1) for n in file_rows]
    paths = write_files(tmp_path_factory.mktemp("d"), tables, fmt, unit_rows)
    uninterrupted = batches_of(read_all(make(fmt, paths, RESUME_KINDS, batch_size, shuffle=shuffle)))
    if not uninterrupted:
        return
    k = data.draw(st.integers(0, len(uninterrupted) - 1), label="batches before the dump")

    def dataset(i):
        return make(
            fmt, paths, RESUME_KINDS, batch_size, read_threads_num=threads[i], prefetch=prefetch[i], shuffle=shuffle
        )

    first = dataset(0)
    head, error = collect(first, limit=k)
    assert error is None
    state = json.loads(json.dumps(first.dump_io_state()))  # what a checkpoint stores

    second = dataset(1)
    second.load_io_state(state)
    tail = batches_of(read_all(second))
    assert delivered_rows(batches_of(head) + tail, RESUME_KINDS) == delivered_rows(uninterrupted, RESUME_KINDS)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_state_walks_rows_and_epochs(tmp_path, fmt):
    tables = [random_table({"ids": "int_list"}, n, np.random.default_rng(n)) for n in (5, 0, 7)]
    paths = write_files(tmp_path, tables, fmt, unit_rows=2)
    ds = make(fmt, paths, {"ids": "int_list"}, 4)
    start = ds.dump_io_state()
    first_file = os.path.basename(paths[0])
    assert (start["epoch"], start["file_index"], start["row"], start["file"]) == (0, 0, 0, first_file)
    seen = []
    for _ in ds:
        state = ds.dump_io_state()
        seen.append((state["epoch"], state["file_index"], state["row"]))
    assert seen == [(0, 0, 4), (0, 2, 3), (0, 2, 7)]
    assert ds.dump_io_state()["epoch"] == 1 and ds.dump_io_state()["file_index"] == 0  # a full pass: next epoch
    again = batches_of(read_all(ds))
    assert [b["ids"].batch_size() for b in again] == [4, 4, 4]
    # a pass abandoned midway leaves the state at its last delivered batch; a new pass restarts
    head, _ = collect(ds, limit=1)
    assert ds.dump_io_state()["epoch"] == 2 and ds.dump_io_state()["row"] == 4
    assert delivered_rows(batches_of(read_all(ds)), ["ids"]) == delivered_rows(again, ["ids"])
    ds.reset()
    assert ds.dump_io_state() == start


def test_load_io_state_checks_the_shard(tmp_path):
    paths = write_files(tmp_path, [random_table({"ids": "int_list"}, 10, np.random.default_rng(0))] * 3, "orc")
    ds = make("orc", paths, {"ids": "int_list"}, 4)
    collect(ds, limit=1)
    state = ds.dump_io_state()

    fewer = make("orc", paths[:2], {"ids": "int_list"}, 4)
    fewer.load_io_state(state)
    with pytest.raises(ValueError, match="taken over 3 files, this shard has 2"):
        iter(fewer)
    other_worker = make("orc", paths, {"ids": "int_list"}, 4, worker_idx=1, worker_num=2)
    other_worker.load_io_state(state)
    with pytest.raises(ValueError, match="it is for worker 0 of 1, this is worker 1 of 2"):
        iter(other_worker)
    renamed = dict(state, file="elsewhere.orc")
    ds.load_io_state(renamed)
    with pytest.raises(ValueError, match="next file is 'elsewhere.orc'"):
        iter(ds)
    for bad in ({"epoch": 0}, dict(state, row=-1), dict(state, format="recis")):
        with pytest.raises(ValueError):
            ds.load_io_state(bad)
    ds.load_io_state(None)  # RecIS: an empty state is ignored
    ds.load_io_state({})


# -- sharding ----------------------------------------------------------------------------------------
def _id_tables(file_rows):
    start = 0
    tables = []
    for n in file_rows:
        tables.append(pa.table({"id": pa.array([[i] for i in range(start, start + n)])}))
        start += n
    return tables


@pytest.mark.parametrize("worker_num", [1, 2, 3, 4, 5])
def test_sharding_is_disjoint_and_complete(tmp_path, worker_num):
    file_rows = [3, 1, 4, 1, 5, 9, 2]
    # ids follow the writing order, unlike the files' sorted order: sharding must use the latter
    letters = "gceafbd"
    for letter, table in zip(letters, _id_tables(file_rows)):
        write(table, tmp_path / f"{letter}.orc", "orc")
    sorted_files = sorted(range(len(letters)), key=lambda i: letters[i])
    starts = np.concatenate([[0], np.cumsum(file_rows)])
    per_worker = []
    for worker_idx in range(worker_num):
        ds = OrcDataset(2, worker_idx=worker_idx, worker_num=worker_num, read_threads_num=3)
        ds.add_path(tmp_path)
        ds.varlen_feature("id")
        ids = [row[0] for b in batches_of(read_all(ds)) for row in rows_of(b["id"])]
        mine = [f for j, f in enumerate(sorted_files) if j % worker_num == worker_idx]
        assert ids == [r for f in mine for r in range(starts[f], starts[f + 1])]
        per_worker.append(ids)
    everything = sorted(i for ids in per_worker for i in ids)
    assert everything == list(range(sum(file_rows)))


def _loader_ids(ds, num_workers):
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)
    return [row[0] for batch in loader for row in rows_of(batch["id"])]


def test_dataloader_workers_sub_shard(tmp_path):
    file_rows = [3, 5, 2, 4, 6]
    write_files(tmp_path, _id_tables(file_rows), "orc")
    seen = []
    for worker_idx in range(2):
        ds = OrcDataset(2, worker_idx=worker_idx, worker_num=2, transform_fn=lambda x: x[0])
        ds.add_path(tmp_path)
        ds.varlen_feature("id")
        ids = _loader_ids(ds, num_workers=2)
        assert len(ids) == len(set(ids))
        seen += ids
    assert sorted(seen) == list(range(sum(file_rows)))


# -- paths -------------------------------------------------------------------------------------------
def test_add_path_forms(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    table = pa.table({"id": pa.array([[1]])})
    files = [
        write_files(tmp_path / "a", [table], "orc")[0],
        write_files(tmp_path / "a" / "deep", [table], "orc")[0],
    ]
    (tmp_path / "a" / "_SUCCESS").write_text("")
    (tmp_path / "a" / "notes.txt").write_text("x")
    ds = OrcDataset(1)
    ds.add_path(tmp_path / "a")  # a directory: every *.orc below it
    ds.add_path(files[0])  # a file already added: no duplicate
    ds.add_paths([str(tmp_path / "a" / "**" / "*.orc")])  # a glob
    assert ds._files == sorted(os.path.abspath(f) for f in files)


# -- delivery ----------------------------------------------------------------------------------------
@pytest.fixture
def small_files(tmp_path):
    rng = np.random.default_rng(3)
    kinds = {"ids": "int_list", "s": "str_list", "d": "fixed_list"}
    tables = [random_table(kinds, n, rng) for n in (10, 7)]
    return write_files(tmp_path, tables, "orc", unit_rows=4), kinds, tables


def test_transform_fn_forms(small_files):
    paths, kinds, _ = small_files
    plain = read_all(make("orc", paths, kinds, 5))
    assert all(isinstance(b, list) and len(b) == 1 and isinstance(b[0], dict) for b in plain)
    single = read_all(make("orc", paths, kinds, 5, transform_fn=lambda x: x[0]))
    assert all(isinstance(b, dict) for b in single)
    chained = read_all(make("orc", paths, kinds, 5, transform_fn=[lambda x: x[0], lambda b: b["ids"].batch_size()]))
    assert chained == [5, 5, 5, 2]
    with pytest.raises(TypeError, match="transform_fn"):
        OrcDataset(5, transform_fn=[1])


def test_ragged_format_false_gives_sparse_coo(small_files):
    paths, kinds, tables = small_files
    ragged = batches_of(read_all(make("orc", paths, kinds, 6)))
    sparse = batches_of(read_all(make("orc", paths, kinds, 6, ragged_format=False)))
    for r, s in zip(ragged, sparse):
        assert torch.equal(r["d"], s["d"])
        assert s["ids"].is_sparse and torch.equal(s["ids"].to_dense(), r["ids"].to_dense())
        assert s["s"].is_sparse and s["s"].dim() == 3 and torch.equal(s["s"].to_dense(), r["s"].to_dense())


def test_batches_are_writable_and_independent(small_files):
    """Batches of one stripe may share its Arrow buffers (zero copy): a consumer writing into
    one batch must still leave every other batch, and later reads, untouched."""
    paths, kinds, _ = small_files
    reference = batches_of(read_all(make("orc", paths, kinds, 3, dtype=torch.float64)))
    mine = batches_of(read_all(make("orc", paths, kinds, 3, dtype=torch.float64)))
    for batch in mine:
        batch["ids"].values().add_(1)
        batch["s"].values().add_(1)
        batch["d"].add_(1)
    for ref, got in zip(reference, mine):
        assert torch.equal(got["ids"].values(), ref["ids"].values() + 1)
        assert torch.equal(got["s"].values(), ref["s"].values() + 1)
        assert torch.equal(got["d"], ref["d"] + 1)


def test_reader_threads_stop_when_consumer_stops(small_files):
    paths, kinds, _ = small_files
    ds = make("orc", paths, kinds, 1, read_threads_num=4, prefetch=2)
    it = iter(ds)
    next(it)
    del it
    gc.collect()
    deadline = time.time() + 5
    while any(t.name == "fxrec-io" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "fxrec-io" for t in threading.enumerate())


@pytest.mark.skipif(
    torch.get_num_threads() < 2 or "parallel backend: OpenMP" not in torch.__config__.parallel_info(),
    reason="needs torch's OpenMP backend with several intra-op threads",
)
def test_reader_threads_run_torch_ops_on_one_core():
    # N reader threads each starting an OpenMP team of every core oversubscribes the machine;
    # only fxrec's own threads are limited, the caller's and later threads keep torch's count.
    before = torch.get_num_threads()
    jobs = [lambda put: put(torch.get_num_threads())] * 4
    assert list(ordered_parallel(jobs, num_threads=2, max_ahead=2)) == [1] * 4
    assert torch.get_num_threads() == before
    later = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [before]


def test_shuffle_is_per_epoch_and_deterministic(tmp_path):
    write_files(tmp_path, _id_tables([1] * 12), "orc")

    def epoch_orders(passes):
        ds = OrcDataset(1, shuffle=True)
        ds.add_path(tmp_path)
        ds.varlen_feature("id")
        return [[rows_of(b["id"])[0][0] for b in batches_of(read_all(ds))] for _ in range(passes)]

    orders = epoch_orders(2)
    assert orders == epoch_orders(2)
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(12)) and orders[0] != orders[1]


@pytest.mark.skipif(not HAS_CUDA, reason="pinned memory needs CUDA")
def test_pin_delivers_pinned_memory(small_files):
    paths, kinds, _ = small_files
    for batch in batches_of(read_all(make("orc", paths, kinds, 6, device="pin"))):
        assert batch["d"].is_pinned() and batch["ids"].values().is_pinned() and batch["ids"].offsets()[0].is_pinned()


@pytest.mark.gpu
def test_cuda_delivers_equal_batches_on_gpu(small_files):
    paths, kinds, _ = small_files
    cpu = batches_of(read_all(make("orc", paths, kinds, 6)))
    gpu = batches_of(read_all(make("orc", paths, kinds, 6, device="cuda", prefetch=2)))
    for c, g in zip(cpu, gpu):
        assert g["d"].is_cuda and torch.equal(g["d"].cpu(), c["d"])
        assert g["s"].values().is_cuda and rows_of(g["s"].cpu()) == rows_of(c["s"])


@pytest.mark.skipif(HAS_CUDA, reason="checks the error raised without CUDA")
def test_device_without_cuda_fails_clearly(small_files):
    paths, kinds, _ = small_files
    for device in ("cuda", "pin"):
        with pytest.raises(RuntimeError, match="needs CUDA"):
            iter(make("orc", paths, kinds, 6, device=device))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(worker_idx=2, worker_num=2), "worker_idx"),
        (dict(read_threads_num=0), "read_threads_num"),
        (dict(prefetch=-1), "prefetch"),
        (dict(dtype=torch.int32), "dtype"),
        (dict(device="gpu"), "device"),
    ],
)
def test_constructor_validation(kwargs, message):
    kwargs = {"batch_size": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        OrcDataset(**kwargs)


def test_parquet_dataset_has_the_same_interface():
    public = lambda cls: {n for n in dir(cls) if not n.startswith("_")}  # noqa: E731
    assert public(ParquetDataset) == public(OrcDataset)


# -- the seed tutorial ---------------------------------------------------------------------------------
# The tutorial's own get_dataset / IOArgs and its data generator, as files: examples/deepctr/.


def test_tutorial_get_dataset(tmp_path, monkeypatch):
    paths = generate_data(str(tmp_path), rows=97, file_num=3, max_seq_len=300)
    table = orc.read_table(paths[0])
    args = IOArgs(data_paths=str(tmp_path), batch_size=64, thread_num=2, prefetch=1, drop_remainder=True)
    dataset = get_dataset(args, device="cuda")  # the tutorial's device
    if HAS_CUDA:
        batches = read_all(dataset)
        assert batches[0]["sparse4"].values().is_cuda
    else:
        with pytest.raises(RuntimeError, match="needs CUDA"):
            iter(dataset)
        monkeypatch.setattr(dataset, "_device", "cpu")
        batches = read_all(dataset)
    assert len(batches) == 3 * 97 // 64
    first = batches[0]
    assert first["label"].shape == (64, 1) and first["dense1"].shape == (64, 8)
    assert first["dense1"].dtype == torch.float32
    assert isinstance(first["sparse4"], RaggedTensor) and first["sparse5"].values().dtype == torch.int8
    assert [b.decode() for b in rows_of(first["sparse5"].cpu())[0]] == table["sparse5"][0].as_py()
    assert rows_of(first["sparse1"].cpu()) == [[i] for i in range(64)]


def test_orc_reads_grow_pyarrow_io_pool_to_read_threads_num(small_files):
    """The ORC scan decodes on pyarrow's IO pool: fewer pool threads than readers would cap the
    files decoded at once below read_threads_num."""
    paths, kinds, _ = small_files
    before = pa.io_thread_count()
    try:
        pa.set_io_thread_count(1)
        assert batches_of(read_all(make("orc", paths, kinds, 4, read_threads_num=5)))
        assert pa.io_thread_count() == 5
        assert batches_of(read_all(make("orc", paths, kinds, 4, read_threads_num=2)))
        assert pa.io_thread_count() == 5  # never shrunk
    finally:
        pa.set_io_thread_count(before)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_readers_decode_later_files_while_the_first_is_consumed(tmp_path, monkeypatch, fmt):
    """Files decode in many small record batches; each reader must be able to decode its whole
    (small) file ahead of the consumer, or the readers run one file at a time."""
    tables = [pa.table({"ids": pa.array([[i, r] for r in range(30)])}) for i in range(3)]
    paths = write_files(tmp_path, tables, fmt, unit_rows=30)
    decoded = {}  # file index -> record batches decoded
    read_file = FORMATS[fmt]._read_file

    def counting_read_file(self, file_index, path, start_row, put):
        def counting_put(chunk):
            decoded[file_index] = decoded.get(file_index, 0) + 1
            put(chunk)

        read_file(self, file_index, path, start_row, counting_put)

    monkeypatch.setattr(FORMATS[fmt], "_read_file", counting_read_file)
    with decoding_in_batches_of(1):
        ds = make(fmt, paths, {"ids": "int_list"}, 1, read_threads_num=3, prefetch=0)
        it = iter(ds)
        first = next(it)
        deadline = time.time() + 10
        while min(decoded.get(1, 0), decoded.get(2, 0)) < 30 and time.time() < deadline:
            time.sleep(0.01)
        assert decoded.get(1) == 30 and decoded.get(2) == 30, decoded
        rest = list(it)
    assert [rows_of(b[0]["ids"]) for b in [first, *rest]] == [[[i, r]] for i in range(3) for r in range(30)]

"""fxrec.io read throughput vs raw pyarrow, on the seed tutorial's data.

    python bench/io.py               # the tutorial's data: 10 ORC files x 2047 rows
    python bench/io.py --scale 10    # 10x the files
    python bench/io.py --device cuda # batches delivered on the GPU (pinned + non_blocking copy)
    python bench/io.py --format parquet  # the same data as Parquet files, ParquetDataset

Data: the tutorial's generator (seeded): per row, dense columns, three 1-id columns, an id
sequence (sparse4) and a string sequence (sparse5) of 1..1999 items each; every file holds the
same table, as in the tutorial. Written once into --data-dir and reused (``--format parquet``:
the ORC files rewritten once as Parquet with pyarrow's defaults, into <data-dir>-parquet).

Measured, per read_threads_num in --threads, over --repeat rounds of one raw pass and one fxrec
pass over all files (files in the page cache):
- raw: ``pyarrow.orc.ORCFile(path).read(columns)`` (Parquet: ``ParquetFile(path).read(columns,
  use_threads=False)``) for every file on a thread pool of the same size, touching each column's
  buffers (decode only, no conversion, no batching);
- fxrec: ``OrcDataset`` (``ParquetDataset``) reading the same columns as the tutorial's
  get_dataset into batches of --batch-size, sparse5 either as trans_int8 bytes or hashed at read time (hash_type="farm").
Printed: median rows/s, median ids/s (sparse1-4 ids + sparse5 strings), the median over rounds
of fxrec / raw speed (each round's two passes ran back to back), and each pass's cores busy
(process CPU seconds / wall seconds): a pass that keeps fewer cores busy than it has threads is
waiting on something (locks, the GIL, the consumer), not computing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.deepctr.data import generate_data  # noqa: E402
from fxrec.io import OrcDataset, ParquetDataset  # noqa: E402

ROWS_PER_FILE = 2047
BASE_FILES = 10
COLUMNS = ["label", "dense1", "dense2", "sparse1", "sparse2", "sparse3", "sparse4", "sparse5"]
ID_COLUMNS = ["sparse1", "sparse2", "sparse3", "sparse4"]


def make_data(data_dir: str, num_files: int) -> list[str]:
    marker = os.path.join(data_dir, "DONE.json")
    spec = {"rows_per_file": ROWS_PER_FILE, "num_files": num_files, "seed": 42, "generator": "examples.deepctr.data"}
    paths = [os.path.join(data_dir, f"data_{i}.orc") for i in range(num_files)]
    if os.path.exists(marker) and json.load(open(marker)) == spec:
        return paths
    print(f"writing {num_files} files of {ROWS_PER_FILE} rows into {data_dir} ...", flush=True)
    paths = generate_data(data_dir, rows=ROWS_PER_FILE, file_num=num_files, seed=42)  # the tutorial's generator
    json.dump(spec, open(marker, "w"))
    return paths


def as_parquet(orc_paths: list[str], data_dir: str) -> list[str]:
    os.makedirs(data_dir, exist_ok=True)
    paths = []
    for orc_path in orc_paths:
        path = os.path.join(data_dir, os.path.basename(orc_path)[: -len(".orc")] + ".parquet")
        if not os.path.exists(path):
            pq.write_table(orc.ORCFile(orc_path).read(), path + ".partial")
            os.replace(path + ".partial", path)
        paths.append(path)
    return paths


RAW_READ = {
    "orc": lambda path: orc.ORCFile(path).read(columns=COLUMNS),
    "parquet": lambda path: pq.ParquetFile(path).read(columns=COLUMNS, use_threads=False),
}
DATASETS = {"orc": OrcDataset, "parquet": ParquetDataset}


def warm_page_cache(paths: list[str]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def raw_pass(paths: list[str], threads: int, fmt: str) -> tuple[int, int]:
    def read(path):
        table = RAW_READ[fmt](path)
        for column in table.columns:
            for chunk in column.chunks:
                chunk.buffers()  # conversion-free access to what was decoded
        ids = sum(len(chunk.values) for name in ID_COLUMNS + ["sparse5"] for chunk in table[name].chunks)
        return table.num_rows, ids

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        counts = list(pool.map(read, paths))
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def fxrec_pass(
    paths: list[str], threads: int, batch_size: int, sparse5: str, device: str, fmt: str
) -> tuple[int, int]:
    dataset = DATASETS[fmt](
        batch_size, read_threads_num=threads, prefetch=2, transform_fn=lambda x: x[0], device=device
    )
    dataset.add_paths(paths)
    dataset.fixedlen_feature("label", [0.0])
    dataset.fixedlen_feature("dense1", [0.0] * 8)
    dataset.fixedlen_feature("dense2", [0.0])
    for name in ID_COLUMNS:
        dataset.varlen_feature(name)
    if sparse5 == "trans_int8":
        dataset.varlen_feature("sparse5", trans_int8=True)
    else:
        dataset.varlen_feature("sparse5", hash_type=sparse5)
    rows = ids = 0
    for batch in dataset:
        rows += batch["label"].shape[0]
        ids += sum(batch[name].values().shape[0] for name in ID_COLUMNS)
        strings = batch["sparse5"].offsets()[-1] if sparse5 == "trans_int8" else batch["sparse5"].values()
        ids += strings.shape[0] - (1 if sparse5 == "trans_int8" else 0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return rows, ids


def timed_interleaved(repeat: int, runs: dict) -> dict:
    """Wall times, counts and median cores busy of each run over ``repeat`` rounds; within a round
    the runs go one after the other, first one then the other first, so machine drift (other
    tenants, allocator state left by the previous pass) hits each of them alike. Each run first
    goes once untimed: a process's first pass also pays for its allocators' first page faults
    and pyarrow's thread pools (on the 2-core VM it ran ~15% slower than the next ones)."""
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    cores = {name: [] for name in runs}
    counts = {}
    names = list(runs)
    for round_ in range(repeat):
        for name in names if round_ % 2 == 0 else names[::-1]:  # alternate who goes first
            fn = runs[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            counts[name] = fn()
            times[name].append(time.perf_counter() - start)
            cores[name].append((time.process_time() - start_cpu) / times[name][-1])
    return {name: (times[name], counts[name], statistics.median(cores[name])) for name in runs}


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()} {platform.processor() or ''}, {cores} usable cores (os.cpu_count={os.cpu_count()}), "
        f"{gpu}; python {platform.python_version()}, torch {torch.__version__}, pyarrow {pa.__version__}, "
        f"numpy {np.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=1, help="files = 10 x scale")
    parser.add_argument("--threads", default="1,2,4,8")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "pin", "cuda"])
    parser.add_argument("--sparse5", default="trans_int8,farm", help="comma list of trans_int8 / farm / murmur")
    parser.add_argument("--data-dir", default=None, help="default: /tmp/fxrec_bench_io/scale<N>")
    parser.add_argument("--format", default="orc", choices=sorted(DATASETS))
    args = parser.parse_args()

    data_dir = args.data_dir or f"/tmp/fxrec_bench_io/scale{args.scale}"
    paths = make_data(data_dir, BASE_FILES * args.scale)
    if args.format == "parquet":
        paths = as_parquet(paths, data_dir.rstrip("/") + "-parquet")
    warm_page_cache(paths)
    size_mb = sum(os.path.getsize(p) for p in paths) / 2**20
    print(f"machine: {machine()}")
    print(f"data: {len(paths)} {args.format} files x {ROWS_PER_FILE} rows, {size_mb:.0f} MiB; "
          f"batch_size {args.batch_size}; device {args.device}; medians of {args.repeat} rounds")
    print()
    header = (
        f"{'sparse5':<10} {'threads':>7} {'raw rows/s':>11} {'fxrec rows/s':>12} {'fxrec Mids/s':>12} "
        f"{'fxrec/raw':>9} {'raw cores':>9} {'fxrec cores':>11}"
    )
    print(header)
    print("-" * len(header))
    for sparse5 in args.sparse5.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            timed = timed_interleaved(
                args.repeat,
                {
                    "raw": lambda: raw_pass(paths, threads, args.format),
                    "fxrec": lambda: fxrec_pass(paths, threads, args.batch_size, sparse5, args.device, args.format),
                },
            )
            (raw_t, (raw_rows, raw_ids), raw_cores), (fx_t, (fx_rows, fx_ids), fx_cores) = timed["raw"], timed["fxrec"]
            raw_s, fx_s = statistics.median(raw_t), statistics.median(fx_t)
            ratio = statistics.median(r / f for r, f in zip(raw_t, fx_t))  # per round: same conditions
            assert (fx_rows, fx_ids) == (raw_rows, raw_ids), ((fx_rows, fx_ids), (raw_rows, raw_ids))
            print(
                f"{sparse5:<10} {threads:>7} {raw_rows / raw_s:>11,.0f} {fx_rows / fx_s:>12,.0f} "
                f"{fx_ids / fx_s / 1e6:>12.1f} {ratio:>9.2f} {raw_cores:>9.1f} {fx_cores:>11.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""The tutorial's fake data (``generate_data``): ORC files of random CTR rows.

The tutorial builds ONE table of ``bs = 2047`` rows (a random 0/1 ``label``, ``dense1 [8]``,
``dense2 [1]``, ``sparse1``/``sparse2``/``sparse3`` = the row number, ``sparse4`` a list of up to
1999 random ints, ``sparse5`` a list of up to 1999 strings drawn from 1000 random 10-character
strings) and writes it ``file_num = 10`` times to ``./fake_data/data_<i>.orc``. The labels are
noise, but every file holds the same rows and ``sparse1..3`` name the row: the model can learn
them by heart, which is why the loss falls.

Here the sizes are parameters (``rows``, ``file_num``, ``max_seq_len``: sequences are
``randint(1, max_seq_len)`` long, the tutorial's 2000 by default) and the random generator is
seeded, so a run is reproducible. Run ``python -m examples.deepctr.data [--rows N] [--files N]
[--max-seq-len N] [--data-dir D]``.
"""

from __future__ import annotations

import argparse
import os
import string

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc

__all__ = ["generate_data", "has_data"]


def generate_data(file_dir: str = "./fake_data/", rows: int = 2047, file_num: int = 10, max_seq_len: int = 2000,
                  seed: int = 0) -> list[str]:
    """Write ``file_num`` ORC files of the tutorial's ``rows``-row table under ``file_dir``;
    returns their paths (module docstring)."""
    if rows < 1 or file_num < 1 or max_seq_len < 2:
        raise ValueError(f"generate_data: need rows >= 1, file_num >= 1, max_seq_len >= 2; got {rows}, {file_num}, "
                         f"{max_seq_len}")
    rng = np.random.default_rng(seed)
    bs = rows
    dense1 = rng.random((bs, 8))
    dense2 = rng.random((bs, 1))
    label = np.floor(rng.random((bs, 1)) + 0.5).astype(np.float32)
    sparse = np.arange(bs, dtype=np.int64).reshape(bs, 1)

    # long int sequences
    lengths = rng.integers(1, max_seq_len, size=bs)
    flat = rng.integers(0, 1000000, size=int(lengths.sum()), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    long_int_seq = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))

    # long string sequences drawn from 1000 random 10-character strings
    characters = np.array(list(string.ascii_letters + string.digits))
    strs = pa.array(["".join(chars) for chars in rng.choice(characters, size=(1000, 10))], type=pa.string())
    lengths = rng.integers(1, max_seq_len, size=bs)
    picks = strs.take(pa.array(rng.integers(0, len(strs), size=int(lengths.sum()))))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    long_str_seq = pa.ListArray.from_arrays(pa.array(offsets), picks)

    table = pa.table({
        "label": label.tolist(),
        "dense1": dense1.tolist(),
        "dense2": dense2.tolist(),
        "sparse1": sparse.tolist(),
        "sparse2": sparse.tolist(),
        "sparse3": sparse.tolist(),
        "sparse4": long_int_seq,
        "sparse5": long_str_seq,
    })
    os.makedirs(file_dir, exist_ok=True)
    paths = []
    for i in range(file_num):
        path = os.path.join(file_dir, "data_{}.orc".format(i))
        # Never a half-written .orc: written under a name of this process's own (torchrun ranks all
        # generate the same files at once), then renamed into place atomically.
        tmp = f"{path}.tmp-{os.getpid()}"
        orc.write_table(table, tmp)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def has_data(file_dir: str) -> bool:
    """Whether ``file_dir`` holds at least one ``.orc`` file."""
    return os.path.isdir(file_dir) and any(
        name.endswith(".orc") for _, _, names in os.walk(file_dir) for name in names
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="./fake_data/")
    parser.add_argument("--rows", type=int, default=2047)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--max-seq-len", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = generate_data(args.data_dir, args.rows, args.files, args.max_seq_len, args.seed)
    print(f"wrote {len(paths)} files of {args.rows} rows under {args.data_dir}")


if __name__ == "__main__":
    main()

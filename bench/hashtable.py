"""Dynamic-table index benchmark: ``fxrec::table_find`` and ``fxrec::table_find_or_insert``.

A table of ``2**capacity_log2`` slots (default 2**27 = 128M: keys int64 + state int32, 1.5 GiB;
64M keys at load 0.5) is filled with distinct pseudo-random int64 ids (the splitmix64 stream: ``mix64(i * GAMMA + salt)``,
distinct because it is a bijection of ``i``), in batches of ``2**batch_log2`` (default 1M), up to
each load factor in turn (0.25, 0.5, 0.75). At each load, for one batch of ids:

  find (hit)             every id present
  find (miss)            every id absent
  find_or_insert (new)   fresh ids (absent) inserted into the table at that load; the table is
                         restored (``copy_`` of keys/state) before each repeat, outside the timed
                         region (CUDA events around the op only)
  find_or_insert (hit)   every id present: the training steady state
  find + gather dim D    ``rows = find(ids); fxrec::gather_rows(emb, rows)`` from ``emb float32
                         [capacity, D]`` (what HierarchicalKV's find returns: the values); dims
                         whose table does not fit the free memory are skipped

Printed: the card, torch/triton versions and device-to-device copy bandwidth, then one table:
median ms over the repeats, billions of keys/s, the bytes per key the model counts (below) and the
bandwidth that implies, next to HierarchicalKV's published A100 figures (load 0.5, dim 8: find
2.47, insert 1.09 B keys/s) and the H100 targets (find >= 4, find_or_insert >= 2 B keys/s).

Bytes counted (METHOD: predicted from the table before timing; random accesses cost a 32-byte
sector each). For every id the probe length ``p`` (slots read, home slot included) is taken from
the table itself: hits and inserts from the slot the op returns, misses from the first empty slot
after the id's home slot. Linear probing walks consecutive slots, so a probe run of ``p`` slots
touches the 32 B sectors it spans: ``state`` (4 B a slot, 8 a sector) and ``keys`` (8 B a slot,
4 a sector; a key is read only where the state says FILLED, so a miss/insert reads keys on its
first ``p - 1`` slots). Per id:
  find             8 (id) + 8 (row) + 32 x (state sectors + key sectors)
  find_or_insert   the same + 1 (inserted flag); a new id also writes back its state sector and
                   its key sector (+ 64)
  find + gather    find + the row (dim x 4 B, rounded up to 32 B sectors, random) + its copy out
                   (dim x 4 B); the rows tensor between the two ops (2 x 8 B) is not counted
Not counted: L2 hits (an H100's 50 MB L2 holds ~3% of the 1.5 GiB index: few), atomics' latency.
The Triton kernels run one program per 256 ids and loop until the program's LONGEST probe ends,
so the "block max" column (mean over programs of their longest probe) is the latency term.

    python -m bench.hashtable [--capacity-log2 27] [--batch-log2 20] [--loads 0.25 0.5 0.75]
                              [--dims 8 16 64] [--reps 10]
    python -m bench.hashtable --smoke     # CPU (the ops' torch kernels), tiny table, seconds
"""

from __future__ import annotations

import argparse

import torch

import fxrec  # noqa: F401  (registers torch.ops.fxrec)
from fxrec.ops.table import EMPTY, new_index
from fxrec.ops.triton.table import _BLOCK as KERNEL_BLOCK  # ids per program of the Triton kernels
from fxrec.ops.uint64 import GAMMA, as_int64, mix64
from bench.timing import copy_bandwidth, machine, median_ms

ops = torch.ops.fxrec

HKV_A100 = {"find": 2.47, "find_or_insert": 1.09}  # B keys/s, load 0.5, dim 8 (HierarchicalKV README)
TARGET_H100 = {"find": 4.0, "find_or_insert": 2.0}  # B keys/s (the issue)
SALT = as_int64(0x5EED_F00D_CAFE_B0BA)
MISS_BASE = 1 << 40  # stream indices never inserted


# -- the table -----------------------------------------------------------------------------------


def stream_ids(i: torch.Tensor) -> torch.Tensor:
    """The ids with stream indices ``i``: distinct pseudo-random int64 (a bijection of ``i``)."""
    return mix64(i * as_int64(GAMMA) + SALT)


def fill(keys: torch.Tensor, state: torch.Tensor, start: int, stop: int, batch: int) -> None:
    """Insert the ids of stream indices ``start:stop``, ``batch`` at a time."""
    for lo in range(start, stop, batch):
        ids = stream_ids(torch.arange(lo, min(lo + batch, stop), device=keys.device))
        ops.table_find_or_insert(keys, state, ids, None, None)


def first_empty(state: torch.Tensor, home: torch.Tensor) -> torch.Tensor:
    """The first empty slot at or after ``home`` (unwrapped: may be ``>= capacity``)."""
    empty = (state == EMPTY).nonzero().squeeze(1)
    j = torch.searchsorted(empty, home)
    slot = empty[j.clamp(max=empty.numel() - 1)]
    return torch.where(j == empty.numel(), empty[0] + state.numel(), slot)


def probe_model(ids: torch.Tensor, end: torch.Tensor, capacity: int, kind: str) -> dict:
    """Probe lengths and counted bytes per id (module docstring). ``end``: each id's last probed
    slot (its row for hits and inserts, its first empty slot for misses); ``kind``: "hit", "miss"
    or "new"."""
    home = mix64(ids) & (capacity - 1)
    last = home + ((end - home) & (capacity - 1))  # unwrapped
    probes = last - home + 1
    state_sectors = last // 8 - home // 8 + 1
    key_last = last if kind == "hit" else last - 1  # keys are read only on FILLED slots
    key_sectors = torch.where(key_last >= home, key_last // 4 - home // 4 + 1, 0)
    find_bytes = 16 + 32 * (state_sectors + key_sectors).double().mean().item()
    n_blocks = probes.numel() // KERNEL_BLOCK
    block_max = probes[: n_blocks * KERNEL_BLOCK].view(n_blocks, KERNEL_BLOCK).amax(1) if n_blocks else probes
    return {
        "probes": probes.double().mean().item(),
        "block_max": block_max.double().mean().item(),
        "find": find_bytes,
        "insert": find_bytes + 1 + (64 if kind == "new" else 0),
    }


# -- the benchmark -------------------------------------------------------------------------------


def print_row(op: str, load: float, dim, keys: int, model: dict, nbytes: float, ms: float | str, copy_gbs: float,
              family: str) -> None:
    """One table row; ``ms`` may be a reason instead ("OOM", "skipped: ...")."""
    has_ref = op in ("find (hit)", "find_or_insert (new)") or (op.startswith("find + gather") and dim == 8)
    cells = [op, f"{load:.2f}", str(dim), str(keys), f"{model['probes']:.2f} / {model['block_max']:.1f}",
             f"{nbytes:.0f}"]
    if isinstance(ms, str):
        cells += [ms, "-", "-", "-"]
    else:
        rate = keys / ms / 1e6  # B keys/s
        cells += [f"{ms:.3f}", f"{rate:.3g}", f"{rate * nbytes:.0f}", f"{100 * rate * nbytes / copy_gbs:.0f}%"]
    cells += [f"{HKV_A100[family]:.2f}" if has_ref else "-", f">= {TARGET_H100[family]:g}"]
    print("| " + " | ".join(cells) + " |")


def bench_load(keys, state, n_stored: int, batch: int, load: float, dims: list[int], reps: int, copy_gbs: float,
               device: str) -> None:
    """All rows at one load (the table holds stream indices ``0:n_stored``)."""
    capacity = keys.numel()
    gen = torch.Generator(device=device).manual_seed(int(load * 1000))
    hit_ids = stream_ids(torch.randint(0, n_stored, (batch,), device=device, generator=gen))
    miss_ids = stream_ids(torch.arange(MISS_BASE, MISS_BASE + batch, device=device))
    new_ids = stream_ids(torch.arange(n_stored, n_stored + batch, device=device))

    # predict: probe lengths and bytes from the table (and checks that hits hit, misses miss)
    hit_rows = ops.table_find(keys, state, hit_ids)
    assert bool((hit_rows >= 0).all()), "hit ids not found"
    assert bool((ops.table_find(keys, state, miss_ids) < 0).all()), "miss ids found"
    hit = probe_model(hit_ids, hit_rows, capacity, "hit")
    miss = probe_model(miss_ids, first_empty(state, mix64(miss_ids) & (capacity - 1)), capacity, "miss")
    saved_keys, saved_state = keys.clone(), state.clone()

    def restore():
        keys.copy_(saved_keys)
        state.copy_(saved_state)

    new_rows, inserted = ops.table_find_or_insert(keys, state, new_ids, None, None)
    assert bool(inserted.all()), "fresh ids not all inserted"
    new = probe_model(new_ids, new_rows, capacity, "new")
    restore()

    def row(op, dim, model, nbytes, family, fn, setup=None):
        try:
            ms = median_ms(fn, device, reps=reps, setup=setup)
        except RuntimeError as err:  # OOM (a RuntimeError too) or a failing op: the table goes on
            oom = isinstance(err, torch.OutOfMemoryError)
            if oom:
                torch.cuda.empty_cache()
            ms = "OOM" if oom else f"error: {str(err).splitlines()[0][:60]}"
        print_row(op, load, dim, batch, model, nbytes, ms, copy_gbs, family)

    row("find (hit)", "-", hit, hit["find"], "find", lambda: ops.table_find(keys, state, hit_ids))
    row("find (miss)", "-", miss, miss["find"], "find", lambda: ops.table_find(keys, state, miss_ids))
    row("find_or_insert (new)", "-", new, new["insert"], "find_or_insert",
        lambda: ops.table_find_or_insert(keys, state, new_ids, None, None), setup=restore)
    row("find_or_insert (hit)", "-", hit, hit["insert"], "find_or_insert",
        lambda: ops.table_find_or_insert(keys, state, hit_ids, None, None))
    for dim in dims:
        gather_bytes = hit["find"] + 32 * -(-dim * 4 // 32) + dim * 4
        print_row("find + gather (hit)", load, dim, batch, hit, gather_bytes,
                  time_find_gather(keys, state, hit_ids, dim, reps, device), copy_gbs, "find")


def time_find_gather(keys, state, ids, dim: int, reps: int, device: str) -> float | str:
    """ms of ``gather_rows(emb, find(ids))`` (what ``HashTable.gather`` runs) with ``emb float32
    [capacity, dim]``, or why not."""
    need = keys.numel() * dim * 4
    if torch.device(device).type == "cuda" and need > torch.cuda.mem_get_info()[0] - (2 << 30):
        return f"skipped: emb needs {need / 2**30:.0f} GiB"
    try:
        emb = torch.empty((keys.numel(), dim), dtype=torch.float32, device=device)  # values don't matter
        return median_ms(lambda: ops.gather_rows(emb, ops.table_find(keys, state, ids)), device, reps=reps)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"


def run(capacity_log2: int, batch_log2: int, loads: list[float], dims: list[int], reps: int, device: str,
        copy_bytes: int) -> None:
    capacity, batch = 1 << capacity_log2, 1 << batch_log2
    print(f"## fxrec table index ops: {machine(device)}")
    copy_gbs = copy_bandwidth(device, copy_bytes)
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write, {copy_bytes >> 20} MiB)")
    print(f"capacity 2**{capacity_log2} = {capacity:,} slots, batches of {batch:,} ids, {reps} repeats (median); "
          f"HKV A100 column: published find / insert B keys/s at load 0.5, dim 8\n")
    print("| op | load | dim | keys | probes mean / block max | B/key (model) | ms | B keys/s | GB/s (implied) | "
          "% copy | HKV A100 | H100 target |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    keys, state = new_index(capacity, device)
    n_stored = 0
    for load in sorted(loads):
        target = round(load * capacity)
        fill(keys, state, n_stored, target, batch)
        n_stored = max(n_stored, target)
        filled = int((state != EMPTY).sum())
        assert filled == n_stored, f"table holds {filled} ids, expected {n_stored}"
        bench_load(keys, state, n_stored, batch, filled / capacity, dims, reps, copy_gbs, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capacity-log2", type=int, default=27)
    parser.add_argument("--batch-log2", type=int, default=20)
    parser.add_argument("--loads", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--dims", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="CPU, capacity 2**16, batches of 2**12, 3 repeats")
    args = parser.parse_args()
    if args.smoke:
        run(16, 12, args.loads, args.dims, 3, "cpu", 1 << 24)
    elif torch.cuda.is_available():
        run(args.capacity_log2, args.batch_log2, args.loads, args.dims, args.reps, "cuda", 1 << 30)
    else:
        print("no CUDA device: run with --smoke for the CPU check")


if __name__ == "__main__":
    main()

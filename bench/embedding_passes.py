"""The tutorial's embedding stage under fxrec's embedding passes: no passes vs ``lookup_merge`` vs
``lookup_merge`` + ``table_coalesce`` vs those + ``combine_fusion`` (the ``passes=True`` default),
in the same run; then the combines of one coalesced storage alone: F ``table_combine`` vs one
``table_combine_multi``, forward + backward.

``examples/deepctr/embeddings.py``'s 7 features over 6 tables (dims 8 and 16, tile_len 1000),
batches shaped like the tutorial's data: dense2 one id per row in [0, 5); sparse1-3 1..3 ids per
row; sparse4 1..1999 ids (a sequence, tiled to 1000); sparse5 1..39; the cross 1..9; ids uniform
in [0, vocab). Per mode: the forward (7 lookups -> 6 -> 1; 7 combines -> 1) and a whole sparse
training step (forward, sum of the outputs, backward, SparseAdamWTF step), median ms over batches
that cycle (the tables are warmed with every batch first: lookups find their ids, nothing grows),
each mode's ms / the no-pass ms, and the ops one training step dispatches (``ops/step``: torch and
fxrec ops as ``TorchDispatchMode`` sees them, each one host dispatch, on CUDA mostly a launch).

Combine table (``combine_fusion``'s op alone): the coalesced tutorial's one storage (dim 16:
dense2, sparse1, sparse2, sparse3 sum (the dim-8 tables' rows padded to 16), sparse4 and sparse5
tile, the cross mean)
and for F = 2 / 4 / 8 one-id-per-row sum features of one storage (where dispatch dominates), the
features' combines through ONE anchor (HashTable's expanded zero ``[U, dim]``) and the backward
into it: F ``table_combine`` (autograd: F ``[U, dim]`` gradients, F zero fills, F - 1 adds) vs one
``table_combine_multi`` (one ``[U, dim]`` gradient), median ms, the multi's ms / the F ops' ms, and
the ops dispatched (as above), and on CUDA the kernels + memsets of one forward + backward
(``bench.feature_ops.count_launches``).

    python -m bench.embedding_passes [--batch 1024] [--vocab 1000000] [--reps 20]
    python -m bench.embedding_passes --smoke    # CPU, tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.timing import machine, median_ms
from examples.deepctr.embeddings import get_embedding_conf
from fxrec.nn import EmbeddingEngine
from fxrec.nn.modules.hashtable import filter_out_sparse_param
from fxrec.optim import SparseAdamWTF
from fxrec.passes import lookup_merge, op_counts, table_coalesce
from fxrec.ragged import RaggedTensor

# feature -> (min, max) ids per row
_LENGTHS = {"sparse1": (1, 3), "sparse2": (1, 3), "sparse3": (1, 3), "sparse4": (1, 1999), "sparse5": (1, 39),
            "sparse1_x_sparse2": (1, 9)}
MODES = {"no passes": False, "lookup_merge": [lookup_merge], "+ table_coalesce": [lookup_merge, table_coalesce],
         "+ combine_fusion (passes=True)": True}
# the coalesced tutorial's storages: (dim, [(feature, combiner)])
STORAGES = {16: [("dense2", "sum"), ("sparse1", "sum"), ("sparse2", "sum"), ("sparse3", "sum"), ("sparse4", "tile"),
                 ("sparse5", "tile"), ("sparse1_x_sparse2", "mean")]}


class _OpCounter(TorchDispatchMode):
    """Counts the ops dispatched below autograd (what runs on the device, one host dispatch each)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.name()] += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn) -> int:
    with _OpCounter() as counter:
        fn()
    return sum(counter.counts.values())


def make_batch(batch: int, vocab: int, max_len: int, gen: torch.Generator, device: str) -> dict:
    out = {"dense2": torch.randint(0, 5, (batch, 1), generator=gen)}
    for name, (low, high) in _LENGTHS.items():
        lengths = torch.randint(low, min(high, max_len) + 1, (batch,), generator=gen)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        out[name] = RaggedTensor(torch.randint(0, vocab, (int(offsets[-1]),), generator=gen), offsets)
    return {k: v.to(device) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes")
    args = parser.parse_args()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    batch, vocab, reps, tile_len, max_len = args.batch, args.vocab, args.reps, 1000, 1999
    if args.smoke:
        batch, vocab, reps, tile_len, max_len = 32, 1000, 3, 10, 20
    gen = torch.Generator().manual_seed(0)
    batches = [make_batch(batch, vocab, max_len, gen, device) for _ in range(4)]
    print(f"{machine(device)}; batch {batch}, vocab {vocab}, tile_len {tile_len}")
    print(f"{'mode':<32} {'lookups':>7} {'combines':>8} {'fwd ms':>8} {'x':>5} {'step ms':>8} {'x':>5} "
          f"{'ops/step':>8}")
    base = None
    for mode, passes in MODES.items():
        engine = EmbeddingEngine(get_embedding_conf(torch.device(device), tile_len), passes=passes)
        opt = SparseAdamWTF(filter_out_sparse_param(engine), lr=1e-3)
        for b in batches:  # every id inserted: timed lookups only find
            engine(b)
        cycle = iter(range(10**9))

        def forward():
            with torch.no_grad():
                engine(batches[next(cycle) % len(batches)])

        def step():
            out = engine(batches[next(cycle) % len(batches)])
            sum(v.sum() for v in out.values()).backward()
            opt.step()
            opt.zero_grad()

        fwd, stp = median_ms(forward, device, reps), median_ms(step, device, reps)
        base = base or (fwd, stp)
        counts = op_counts(engine.graph_module)
        combines = counts["table_combine"] + counts["table_combine_multi"]
        print(f"{mode:<32} {counts['table_lookup']:>7} {combines:>8} {fwd:>8.3f} {fwd / base[0]:>5.2f} {stp:>8.3f} "
              f"{stp / base[1]:>5.2f} {dispatched_ops(step):>8}")
    print()
    combine_table(batches[0], tile_len, vocab, device, reps)


def storage_features(batch: dict, features: list[tuple[str, str]], tile_len: int) -> tuple[int, list[tuple]]:
    """``(U, [(index, offsets, weight, combiner, tile_len)])``: the features' ids deduplicated
    together (one lookup), each feature's inverse into them, as ``table_combine`` takes them."""
    values, offsets = [], []
    for name, _ in features:
        v = batch[name]
        if isinstance(v, RaggedTensor):
            values.append(v.values()), offsets.append(v.offsets()[0])
        else:  # dense2 [B, 1]
            values.append(v.reshape(-1))
            offsets.append(torch.arange(v.shape[0] + 1, device=v.device) * v.shape[1])
    uniq, inverse = torch.unique(torch.cat(values), return_inverse=True)
    inverses = torch.split(inverse, [v.shape[0] for v in values])
    return uniq.shape[0], [(inv, off, None, combiner, tile_len if combiner == "tile" else 1)
                           for inv, off, (_, combiner) in zip(inverses, offsets, features)]


def combine_cases(batch: dict, tile_len: int, vocab: int, device: str) -> list[tuple[str, int, int, list[tuple]]]:
    """``(name, U, dim, features)``: the coalesced tutorial's storage, then F one-id sum features."""
    cases = [(f"tutorial dim {dim} ({len(fs)} features)", dim, *storage_features(batch, fs, tile_len))
             for dim, fs in STORAGES.items()]
    gen = torch.Generator().manual_seed(1)
    rows = batch["label"].shape[0] if "label" in batch else batch["dense2"].shape[0]
    for n in (2, 4, 8):
        ids = {f"f{i}": RaggedTensor(torch.randint(0, vocab, (rows,), generator=gen).to(device),
                                     torch.arange(rows + 1, device=device)) for i in range(n)}
        cases.append((f"{n} sum features, 1 id/row", 16, *storage_features(ids, [(f, "sum") for f in ids], 1)))
    return [(name, u, dim, fs) for name, dim, u, fs in cases]


def combine_table(batch: dict, tile_len: int, vocab: int, device: str, reps: int) -> None:
    ops = torch.ops.fxrec
    cuda = torch.device(device).type == "cuda"
    print(f"{'F combines, one anchor: fwd + bwd':<34} {'U':>7} {'F ops ms':>9} {'multi ms':>9} {'x':>5} "
          f"{'F ops ops':>9} {'multi ops':>9}" + (f" {'F ops kernels':>13} {'multi kernels':>13}" if cuda else ""))
    for name, n_unique, dim, features in combine_cases(batch, tile_len, vocab, device):
        table = torch.randn(n_unique, dim, device=device)
        rows = torch.arange(n_unique, device=device)
        anchor = torch.zeros((), device=device).expand(n_unique, dim).requires_grad_()
        width = [(t if c == "tile" else 1) * dim for _, _, _, c, t in features]
        grads = [torch.ones(off.shape[0] - 1, w, device=device) for (_, off, _, _, _), w in zip(features, width)]
        lists = [list(x) for x in zip(*features)]

        def per_feature():
            torch.autograd.backward([ops.table_combine(table, rows, anchor, *f) for f in features], grads)
            anchor.grad = None

        def multi():
            torch.autograd.backward(ops.table_combine_multi(table, rows, anchor, *lists), grads)
            anchor.grad = None

        single_ms, multi_ms = median_ms(per_feature, device, reps), median_ms(multi, device, reps)
        line = (f"{name:<34} {n_unique:>7} {single_ms:>9.3f} {multi_ms:>9.3f} {multi_ms / single_ms:>5.2f} "
                f"{dispatched_ops(per_feature):>9} {dispatched_ops(multi):>9}")
        if cuda:
            from bench.feature_ops import count_launches

            (k1, c1, _), (k2, c2, _) = count_launches(per_feature), count_launches(multi)
            line += f" {f'{k1} + {c1}':>13} {f'{k2} + {c2}':>13}"
        print(line)


if __name__ == "__main__":
    main()

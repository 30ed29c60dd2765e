"""The tutorial's embedding stage under fxrec's embedding passes: no passes vs ``lookup_merge`` vs
``lookup_merge`` + ``table_coalesce`` (the ``passes=True`` default), in the same run.

``examples/deepctr/embeddings.py``'s 7 features over 6 tables (dims 8 and 16, tile_len 1000),
batches shaped like the tutorial's data: dense2 one id per row in [0, 5); sparse1-3 1..3 ids per
row; sparse4 1..1999 ids (a sequence, tiled to 1000); sparse5 1..39; the cross 1..9; ids uniform
in [0, vocab). Per mode: the forward (7 lookups -> 6 -> 2; 7 combines) and a whole sparse training
step (forward, sum of the outputs, backward, SparseAdamWTF step), median ms over batches that
cycle (the tables are warmed with every batch first: lookups find their ids, nothing grows), and
each mode's ms / the no-pass ms.

    python -m bench.embedding_passes [--batch 1024] [--vocab 1000000] [--reps 20]
    python -m bench.embedding_passes --smoke    # CPU, tiny sizes, seconds
"""

from __future__ import annotations

import argparse

import torch

from bench.timing import machine, median_ms
from examples.deepctr.embeddings import get_embedding_conf
from fxrec.nn import EmbeddingEngine
from fxrec.nn.modules.hashtable import filter_out_sparse_param
from fxrec.optim import SparseAdamWTF
from fxrec.passes import lookup_merge, op_counts
from fxrec.ragged import RaggedTensor

# feature -> (min, max) ids per row
_LENGTHS = {"sparse1": (1, 3), "sparse2": (1, 3), "sparse3": (1, 3), "sparse4": (1, 1999), "sparse5": (1, 39),
            "sparse1_x_sparse2": (1, 9)}
MODES = {"no passes": False, "lookup_merge": [lookup_merge], "lookup_merge + table_coalesce": True}


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
    print(f"{'mode':<32} {'lookups':>7} {'fwd ms':>8} {'x':>5} {'step ms':>8} {'x':>5}")
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
        lookups = op_counts(engine.graph_module)["table_lookup"]
        print(f"{mode:<32} {lookups:>7} {fwd:>8.3f} {fwd / base[0]:>5.2f} {stp:>8.3f} {stp / base[1]:>5.2f}")


if __name__ == "__main__":
    main()

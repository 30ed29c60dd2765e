"""Sharded training against one process (tests/test_sharded.py and its worker processes,
tests/sharded_worker.py).

Every rank trains the same small model (one table read by two features, a linear layer, BCE loss)
on its own batches; dense gradients are averaged over ranks by hand (what DDP does). The
reference is ONE process training the same model on every rank's batch of each step, its loss the
mean of the ranks' losses (the loss DDP's averaged gradients belong to). Batches hold the edge
cases: duplicates within and across rows and ranks, negative and extreme ids, multiples of 65536,
empty rows, a rank with B=1 and a rank whose batch has no ids at all.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fxrec.distributed.env import is_distributed
from fxrec.nn.hashtable_hook import AdmitHook, FilterHook
from fxrec.nn.initializers import DEFAULT_BLOCK_SIZE, TruncNormalInitializer
from fxrec.nn.modules.embedding import EmbeddingEngine, EmbeddingOption
from fxrec.nn.modules.hashtable import filter_out_sparse_param
from fxrec.optim import SparseAdamWTF, SparseSGD
from fxrec.ragged import RaggedTensor

DIM = 3
TILE = 2
STEPS = 5
# (combiner, grad_reduce_by, sparse optimizer): every combiner with both reductions, both optimizers
CONFIGS = [
    ("sum", "worker", "adamwtf"),
    ("sum", "id", "sgd"),
    ("mean", "worker", "sgd"),
    ("mean", "id", "adamwtf"),
    ("tile", "worker", "sgd"),
    ("tile", "id", "adamwtf"),
]
_EXTREMES = np.array([0, -1, 7 << 16, 13 << 16, -(5 << 16), 2**63 - 1, -(2**63)], dtype=np.int64)


class ShardModel(nn.Module):
    """Features "a" and "b" share table "t"; "c" reads table "r" (ReadOnly when ``read_only``; of
    ``r_dim`` columns: narrower, it pads into "t"'s storage when coalesced)."""

    def __init__(self, combiner: str, grad_reduce_by: str, filter_hook: FilterHook | None = None,
                 read_only: bool = False, device: str = "cpu", passes: bool | tuple = False, b_trainable: bool = True,
                 block_size: int = DEFAULT_BLOCK_SIZE, r_dim: int = DIM):
        super().__init__()
        torch.manual_seed(0)
        init = TruncNormalInitializer(mean=0, std=0.1)
        kwargs = {"tile_len": TILE} if combiner == "tile" else None
        common = dict(embedding_dim=DIM, initializer=init, device=device, grad_reduce_by=grad_reduce_by,
                      combiner=combiner, combiner_kwargs=kwargs, block_size=block_size)
        self.embedding = EmbeddingEngine({
            "a": EmbeddingOption(shared_name="t", filter_hook=filter_hook, **common),
            "b": EmbeddingOption(shared_name="t", filter_hook=filter_hook, trainable=b_trainable, **common),
            "c": EmbeddingOption(shared_name="r", admit_hook=AdmitHook("ReadOnly") if read_only else None,
                                 **{**common, "embedding_dim": r_dim}),
        }, passes=passes)
        slots = TILE if combiner == "tile" else 1
        # Made on the CPU, then moved: the same weights as the one-process CPU reference (a Linear
        # made on a GPU draws from the GPU's generator).
        self.dense = nn.Linear(slots * (2 * DIM + r_dim), 1).to(device)

    def forward(self, batch: dict) -> torch.Tensor:
        emb = self.embedding(batch)
        logit = self.dense(torch.cat([emb["a"], emb["b"], emb["c"]], -1)).reshape(-1)
        # Compiled (fxrec.compile), the logits' length (from the ragged offsets) and the labels'
        # are two unbacked sizes: this tells the compiler they agree, as the loss requires.
        torch._check(logit.shape[0] == batch["label"].shape[0])
        return F.binary_cross_entropy_with_logits(logit, batch["label"])


def _ragged(rng: np.random.Generator, rows: int, vocab: int, empty: bool) -> RaggedTensor:
    lengths = np.zeros(rows, dtype=np.int64) if empty else rng.integers(0, 4, size=rows)
    n = int(lengths.sum())
    values = rng.integers(-vocab, vocab, size=n)
    if n:
        pick = rng.random(n) < 0.2
        values[pick] = rng.choice(_EXTREMES, size=int(pick.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    # From lists: torch.from_numpy (and torch.tensor) of an empty array gives stride 0, which a
    # compiled graph guards on (a recompile for a batch of no ids).
    return RaggedTensor(torch.tensor(values.tolist(), dtype=torch.int64),
                        torch.tensor(offsets.tolist(), dtype=torch.int64))


def rank_batch(step: int, rank: int, world: int, device: str = "cpu") -> dict:
    """Rank ``rank``'s batch of ``step``: B=1 on the last rank at step 1, no ids at all on rank 0
    at step 2; else B=4."""
    return sized_batch(1000 * step + rank, 1 if (step == 1 and rank == world - 1) else 4, step == 2 and rank == 0,
                       device)


def sized_batch(seed: int, rows: int, empty: bool, device: str = "cpu") -> dict:
    """A batch of ``rows`` rows drawn from ``seed``; ``empty``: no ids at all."""
    rng = np.random.default_rng(seed)
    batch = {
        "a": _ragged(rng, rows, 30, empty),
        "b": _ragged(rng, rows, 30, empty),
        "c": _ragged(rng, rows, 10, empty),
        "label": torch.from_numpy(rng.integers(0, 2, size=rows).astype(np.float32)),
    }
    return {k: v.to(device) for k, v in batch.items()}


def build(config: tuple, device: str = "cpu", **model_kwargs) -> tuple[ShardModel, torch.optim.Optimizer, object]:
    combiner, reduce_by, optimizer = config
    model = ShardModel(combiner, reduce_by, device=device, **model_kwargs)
    dense = torch.optim.SGD(model.dense.parameters(), lr=0.1)
    tables = filter_out_sparse_param(model)
    sparse = SparseAdamWTF(tables, lr=0.05) if optimizer == "adamwtf" else SparseSGD(tables, lr=0.5)
    return model, dense, sparse


def _average_dense_grads(model: nn.Module) -> None:
    """DDP's all-reduce of dense gradients (mean over ranks), by hand."""
    world = dist.get_world_size()
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world


def train_step(model, dense, sparse, batches: list[dict], micro: int = 1, forward=None) -> float:
    """One step on this process's batches (sharded: ``micro`` batches, a gradient-accumulation
    group) or on every rank's (the reference: ``micro`` batches per rank, rank-major); the loss of
    each micro-batch is scaled by 1/micro, as the Trainer does. Returns the mean over ranks (and
    micro-batches) of the losses. ``forward``: what computes a batch's loss (default ``model``;
    ``fxrec.compile(model)``)."""
    forward = model if forward is None else forward
    ranks = len(batches) // micro
    total = 0.0
    for m in range(micro):
        loss = torch.stack([forward(batches[r * micro + m]) for r in range(ranks)]).mean() / micro
        loss.backward()
        total = total + loss.detach()
    if is_distributed():
        _average_dense_grads(model)
        dist.all_reduce(total)
        total /= dist.get_world_size()
    dense.step()
    sparse.step()
    dense.zero_grad()
    sparse.zero_grad()
    return float(total)


def snapshot(model: nn.Module) -> dict:
    """Per table, in id order: ids, embedding, slots (lists); and the dense weights."""
    out = {"dense": {k: v.detach().cpu().tolist() for k, v in model.dense.state_dict().items()}}
    for name, table in filter_out_sparse_param(model).items():
        ids, rows = table.items()  # this table's ids only (tables may be coalesced into one storage)
        order = torch.argsort(ids)
        rows = rows[order]
        snap = {"ids": ids[order].cpu().tolist(), "embedding": table.embedding[rows].cpu().tolist(),
                "step": int(table.step)}
        for slot, t in table.slots().items():
            snap["slot." + slot] = t[rows].cpu().tolist()
        out[name] = snap
    return out


def union_of_shards(snaps: list[dict]) -> dict:
    """The ranks' table snapshots as one (ids in order): what one process's tables would hold."""
    out = {"dense": snaps[0]["dense"]}
    for name in snaps[0]:
        if name == "dense":
            continue
        keys = [k for k in snaps[0][name] if k != "step"]
        rows = sorted((i, {k: s[name][k][j] for k in keys}) for s in snaps for j, i in enumerate(s[name]["ids"]))
        out[name] = {k: [r[k] for _, r in rows] for k in keys}
        out[name]["step"] = snaps[0][name]["step"]
    return out


def assert_close_snapshots(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].keys() == want[name].keys(), name
        for k in want[name]:
            if k in ("ids", "step"):
                assert got[name][k] == want[name][k], (name, k)
            else:
                torch.testing.assert_close(torch.tensor(got[name][k]), torch.tensor(want[name][k]), atol=atol,
                                           rtol=1e-5, msg=f"{name}.{k}")


def reference(config: tuple, world: int, steps: int = STEPS, **model_kwargs) -> tuple[list[float], dict]:
    """One process: every step on all ``world`` ranks' batches (module docstring)."""
    model, dense, sparse = build(config, **model_kwargs)
    losses = [train_step(model, dense, sparse, [rank_batch(s, r, world) for r in range(world)])
              for s in range(steps)]
    return losses, snapshot(model)


# -- the other scenarios: (name, config, model kwargs, steps, micro-batches per step) -----------------
# eviction: table "t" forgets ids unseen for 2 table steps (evict_stale after every step);
# read-only: table "r" takes no new ids after step 2; accumulation: 2 micro-batches a step;
# passes: one merged lookup per table, with "b" not trainable (tables "t" and "r" agree in layout:
# table_coalesce puts them into one storage, so one merged lookup of (tag, id) pairs for all three
# features); coalesce: the same with every feature trainable, "mean" / "worker" and 2 micro-batches;
# mixed_dims: "r" of 2 columns padded into "t"'s storage of 3 (tile rows cut back to 2 per slot).
EXTRAS = [
    ("evict", ("sum", "worker", "adamwtf"), {"filter_hook": FilterHook("GlobalStepFilter", {"filter_step": 2})}, 4, 1),
    ("read_only", ("mean", "id", "sgd"), {}, 4, 1),
    ("accumulate", ("tile", "id", "adamwtf"), {}, 3, 2),
    ("passes", ("sum", "id", "adamwtf"), {"passes": True, "b_trainable": False}, 3, 1),
    ("coalesce", ("mean", "worker", "adamwtf"), {"passes": True}, 3, 2),
    ("mixed_dims", ("tile", "id", "adamwtf"), {"passes": True, "r_dim": 2}, 3, 2),
]
EVAL_STEPS = (7, 8)  # batches evaluated after training: mostly unseen ids


def run_extra(name: str, config: tuple, model_kwargs: dict, steps: int, micro: int, rank: int | None, world: int,
              device: str = "cpu") -> dict:
    """One ``EXTRAS`` scenario, sharded (``rank``) or as the reference (``rank`` None): losses,
    the table snapshot after training, then eval-mode outputs on ``EVAL_STEPS``' batches (the
    reference's: every rank's, rank-major) and the table snapshot after them (eval inserts
    nothing), and the names of the tables in table "t"'s storage (coalesced: several)."""
    model, dense, sparse = build(config, device=device, **model_kwargs)
    ranks = range(world) if rank is None else [rank]
    losses = []
    for s in range(steps):
        if name == "read_only" and s == 2:
            model.embedding.tables["r"].admit_hook = AdmitHook("ReadOnly")
        batches = [rank_batch(100 * m + s, r, world, device) for r in ranks for m in range(micro)]
        losses.append(train_step(model, dense, sparse, batches, micro))
        if name == "evict":
            model.embedding.tables["t"].evict_stale()
    trained = snapshot(model)
    model.eval()
    with torch.no_grad():
        outputs = [model.embedding(rank_batch(s, r, world, device))[f].cpu().tolist()
                   for s in EVAL_STEPS for r in ranks for f in ("a", "b", "c")]
    return {"losses": losses, "trained": trained, "outputs": outputs, "after_eval": snapshot(model),
            "storage": [t.name for t in model.embedding.tables["t"].storage.members]}


ROW_CAP = 40
CAP_IDS = 60


def cap_batch(step: int, rank: int, world: int, device: str = "cpu") -> dict:
    """Step ``step`` of the row-cap run: feature "a" reads ids ``CAP_IDS`` ids in all (30 a
    step, the ranks splitting them), "b" and "c" one id a row."""
    ids = torch.arange(step * CAP_IDS // 2, (step + 1) * CAP_IDS // 2, dtype=torch.int64) * 65536
    mine = ids[rank::world]
    rows = mine.numel()
    one = torch.arange(rows + 1, dtype=torch.int64)
    batch = {"a": RaggedTensor(mine, one), "b": RaggedTensor(torch.zeros(rows, dtype=torch.int64), one),
             "c": RaggedTensor(torch.ones(rows, dtype=torch.int64), one),
             "label": (torch.arange(rows) % 2).to(torch.float32)}
    return {k: v.to(device) for k, v in batch.items()}

# ids of the traffic count: duplicates, negatives, structured ids
TRAFFIC_IDS = torch.tensor([[5, 5, -3, 1 << 16], [7 << 16, 0, 5, -(2**63)]], dtype=torch.int64)

# fxrec.compile of a sharded model (tests/test_sharded_compile.py): per step, (rank 0's B, rank 1's
# B); B=1 on either rank and on both, a rank far larger than the other (its ids fill the small
# rank's table past the room it reserved for its own: the owners must reserve for every rank's)
COMPILE_SIZES = [(1, 20), (3, 5), (6, 1), (1, 1), (9, 2), (4, 12), (2, 1), (12, 3), (5, 5), (1, 8), (7, 4)]
COMPILE_EMPTY = {(3, 0), (7, 1)}  # (step, rank): a batch of no ids at all (every row empty)
# (name, config, model kwargs): separate tables (engines built with an empty sequence of passes,
# which fxrec.compile keeps as they are); "t" and "r" coalesced into one storage with "b" not
# trainable (merged lookups of (tag, id) pairs); tiny tables that grow every few steps
COMPILE_RUNS = [
    ("separate", ("mean", "id", "adamwtf"), {"block_size": 2, "passes": ()}),
    ("coalesced", ("tile", "worker", "sgd"), {"block_size": 2, "passes": True, "b_trainable": False}),
]


def compile_batch(step: int, rank: int, device: str = "cpu") -> dict:
    """Rank ``rank``'s batch of ``step`` of the compiled runs (``COMPILE_SIZES``, ``COMPILE_EMPTY``)."""
    return sized_batch(5000 + 1000 * step + rank, COMPILE_SIZES[step][rank], (step, rank) in COMPILE_EMPTY, device)

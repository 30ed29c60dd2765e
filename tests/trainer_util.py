"""Small models, batches and ORC files for the Trainer's tests (tests/test_trainer.py, and the
child processes some of those tests start)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc
import torch
import torch.nn.functional as F
from torch import nn

from fxrec.distributed.checkpoint import is_shard_part, load_shards
from fxrec.framework.checkpoint import CheckpointManager
from fxrec.framework.metrics import add_metric
from fxrec.framework.trainer import Trainer, TrainingArguments, _dense_state_dict
from fxrec.io.orc_dataset import OrcDataset
from fxrec.metrics.auroc import AUROC
from fxrec.nn.hashtable_hook import FilterHook
from fxrec.nn.initializers import TruncNormalInitializer
from fxrec.nn.modules.embedding import EmbeddingEngine, EmbeddingOption
from fxrec.nn.modules.hashtable import filter_out_sparse_param
from fxrec.optim import SparseAdamWTF, SparseSGD
from fxrec.ragged import RaggedTensor

DIM = 4


class ToyModel(nn.Module):
    """Two tables ("ids": sum, grad_reduce_by "worker"; "tags": mean, "id"), a small MLP, BCE
    loss, an AUROC registered with add_metric (as the tutorial's DeepCTR does). ``coalesce``:
    "tags" reduces by "worker" too and the engine runs its passes, so ``table_coalesce`` puts
    both tables into one storage."""

    def __init__(self, seed: int = 0, filter_hook: FilterHook | None = None, width: int = 8, coalesce: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        init = TruncNormalInitializer(mean=0, std=0.1)
        self.embedding = EmbeddingEngine({
            "ids": EmbeddingOption(embedding_dim=DIM, shared_name="ids", combiner="sum", initializer=init,
                                   device="cpu", grad_reduce_by="worker", filter_hook=filter_hook),
            "tags": EmbeddingOption(embedding_dim=DIM, shared_name="tags", combiner="mean", initializer=init,
                                    device="cpu", grad_reduce_by="worker" if coalesce else "id",
                                    filter_hook=filter_hook if coalesce else None),
        }, passes=coalesce)
        self.dense = nn.Sequential(nn.Linear(2 * DIM + 2, width), nn.ReLU(), nn.Linear(width, 1))
        self.auc = AUROC(num_thresholds=50)

    def forward(self, batch: dict) -> torch.Tensor:
        emb = self.embedding({"ids": batch["ids"], "tags": batch["tags"]})
        x = torch.cat([emb["ids"], emb["tags"], batch["dense"].to(torch.float32)], -1)
        p = torch.sigmoid(self.dense(x)).reshape(-1)
        label = batch["label"].reshape(-1).to(torch.float32)
        loss = F.binary_cross_entropy(p, label)
        self.auc.update(p.detach(), label)
        add_metric("auc", self.auc.compute())
        add_metric("loss", loss)
        return loss


def _ragged(rng: np.random.Generator, rows: int, low: int, high: int, vocab: int) -> RaggedTensor:
    lengths = rng.integers(low, high + 1, size=rows)
    values = torch.from_numpy(rng.integers(0, vocab, size=int(lengths.sum())).astype(np.int64))
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    return RaggedTensor(values, offsets)


def make_batches(n: int, batch_size: int, seed: int = 0, vocab: int = 50) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        out.append({
            "label": torch.from_numpy(rng.integers(0, 2, size=(batch_size, 1)).astype(np.float32)),
            "dense": torch.from_numpy(rng.random((batch_size, 2)).astype(np.float32)),
            "ids": _ragged(rng, batch_size, 1, 3, vocab),
            "tags": _ragged(rng, batch_size, 0, 4, 20),
        })
    return out


def concat_batches(batches: list[dict]) -> dict:
    out = {}
    for key in batches[0]:
        values = [b[key] for b in batches]
        if isinstance(values[0], RaggedTensor):
            vals, offs, base = [], [torch.zeros(1, dtype=torch.int64)], 0
            for v in values:
                vals.append(v.values())
                offs.append(v.offsets()[0][1:] + base)
                base += v.values().numel()
            out[key] = RaggedTensor(torch.cat(vals), torch.cat(offs))
        else:
            out[key] = torch.cat(values)
    return out


def write_orc(directory: str, files: int = 3, rows: int = 20, seed: int = 0) -> str:
    """``files`` ORC files of ``rows`` rows with the columns ToyModel reads."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(files):
        ids = [rng.integers(0, 50, size=rng.integers(1, 4)).tolist() for _ in range(rows)]
        tags = [rng.integers(0, 20, size=rng.integers(0, 5)).tolist() for _ in range(rows)]
        table = pa.table({
            "label": pa.array([[float(x)] for x in rng.integers(0, 2, size=rows)], type=pa.list_(pa.float64())),
            "dense": pa.array(rng.random((rows, 2)).tolist(), type=pa.list_(pa.float64())),
            "ids": pa.array(ids, type=pa.list_(pa.int64())),
            "tags": pa.array(tags, type=pa.list_(pa.int64())),
        })
        orc.write_table(table, os.path.join(directory, f"part_{i}.orc"))
    return directory


def orc_dataset(directory: str, batch_size: int = 16, drop_remainder: bool = False, worker_idx: int = 0,
                worker_num: int = 1) -> OrcDataset:
    ds = OrcDataset(batch_size, worker_idx=worker_idx, worker_num=worker_num, read_threads_num=1, prefetch=1,
                    drop_remainder=drop_remainder, transform_fn=[lambda x: x[0]])
    ds.add_path(directory)
    ds.fixedlen_feature("label", [0.0])
    ds.fixedlen_feature("dense", [0.0, 0.0])
    ds.varlen_feature("ids")
    ds.varlen_feature("tags")
    return ds


def make_trainer(output_dir: str, dataset, seed: int = 0, sgd: bool = False, scheduler: bool = True,
                 eval_dataset=None, hooks=None, model: ToyModel | None = None, **args) -> Trainer:
    """A Trainer over a fresh ToyModel: AdamW + StepLR + SparseAdamWTF (``sgd``: SGD + SparseSGD)."""
    model = ToyModel(seed) if model is None else model
    if sgd:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sparse = SparseSGD(filter_out_sparse_param(model), lr=0.1)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        sparse = SparseAdamWTF(filter_out_sparse_param(model), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if scheduler else None
    args.setdefault("log_steps", 100)
    args.setdefault("save_steps", None)
    config = TrainingArguments(output_dir=output_dir, **args)
    return Trainer(model, config, dataset, eval_dataset=eval_dataset, hooks=hooks, dense_optimizers=(opt, sched),
                   sparse_optimizer=sparse)


def table_snapshot(model: nn.Module) -> dict:
    """Per table, in id order: ids, embedding rows, slots, the table's step."""
    out = {}
    for name, table in filter_out_sparse_param(model).items():
        ids, rows = table.items()  # this table's ids only (tables may be coalesced into one storage)
        order = torch.argsort(ids)
        rows = rows[order]
        snap = {"ids": ids[order].clone(), "embedding": table.embedding[rows].clone(), "step": int(table.step)}
        for slot, t in table.slots().items():
            snap["slot." + slot] = t[rows].clone()
        out[name] = snap
    return out


def dense_snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_same(a: dict, b: dict, exact: bool = True, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_same(a[k], b[k], exact, atol)
        elif isinstance(a[k], torch.Tensor):
            if exact or not a[k].dtype.is_floating_point:
                assert torch.equal(a[k], b[k]), k
            else:
                torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)
        else:
            assert a[k] == b[k], k


def by_id(entry: dict) -> dict:
    """A table's state (``HashTable.state_dict()``, or a sparse optimizer's per-table state) with
    its per-id tensors (first dimension = the number of ids) in id order; scalars as they are."""
    order = torch.argsort(entry["ids"])
    n = entry["ids"].numel()
    return {k: v[order] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
            for k, v in entry.items()}


def load_parts(directory, step: int | None = None, rank: int = 0, world: int = 1) -> dict:
    """Checkpoint ``step`` of ``directory`` as one rank of ``world`` sees it: the dense parts, and
    ``"sparse"`` / ``"sparse_optimizer"``: the table shards merged to the ids ``rank`` owns (at
    world 1: every id)."""
    manager = CheckpointManager(directory)
    step = manager.latest_step() if step is None else step
    parts = manager.load(step, parts=[p for p in manager.part_names(step) if not is_shard_part(p)])
    parts.update(load_shards(manager, step, rank, world))
    return parts


def assert_matches_checkpoint(trainer: Trainer, parts: dict) -> None:
    """The trainer's state equals a checkpoint's parts (``load_parts``) exactly: every table's ids and every slot
    (embedding, last_seen, optimizer moments, the table step), compared in id order; the sparse
    optimizer's per-table state (ids, slots, step, b1p, b2p) and param group; the dense state; the
    global step."""
    assert sorted(trainer.tables) == sorted(parts["sparse"])
    for name, table in trainer.tables.items():
        assert_same(by_id(table.state_dict()), by_id(parts["sparse"][name]))
    mine, saved = trainer.sparse_optimizer.state_dict(), parts["sparse_optimizer"]
    assert sorted(mine["state"]) == sorted(saved["state"]) == sorted(trainer.tables)
    for name in mine["state"]:
        assert_same(by_id(mine["state"][name]), by_id(saved["state"][name]))
    assert mine["param_groups"] == saved["param_groups"]
    assert_same(dict(_dense_state_dict(trainer.model)), dict(parts["model"]))
    assert trainer.state.global_step == parts["trainer"]["global_step"]


def run_ranks(script: str, world: int, log_dir: str, args: list[str] = (), timeout: float = 300,
              cuda: bool = False) -> None:
    """Run ``python script *args`` as ``world`` ranks (RANK, WORLD_SIZE, LOCAL_RANK set; CPU, one
    thread each; ``cuda``: the GPUs stay visible) and assert every rank exits 0 (else the failing
    rank's log tail). When one rank fails, the others are killed (they would wait for it
    forever). Logs: ``log_dir/<script name>.rank<r>.log``."""
    env = dict(os.environ, WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    stem = os.path.splitext(os.path.basename(script))[0]
    paths = [os.path.join(log_dir, f"{stem}.rank{r}.log") for r in range(world)]
    logs = [open(path, "w") for path in paths]
    procs = [subprocess.Popen([sys.executable, script, *args], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=logs[r], stderr=subprocess.STDOUT) for r in range(world)]
    try:
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one rank failed: the others would wait for it forever
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in logs:
            f.close()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:  # report the rank that failed first, not one killed here
        r = next((r for r in failed if procs[r].returncode != -signal.SIGKILL), failed[0])
        with open(paths[r]) as f:
            raise AssertionError(f"rank {r} of {world} exited {procs[r].returncode}:\n" + f.read()[-3000:])

"""Train the tutorial's DeepCTR (``python -m examples.deepctr.train``): the seed tutorial's
``train()`` as a script, on CPU or GPU, in one process or under ``torchrun``.

    python -m examples.deepctr.train [--steps 50] [--batch-size 1024] [--data-dir ./fake_data/]
                                     [--output-dir ./ckpt/] [--compile] [--passes] [--seq-len 1000]
    torchrun --nproc_per_node=2 -m examples.deepctr.train --steps 20

What differs from the tutorial, and why:

- The device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU (the tutorial hardcodes
  ``torch.device("cuda")`` and ``.cuda()``). The tutorial's ``set_num_threads`` (``cpu_count() //
  16`` threads: 0 on small machines) becomes "the cores divided among the local ranks".
- The data: generated first (rank 0) when ``--data-dir`` holds no ``.orc`` file: the tutorial's
  ``generate_data`` with ``--rows`` rows per file (2047) and ``--files`` files (10).
- ``--steps`` (default 50; the tutorial trains 100) and ``--batch-size`` (1024) are arguments, as
  is ``--seq-len`` (the tutorial's 1000: the truncation and tile length of sparse4/sparse5).
- ``--compile`` sets ``TrainingArguments(compile=True)``: the forward and backward run as one
  compiled graph (``fxrec.compile``, of the engines' graphs rewritten by fxrec's passes; the
  first step compiles it, about a minute on a CPU).
- ``--passes`` builds the FeatureEngine and EmbeddingEngine with ``passes=True`` (fxrec's graph
  passes: fused feature ops, one lookup per storage; implied by ``--compile``).
- Checkpoints go to ``--output-dir`` (``./ckpt/``); a second run resumes from the latest one
  (and, having reached ``--steps`` already, stops at once: raise ``--steps`` to train on).
  After training each rank writes ``<output-dir>/tables_rank<r>.json``: per table, the number of
  ids and a checksum of its (id, row) pairs in id order — of the rank's shard: under torchrun the
  tables are row-wise sharded (``fxrec.distributed.sharded``), each rank holding the ids it owns.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from multiprocessing import cpu_count

import numpy as np
import torch
import torch.distributed as dist
from torch.optim import AdamW

from examples.deepctr.data import generate_data, has_data
from examples.deepctr.dataset import IOArgs, get_dataset
from examples.deepctr.model import DeepCTR
from fxrec.distributed.env import default_device, init_distributed, is_distributed
from fxrec.framework.trainer import Trainer, TrainingArguments
from fxrec.nn.modules.hashtable import filter_out_sparse_param
from fxrec.optim import SparseAdamWTF
from fxrec.utils.logger import Logger

logger = Logger(__name__)


def set_num_threads() -> None:
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    threads = max(1, cpu_count() // max(1, local_world))
    torch.set_num_threads(threads)


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    np.random.seed(seed)
    random.seed(seed)


def table_checksums(model: torch.nn.Module) -> dict:
    """Per table: ids and a sha256 of (ids, embedding rows, optimizer slots) in id order."""
    out = {}
    for name, table in sorted(filter_out_sparse_param(model).items()):
        ids, rows = table.items()
        order = torch.argsort(ids)
        digest = hashlib.sha256()
        digest.update(ids[order].cpu().numpy().tobytes())
        digest.update(table.embedding[rows[order]].cpu().numpy().tobytes())
        for slot_name, slot in sorted(table.slots().items()):
            digest.update(slot_name.encode())
            digest.update(slot[rows[order]].cpu().numpy().tobytes())
        out[name] = {"ids": int(ids.numel()), "sha256": digest.hexdigest()}
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the tutorial's DeepCTR on fake data.")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps in all (default 50)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--data-dir", default="./fake_data/")
    parser.add_argument("--output-dir", default="./ckpt/")
    parser.add_argument("--compile", action="store_true", help="run forward and backward compiled (fxrec.compile)")
    parser.add_argument("--passes", action="store_true", help="run fxrec's graph passes on the engines' graphs")
    parser.add_argument("--seq-len", type=int, default=1000, help="sparse4/sparse5 truncation and tile length")
    parser.add_argument("--rows", type=int, default=2047, help="rows per generated file")
    parser.add_argument("--files", type=int, default=10, help="generated files")
    parser.add_argument("--max-seq-len", type=int, default=2000, help="generated sequences are 1..this-1 long")
    parser.add_argument("--log-steps", type=int, default=10)
    parser.add_argument("--save-steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--threads", type=int, default=1, help="read threads of the dataset")
    return parser.parse_args(argv)


def train(args: argparse.Namespace) -> Trainer:
    device = default_device()
    deepctr_model = DeepCTR(device=device, seq_len=args.seq_len, passes=args.passes).to(device)
    train_dataset = get_dataset(
        io_args=IOArgs(
            data_paths=args.data_dir,
            batch_size=args.batch_size,
            thread_num=args.threads,
            prefetch=2,
            drop_remainder=True,
        ),
        device=str(device),
    )
    logger.info_rank0(str(deepctr_model))
    sparse_params = filter_out_sparse_param(deepctr_model)

    sparse_optim = SparseAdamWTF(sparse_params, lr=args.lr)
    opt = AdamW(params=deepctr_model.parameters(), lr=args.lr)

    train_config = TrainingArguments(
        gradient_accumulation_steps=1,
        output_dir=args.output_dir,
        model_bank=None,
        log_steps=args.log_steps,
        train_steps=args.steps,
        train_epoch=1,
        eval_steps=None,
        save_steps=args.save_steps,
        max_to_keep=3,
        save_concurrency_per_rank=2,
        compile=args.compile,
    )
    trainer = Trainer(
        model=deepctr_model,
        args=train_config,
        train_dataset=train_dataset,
        dense_optimizers=(opt, None),
        sparse_optimizer=sparse_optim,
        data_to_cuda=False,
    )
    trainer.train()
    return trainer


def main(argv=None) -> None:
    args = parse_args(argv)
    set_num_threads()
    set_seed(42)
    init_distributed()
    rank = dist.get_rank() if is_distributed() else 0
    if rank == 0 and not has_data(args.data_dir):
        logger.info(f"no data under {args.data_dir}: generating {args.files} files of {args.rows} rows")
        generate_data(args.data_dir, rows=args.rows, file_num=args.files, max_seq_len=args.max_seq_len)
    if is_distributed():
        dist.barrier()
    trainer = train(args)
    checksums = table_checksums(trainer.model)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, f"tables_rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "step": trainer.state.global_step, "tables": checksums}, f, indent=1)
    logger.info(f"rank {rank}: step {trainer.state.global_step}, tables {checksums}")
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

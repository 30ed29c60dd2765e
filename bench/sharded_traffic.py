"""Bytes through all-to-all per training step of the tutorial's DeepCTR with sharded tables.

    torchrun --standalone --nproc_per_node=2 -m bench.sharded_traffic [--steps 10] [--batch-size 1024]

Trains ``--steps`` steps under the Trainer (data generated into ``--data-dir`` when missing, as
``examples.deepctr.train`` does) and counts, per step, the bytes every rank sent to the other
ranks through all-to-all (``fxrec.distributed.sharded.traffic``): ``ids`` (forward: ids to their
owners), ``tags`` (forward: coalesced tables' tags with their ids, 4 bytes a pair), ``rows``
(forward: rows back), ``grads`` (backward: ids, row gradients and counts to the
owners), ``sizes`` (the split sizes exchanged first). The baseline, measured in the same run, is
what the replaced replicated tables all-gathered per step: every rank's touched ids and gradients
to every other rank (``(W - 1) x`` the gradient bytes each rank would send were it to send them
all). Counts, not timings: they do not depend on the card; the card is printed all the same.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.distributed as dist

from examples.deepctr.data import generate_data, has_data
from examples.deepctr.dataset import IOArgs, get_dataset
from examples.deepctr.model import DeepCTR
from fxrec.distributed import sharded
from fxrec.distributed.env import collective_device, default_device, init_distributed, is_distributed
from fxrec.framework.hooks import Hook
from fxrec.framework.trainer import Trainer, TrainingArguments
from fxrec.nn.modules.hashtable import filter_out_sparse_param
from fxrec.optim import SparseAdamWTF

KINDS = ("ids", "tags", "rows", "grads", "sizes")


class TrafficHook(Hook):
    """Per step: this rank's ``sharded.traffic()`` and the rows it sent gradients for."""

    def __init__(self) -> None:
        self.steps: list[dict[str, int]] = []

    def before_step(self, trainer, *args, **kwargs) -> None:
        sharded.reset_traffic()

    def after_step(self, trainer, *args, **kwargs) -> None:
        self.steps.append(sharded.traffic())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=1000)
    parser.add_argument("--data-dir", default="./fake_data/")
    parser.add_argument("--rows", type=int, default=2047, help="rows per generated file")
    parser.add_argument("--files", type=int, default=10, help="generated files")
    parser.add_argument("--max-seq-len", type=int, default=2000, help="generated sequences are 1..this-1 long")
    args = parser.parse_args(argv)
    init_distributed()
    if not is_distributed():
        raise SystemExit("run it under torchrun with --nproc_per_node >= 2: one process has no all-to-all")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0 and not has_data(args.data_dir):
        generate_data(args.data_dir, rows=args.rows, file_num=args.files, max_seq_len=args.max_seq_len)
    dist.barrier()
    device = default_device()
    model = DeepCTR(device=device, seq_len=args.seq_len).to(device)
    dataset = get_dataset(io_args=IOArgs(data_paths=args.data_dir, batch_size=args.batch_size, thread_num=1,
                                         prefetch=2, drop_remainder=True), device=str(device))
    hook = TrafficHook()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, TrainingArguments(output_dir=out, train_steps=args.steps, log_steps=args.steps,
                                                   save_steps=None), dataset, hooks=[hook],
                          dense_optimizers=(torch.optim.AdamW(model.parameters(), lr=1e-3), None),
                          sparse_optimizer=SparseAdamWTF(filter_out_sparse_param(model), lr=1e-3))
        trainer.train()
    dims = {name: t.dim for name, t in filter_out_sparse_param(model).items()}
    # per kind: bytes a step, summed over ranks, averaged over the steps after the first (warm-up)
    measured = hook.steps[1:] or hook.steps
    mine = torch.tensor([[step[k] for k in KINDS] for step in measured], dtype=torch.float64).mean(0)
    total = mine.to(collective_device(device))
    dist.all_reduce(total)
    total = total.cpu()
    if rank == 0:
        card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (gloo)"
        print(f"## sharded all-to-all traffic, DeepCTR, W={world}, B={args.batch_size} per rank, {card}")
        print(f"tables (dim): {dims}")
        print("| kind | bytes a step, all ranks | MB |")
        print("|---|---|---|")
        for k, v in zip(KINDS, total.tolist()):
            print(f"| {k} | {v:.0f} | {v / 1e6:.2f} |")
        print(f"| all | {total.sum():.0f} | {total.sum() / 1e6:.2f} |")
        # The replicated baseline: each rank's gradient rows went to all W-1 others; sharded, a row
        # goes to its owner only, i.e. to another rank with probability (W-1)/W.
        replicated = total[KINDS.index("grads")] * world
        print(f"replicated tables' all-gather of the same gradients: about {replicated:.0f} bytes "
              f"({replicated / max(1.0, float(total[KINDS.index('grads')])):.1f}x the sharded gradient bytes)")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

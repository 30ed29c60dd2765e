"""One rank of tests/test_sharded_compile.py: ``python tests/sharded_compile_worker.py OUT STORE DEVICE``
with RANK / WORLD_SIZE set (2 ranks: gloo on the CPU, NCCL on ``cuda:<rank>``). Per ``sharded_util.COMPILE_RUNS`` scenario, trains the
model eagerly, then a fresh copy under ``fxrec.compile``, on this rank's ``compile_batch``es;
writes ``OUT/rank<r>.json``: per scenario and mode the global losses, this rank's snapshot and
traffic, and (compiled) Dynamo's graph and graph-break counters."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch._dynamo  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import fxrec  # noqa: E402
from fxrec.distributed import sharded  # noqa: E402
from tests.sharded_util import COMPILE_RUNS, COMPILE_SIZES, build, compile_batch, snapshot, train_step  # noqa: E402

out, store, device = sys.argv[1], sys.argv[2], sys.argv[3]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
if device == "cuda":
    torch.cuda.set_device(rank)
    device = f"cuda:{rank}"
dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", init_method="file://" + store, rank=rank,
                        world_size=world)
results = {}
for name, config, kwargs in COMPILE_RUNS:
    for mode in ("eager", "compiled"):
        torch._dynamo.reset()
        counters.clear()
        sharded.reset_traffic()
        model, dense, sparse = build(config, device=device, **kwargs)
        forward = fxrec.compile(model) if mode == "compiled" else model
        losses = [train_step(model, dense, sparse, [compile_batch(s, rank, device)], forward=forward)
                  for s in range(len(COMPILE_SIZES))]
        results[f"{name}/{mode}"] = {"losses": losses, "snapshot": snapshot(model), "traffic": sharded.traffic(),
                                     "graphs": counters["stats"]["unique_graphs"],
                                     "breaks": dict(counters["graph_break"])}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(results, f)
dist.barrier()  # no rank tears the group down while another still uses it
dist.destroy_process_group()

"""One rank of tests/test_sharded.py's multi-process runs: ``python tests/sharded_worker.py OUT
STORE DEVICE`` with RANK / WORLD_SIZE set. Trains every ``sharded_util.CONFIGS`` model sharded for
``STEPS`` steps, then the ``EXTRAS`` scenarios (eviction, read-only, gradient accumulation,
merged lookups, coalesced tables, eval mode), then a table over the row cap, then counts the bytes of
one lookup (of one table, and of two coalesced tables);
writes ``OUT/rank<r>.json``: per
scenario the global losses and this rank's snapshots."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from fxrec.distributed import sharded  # noqa: E402
from fxrec.nn.modules.hashtable import MAX_ROWS_ENV  # noqa: E402
from tests.sharded_util import (  # noqa: E402
    CONFIGS, EXTRAS, ROW_CAP, STEPS, TRAFFIC_IDS, build, cap_batch, rank_batch, run_extra, snapshot, train_step)

out, store, device = sys.argv[1], sys.argv[2], sys.argv[3]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
if device == "cuda":
    torch.cuda.set_device(rank)
    device = f"cuda:{rank}"
dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", init_method="file://" + store,
                        rank=rank, world_size=world)
results = {}
for config in CONFIGS:
    model, dense, sparse = build(config, device=device)
    losses = [train_step(model, dense, sparse, [rank_batch(s, rank, world, device)]) for s in range(STEPS)]
    results["/".join(config)] = {"losses": losses, "snapshot": snapshot(model)}
for name, config, kwargs, steps, micro in EXTRAS:
    results[name] = run_extra(name, config, kwargs, steps, micro, rank, world, device)
# the row cap: table "t" holds CAP_IDS ids in all, more than one rank may, fewer than each owns
os.environ[MAX_ROWS_ENV] = str(ROW_CAP)
model, dense, sparse = build(CONFIGS[0], device=device)
for s in range(2):
    train_step(model, dense, sparse, [cap_batch(s, rank, world, device)])
results["cap"] = snapshot(model)
del os.environ[MAX_ROWS_ENV]
# traffic: one eval-mode lookup of TRAFFIC_IDS through HashTable.forward
table = model.embedding.tables["t"].eval()
sharded.reset_traffic()
with torch.no_grad():
    table(TRAFFIC_IDS.to(device))
results["traffic"] = sharded.traffic()
# traffic of coalesced tables: "t" and "r" in one storage (passes=True), one eval-mode merged
# lookup of (tag, id) pairs: "a" and "b" read "t", "c" reads "r"
model, _, _ = build(CONFIGS[0], device=device, passes=True)
model.eval()
ids = TRAFFIC_IDS.to(device)
sharded.reset_traffic()
with torch.no_grad():
    model.embedding({"a": ids, "b": ids + 1, "c": ids})
results["traffic_coalesced"] = sharded.traffic()
results["traffic_coalesced_storage"] = [t.name for t in model.embedding.tables["t"].storage.members]
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(results, f)
dist.barrier()  # no rank tears the group down while another still uses it
dist.destroy_process_group()

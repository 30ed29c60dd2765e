"""``fxrec.compile`` and ``TrainingArguments(compile=True)`` (SPEC §6): the tutorial's DeepCTR
trained eagerly, with the engines' passes, and compiled gives the same losses, tables and dense
weights; one graph, no graph breaks, over batches of every size (1 included) and ragged lengths;
the Trainer trains compiled as it trains eagerly, in one process and under DDP with row-wise
sharded tables (2 gloo ranks; the sharded exchange is traced: the graph breaks only in DDP's wrapper).

The oracle is the eager model. Compiling the DeepCTR forward + backward takes about a minute on
a CPU, so one module-scoped fixture compiles it once and every check reads its results.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch._dynamo.utils import counters

import fxrec
from examples.deepctr.model import DeepCTR
from fxrec.compiler import DYNAMO_CONFIG, id_bounds
from fxrec.features.feature_engine import FeatureEngine
from fxrec.framework.metrics import clear_metrics, get_log_metrics
from fxrec.nn.modules.hashtable import filter_out_sparse_param
from fxrec.nn.initializers import UniformInitializer
from fxrec.nn.modules.embedding import EmbeddingEngine, EmbeddingOption
from fxrec.optim import SparseAdamWTF, SparseSGD
from fxrec.passes import op_counts
from fxrec.ragged import RaggedTensor
from raggedutil import ragged_ids
from test_features_compile import random_batch
from tests.trainer_util import ToyModel, assert_same, dense_snapshot, make_batches, make_trainer, run_ranks, table_snapshot

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 4
EQUAL_STEPS = 5
# Batch sizes after the first EQUAL_STEPS: 1 several times, one larger than every earlier one.
MORE_SIZES = [1, 7, 2, 1, 11, 3, 5, 1, 4, 9, 2, 6, 1, 8, 3, 17, 2, 5, 1, 4, 6, 3, 2, 9, 1]
LR = 0.01
ADAM_EPS = 1e-3


def deepctr_batches(sizes: list[int], seed: int = 0, device: str = "cpu") -> list[dict]:
    """Raw batches as the tutorial's dataset delivers them (labels 0/1), ragged rows of every
    length 0..9 (empty rows included), strings for sparse5."""
    rng = random.Random(seed)
    out = []
    for b in sizes:
        batch = random_batch(rng, b)
        batch["label"] = (batch["label"] > 0.5).to(torch.float32)
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def train(model: DeepCTR, forward, batches: list[dict]) -> tuple[list[torch.Tensor], dict]:
    """The tutorial's optimizers (AdamW + SparseAdamWTF), one step per batch; the losses and the
    first step's dense gradients. ``eps`` 1e-3, not 1e-8: Adam's update lr * m / (sqrt(v) + eps)
    is normalized per element, so with a tiny eps a gradient element's rounding error relative
    to ITSELF reaches the weight (up to lr * |error| / eps: 5e-4 for the 5e-10 rounding seen here
    on elements near 1e-8), and no tolerance of the weights would say anything."""
    sparse = SparseAdamWTF(filter_out_sparse_param(model), lr=LR, eps=ADAM_EPS)
    dense = torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS)
    losses, first_grads = [], {}
    for batch in batches:
        clear_metrics()
        loss = forward(batch)
        loss.backward()
        if not losses:
            first_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        dense.step()
        sparse.step()
        dense.zero_grad()
        sparse.zero_grad()
        losses.append(loss.detach())
    return losses, first_grads


def snapshot(model: DeepCTR) -> dict:
    """Tables (ids, rows, slots, step; id order), dense parameters, AUROC counters."""
    metric = {k: v.clone() for k, v in model.auc_metric.state_dict().items()}
    return {"tables": table_snapshot(model), "dense": dense_snapshot(model), "auroc": metric}


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def runs(request):
    device = request.param
    data = deepctr_batches([5, 3, 1, 6, 4] + MORE_SIZES, device=device)
    first, more = data[:EQUAL_STEPS], data[EQUAL_STEPS:]
    results = {}
    for name in ("eager", "passes"):
        torch.manual_seed(0)
        model = DeepCTR(device=torch.device(device), seq_len=SEQ_LEN, passes=name == "passes").to(device)
        results[name] = (*train(model, model, first), snapshot(model))
    torch.manual_seed(0)
    model = DeepCTR(device=torch.device(device), seq_len=SEQ_LEN).to(device)
    torch._dynamo.reset()
    counters.clear()
    config_before = {k: getattr(torch._dynamo.config, k) for k in DYNAMO_CONFIG}
    compiled = fxrec.compile(model)
    results["compiled"] = (*train(model, compiled, first), snapshot(model))
    results["config"] = (config_before, {k: getattr(torch._dynamo.config, k) for k in DYNAMO_CONFIG})
    results["marked"] = [k for k, v in first[0].items() for t in pytree.tree_leaves(v)
                         if hasattr(t, "_dynamo_unbacked_indices")]
    metrics = get_log_metrics()
    more_losses, _ = train(model, compiled, more)
    results["graphs"] = counters["stats"]["unique_graphs"]
    results["breaks"] = dict(counters["graph_break"])
    results["more_losses"] = more_losses
    results["metrics"] = metrics
    results["model"] = model
    yield results
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", ["passes", "compiled"])
def test_equal_to_eager_after_five_steps(runs, variant):
    """Losses and the first step's gradients within 1e-5 relative (of the tensor's largest
    element); after 5 steps, ids, table steps and AUROC counters exact, the weights, rows and
    optimizer slots within 1e-5 relative (1e-7 absolute near 0)."""
    eager_losses, eager_grads, eager = runs["eager"]
    losses, grads, got = runs[variant]
    torch.testing.assert_close(torch.stack(losses), torch.stack(eager_losses), rtol=1e-5, atol=0)
    assert grads.keys() == eager_grads.keys()
    for key, g in eager_grads.items():
        torch.testing.assert_close(grads[key], g, rtol=1e-5, atol=1e-5 * float(g.abs().max()), msg=key)
    assert_same(got["tables"], eager["tables"], exact=False, atol=1e-7)
    assert_same(got["dense"], eager["dense"], exact=False, atol=1e-7)
    assert_same(got["auroc"], eager["auroc"])


def test_one_graph_no_breaks_over_every_batch_size(runs):
    assert len(runs["more_losses"]) == len(MORE_SIZES) and all(torch.isfinite(x) for x in runs["more_losses"])
    assert runs["breaks"] == {}
    assert runs["graphs"] == 1


def test_dynamo_config_scoped_and_caller_tensors_unmarked(runs):
    before, after = runs["config"]
    assert after == before and before != DYNAMO_CONFIG  # set only while compiled code runs
    assert runs["marked"] == []  # the batch's own tensors carry no unbacked marks


def test_compiled_forward_registers_metrics(runs):
    assert set(runs["metrics"]) == {"auc", "loss"}


def test_tables_reserved_outside_the_graph_and_grad_sinks_released(runs):
    for table in filter_out_sparse_param(runs["model"]).values():
        assert table.storage.grad_sinks == [] and table._pending == []
        assert 2 * len(table) <= table.capacity


class OneTable(torch.nn.Module):
    """A table that starts at capacity 16 (block_size 16) and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = EmbeddingEngine({"a": EmbeddingOption(embedding_dim=4, shared_name="a", block_size=16,
                                                         initializer=UniformInitializer(-0.5, 0.5))})
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, batch: dict) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self.lin(self.emb(batch)["a"]), batch["label"])


def test_table_growth_inside_a_compiled_run_needs_no_recompile():
    """Each step brings new ids, the table grows 5 times (capacity 32 -> 1024) between compiled
    calls: one graph, and the same tables and weights as eager."""
    batches = [{"a": ragged_ids([[i * 1000 + j for j in range(5 + 7 * i)], [i]]), "label": torch.ones(2, 1)}
               for i in range(8)]
    results = []
    torch._dynamo.reset()
    counters.clear()
    for compiled in (False, True):
        model = OneTable()
        forward = fxrec.compile(model) if compiled else model
        opt = SparseSGD(filter_out_sparse_param(model), lr=0.1)
        capacities = []
        for batch in batches:
            forward(batch).backward()
            opt.step()
            opt.zero_grad()
            capacities.append(model.emb.tables["a"].capacity)
        results.append((table_snapshot(model), capacities))
    assert counters["stats"]["unique_graphs"] == 1
    assert len(set(results[1][1])) >= 5  # it grew
    assert_same(results[1][0], results[0][0], exact=False, atol=1e-7)
    torch._dynamo.reset()


def test_id_bounds_from_shapes_and_feature_configs():
    model = DeepCTR(device="cpu", seq_len=SEQ_LEN)
    batch = deepctr_batches([6])[0]
    bounds = {t.name: n for t, n in id_bounds(model, batch).items()}
    items = {k: v.values().shape[0] for k, v in batch.items() if isinstance(v, RaggedTensor)}
    strings = batch["sparse5"].offsets()[1].shape[0] - 1
    assert bounds == {
        "sparse1": min(6, 4) + items["sparse1"],  # dense2: Bucketize of 3 boundaries (4 values); sparse1: its ids
        "sparse2": items["sparse2"],
        "sparse3": min(items["sparse3"], 10000),
        "sparse4": min(items["sparse4"], 6 * SEQ_LEN, 10000),
        "sparse5": min(strings, 6 * SEQ_LEN, 10000),
        "sparse1_x_sparse2": min(items["sparse1"] * items["sparse2"], 1000),
    }


def test_compile_rewrites_engines_built_without_passes():
    """fxrec.compile compiles the rewritten graphs (SPEC §6): the tutorial model's engines, built
    without passes, get the default passes (fused feature ops; its 6 tables coalesced: one lookup,
    one combine); an engine built with an explicit (here empty) sequence of passes is kept."""
    model = DeepCTR(device="cpu", seq_len=SEQ_LEN)
    features, embeddings = model.sparse_arch.feature_engine, model.sparse_arch.embedding_engine
    assert not features.rewritten and op_counts(embeddings.graph_module)["table_lookup"] == 7
    fxrec.compile(model)
    assert features.rewritten and embeddings.rewritten
    assert op_counts(embeddings.graph_module) == {"table_lookup": 1, "table_combine_multi": 1}
    assert op_counts(features.graph_module) == op_counts(FeatureEngine(features.features, passes=True).graph_module)
    kept = EmbeddingEngine({"a": EmbeddingOption(embedding_dim=2, shared_name="t")}, passes=())
    graph = kept.graph_module
    fxrec.compile(torch.nn.ModuleDict({"emb": kept}))
    assert kept.graph_module is graph and kept.rewritten


def test_compile_rejects_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        fxrec.compile(lambda batch: batch)
    with pytest.raises(ValueError, match="fullgraph"):
        fxrec.compile(ToyModel(), fullgraph=True)
    compiled = fxrec.compile(ToyModel())
    with pytest.raises(TypeError, match="dict"):
        compiled([1, 2])


def test_eval_mode_runs_the_eager_model():
    model = ToyModel()
    compiled = fxrec.compile(model)
    model.eval()
    batch = make_batches(1, 3)[0]
    with torch.no_grad():
        torch.testing.assert_close(compiled(batch), model(batch), rtol=0, atol=0)
    assert all(len(t) == 0 for t in filter_out_sparse_param(model).values())  # eval does not insert


VARIED_SIZES = [4, 1, 6, 3, 5, 2]


def _varied_batches() -> list[dict]:
    """ToyModel batches of VARIED_SIZES rows (the DDP worker makes the same)."""
    return [b for i, size in enumerate(VARIED_SIZES) for b in make_batches(1, size, seed=20 + i)]


def test_trainer_compile_equals_eager(tmp_path):
    data = _varied_batches()
    eager = make_trainer(str(tmp_path / "eager"), data, train_steps=len(data))
    eager.train()
    torch._dynamo.reset()
    counters.clear()
    compiled = make_trainer(str(tmp_path / "compiled"), data, train_steps=len(data), compile=True)
    compiled.train()
    assert counters["stats"]["unique_graphs"] == 1 and dict(counters["graph_break"]) == {}
    torch._dynamo.reset()
    assert_same(table_snapshot(compiled.model), table_snapshot(eager.model), exact=False, atol=1e-6)
    assert_same(dense_snapshot(compiled.model), dense_snapshot(eager.model), exact=False, atol=1e-6)


_DDP_WORKER = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
import torch._dynamo
import torch.distributed as dist
from torch._dynamo.utils import counters
from fxrec.framework.hooks import Hook
from tests.trainer_util import ToyModel, make_batches, make_trainer, table_snapshot

class Losses(Hook):
    def __init__(self):
        self.losses = []

    def after_step(self, trainer, step, outputs):
        self.losses.append(float(outputs["loss"]))

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", init_method="file://" + os.path.join({out!r}, "store"), rank=rank, world_size=world)
mine = [b for i, size in enumerate({sizes}) for b in make_batches(1, size, seed=20 + i)][rank::world]
got = {{}}
for coalesce in (False, True):
    for compile in (False, True):
        torch._dynamo.reset()
        counters.clear()
        losses = Losses()
        trainer = make_trainer(os.path.join({out!r}, f"out{{int(coalesce)}}{{int(compile)}}"), mine,
                               model=ToyModel(rank, coalesce=coalesce), train_steps=len(mine), compile=compile,
                               hooks=[losses])
        trainer.train()
        got[f"{{coalesce}} {{compile}}"] = {{
            "losses": losses.losses,
            "dense": {{k: v.tolist() for k, v in trainer.model.named_parameters()}},
            "tables": {{n: {{k: (v.tolist() if torch.is_tensor(v) else v) for k, v in t.items()}}
                       for n, t in table_snapshot(trainer.model).items()}},
            "graph_breaks": dict(counters["graph_break"]),
            "graphs": counters["stats"]["unique_graphs"],
        }}
with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
    json.dump(got, f)
dist.barrier()  # no rank tears gloo down while another still uses it
dist.destroy_process_group()
"""


def _as_tensors(tree):
    if isinstance(tree, dict):
        return {k: _as_tensors(v) for k, v in tree.items()}
    return torch.tensor(tree) if isinstance(tree, list) else tree


def test_ddp_compile_sharded_two_ranks_equals_eager(tmp_path):
    """2 gloo ranks, each its own batches of varying sizes: DDP over the dense weights, tables
    row-wise sharded (every lookup an all-to-all), as separate tables and coalesced into one
    storage. Compiled training gives the losses, dense weights (identical replicas) and each
    rank's table shard of eager training. The graph breaks only where Dynamo cannot go, in DDP's
    own forward wrapper: the sharded exchange is traced (``tests/test_sharded_compile.py``: one
    graph without DDP)."""
    out = str(tmp_path)
    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER.format(repo=REPO, out=out, sizes=VARIED_SIZES))
    run_ranks(str(script), 2, out, timeout=600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for coalesce in (False, True):
        eager = [got[f"{coalesce} False"] for got in ranks]
        compiled = [got[f"{coalesce} True"] for got in ranks]
        assert compiled[0]["dense"] == compiled[1]["dense"]  # bit-identical replicas
        for e, c in zip(eager, compiled):
            assert e["graph_breaks"] == {} and c["graphs"] == 1
            assert len(c["losses"]) == len(e["losses"]) == len(VARIED_SIZES) // 2
            torch.testing.assert_close(torch.tensor(c["losses"]), torch.tensor(e["losses"]), rtol=1e-6, atol=0)
            assert_same(_as_tensors(c["dense"]), _as_tensors(e["dense"]), exact=False, atol=1e-6)
            assert_same(_as_tensors(c["tables"]), _as_tensors(e["tables"]), exact=False, atol=1e-6)
            reasons = list(c["graph_breaks"])
            assert all("DistributedDataParallel._inside_ddp_forward" in reason or "`Logger`" in reason
                       for reason in reasons), reasons

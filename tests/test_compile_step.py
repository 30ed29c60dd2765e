"""torch.compile of a WHOLE training step (SPEC §6): features -> table lookups -> dense model ->
loss -> backward -> sparse + dense optimizer updates, as one graph, equal to eager.

What it takes (torch 2.13, CPU; skipped on older torch, see ``pytestmark``):
- ``torch._dynamo.config.trace_autograd_ops = True``: ``loss.backward()`` inside the graph (else
  a graph break, and the tables' ``requires_grad_`` anchors leak out of the region);
  ``capture_dynamic_output_shape_ops`` / ``capture_scalar_outputs``: unique ids, inserts.
- Table growth outside the graph: ``table.reserve(n)`` before the compiled steps.
- The dense update through torch's functional optimizers (``torch.optim.sgd.sgd``,
  ``torch.optim.adamw.adamw``) on the module's parameters: ``Optimizer.step`` breaks the graph
  on purpose (``torch._dynamo.graph_break()`` in ``_use_grad``, pytorch#104053, and "optimizer:
  pending mutation on parameter" after an in-graph backward), ``Optimizer.zero_grad`` is
  ``torch._disable_dynamo``.
- ONE graph for all ten steps (SGD and AdamW): SparseOptimizer keeps its per-table counters
  (step, Adam's b1p/b2p) as tensors updated in place, and ``fxrec::sparse_adam_update`` takes
  its bias corrections as 0-d float64 tensors, so Dynamo has no Python number to guard on (as
  Python numbers they recompiled every AdamW step, up to the recompile limit).
- Inductor's pattern matcher miscompiled the functional dense SGD update here (the weight moved
  by +grad): the fixture turns it off; not yet reduced to a report.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from torch._dynamo.utils import counters
from torch.optim.adamw import adamw as functional_adamw
from torch.optim.sgd import sgd as functional_sgd

from fxrec.nn.initializers import UniformInitializer
from fxrec.nn.modules.embedding import EmbeddingEngine, EmbeddingOption
from fxrec.nn.modules.hashtable import filter_out_sparse_param
from fxrec.optim import SparseAdamWTF, SparseSGD
from fxrec.utils.dynamic import dynamic_batch
from raggedutil import ragged_ids

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        torch.torch_version.TorchVersion(torch.__version__) < (2, 13),
        reason="in-graph backward needs torch >= 2.13: before it, Dynamo cannot trace requires_grad_() on an "
               "intermediate tensor (the tables' gradient anchors, HashTable.grad_anchor: 'Unsupported "
               "Tensor.requires_grad_() call', a graph break in every lookup), and the loss.backward() it then "
               "traces in the resumed frame finds no leaf of that frame to differentiate, so it computes nothing "
               "(the dense grads stay None: TypeError in torch.optim.sgd). fxrec.compile, which compiles the "
               "forward and leaves backward to AOTAutograd, works on torch 2.11 (tests/test_compile.py)",
    ),
]

SIZES = [5, 1, 7, 3, 1, 9, 4, 2, 6, 8]  # batch sizes, B=1 included
LR = 0.05


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = EmbeddingEngine({
            "a": EmbeddingOption(embedding_dim=4, shared_name="ta", combiner="sum",
                                 initializer=UniformInitializer(-0.5, 0.5)),
            "b": EmbeddingOption(embedding_dim=2, shared_name="tb", combiner="tile", combiner_kwargs={"tile_len": 3},
                                 initializer=UniformInitializer(-0.5, 0.5)),
        })
        self.lin = torch.nn.Linear(4 + 3 * 2, 1)

    def forward(self, batch: dict) -> torch.Tensor:
        e = self.emb(batch)
        label = batch["label"]
        # dynamic_batch gives every tensor's dim 0 its own unbacked size: tell the compiler
        # that the features' and the label's batch sizes agree (free in eager).
        torch._check(e["a"].shape[0] == label.shape[0])
        torch._check(e["b"].shape[0] == label.shape[0])
        logits = self.lin(torch.cat([e["a"], e["b"]], dim=1))
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, label)


def batches() -> list[dict]:
    rng = random.Random(0)

    def rows(b: int) -> list[list[int]]:  # ragged, empty rows included; row 0 never empty
        return [[rng.randint(-40, 40) for _ in range(rng.randint(1 if i == 0 else 0, 4))] for i in range(b)]

    return [{"a": ragged_ids(rows(b)), "b": ragged_ids(rows(b)),
             "label": torch.tensor([[float(rng.random() < 0.5)] for _ in range(b)])} for b in SIZES]


class DenseOptimizer:
    """torch's SGD / AdamW (foreach=False) through their functional forms, on the model's params."""

    def __init__(self, kind: str, params: list[torch.nn.Parameter]) -> None:
        self.kind, self.params = kind, params
        self.exp_avgs = [torch.zeros_like(p) for p in params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in params]
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in params]

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        if self.kind == "sgd":
            functional_sgd(self.params, grads, [None] * len(grads), foreach=False, weight_decay=0.0,
                           momentum=0.0, lr=LR, dampening=0.0, nesterov=False, maximize=False)
        else:
            functional_adamw(self.params, grads, self.exp_avgs, self.exp_avg_sqs, [], self.steps,
                             foreach=False, amsgrad=False, beta1=0.9, beta2=0.999, lr=LR,
                             weight_decay=0.01, eps=1e-8, maximize=False)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def setup(kind: str):
    torch.manual_seed(0)
    model = Toy()
    tables = filter_out_sparse_param(model)
    sparse = SparseSGD(tables, lr=LR) if kind == "sgd" else SparseAdamWTF(tables, lr=LR, weight_decay=0.01)
    dense = DenseOptimizer(kind, list(model.parameters()))
    for table in tables.values():
        table.reserve(200)  # room for every id of the run: no growth inside the compiled step
    capacities = {name: t.capacity for name, t in tables.items()}

    def train_step(batch: dict) -> torch.Tensor:
        loss = model(batch)
        loss.backward()
        sparse.step()
        dense.step()
        sparse.zero_grad()
        dense.zero_grad()
        return loss.detach()

    return model, sparse, capacities, train_step


def snapshot(model, sparse) -> dict:
    """Dense params, per table its state sorted by id (embedding, slots, ...), the sparse
    optimizer's per-table scalars."""
    out = {f"param.{k}": v.detach().clone() for k, v in model.named_parameters()}
    for name, table in filter_out_sparse_param(model).items():
        state = table.state_dict()
        order = torch.argsort(state["ids"])
        for key, value in state.items():
            out[f"{name}.{key}"] = value if value.dim() == 0 else value[order]
    for name, scalars in sparse.table_state.items():
        for key, value in scalars.items():
            out[f"opt.{name}.{key}"] = value.clone()  # 0-d tensors, updated in place
    return out


@pytest.fixture(scope="module", params=["sgd", "adamw"])
def runs(request):
    """(eager snapshot, eager losses, compiled snapshot, compiled losses, graph breaks, graphs)."""
    flags = {"capture_scalar_outputs": True, "capture_dynamic_output_shape_ops": True, "trace_autograd_ops": True}
    saved = {k: getattr(torch._dynamo.config, k) for k in flags}
    data = batches()
    model, sparse, capacities, step = setup(request.param)
    eager_losses = [step(b) for b in data]
    eager = snapshot(model, sparse)
    pattern_matcher = torch._inductor.config.pattern_matcher
    try:
        for k, v in flags.items():
            setattr(torch._dynamo.config, k, v)
        # Inductor's pattern matcher miscompiles the dense SGD update of lin.weight in this graph
        # (the weight moves by +grad instead of -lr * grad; aot_eager is right): off, for now.
        torch._inductor.config.pattern_matcher = False
        torch._dynamo.reset()
        counters.clear()
        model, sparse, capacities, step = setup(request.param)
        compiled = torch.compile(step)
        losses = [compiled(dynamic_batch(b)) for b in data]
        breaks = dict(counters["graph_break"])
        graphs = counters["stats"]["unique_graphs"]
        got = snapshot(model, sparse)
        assert {n: t.capacity for n, t in filter_out_sparse_param(model).items()} == capacities
    finally:
        for k, v in saved.items():
            setattr(torch._dynamo.config, k, v)
        torch._inductor.config.pattern_matcher = pattern_matcher
        torch._dynamo.reset()
    return eager, eager_losses, got, losses, breaks, graphs


def test_compiled_step_matches_eager(runs):
    eager, eager_losses, got, losses, _, _ = runs
    torch.testing.assert_close(torch.stack(losses), torch.stack(eager_losses), rtol=1e-5, atol=1e-6)
    assert got.keys() == eager.keys()
    for key in eager:
        if isinstance(eager[key], torch.Tensor) and not eager[key].is_floating_point():
            assert torch.equal(got[key], eager[key]), key
        else:
            # atol 1e-5: Inductor's fused kernels round differently, and Adam's m / sqrt(v) on
            # tiny early moments magnifies it (1.6e-6 on a dense weight after 10 AdamW steps)
            torch.testing.assert_close(got[key], eager[key], rtol=1e-5, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def test_compiled_step_no_graph_breaks(runs):
    *_, breaks, graphs = runs
    assert breaks == {}
    assert graphs <= 8  # Dynamo's recompile limit (test_compiled_step_one_graph: exactly 1)


def test_compiled_step_one_graph(runs):
    *_, graphs = runs
    assert graphs == 1

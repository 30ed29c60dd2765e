"""``fxrec.compile`` of a row-wise sharded model (fxrec.distributed.sharded, 2 gloo ranks,
tests/sharded_compile_worker.py): every lookup's exchange (counts, ids to the owners, the owners'
lookup, rows back) is traced into the graph with functional collectives, so the compiled forward
is ONE graph with no graph break over batches of every size (B=1, empty rows, a rank with no
ids), and compiled training equals eager training: losses, every row and slot of each rank's
shard, and the bytes sent."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.sharded_util import COMPILE_RUNS, COMPILE_SIZES, assert_close_snapshots
from tests.trainer_util import run_ranks

pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharded_compile_worker.py")


def _run(directory, device: str) -> list[dict]:
    run_ranks(WORKER, 2, str(directory), [str(directory), str(directory / "store"), device], timeout=600,
              cuda=device == "cuda")
    return [json.loads((directory / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """The worker's results on each of 2 gloo ranks, computed once (compiling costs ~15 s a graph)."""
    return _run(tmp_path_factory.mktemp("sharded_compile"), "cpu")


@pytest.mark.parametrize("name", [run[0] for run in COMPILE_RUNS])
def test_compiled_sharded_training_equals_eager_in_one_graph(ranks, name):
    _check(ranks, name)


@pytest.mark.gpu
def test_compiled_sharded_training_equals_eager_in_one_graph_on_two_gpus(tmp_path):
    """The same on 2 NCCL ranks, one GPU each."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    got = _run(tmp_path, "cuda")
    for name, _, _ in COMPILE_RUNS:
        _check(got, name)


def _check(ranks: list[dict], name: str) -> None:
    for got in ranks:
        eager, compiled = got[f"{name}/eager"], got[f"{name}/compiled"]
        assert len(compiled["losses"]) == len(COMPILE_SIZES)
        torch.testing.assert_close(torch.tensor(compiled["losses"]), torch.tensor(eager["losses"]), atol=1e-5,
                                   rtol=1e-5)
        assert_close_snapshots(compiled["snapshot"], eager["snapshot"])
        assert compiled["traffic"] == eager["traffic"]
        assert compiled["graphs"] == 1 and compiled["breaks"] == {}, (compiled["graphs"], compiled["breaks"])

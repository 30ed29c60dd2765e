"""torch.compile of the seed's FeatureEngine: one graph, no breaks, across batch shapes."""

from __future__ import annotations

import random

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from examples.deepctr.features import get_feature_conf
from fxrec.features.feature_engine import FeatureEngine
from fxrec.utils.dynamic import dynamic_batch
from raggedutil import ragged_ids, ragged_strings

SEQ_LEN = 4


def random_batch(rng: random.Random, b: int) -> dict:
    def id_rows(max_len):
        return [[rng.randint(-(2**63), 2**63 - 1) for _ in range(rng.randint(0, max_len))] for _ in range(b)]

    strings = [[bytes(rng.randrange(256) for _ in range(rng.randint(0, 20))) for _ in range(rng.randint(0, 6))]
               for _ in range(b)]
    return {
        "label": torch.rand(b, 1),
        "dense1": torch.rand(b, 8),
        "dense2": torch.rand(b, 1).mul_(1.5),  # in place: an empty product would get stride 0
        "sparse1": ragged_ids(id_rows(3)),
        "sparse2": ragged_ids(id_rows(3)),
        "sparse3": ragged_ids(id_rows(3)),
        "sparse4": ragged_ids(id_rows(9)),
        "sparse5": ragged_strings(strings),
    }


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return torch.equal(a.values(), b.values()) and all(torch.equal(x, y) for x, y in zip(a.offsets(), b.offsets()))


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_feature_engine_one_graph_no_breaks(device):
    torch._dynamo.reset()
    counters.clear()
    engine = FeatureEngine(get_feature_conf(seq_len=SEQ_LEN)).to(device)
    compiled = torch.compile(engine, fullgraph=True)
    rng = random.Random(0)
    sizes = [5, 1, 3, 0, 8, 2, 1, 7, 4, 6, 1, 9, 3, 2, 5, 1, 12, 0, 4, 3]
    for b in sizes:
        batch = random_batch(rng, b)
        if b:  # an empty row in every non-empty batch
            batch["sparse4"] = ragged_ids([[]] + [[1, 2]] * (b - 1))
        batch = {k: v.to(device) for k, v in batch.items()}
        expected = engine(batch)
        got = compiled(dynamic_batch(batch))
        assert expected.keys() == got.keys()
        for key in expected:
            assert same(expected[key], got[key]), (b, key)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0

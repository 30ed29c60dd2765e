"""FeatureEngine: configs -> FX graph of fxrec ops; values vs a pure-Python pipeline oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from torch.utils._pytree import tree_leaves
from hypothesis import strategies as st

import oracles
from examples.deepctr.features import get_feature_conf
from fxrec.features.feature import Feature
from fxrec.features.feature_engine import FeatureEngine
from fxrec.features.op import (
    Bucketize,
    FeatureCross,
    Hash,
    Mod,
    SelectField,
    SelectFields,
    SequenceTruncate,
)
from fxrec.ragged import RaggedTensor
from raggedutil import ragged_ids, ragged_strings, rows_of, weight_rows_of

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
ids = st.one_of(st.integers(INT64_MIN, INT64_MAX), st.integers(-3, 3), st.sampled_from([INT64_MIN, INT64_MAX]))
id_rows = st.lists(ids, max_size=6)
strings = st.binary(max_size=24)


@st.composite
def seed_batches(draw, max_rows=6):
    b = draw(st.integers(0, max_rows))
    row = lambda s: draw(st.lists(s, min_size=b, max_size=b))  # noqa: E731
    dense2 = draw(st.lists(st.sampled_from([-1.0, 0.0, 0.25, 0.5, 1.0, 2.0, float("nan")]), min_size=b, max_size=b))
    return {
        "label": torch.rand(b, 1),
        "dense1": torch.rand(b, 8),
        "dense2": torch.tensor(dense2, dtype=torch.float32).reshape(b, 1),
        "sparse1": row(id_rows),
        "sparse2": row(id_rows),
        "sparse3": row(id_rows),
        "sparse4": row(st.lists(ids, max_size=12)),
        "sparse5": row(st.lists(strings, max_size=8)),
    }


def to_tensors(raw: dict) -> dict:
    batch = {}
    for key, value in raw.items():
        if isinstance(value, torch.Tensor):
            batch[key] = value
        elif key == "sparse5":
            batch[key] = ragged_strings(value)
        else:
            batch[key] = ragged_ids(value)
    return batch


def oracle_pipeline(raw: dict, seq_len: int) -> dict:
    def mod_rows(rows, m):
        return [[oracles.mod(x, m) for x in row] for row in rows]

    def trunc(rows):
        return [oracles.truncate_row(r, seq_len, keep_last=False) for r in rows]

    hashed = [[oracles.farm64(s) for s in row] for row in raw["sparse5"]]
    cross = [oracles.cross_row(x, y)[0] for x, y in zip(raw["sparse1"], raw["sparse2"])]
    return {
        "dense2": [[oracles.bucketize(v, [0.0, 0.5, 1.0]) for v in row] for row in raw["dense2"].tolist()],
        "sparse1": raw["sparse1"],
        "sparse2": raw["sparse2"],
        "sparse3": mod_rows(raw["sparse3"], 10000),
        "sparse4": trunc(mod_rows(raw["sparse4"], 10000)),
        "sparse5": trunc(mod_rows(hashed, 10000)),
        "sparse1_x_sparse2": mod_rows(cross, 1000),
    }


SEQ_LEN = 5


@pytest.fixture(scope="module")
def seed_engine():
    return FeatureEngine(get_feature_conf(seq_len=SEQ_LEN))


def check_seed_outputs(out: dict, raw: dict, batch: dict) -> None:
    expected = oracle_pipeline(raw, SEQ_LEN)
    assert out["dense2"].dtype == torch.int64 and out["dense2"].tolist() == expected["dense2"]
    assert out["dense1"] is batch["dense1"] and out["label"] is batch["label"]
    for name in ("sparse1", "sparse2", "sparse3", "sparse4", "sparse5", "sparse1_x_sparse2"):
        assert isinstance(out[name], RaggedTensor), name
        assert rows_of(out[name]) == expected[name], name
        assert out[name].weight() is None, name


@given(raw=seed_batches())
def test_seed_features_match_oracle(seed_engine, raw):
    batch = to_tensors(raw)
    before = {k: v.clone() for k, v in batch.items()}
    out = seed_engine(batch)
    check_seed_outputs(out, raw, batch)
    for key, value in before.items():  # no op writes into its input
        for a, b in zip(tree_leaves(batch[key]), tree_leaves(value), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_seed_long_sequences_truncate_to_1000():
    g = torch.Generator().manual_seed(0)
    engine = FeatureEngine(get_feature_conf())
    lengths = [1999, 0, 1000, 1001, 1]
    raw = {
        "label": torch.zeros(5, 1),
        "dense1": torch.zeros(5, 8),
        "dense2": torch.zeros(5, 1),
        "sparse1": [[1], [2], [3], [4], [5]],
        "sparse2": [[1], [2], [3], [4], [5]],
        "sparse3": [[1], [2], [3], [4], [5]],
        "sparse4": [torch.randint(-10**6, 10**6, (n,), generator=g).tolist() for n in lengths],
        "sparse5": [[bytes([65 + i % 26]) * 10 for i in range(n)] for n in lengths],
    }
    out = engine(to_tensors(raw))
    assert [len(r) for r in rows_of(out["sparse4"])] == [1000, 0, 1000, 1000, 1]
    assert rows_of(out["sparse4"])[0] == [oracles.mod(x, 10000) for x in raw["sparse4"][0][:1000]]
    assert [len(r) for r in rows_of(out["sparse5"])] == [1000, 0, 1000, 1000, 1]


def test_graph_is_made_of_fxrec_ops(seed_engine):
    gm = seed_engine.graph_module
    assert isinstance(gm, torch.fx.GraphModule)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    count = lambda t: sum(1 for x in targets if x == t)  # noqa: E731
    assert count(torch.ops.fxrec.mod.default) == 4
    assert count(torch.ops.fxrec.bucketize.default) == 1
    assert count(torch.ops.fxrec.sequence_truncate.default) == 2
    assert count(torch.ops.fxrec.feature_cross.default) == 1
    # bucket boundaries are (non-persistent) buffers, so .to(device) / .cuda() moves them
    assert [b.tolist() for b in seed_engine.buffers()] == [[0.0, 0.5, 1.0]]
    assert seed_engine.to("cpu") is seed_engine and seed_engine.state_dict() == {}
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["dense1", "dense2", "sparse1", "sparse2", "sparse3", "sparse4", "sparse5"]


@given(
    rows=st.lists(st.lists(ids, max_size=5), max_size=5),
    data=st.data(),
)
def test_weights_follow_ids(rows, data):
    weights = [data.draw(st.lists(st.floats(0, 4, width=32), min_size=len(r), max_size=len(r))) for r in rows]
    engine = FeatureEngine([
        Feature("m").add_op(SelectField("x")).add_op(Mod(7)).add_op(SequenceTruncate(seq_len=3, truncate_side="left")),
        Feature("h").add_op(SelectField("x")).add_op(Hash("murmur")),
        Feature("c").add_op(SelectFields([SelectField("x"), SelectField("x")])).add_op(FeatureCross()),
    ])
    x = ragged_ids(rows, weights)
    out = engine({"x": x})
    assert rows_of(out["m"]) == [[oracles.mod(v, 7) for v in r][-3:] for r in rows]
    assert weight_rows_of(out["m"]) == [w[-3:] for w in weights]
    assert rows_of(out["h"]) == [[oracles.hash_id(v, "murmur") for v in r] for r in rows]
    assert weight_rows_of(out["h"]) == weights
    expected = [oracles.cross_row(r, r, w, w) for r, w in zip(rows, weights)]
    assert rows_of(out["c"]) == [e[0] for e in expected]
    got_weights = [w for row in weight_rows_of(out["c"]) for w in row]
    assert got_weights == pytest.approx([w for e in expected for w in e[1]])
    assert out["x"] is x


def test_dense_ids_and_3d_truncate():
    engine = FeatureEngine([
        Feature("d").add_op(SelectField("ids")).add_op(Mod(5)),
        Feature("t").add_op(SelectField("seq")).add_op(SequenceTruncate(seq_len=2, truncate_side="right", n_dims=3)),
    ])
    dense = torch.tensor([[-1, 7], [12, 0]])
    # row 0: [[1,2],[3],[4,5,6]], row 1: [] -> 2 lists each, padded with empty lists
    seq = RaggedTensor(torch.arange(1, 7), [torch.tensor([0, 3, 3]), torch.tensor([0, 2, 3, 6])])
    out = engine({"ids": dense, "seq": seq})
    assert out["d"].tolist() == [[oracles.mod(-1, 5), 2], [2, 0]]
    outer, inner = out["t"].offsets()
    assert outer.tolist() == [0, 2, 4] and inner.tolist() == [0, 2, 3, 3, 3]
    assert out["t"].values().tolist() == [1, 2, 3]


def test_truncate_false_checks_length():
    engine = FeatureEngine([
        Feature("s").add_op(SelectField("s")).add_op(SequenceTruncate(seq_len=2, truncate=False, check_length=True))
    ])
    ok = engine({"s": ragged_ids([[1, 2], []])})
    assert rows_of(ok["s"]) == [[1, 2], []]
    with pytest.raises(ValueError, match=r"feature 's'.*3 items.*seq_len=2"):
        engine({"s": ragged_ids([[1, 2, 3]])})


def test_truncate_false_3d_checks_lists_per_row():
    engine = FeatureEngine([
        Feature("s").add_op(SelectField("s")).add_op(SequenceTruncate(seq_len=2, truncate=False, n_dims=3))
    ])
    # row 0: [[1, 2, 3]] (one list of 3 items: fine), row 1: [[4], [5]]
    ok = RaggedTensor(torch.arange(1, 6), [torch.tensor([0, 1, 3]), torch.tensor([0, 3, 4, 5])])
    out = engine({"s": ok})
    assert [o.tolist() for o in out["s"].offsets()] == [[0, 1, 3], [0, 3, 4, 5]]
    three_lists = RaggedTensor(torch.arange(3), [torch.tensor([0, 3]), torch.tensor([0, 1, 2, 3])])
    with pytest.raises(ValueError, match=r"feature 's'.*3 items.*seq_len=2"):
        engine({"s": three_lists})


# -- config and input validation -----------------------------------------------------------

@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Mod(0), "mod_value"),
        (lambda: Mod(-3), "mod_value"),
        (lambda: Mod(2.5), "mod_value"),
        (lambda: Bucketize([1, 1]), "strictly increasing"),
        (lambda: Bucketize([2, 1]), "strictly increasing"),
        (lambda: Bucketize([]), "empty"),
        (lambda: Bucketize([0, float("nan")]), "NaN"),
        (lambda: Hash("md5"), "hash_type"),
        (lambda: SequenceTruncate(seq_len=0), "seq_len"),
        (lambda: SequenceTruncate(truncate_side="middle"), "truncate_side"),
        (lambda: SequenceTruncate(n_dims=4), "n_dims"),
        (lambda: Feature("f").add_op(Mod(3)), "first op must be SelectField"),
        (lambda: Feature("f").add_op(SelectField("a")).add_op(SelectField("b")), "only be the first"),
        (lambda: FeatureEngine([Feature("f").add_op(SelectField("a"))] * 2), "defined twice"),
        (lambda: FeatureEngine([Feature("f").add_op(SelectField("a")).add_op(FeatureCross())]), "exactly two"),
        (
            lambda: FeatureEngine([Feature("f").add_op(SelectFields([SelectField("a"), SelectField("b")])).add_op(Mod(3))]),
            "only feed FeatureCross",
        ),
    ],
)
def test_bad_configs_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs_name_the_feature():
    engine = FeatureEngine([
        Feature("cnt").add_op(SelectField("count", dim=2)),
        Feature("m").add_op(SelectField("price")).add_op(Mod(10)),
        Feature("t").add_op(SelectField("dense")).add_op(SequenceTruncate(seq_len=3)),
        Feature("h").add_op(SelectField("price")).add_op(Hash()),
    ])
    good = {"count": torch.zeros(2, 2), "price": ragged_ids([[1], [2]]), "dense": ragged_ids([[1], []])}
    engine(good)
    with pytest.raises(ValueError, match=r"feature 'm'.*column 'price' is not in the batch"):
        engine({k: v for k, v in good.items() if k != "price"})
    with pytest.raises(ValueError, match=r"feature 'cnt'.*'count' has last dim 3.*dim=2"):
        engine({**good, "count": torch.zeros(2, 3)})
    with pytest.raises(TypeError, match=r"feature 'm' \(Mod\).*int64.*float32"):
        engine({**good, "price": RaggedTensor(torch.rand(2), torch.tensor([0, 1, 2]))})
    with pytest.raises(ValueError, match=r"feature 't' \(SequenceTruncate\).*ragged"):
        engine({**good, "dense": torch.zeros(2, 3, dtype=torch.int64)})
    with pytest.raises(TypeError, match="dict"):
        engine([good])

"""EmbeddingOption / EmbeddingEngine (SPEC §4.1–4.5) against a row-by-row Python oracle.

The oracle knows only what the spec promises: an id's row is its initial row
(``initializer.init_rows`` keyed by the table's seed, no optimizer step has run), combiners
follow SPEC §4.2 one row and one item at a time, and a row's gradient is the sum over its
occurrences (SPEC §4.5).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxrec.nn
from examples.deepctr.embeddings import get_embedding_conf
from examples.deepctr.features import get_feature_conf
from fxrec.features.feature_engine import FeatureEngine
from fxrec.nn.hashtable_hook import AdmitHook, FilterHook
from fxrec.nn.initializers import (
    ConstantInitializer,
    NormalInitializer,
    UniformInitializer,
    XavierUniformInitializer,
)
from fxrec.nn.modules.embedding import EmbeddingEngine, EmbeddingOption
from fxrec.nn.modules.hashtable import HashTable, filter_out_sparse_param
from fxrec.ragged import RaggedTensor
from raggedutil import offsets_of, ragged_ids, ragged_strings

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
ids_st = st.one_of(st.integers(-3, 3), st.integers(INT64_MIN, INT64_MAX), st.sampled_from([INT64_MIN, INT64_MAX]))
# Exact in float32, and some rows' weights sum to 0 (mean's rule).
weights_st = st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0, 3.0])
short_rows = st.lists(st.lists(ids_st, max_size=6), max_size=6)
long_rows = st.lists(st.lists(ids_st, min_size=20, max_size=40), min_size=1, max_size=2)
# float32 results vs float64 oracle: |got - want| <= RTOL * (sum of |terms|) + ATOL.
RTOL, ATOL = 1e-5, 1e-6


def option(**kw) -> EmbeddingOption:
    kw.setdefault("block_size", 16)
    kw.setdefault("initializer", NormalInitializer(0.0, 1.0))
    return EmbeddingOption(**kw)


# -- the oracle ---------------------------------------------------------------------------------------

def initial_rows(table: HashTable, ids) -> dict[int, np.ndarray]:
    """id -> its initial row (float64), from the initializer keyed by the table's seed."""
    ids = sorted(set(ids))
    if not ids:
        return {}
    rows = table.initializer.init_rows(torch.tensor(ids, dtype=torch.int64), table.dim, table.seed, table.block_size)
    return {i: r for i, r in zip(ids, rows.double().numpy())}


def oracle(rows, weights, row_of, dim, combiner, tile_len, use_weight, grad=None):
    """(out [B, width], magnitude, {id: grad [dim]}, {id: grad magnitude}) of one feature.

    ``row_of(id)`` is the id's row, or None for an id the table does not hold (zero, no grad).
    ``grad`` [B, width] is d loss / d out."""
    width = tile_len * dim if combiner == "tile" else dim
    out, mag = np.zeros((len(rows), width)), np.zeros((len(rows), width))
    id_grad, id_mag = {}, {}
    grad = np.zeros((len(rows), width)) if grad is None else np.asarray(grad, dtype=np.float64)

    def add_grad(i, g):
        if row_of(i) is not None:
            id_grad[i] = id_grad.get(i, 0.0) + g
            id_mag[i] = id_mag.get(i, 0.0) + np.abs(g)

    for b, row in enumerate(rows):
        if combiner == "tile":
            for slot, i in enumerate(row):
                if slot >= tile_len:
                    add_grad(i, np.zeros(dim))  # looked up, outside the tile: a zero gradient
                    continue
                e = row_of(i)
                if e is not None:
                    out[b, slot * dim:(slot + 1) * dim] = e
                add_grad(i, grad[b, slot * dim:(slot + 1) * dim])
            mag[b] = np.abs(out[b])
            continue
        ws = [weights[b][k] if use_weight and weights is not None else 1.0 for k in range(len(row))]
        total = sum(ws)
        scale = 1.0
        if combiner == "mean":
            scale = 0.0 if total == 0 else 1.0 / total
        for i, w in zip(row, ws):
            e = row_of(i)
            if e is not None:
                out[b] += w * scale * e
                mag[b] += abs(w * scale) * np.abs(e)
            add_grad(i, w * scale * grad[b])
    return out, mag, id_grad, id_mag


def assert_near(got: torch.Tensor, want: np.ndarray, mag: np.ndarray) -> None:
    got = got.detach().double().numpy()
    assert got.shape == want.shape
    assert np.all(np.abs(got - want) <= RTOL * mag + ATOL), np.abs(got - want).max()


def grads_by_id(table: HashTable) -> dict[int, np.ndarray]:
    rows, grads = table.take_grads()
    rows, grads = rows[rows >= 0], grads[rows >= 0]  # -1: padding
    ids = table.keys[rows].tolist()
    assert len(set(ids)) == len(ids)
    return dict(zip(ids, grads.double().numpy()))


def assert_grads(table: HashTable, want: dict, mag: dict) -> None:
    got = grads_by_id(table)
    assert set(got) == set(want)
    for i in want:
        assert np.all(np.abs(got[i] - want[i]) <= RTOL * mag[i] + ATOL), (i, got[i], want[i])


def merge(into: tuple[dict, dict], grads: dict, mags: dict) -> None:
    for i in grads:
        into[0][i] = into[0].get(i, 0.0) + grads[i]
        into[1][i] = into[1].get(i, 0.0) + mags[i]


# -- strategies ---------------------------------------------------------------------------------------

@st.composite
def lookups(draw):
    """One feature's batch and how it is combined."""
    rows = draw(st.one_of(short_rows, short_rows, long_rows))
    weights = draw(st.one_of(st.none(), st.just([[draw(weights_st) for _ in row] for row in rows])))
    combiner = draw(st.sampled_from(["sum", "mean", "tile"]))
    kwargs = {"tile_len": draw(st.integers(1, 4))} if combiner == "tile" else None
    return rows, weights, dict(combiner=combiner, combiner_kwargs=kwargs, use_weight=draw(st.booleans()))


# -- forward and backward against the oracle ------------------------------------------------------------

@given(a=lookups(), b=lookups(), shared=st.booleans(), dim=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_two_features_match_oracle(a, b, shared, dim, seed):
    """Outputs, table contents and per-id gradients of two features, in one table or two."""
    (rows_a, w_a, kw_a), (rows_b, w_b, kw_b) = a, b
    engine = EmbeddingEngine({
        "a": option(embedding_dim=dim, shared_name="t", **kw_a),
        "b": option(embedding_dim=dim, shared_name="t" if shared else "u", **kw_b),
    })
    x = {"a": ragged_ids(rows_a, w_a), "b": ragged_ids(rows_b, w_b)}
    out = engine(x)
    g = torch.Generator().manual_seed(seed)
    grads = {k: torch.randn(out[k].shape, generator=g) for k in ("a", "b")}
    (out["a"] * grads["a"]).sum().add((out["b"] * grads["b"]).sum()).backward()

    table_a, table_b = engine.table_of("a"), engine.table_of("b")
    ids_a = [i for r in rows_a for i in r]
    ids_b = [i for r in rows_b for i in r]
    rows_t = initial_rows(table_a, ids_a + (ids_b if shared else []))
    rows_u = rows_t if shared else initial_rows(table_b, ids_b)
    want_a = oracle(rows_a, w_a, rows_t.get, dim, grad=grads["a"].numpy(), tile_len=engine.options["a"].tile_len,
                    combiner=kw_a["combiner"], use_weight=kw_a["use_weight"])
    want_b = oracle(rows_b, w_b, rows_u.get, dim, grad=grads["b"].numpy(), tile_len=engine.options["b"].tile_len,
                    combiner=kw_b["combiner"], use_weight=kw_b["use_weight"])
    assert_near(out["a"], *want_a[:2])
    assert_near(out["b"], *want_b[:2])
    # the table holds exactly the distinct ids, each at its initial row
    assert len(table_a) == len(rows_t) and len(table_b) == len(rows_u)
    if shared:
        assert table_a is table_b and len(engine.tables) == 1
        total = ({}, {})
        merge(total, *want_a[2:])
        merge(total, *want_b[2:])
        assert_grads(table_a, *total)
    else:
        assert len(engine.tables) == 2
        assert_grads(table_a, *want_a[2:])
        assert_grads(table_b, *want_b[2:])


@given(rows=st.one_of(short_rows, long_rows), data=st.data())
def test_dense_ids_are_rows_of_ids(rows, data):
    """[B, F] is F ids per row, [B] one id per row: as the ragged batch with those rows."""
    width = data.draw(st.integers(0, 4))
    rows = [(r + [0] * width)[:width] for r in rows]
    combiner = data.draw(st.sampled_from(["sum", "mean", "tile"]))
    kwargs = {"tile_len": 3} if combiner == "tile" else None
    engine = EmbeddingEngine({
        "d": option(embedding_dim=3, combiner=combiner, combiner_kwargs=kwargs),
        "one": option(embedding_dim=3, combiner=combiner, combiner_kwargs=kwargs),
    })
    dense = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), width)
    first = torch.tensor([r[0] if r else 7 for r in rows], dtype=torch.int64)
    out = engine({"d": dense, "one": first})
    table = engine.tables["embedding"]
    row_of = initial_rows(table, dense.reshape(-1).tolist() + first.tolist()).get
    assert_near(out["d"], *oracle(rows, None, row_of, 3, combiner, 3, True)[:2])
    assert_near(out["one"], *oracle([[i] for i in first.tolist()], None, row_of, 3, combiner, 3, True)[:2])


def test_batch_edges():
    """B = 0, B = 1, all rows empty, one long row, duplicates and extreme ids."""
    engine = EmbeddingEngine({
        "s": option(embedding_dim=2, combiner="sum"),
        "m": option(embedding_dim=2, combiner="mean"),
        "t": option(embedding_dim=2, combiner="tile", combiner_kwargs={"tile_len": 5}),
    })
    cases = [[], [[]], [[], [], []], [[INT64_MIN, INT64_MAX, -1, 0, INT64_MIN]], [list(range(-50, 50)) * 3]]
    for rows in cases:
        out = engine({k: ragged_ids(rows) for k in "smt"})
        row_of = initial_rows(engine.tables["embedding"], [i for r in rows for i in r]).get
        for k, combiner in zip("smt", ["sum", "mean", "tile"]):
            assert_near(out[k], *oracle(rows, None, row_of, 2, combiner, 5, True)[:2])
        engine.tables["embedding"].clear_grads()
    assert len(engine.tables["embedding"]) == 4 + 100 - 2  # -1 and 0 are in both the 4th and 5th batch


def test_weights_and_use_weight_false():
    rows, weights = [[1, 2, 2], [3, 4], [5]], [[0.5, 2.0, -1.0], [1.0, -1.0], [0.0]]
    x = ragged_ids(rows, weights)
    engine = EmbeddingEngine({
        "sum": option(),
        "mean": option(combiner="mean"),
        "sum_nw": option(use_weight=False),
        "mean_nw": option(combiner="mean", use_weight=False),
    })
    out = engine({k: x for k in ("sum", "mean", "sum_nw", "mean_nw")})
    row_of = initial_rows(engine.tables["embedding"], [1, 2, 3, 4, 5]).get
    for k, combiner, use_weight in [("sum", "sum", True), ("mean", "mean", True), ("sum_nw", "sum", False),
                                    ("mean_nw", "mean", False)]:
        assert_near(out[k], *oracle(rows, weights, row_of, 16, combiner, 1, use_weight)[:2])
    assert out["mean"][1].abs().sum() == 0 and out["mean"][2].abs().sum() == 0  # Σw == 0 -> 0
    # weights are data: a weight that requires grad is passed detached and gets none
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], requires_grad=True)
    engine({k: RaggedTensor(x.values(), x.offsets(), w) for k in engine.options})["sum"].sum().backward()
    assert w.grad is None


# -- shared tables -----------------------------------------------------------------------------------------

def test_shared_table_shares_rows_and_grads():
    init = UniformInitializer(-1.0, 1.0)
    engine = EmbeddingEngine({
        "user": option(embedding_dim=4, shared_name="id", initializer=init),
        "item": option(embedding_dim=4, shared_name="id", initializer=init, combiner="tile",
                       combiner_kwargs={"tile_len": 2}),
        "other": option(embedding_dim=4, shared_name="other", initializer=init),
    })
    assert list(engine.tables) == ["id", "other"] and engine.table_of("user") is engine.table_of("item")
    out = engine({"user": ragged_ids([[10], [11], [10]]), "item": ragged_ids([[11, 10], [12]]),
                  "other": ragged_ids([[10]])})
    torch.testing.assert_close(out["item"][0, :4], out["user"][1])  # id 11: one row for both features
    torch.testing.assert_close(out["item"][0, 4:], out["user"][0])  # id 10
    assert len(engine.tables["id"]) == 3 and len(engine.tables["other"]) == 1  # {10, 11, 12} and {10}
    assert not torch.equal(out["other"][0], out["user"][0])  # another table: another seed, another row
    (out["user"].sum() + 2 * out["item"].sum()).backward()
    got = grads_by_id(engine.tables["id"])
    assert {i: g.tolist() for i, g in got.items()} == {10: [4.0] * 4, 11: [3.0] * 4, 12: [2.0] * 4}
    assert filter_out_sparse_param(nn.Sequential(engine)) == {"id": engine.tables["id"],
                                                              "other": engine.tables["other"]}


def test_grad_reduce_by_id_averages_over_occurrences_of_both_features():
    engine = EmbeddingEngine({
        "a": option(shared_name="t", grad_reduce_by="id"),
        "b": option(shared_name="t", grad_reduce_by="id", combiner="mean"),
    })
    out = engine({"a": ragged_ids([[1, 1], [2]]), "b": ragged_ids([[1, 2, 2, 2]])})
    (out["a"].sum() + out["b"].sum()).backward()
    got = {i: g[0].item() for i, g in grads_by_id(engine.tables["t"]).items()}
    # id 1: 2 (from a) + 1/4 (from b) over 3 occurrences; id 2: 1 + 3/4 over 4
    assert got == pytest.approx({1: 2.25 / 3, 2: 1.75 / 4})


@pytest.mark.parametrize(
    "field, a, b",
    [
        ("embedding_dim", 8, 16),
        ("block_size", 16, 32),
        ("dtype", torch.float32, torch.float64),
        ("device", torch.device("cpu"), torch.device("cuda")),
        ("initializer", NormalInitializer(0, 1), NormalInitializer(0, 2)),
        ("initializer", XavierUniformInitializer(), NormalInitializer()),
        ("grad_reduce_by", "worker", "id"),
        ("filter_hook", None, FilterHook("GlobalStepFilter", {"filter_step": 3})),
        ("admit_hook", AdmitHook("ReadOnly"), None),
    ],
)
def test_shared_table_conflicts_name_both_features(field, a, b):
    options = {"first": option(shared_name="tab", **{field: a}), "second": option(shared_name="tab", **{field: b})}
    with pytest.raises(ValueError, match=rf"'first' and 'second' share the table 'tab'.*{field}"):
        EmbeddingEngine(options)


def test_shared_table_allows_per_lookup_differences():
    engine = EmbeddingEngine({
        "a": option(shared_name="t", initializer=NormalInitializer(0, 1)),
        "b": option(shared_name="t", initializer=NormalInitializer(0.0, 1.0), trainable=False, use_weight=False,
                    combiner="tile", combiner_kwargs={"tile_len": 3}),
    })
    assert len(engine.tables) == 1


def test_one_fused_op_per_lookup_and_sparse_gradients_only():
    """Each feature's lookup + combiner is ONE fxrec::table_combine (no [U, dim] gather); the
    gradient reaches the table through the stride-0 anchor only, never a dense table gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    engine = EmbeddingEngine({
        "a": option(embedding_dim=4, shared_name="t", combiner="tile", combiner_kwargs={"tile_len": 3}),
        "b": option(embedding_dim=4, shared_name="t", combiner="mean"),
    })
    x = {"a": ragged_ids([[1, 2, 2], [7]]), "b": ragged_ids([[2, 9], []])}
    with Record() as record:
        out = engine(x)
    combiners = [op for op in record.ops if op.startswith("fxrec.") and "find" not in op
                 and "init_rows" not in op]  # the insert: ids, their initial rows written in place
    assert combiners == ["fxrec.table_combine.default"] * 2
    table = engine.tables["t"]
    assert [p.anchor.stride() for p in table._pending] == [(0, 0), (0, 0)]
    (out["a"].sum() + out["b"].sum()).backward()
    assert table.embedding.grad is None and not table.embedding.requires_grad
    assert {i: g[0] for i, g in grads_by_id(table).items()} == {1: 1.0, 2: 2.5, 7: 1.0, 9: 0.5}


# -- trainable, eval, read-only -----------------------------------------------------------------------------

def test_untrainable_feature_inserts_but_gives_no_grads():
    engine = EmbeddingEngine({
        "frozen": option(shared_name="t", trainable=False),
        "live": option(shared_name="t"),
        "alone": option(shared_name="u", trainable=False),
    })
    out = engine({"frozen": ragged_ids([[1, 2]]), "live": ragged_ids([[2, 3]]), "alone": ragged_ids([[4]])})
    assert not out["frozen"].requires_grad and not out["alone"].requires_grad
    assert len(engine.tables["t"]) == 3 and len(engine.tables["u"]) == 1
    row_of = initial_rows(engine.tables["t"], [1, 2, 3]).get
    assert_near(out["frozen"], *oracle([[1, 2]], None, row_of, 16, "sum", 1, True)[:2])
    (out["frozen"].sum() + out["live"].sum()).backward()
    assert {i: g.tolist() for i, g in grads_by_id(engine.tables["t"]).items()} == {2: [1.0] * 16, 3: [1.0] * 16}
    assert grads_by_id(engine.tables["u"]) == {}


@pytest.mark.parametrize("readonly", ["eval", "admit_hook"])
def test_no_inserts_unseen_ids_are_zero_rows(readonly):
    hook = AdmitHook("ReadOnly") if readonly == "admit_hook" else None
    seen = EmbeddingEngine({"f": option(embedding_dim=4, shared_name="t", combiner="mean")})
    seen({"f": ragged_ids([[1, 2]])})  # training: inserts 1 and 2
    seen.tables["t"].clear_grads()
    engine = EmbeddingEngine({"f": option(embedding_dim=4, shared_name="t", combiner="mean", admit_hook=hook)})
    engine.load_state_dict(seen.state_dict())  # same table name -> same seed and rows
    if readonly == "eval":
        engine.eval()
    rows = [[1, 99], [99], [2, 1, -5], []]
    out = engine({"f": ragged_ids(rows)})
    table = engine.tables["t"]
    assert len(table) == 2 and set(table.state_dict()["ids"].tolist()) == {1, 2}
    row_of = initial_rows(table, [1, 2]).get  # 99 and -5: absent (None -> zero, still counted by mean)
    want, mag, grads, mags = oracle(rows, None, row_of, 4, "mean", 1, True, grad=np.ones((4, 4)))
    assert_near(out["f"], want, mag)
    assert out["f"][1].abs().sum() == 0
    if readonly == "eval":
        assert not out["f"].requires_grad
        assert grads_by_id(table) == {}
    else:  # training with a read-only table: held ids learn, unseen ones get no gradient
        out["f"].sum().backward()
        assert_grads(table, grads, mags)


# -- the batch dict ------------------------------------------------------------------------------------------

def test_pass_through_and_input_untouched():
    engine = EmbeddingEngine({"ids": option(embedding_dim=2)})
    label, tag = torch.tensor([[1.0], [0.0]]), ["x", "y"]
    seq = ragged_ids([[5, 6, 7], []])
    batch = {"label": label, "seq": seq, "ids": ragged_ids([[1], [2, 3]]), "tag": tag}
    snapshot = dict(batch)
    out = engine(batch)
    assert batch == snapshot and list(batch) == ["label", "seq", "ids", "tag"]
    assert list(out) == ["label", "seq", "ids", "tag"] and out is not batch
    assert out["label"] is label and out["tag"] is tag
    assert out["seq"].tolist() == [[5, 6, 7], [0, 0, 0]]
    assert out["ids"].shape == (2, 2)


def test_bad_inputs_name_the_feature():
    engine = EmbeddingEngine({"f": option(embedding_dim=2)})
    with pytest.raises(ValueError, match=r"\['f'\].*not in the batch"):
        engine({"g": ragged_ids([[1]])})
    with pytest.raises(ValueError, match=r"feature 'f' has 2 ragged levels"):
        engine({"f": ragged_strings([[b"ab", b"c"]])})
    with pytest.raises(TypeError, match=r"feature 'f' is a torch.float32 tensor.*int64.*bucketize"):
        engine({"f": torch.rand(3, 1)})
    with pytest.raises(TypeError, match=r"feature 'f' is a torch.int32 tensor"):
        engine({"f": torch.ones(3, 1, dtype=torch.int32)})
    with pytest.raises(TypeError, match=r"feature 'f' has torch.float32 values"):
        engine({"f": RaggedTensor(torch.rand(2), offsets_of([1, 1]))})
    with pytest.raises(ValueError, match=r"feature 'f' is a dense tensor of shape \(2, 2, 2\)"):
        engine({"f": torch.ones(2, 2, 2, dtype=torch.int64)})
    with pytest.raises(TypeError, match=r"feature 'f' must be a RaggedTensor or an int64 tensor, got list"):
        engine({"f": [[1, 2]]})
    with pytest.raises(TypeError, match="samples must be a dict"):
        engine([("f", ragged_ids([[1]]))])


# -- EmbeddingOption -----------------------------------------------------------------------------------------

def test_option_defaults_are_recis():
    o = EmbeddingOption()
    assert (o.embedding_dim, o.block_size, o.dtype, o.device, o.trainable, o.shared_name) == (
        16, 10240, torch.float32, torch.device("cpu"), True, "embedding")
    assert o.initializer == ConstantInitializer(0) and o.use_weight and o.combiner == "sum"
    assert (o.combiner_kwargs, o.grad_reduce_by, o.filter_hook, o.admit_hook) == (None, "worker", None, None)
    assert EmbeddingOption(device="cpu").device == torch.device("cpu")
    assert EmbeddingOption(combiner="tile", combiner_kwargs={"tile_len": 3}, embedding_dim=4).output_width == 12
    assert fxrec.nn.EmbeddingEngine is EmbeddingEngine and fxrec.nn.EmbeddingOption is EmbeddingOption


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(combiner="max"), ValueError, "combiner must be one of"),
        (dict(combiner="tile"), ValueError, r"needs combiner_kwargs \['tile_len'\]"),
        (dict(combiner="tile", combiner_kwargs={}), ValueError, "needs combiner_kwargs"),
        (dict(combiner="tile", combiner_kwargs={"tile_len": 0}), ValueError, "tile_len.*>= 1"),
        (dict(combiner="tile", combiner_kwargs={"tile_len": True}), ValueError, "tile_len.*int"),
        (dict(combiner="tile", combiner_kwargs={"tile_len": 2, "pad": 0}), ValueError, r"unknown \['pad'\]"),
        (dict(combiner="sum", combiner_kwargs={"tile_len": 2}), ValueError, r"unknown \['tile_len'\]"),
        (dict(combiner="mean", combiner_kwargs=[("tile_len", 2)]), TypeError, "combiner_kwargs must be a dict"),
        (dict(embedding_dim=0), ValueError, "embedding_dim"),
        (dict(embedding_dim=2.0), ValueError, "embedding_dim"),
        (dict(embedding_dim=True), ValueError, "embedding_dim"),
        (dict(block_size=0), ValueError, "block_size"),
        (dict(dtype=torch.int64), TypeError, "dtype must be a floating"),
        (dict(dtype="float32"), TypeError, "dtype must be a floating"),
        (dict(device="nowhere"), TypeError, "device"),
        (dict(trainable=1), TypeError, "trainable must be a bool"),
        (dict(use_weight=None), TypeError, "use_weight must be a bool"),
        (dict(shared_name=""), TypeError, "shared_name"),
        (dict(shared_name=3), TypeError, "shared_name"),
        (dict(initializer=torch.nn.init.normal_), TypeError, "initializer"),
        (dict(grad_reduce_by="mean"), ValueError, "grad_reduce_by"),
        (dict(filter_hook="GlobalStepFilter"), TypeError, "filter_hook"),
        (dict(admit_hook="ReadOnly"), TypeError, "admit_hook"),
    ],
)
def test_option_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        EmbeddingOption(**kwargs)


def test_engine_validation():
    with pytest.raises(TypeError, match="options must be a dict"):
        EmbeddingEngine([("f", EmbeddingOption())])
    with pytest.raises(TypeError, match="feature 'f': expected an EmbeddingOption"):
        EmbeddingEngine({"f": {"embedding_dim": 8}})
    with pytest.raises(ValueError, match=r"feature 'f': shared_name 'a.b' must not contain '\.'"):
        EmbeddingEngine({"f": EmbeddingOption(shared_name="a.b")})


# -- the seed tutorial ------------------------------------------------------------------------------------------



def test_seed_tutorial_widths():
    """FeatureEngine -> EmbeddingEngine on a small batch gives the widths the DenseModel concatenates.
    ``dense2`` is a float column, but its Bucketize makes it int64 [B, 1] ids (one per row)."""
    b = 3
    batch = {
        "label": torch.tensor([[1.0], [0.0], [1.0]]),
        "dense1": torch.rand(b, 8),
        "dense2": torch.tensor([[0.7], [0.2], [1.5]]),
        "sparse1": ragged_ids([[2], [1], [0]]),
        "sparse2": ragged_ids([[0], [1], [2]]),
        "sparse3": ragged_ids([[10001], [2], [3]]),
        "sparse4": ragged_ids([[1, 2, 3], [], list(range(1200))]),
        "sparse5": ragged_strings([[b"abc", b"de"], [b"x" * 10], []]),
    }
    features = FeatureEngine(get_feature_conf())(batch)
    assert features["dense2"].dtype == torch.int64 and features["dense2"].tolist() == [[2], [1], [3]]
    engine = EmbeddingEngine(get_embedding_conf(device=torch.device("cpu")))
    samples = engine(features)
    widths = {k: samples[k].shape for k in samples}
    assert widths == {"label": (b, 1), "dense1": (b, 8), "dense2": (b, 8), "sparse1": (b, 8), "sparse2": (b, 16),
                      "sparse3": (b, 8), "sparse4": (b, 16000), "sparse5": (b, 16000), "sparse1_x_sparse2": (b, 16)}
    # dense2's bucket ids share sparse1's table: bucket 2 (row 0) is sparse1's id 2 (row 0)
    torch.testing.assert_close(samples["dense2"][0], samples["sparse1"][0], rtol=0, atol=0)
    assert len(engine.tables["sparse1"]) == 4  # ids {0, 1, 2} from sparse1 and {2, 1, 3} from dense2
    dense_input = torch.cat([samples[k] for k in ("dense1", "dense2", "sparse1", "sparse2", "sparse3", "sparse4",
                                                  "sparse5", "sparse1_x_sparse2")], -1)
    assert dense_input.shape == (b, 8 + 8 + 8 + 16 + 8 + 16000 + 16000 + 16)
    logits = torch.sigmoid(nn.Linear(dense_input.shape[1], 1)(dense_input))
    nn.BCELoss()(logits.squeeze(), samples["label"].squeeze()).backward()
    tables = filter_out_sparse_param(engine)
    assert sorted(tables) == ["sparse1", "sparse1_x_sparse2", "sparse2", "sparse3", "sparse4", "sparse5"]
    rows, grads = tables["sparse4"].take_grads()
    rows, grads = rows[rows >= 0], grads[rows >= 0]  # -1: padding
    assert rows.numel() == len(tables["sparse4"]) and grads.shape == (rows.numel(), 16)


# -- the engine's FX graph ------------------------------------------------------------------------------

def test_graph_module_built_at_construction():
    from fxrec.passes import op_counts

    engine = EmbeddingEngine(get_embedding_conf(device=torch.device("cpu"), tile_len=2))
    gm = engine.graph_module
    assert isinstance(gm, torch.fx.GraphModule)
    gm.graph.lint()
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == list(engine.options)
    assert op_counts(gm) == {"table_lookup": 7, "table_combine": 7}
    # the graph shares the engine's tables, which appear once in state_dict and modules()
    assert gm.tables.sparse1 is engine.tables["sparse1"]
    assert not any(k.startswith("graph_module") for k in engine.state_dict())
    assert sum(isinstance(m, HashTable) for m in engine.modules()) == len(engine.tables)
    engine.eval()
    assert not gm.tables.sparse1.training


def test_every_feature_checked_before_any_lookup():
    engine = EmbeddingEngine({"a": option(embedding_dim=2, shared_name="x"), "b": option(embedding_dim=2, shared_name="y")})
    with pytest.raises(TypeError, match="feature 'b' is a torch.float32 tensor"):
        engine({"a": torch.tensor([1, 2]), "b": torch.tensor([1.0])})
    assert len(engine.tables["x"]) == 0 and not engine.tables["x"]._pending

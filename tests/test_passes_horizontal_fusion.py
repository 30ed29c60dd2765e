"""fxrec.passes.horizontal_fusion: node counts, outputs equal to the unrewritten graph, purity."""

from __future__ import annotations

import operator
import random

import pytest
import torch
import torch._dynamo
import torch.fx
from hypothesis import event, given
from hypothesis import strategies as st
from torch._dynamo.utils import counters
from torch.utils._pytree import tree_leaves, tree_map

from examples.deepctr.features import get_feature_conf
from fxrec.features import graph as G
from fxrec.features.feature import Feature
from fxrec.features.feature_engine import FeatureEngine
from fxrec.features.op import Bucketize, FeatureCross, Hash, Mod, SelectField, SelectFields, SequenceTruncate
from fxrec.passes import DEFAULT_PASSES, explain, horizontal_fusion, op_counts, run_passes
from fxrec.ragged import RaggedTensor
from fxrec.utils.dynamic import dynamic_batch
from raggedutil import ragged_ids, ragged_strings

ops = torch.ops.fxrec
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def assert_same_outputs(expected: dict, got: dict) -> None:
    """Same keys, same kinds, values / offsets / weights equal (integers exact, NaN == NaN)."""
    assert expected.keys() == got.keys()
    for key in expected:
        a, b = expected[key], got[key]
        assert type(a) is type(b), key
        if isinstance(a, RaggedTensor):
            assert (a.weight() is None) == (b.weight() is None), key
            assert len(a.offsets()) == len(b.offsets()), key
        la, lb = tree_leaves(a), tree_leaves(b)
        assert len(la) == len(lb), key
        for x, y in zip(la, lb):
            assert x.dtype == y.dtype and x.shape == y.shape, key
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=key)


# -- the tutorial's features ----------------------------------------------------------------------

SEQ_LEN = 4


@pytest.fixture(scope="module")
def seed_gm():
    return FeatureEngine(get_feature_conf(seq_len=SEQ_LEN)).graph_module


def seed_batch(rng: random.Random, b: int) -> dict:
    def id_rows(max_len):
        return [[rng.randint(INT64_MIN, INT64_MAX) for _ in range(rng.randint(0, max_len))] for _ in range(b)]

    strings = [[bytes(rng.randrange(256) for _ in range(rng.randint(0, 20))) for _ in range(rng.randint(0, 6))]
               for _ in range(b)]
    return {
        "label": torch.rand(b, 1),
        "dense1": torch.rand(b, 8),
        "dense2": torch.rand(b, 1).mul_(1.5),
        "sparse1": ragged_ids(id_rows(3)),
        "sparse2": ragged_ids(id_rows(3)),
        "sparse3": ragged_ids(id_rows(3)),
        "sparse4": ragged_ids(id_rows(9)),
        "sparse5": ragged_strings(strings),
    }


def test_seed_graph_op_counts(seed_gm):
    fused = horizontal_fusion(seed_gm)
    assert op_counts(seed_gm) == {
        "bucketize": 1, "hash_bytes|hash_int64": 1, "mod": 4, "sequence_truncate": 2, "feature_cross": 1,
    }
    # one launch per op type and level, as bench/feature_ops.py's hand-written stage_multi
    assert op_counts(fused) == {
        "bucketize": 1, "hash_bytes|hash_int64": 1, "mod_multi": 1, "sequence_truncate_multi": 1, "feature_cross": 1,
    }
    (mod_multi,) = [n for n in fused.graph.nodes if n.target is ops.mod_multi.default]
    assert mod_multi.args[1] == [10000, 10000, 10000, 1000]
    (trunc,) = [n for n in fused.graph.nodes if n.target is ops.sequence_truncate_multi.default]
    assert trunc.args[3:] == ([SEQ_LEN, SEQ_LEN], [False, False])
    fused.graph.lint()
    placeholders = [n.name for n in fused.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["dense1", "dense2", "sparse1", "sparse2", "sparse3", "sparse4", "sparse5"]


def test_pure_idempotent_and_keeps_buffers(seed_gm):
    code, nodes = seed_gm.code, len(seed_gm.graph.nodes)
    once = horizontal_fusion(seed_gm)
    assert seed_gm.code == code and len(seed_gm.graph.nodes) == nodes  # the input is not touched
    assert once is not seed_gm and once.graph is not seed_gm.graph
    twice = horizontal_fusion(once)
    assert twice.code == once.code and twice is not once
    assert run_passes(seed_gm).code == once.code and DEFAULT_PASSES == (horizontal_fusion,)
    # bucket boundaries stay non-persistent buffers: .to(device) moves them, checkpoints skip them
    assert [b.tolist() for b in once.buffers()] == [[0.0, 0.5, 1.0]] and once.state_dict() == {}


def test_seed_outputs_equal_unrewritten():
    rng = random.Random(0)
    plain = FeatureEngine(get_feature_conf(seq_len=SEQ_LEN))
    fused = FeatureEngine(get_feature_conf(seq_len=SEQ_LEN), passes=True)
    assert op_counts(fused.graph_module)["mod_multi"] == 1
    for b in [0, 1, 2, 5, 9]:
        batch = seed_batch(rng, b)
        assert_same_outputs(plain(batch), fused(batch))


def test_feature_engine_passes_argument():
    features = get_feature_conf(seq_len=SEQ_LEN)
    assert "mod_multi" not in op_counts(FeatureEngine(features).graph_module)  # off by default
    assert op_counts(FeatureEngine(features, passes=[horizontal_fusion]).graph_module)["mod_multi"] == 1
    assert op_counts(FeatureEngine(features, passes=()).graph_module)["mod"] == 4
    with pytest.raises(TypeError, match="passes"):
        FeatureEngine(features, passes=["horizontal_fusion"])
    with pytest.raises(TypeError, match="GraphModule"):
        horizontal_fusion(FeatureEngine(features))


def test_bad_inputs_still_name_the_feature():
    features = [
        Feature("a").add_op(SelectField("x")).add_op(Mod(10)),
        Feature("b").add_op(SelectField("y")).add_op(Mod(7)),
        Feature("c").add_op(SelectField("x")).add_op(Bucketize([0.0])),
        Feature("d").add_op(SelectField("y")).add_op(Bucketize([1.0])),
        Feature("e").add_op(SelectField("x")).add_op(SequenceTruncate(seq_len=1)),
        Feature("f").add_op(SelectField("y")).add_op(SequenceTruncate(seq_len=2)),
    ]
    engine = FeatureEngine(features, passes=True)
    assert op_counts(engine.graph_module) == {"mod_multi": 1, "bucketize_multi": 1, "sequence_truncate_multi": 1}
    good = {"x": ragged_ids([[1, 2], []]), "y": ragged_ids([[-1], [3, 4, 5]])}
    assert_same_outputs(FeatureEngine(features)(good), engine(good))
    with pytest.raises(TypeError, match=r"feature 'b' \(Mod\).*int64.*int8"):
        engine({**good, "y": RaggedTensor(torch.zeros(4, dtype=torch.int8), torch.tensor([0, 1, 4]))})
    with pytest.raises(ValueError, match=r"feature 'f' \(SequenceTruncate\).*ragged"):
        engine({**good, "y": torch.zeros(2, 3, dtype=torch.int64)})
    features[3] = Feature("d").add_op(SelectField("s")).add_op(Bucketize([1.0]))
    with pytest.raises(TypeError, match=r"feature 'd' \(Bucketize\).*int8"):
        FeatureEngine(features, passes=True)({**good, "s": ragged_strings([[b"ab"], []])})


def test_explain_table(capsys):
    engine = FeatureEngine(get_feature_conf(seq_len=SEQ_LEN), passes=True)
    text = explain(engine, print_=True)  # an engine with passes on: "before" is its config graph
    assert capsys.readouterr().out.strip() == text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:]}
    assert rows["mod"] == ["4", "0"] and rows["mod_multi"] == ["0", "1"]
    assert rows["sequence_truncate"] == ["2", "0"] and rows["sequence_truncate_multi"] == ["0", "1"]
    assert rows["total"] == ["9", "5"]
    with_code = explain(engine.graph_module, passes=[], code=True)
    assert "before:" in with_code and "torch.ops.fxrec.mod_multi.default" in with_code


@pytest.mark.slow
def test_compiled_rewritten_engine_one_graph():
    torch._dynamo.reset()
    counters.clear()
    plain = FeatureEngine(get_feature_conf(seq_len=SEQ_LEN))
    compiled = torch.compile(FeatureEngine(get_feature_conf(seq_len=SEQ_LEN), passes=True), fullgraph=True)
    rng = random.Random(1)
    for b in [5, 1, 0, 3]:
        batch = seed_batch(rng, b)
        expected = plain(batch)
        assert_same_outputs(expected, compiled(dynamic_batch(batch)))
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0


@pytest.mark.gpu
def test_seed_outputs_equal_unrewritten_cuda():
    rng = random.Random(2)
    plain = FeatureEngine(get_feature_conf(seq_len=SEQ_LEN))
    fused = FeatureEngine(get_feature_conf(seq_len=SEQ_LEN), passes=True).cuda()
    plain_cuda = FeatureEngine(get_feature_conf(seq_len=SEQ_LEN)).cuda()
    for b in [0, 1, 7, 64]:
        batch = seed_batch(rng, b)
        cuda_batch = tree_map(lambda t: t.cuda(), batch)
        got = fused(cuda_batch)
        assert_same_outputs(plain_cuda(cuda_batch), got)
        assert_same_outputs(plain(batch), tree_map(lambda t: t.cpu(), got))  # CUDA == CPU, bit for bit


# -- random feature sets and batches --------------------------------------------------------------

# Columns of every generated batch: ragged ids (one with weights), ragged strings, dense floats,
# dense ids. Generated features pick columns and chains of ops valid for what they read.
COLUMNS = {"i0": "ids", "i1": "ids", "w0": "ids", "s0": "strings", "s1": "strings", "f0": "floats", "d0": "dense_ids"}

mods = st.builds(Mod, st.sampled_from([1, 7, 10000, 2**63 - 1]))
hashes = st.builds(Hash, st.sampled_from(["farm", "murmur"]))
bucketizes = st.builds(Bucketize, st.sampled_from([[0.0], [-1.0, 0.5, 2.0], [-5.0, 0.0, 1e3, 1e18]]))
truncates = st.builds(
    SequenceTruncate,
    seq_len=st.integers(1, 6),
    truncate_side=st.sampled_from(["left", "right"]),
)


@st.composite
def id_chain(draw, ragged: bool, max_ops: int = 3) -> list:
    """Ops on int64 ids (ragged: truncation too)."""
    choices = [mods, hashes, bucketizes] + ([truncates] if ragged else [])
    return [draw(st.one_of(choices)) for _ in range(draw(st.integers(0, max_ops)))]


@st.composite
def features(draw, index: int) -> Feature:
    kind = draw(st.sampled_from(["ids", "strings", "floats", "dense_ids", "cross"]))
    f = Feature(f"f{index}")
    if kind == "cross":
        x, y = draw(st.sampled_from([("i0", "i1"), ("i1", "w0"), ("w0", "i0")]))
        f.add_op(SelectFields([SelectField(x), SelectField(y)])).add_op(FeatureCross())
        ops_ = draw(id_chain(ragged=True))
    else:
        column = draw(st.sampled_from([c for c, k in COLUMNS.items() if k == kind]))
        f.add_op(SelectField(column))
        if kind == "strings":
            # strings become ids through Hash; a 3-D truncation (lists of strings) may come first
            head = [SequenceTruncate(seq_len=draw(st.integers(1, 3)), n_dims=3)] if draw(st.booleans()) else []
            ops_ = head + [draw(hashes)] + draw(id_chain(ragged=True))
        elif kind == "floats":
            ops_ = [draw(bucketizes)] + draw(id_chain(ragged=False)) if draw(st.booleans()) else []
        else:
            ops_ = draw(id_chain(ragged=kind == "ids"))
    if kind in ("ids", "cross") and draw(st.booleans()):
        ops_.append(SequenceTruncate(seq_len=1000, truncate=False, check_length=True))  # no row is longer
    for op in ops_:
        f.add_op(op)
    return f


@st.composite
def feature_sets(draw) -> list:
    return [draw(features(i)) for i in range(draw(st.integers(1, 7)))]


id_values = st.one_of(st.integers(INT64_MIN, INT64_MAX), st.integers(-3, 3), st.sampled_from([INT64_MIN, INT64_MAX]))


@st.composite
def batches(draw) -> dict:
    b = draw(st.sampled_from([0, 1, 1, 2, 3, 5]))

    def rows(elements, max_len):
        long = draw(st.booleans())  # some rows far over every seq_len
        return [draw(st.lists(elements, max_size=max_len * (4 if long else 1))) for _ in range(b)]

    w_rows = rows(id_values, 4)
    weights = [[float(draw(st.integers(-4, 4))) / 2 for _ in r] for r in w_rows]
    floats = st.sampled_from([-1.0, 0.0, 0.5, 2.0, 1e18, float("nan"), float("inf"), -float("inf")])
    return {
        "label": torch.zeros(b, 1),
        "i0": ragged_ids(rows(id_values, 5)),
        "i1": ragged_ids(rows(id_values, 3)),
        "w0": ragged_ids(w_rows, weights),
        "s0": ragged_strings(rows(st.binary(max_size=20), 3)),
        "s1": ragged_strings(rows(st.binary(max_size=70), 2)),
        "f0": torch.tensor([[draw(floats) for _ in range(2)] for _ in range(b)], dtype=torch.float32).reshape(b, 2),
        "d0": torch.tensor([[draw(id_values) for _ in range(3)] for _ in range(b)], dtype=torch.int64).reshape(b, 3),
    }


@given(feature_list=feature_sets(), batch=batches())
def test_random_features_equal_unrewritten(feature_list, batch):
    plain = FeatureEngine(feature_list)
    before = op_counts(plain.graph_module)
    gm = plain.graph_module
    code = gm.code
    fused_gm = horizontal_fusion(gm)
    assert gm.code == code
    fused_gm.graph.lint()
    assert horizontal_fusion(fused_gm).code == fused_gm.code
    after = op_counts(fused_gm)
    # every single op either stays or went into a multi op of its type
    for single, multi in [("mod", "mod_multi"), ("bucketize", "bucketize_multi"),
                          ("sequence_truncate", "sequence_truncate_multi")]:
        assert after[single] + 2 * after[multi] <= before[single]
        if before[single] and not after[single]:
            assert after[multi] >= 1
    for kept in ("feature_cross", "sequence_truncate_3d"):
        assert after[kept] == before[kept]
    event(f"multi-tensor nodes: {sum(n for op, n in after.items() if op.endswith('_multi'))}")
    fused = FeatureEngine(feature_list, passes=True)
    assert fused.graph_module.code == fused_gm.code
    assert_same_outputs(plain(batch), fused(batch))


# -- hand-built graphs: what must not fuse --------------------------------------------------------


def _module(graph: torch.fx.Graph) -> torch.fx.GraphModule:
    graph.lint()
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def test_dependent_ops_do_not_fuse_and_crossing_chains_stay_acyclic():
    g = torch.fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    m1 = g.call_function(ops.mod.default, (a, 1000))
    m2 = g.call_function(ops.mod.default, (m1, 7))  # depends on m1: never in m1's group
    ha = g.call_function(ops.hash_int64.default, (m2, "farm"))  # a: mod -> mod -> hash
    hb = g.call_function(ops.hash_int64.default, (b, "murmur"))
    mb = g.call_function(ops.mod.default, (hb, 10))  # b: hash -> mod (crosses a's chain)
    g.output((ha, mb))
    gm = _module(g)
    fused = horizontal_fusion(gm)
    fused.graph.lint()
    # m1 first (longest chain after it), then m2 (ties broken by graph order), then both hashes
    # in one node (all remaining hashes ready), then mb: 4 launches, as good as any schedule.
    assert op_counts(fused) == {"mod": 3, "hash_int64_multi": 1}
    x = torch.tensor([-1, 5, 2**62, INT64_MIN])
    y = torch.tensor([[3, -3], [0, INT64_MAX]])
    for u, v in zip(gm(x, y), fused(x, y)):
        assert torch.equal(u, v)


def test_tuple_output_used_whole_is_left_alone():
    g = torch.fx.Graph()
    v1, o1, v2, o2 = (g.placeholder(n) for n in ("v1", "o1", "v2", "o2"))
    t1 = g.call_function(ops.sequence_truncate.default, (v1, o1, None, 2, True))
    t2 = g.call_function(ops.sequence_truncate.default, (v2, o2, None, 1, False))
    t3 = g.call_function(ops.sequence_truncate.default, (v2, o2, None, 3, True))
    g.output((t1, g.call_function(operator.getitem, (t2, 0)), g.call_function(operator.getitem, (t3, -1))))
    gm = _module(g)
    fused = horizontal_fusion(gm)
    assert op_counts(fused) == {"sequence_truncate": 1, "sequence_truncate_multi": 1}
    args = (torch.arange(6), torch.tensor([0, 3, 3, 6]), torch.arange(5) * -1, torch.tensor([0, 1, 5]))
    expected, got = gm(*args), fused(*args)
    for u, v in zip(tree_leaves(expected), tree_leaves(got)):
        assert torch.equal(u, v)


def test_hash_helper_groups_split_strings_from_ids():
    strings = ragged_strings([[b"ab", b""], [b"xyz"]])
    ids = torch.tensor([[1, -2], [INT64_MAX, 0]])
    values = [strings.values(), ids, strings.values(), ids]
    offsets = [strings.offsets()[1], None, strings.offsets()[1], None]
    types = ["farm", "murmur", "murmur", "farm"]
    got = G.hash_ids_multi(values, offsets, types)
    for out, v, o, t in zip(got, values, offsets, types):
        assert torch.equal(out, G.hash_ids(v, o, t))
    assert G.hash_ids_multi([], [], []) == []


def test_graph_with_a_mutating_op_is_left_alone():
    g = torch.fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    m1 = g.call_function(ops.mod.default, (a, 10))
    m2 = g.call_function(ops.mod.default, (b, 10))
    g.call_function(torch.ops.aten.add_.Tensor, (a, 1))  # writes a: order matters beyond data edges
    g.output((m1, m2))
    gm = _module(g)
    fused = horizontal_fusion(gm)
    assert fused.code == gm.code and op_counts(fused) == {"mod": 2}

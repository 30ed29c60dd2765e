"""fxrec::table_combine_multi and fxrec::segment_combine_backward_multi (fxrec/ops/combine.py):
every feature that reads one (table, rows, anchor) in one op, whose backward is ONE ``[U, dim]``
gradient.

The oracle is the single-feature ``fxrec::table_combine`` (itself tested against numpy in
tests/test_ops_table_combine.py), one call per feature: outputs equal bit for bit, the anchor's
gradient equals the sum autograd forms of the per-feature gradients (within rounding: the multi
op sums in one buffer, in another order). The backward op is checked against the sum of
``segment_combine_backward`` per feature, its Triton launcher (interpreter on CPU, or the GPU)
against its CPU kernel."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxrec.ops.triton.combine import segment_combine_backward_multi_triton, table_combine_multi_triton
from test_ops_table_combine import ANCHORS, COMBINERS, ROW_LOOKUPS, TRITON_DEVICE, make_anchor, row_lookup_mode, to_cuda

table_combine = torch.ops.fxrec.table_combine
table_combine_multi = torch.ops.fxrec.table_combine_multi
combine_backward = torch.ops.fxrec.segment_combine_backward
combine_backward_multi = torch.ops.fxrec.segment_combine_backward_multi


# -- inputs --------------------------------------------------------------------------------------

@st.composite
def multi_cases(draw, max_features=4, max_rows=6, max_len=12, max_dim=6, max_unique=8, max_table=10):
    """Python-side data: (table, rows, anchor kind, anchor values, [(index, offsets, weight,
    combiner, tile_len) per feature]): features of any batch size (0 and 1 included), empty rows,
    -1 entries, duplicates, items outside every row, weights of every kind (None for some)."""
    n_table, n_unique, dim = draw(st.integers(0, max_table)), draw(st.integers(0, max_unique)), draw(st.integers(1, max_dim))
    gen = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = draw(st.lists(st.integers(-1, n_table - 1), min_size=n_unique, max_size=n_unique))
    features = []
    for _ in range(draw(st.integers(1, max_features))):
        n_rows = draw(st.sampled_from([0, 1, 2, max_rows]))
        lengths = draw(st.lists(st.integers(0, max_len), min_size=n_rows, max_size=n_rows))
        lead, trail = draw(st.integers(0, 2)), draw(st.integers(0, 2))
        n_items = lead + sum(lengths) + trail
        index = draw(st.lists(st.integers(-1, n_unique - 1), min_size=n_items, max_size=n_items))
        offsets = list(np.cumsum([lead, *lengths]))
        weight = {
            "none": None,
            "random": gen.uniform(0.0, 2.0, n_items),
            "some_zeros": gen.uniform(0.0, 2.0, n_items) * (gen.random(n_items) < 0.5),
        }[draw(st.sampled_from(["none", "random", "some_zeros"]))]
        features.append((index, offsets, weight, draw(st.sampled_from(COMBINERS)), draw(st.integers(1, 4))))
    anchor_kind = draw(st.sampled_from([k for k in ANCHORS if k != "none"]))
    anchor = {
        "dense": gen.standard_normal((n_unique, dim)),
        "zeros": np.zeros((n_unique, dim)),
        "broadcast": np.broadcast_to(gen.standard_normal((1, dim)), (n_unique, dim)),
    }[anchor_kind]
    return gen.standard_normal((n_table, dim)), rows, anchor_kind, anchor, features


def as_tensors(case, dtype=torch.float32, device="cpu"):
    """``(table, rows, anchor, index, offsets, weight, combiner, tile_len)``, the last five lists."""
    table, rows, anchor_kind, anchor, features = case

    def t(x, dt):
        return torch.tensor(np.asarray(x), dtype=dt, device=device)

    return (
        t(table, dtype), t(rows, torch.int64), make_anchor(anchor_kind, anchor, dtype, device),
        [t(f[0], torch.int64) for f in features], [t(f[1], torch.int64) for f in features],
        [None if f[2] is None else t(f[2], torch.float32) for f in features],
        [f[3] for f in features], [f[4] for f in features],
    )


def per_feature(args):
    """The oracle's calls: ``[(table, rows, anchor, index, offsets, weight, combiner, tile_len)]``."""
    table, rows, anchor, *lists = args
    return [(table, rows, anchor, *feature) for feature in zip(*lists)]


def output_grads(outputs, seed, sliced=False):
    """Random gradients of ``outputs``, not contiguous, as autograd may hand them over: transposed,
    or (``sliced``) column slices of wider ones, as a concatenation's backward does."""
    gen = torch.Generator().manual_seed(seed)
    if sliced:
        return [torch.randn((o.shape[0], o.shape[1] + 3), generator=gen, dtype=o.dtype)[:, 2:o.shape[1] + 2]
                for o in outputs]
    return [torch.randn(tuple(reversed(o.shape)), generator=gen, dtype=o.dtype).t() for o in outputs]


# -- forward and backward vs table_combine per feature -------------------------------------------

@given(multi_cases(), st.integers(0, 2**32 - 1))
def test_matches_table_combine_per_feature(case, seed):
    args = as_tensors(case)
    outputs = table_combine_multi(*args)
    expected = [table_combine(*f) for f in per_feature(args)]
    assert len(outputs) == len(expected)
    for out, exp in zip(outputs, expected):
        assert out.dtype == exp.dtype and out.shape == exp.shape
        torch.testing.assert_close(out, exp, rtol=0, atol=0)  # the same computation per feature
    # the anchor's gradient: ONE [U, dim] tensor, the per-feature gradients' sum
    grads = output_grads(outputs, seed)
    table, rows, anchor, *_ = args
    multi_anchor, oracle_anchor = anchor.detach().requires_grad_(), anchor.detach().requires_grad_()
    torch.autograd.backward(table_combine_multi(table, rows, multi_anchor, *args[3:]), grads)
    oracle = [table_combine(table, rows, oracle_anchor, *f[3:]) for f in per_feature(args)]
    torch.autograd.backward(oracle, grads)
    assert multi_anchor.grad.shape == (rows.shape[0], table.shape[1]) and multi_anchor.grad.is_contiguous()
    torch.testing.assert_close(multi_anchor.grad, oracle_anchor.grad, rtol=1e-5, atol=1e-5)


@given(multi_cases(), st.integers(0, 2**32 - 1))
def test_backward_multi_is_the_sum_of_backwards(case, seed):
    table, rows, _, index, offsets, weight, combiner, tile_len = as_tensors(case, dtype=torch.float64)
    outputs = table_combine_multi(table, rows, None, index, offsets, weight, combiner, tile_len)
    grads = output_grads(outputs, seed)
    got = combine_backward_multi(grads, index, offsets, weight, combiner, tile_len, rows.shape[0])
    expected = sum(combine_backward(*f, rows.shape[0]) for f in zip(grads, index, offsets, weight, combiner, tile_len))
    assert got.dtype == torch.float64 and got.shape == (rows.shape[0], table.shape[1])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_unused_outputs_add_nothing():
    args = as_tensors(gradcheck_case(weights="mixed"), dtype=torch.float64)
    table, rows, anchor, *lists = args
    for used in ([0], [1, 2], [2]):
        multi_anchor, oracle_anchor = anchor.detach().requires_grad_(), anchor.detach().requires_grad_()
        outputs = table_combine_multi(table, rows, multi_anchor, *lists)
        sum(outputs[f].square().sum() for f in used).backward()
        sum(table_combine(table, rows, oracle_anchor, *per_feature(args)[f][3:]).square().sum() for f in used).backward()
        torch.testing.assert_close(multi_anchor.grad, oracle_anchor.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradient_rounds_once(dtype):
    # One float32 accumulation buffer for every feature, cast once: at least as close to the
    # float64 gradient as autograd's per-feature half gradients added in half precision.
    args = as_tensors(gradcheck_case(weights="mixed"))
    table, rows, anchor, *lists = args
    grads = [g.to(dtype) for g in output_grads(table_combine_multi(*args), 3)]
    exact = combine_backward_multi([g.double() for g in grads], *lists, rows.shape[0])
    got = combine_backward_multi(grads, *lists, rows.shape[0])
    assert got.dtype == dtype
    per_feature_sum = sum(combine_backward(g, *f[3:], rows.shape[0]) for g, f in zip(grads, per_feature(args)))
    assert (got.double() - exact).abs().max() <= (per_feature_sum.double() - exact).abs().max()


# -- autograd ------------------------------------------------------------------------------------

def gradcheck_case(weights: str):
    """Three features of one (table, rows, anchor): sum, mean, tile; duplicates, -1 entries and rows,
    an empty row, a row longer than tile_len, a row whose weights sum to 0, a batch of one row.
    ``weights``: "none", "all" (every feature weighted) or "mixed" (a None among them)."""
    gen = np.random.default_rng(1)
    table, rows = gen.standard_normal((7, 3)), [6, 0, -1, 2, 0]
    w_mean = gen.uniform(0.5, 1.5, 12)
    w_mean[9:11] = [1.0, -1.0]
    features = [
        ([4, 0, 1, 0, -1, 2, 0, 3, 3, -1, 1, 4], [1, 4, 4, 9, 11], w_mean, "mean", 1),
        ([3, 3, -1, 1], [0, 4], gen.uniform(0.5, 1.5, 4), "sum", 1),
        ([0, 4, -1, 2, 2, 1], [0, 3, 3, 6], gen.uniform(0.5, 1.5, 6), "tile", 2),
    ]
    if weights == "none":
        features = [(i, o, None, c, t) for i, o, _, c, t in features]
    elif weights == "mixed":
        features[1] = (*features[1][:2], None, *features[1][3:])
    return table, rows, "dense", gen.standard_normal((5, 3)), features


@pytest.mark.parametrize("anchor_kind", ["dense", "zeros"])
@pytest.mark.parametrize("weights", ["none", "all", "mixed"])
def test_gradcheck_anchor(weights, anchor_kind):
    table, rows, anchor, *lists = as_tensors(gradcheck_case(weights), dtype=torch.float64)
    if anchor_kind == "zeros":  # HashTable's anchor; gradcheck perturbs a dense copy
        anchor = torch.zeros((), dtype=torch.float64).expand(5, 3).clone()
    anchor.requires_grad_()

    def fn(a):
        return tuple(table_combine_multi(table, rows, a, *lists))

    assert torch.autograd.gradcheck(fn, (anchor,))
    assert torch.autograd.gradgradcheck(fn, (anchor,))


def test_table_and_weight_requiring_grad_raise_on_backward():
    table, rows, anchor, index, offsets, weight, combiner, tile_len = as_tensors(gradcheck_case("mixed"),
                                                                                 dtype=torch.float64)
    anchor.requires_grad_()
    out = table_combine_multi(table.requires_grad_(), rows, anchor, index, offsets, weight, combiner, tile_len)
    with pytest.raises(RuntimeError, match="table gets no gradient"):
        out[0].sum().backward()
    for weights in (weight, [w if w is not None else torch.ones(4, dtype=torch.float64) for w in weight]):
        needs_grad = [weights[0].requires_grad_(), *weights[1:]]
        out = table_combine_multi(table.detach(), rows, anchor, index, offsets, needs_grad, combiner, tile_len)
        with pytest.raises(RuntimeError, match="weights are data"):
            out[1].sum().backward()
        weights[0].requires_grad_(False)


def test_no_anchor_no_grad():
    table, rows, _, *lists = as_tensors(gradcheck_case("none"))
    assert not any(o.requires_grad for o in table_combine_multi(table, rows, None, *lists))


# -- validation ----------------------------------------------------------------------------------

def valid_args():
    return dict(table=torch.randn(4, 2), rows=torch.tensor([3, -1, 0]), anchor=torch.zeros(3, 2),
                index=[torch.tensor([0, 2, -1]), torch.tensor([1])], offsets=[torch.tensor([0, 1, 3]), torch.tensor([0, 1])],
                weight=[None, torch.ones(1)], combiner=["sum", "tile"], tile_len=[1, 2])


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(index=[], offsets=[], weight=[], combiner=[], tile_len=[]), ValueError, "at least one feature"),
        (dict(offsets=[torch.tensor([0, 1, 3])]), ValueError, "offsets has 1 entries for 2 features"),
        (dict(weight=[None]), ValueError, "weight has 1 entries"),
        (dict(combiner=["sum"]), ValueError, "combiner has 1 entries"),
        (dict(tile_len=[1, 2, 3]), ValueError, "tile_len has 3 entries"),
        (dict(combiner=["sum", "max"]), ValueError, r"feature 1\): combiner"),
        (dict(tile_len=[1, 0]), ValueError, r"feature 1\): tile_len"),
        (dict(table=torch.zeros(4, 2, dtype=torch.int64)), TypeError, "table"),
        (dict(rows=torch.tensor([4, -1, 0])), ValueError, "rows"),
        (dict(anchor=torch.zeros(2, 2)), ValueError, "anchor"),
        (dict(index=[torch.tensor([0, 2, -1]), torch.tensor([3])]), ValueError, r"feature 1\).*index"),
        (dict(offsets=[torch.tensor([0, 1, 3]), torch.tensor([0, 2])]), ValueError, r"feature 1\).*offsets"),
        (dict(weight=[torch.ones(2), None]), ValueError, r"feature 0\): weight"),
    ],
)
def test_bad_arguments_raise(change, error, match):
    with pytest.raises(error, match=match):
        table_combine_multi(**{**valid_args(), **change})


def test_backward_multi_bad_arguments_raise():
    index, offsets = [torch.tensor([0, 1]), torch.tensor([1])], [torch.tensor([0, 2]), torch.tensor([0, 1])]
    ok = dict(grad=[torch.ones(1, 2), torch.ones(1, 4)], index=index, offsets=offsets, weight=[None, None],
              combiner=["sum", "tile"], tile_len=[1, 2], num_rows=2)
    assert combine_backward_multi(**ok).tolist() == [[1, 1], [2, 2]]
    for change, match in (
        (dict(grad=[torch.ones(1, 2), torch.ones(1, 2)]), "one embedding dim"),  # tile: dim 1
        (dict(grad=[torch.ones(1, 2), torch.ones(1, 4, dtype=torch.float64)]), "one dtype"),
        (dict(grad=[torch.ones(2, 2), torch.ones(1, 4)]), r"feature 0\): grad must have one row per offsets row"),
        (dict(combiner=["sum"]), "combiner has 1 entries"),
        (dict(num_rows=1), r"index entries must lie in \[-1, 1\)"),
    ):
        with pytest.raises(ValueError, match=match):
            combine_backward_multi(**{**ok, **change})


# -- opcheck and torch.compile -------------------------------------------------------------------

def opcheck_cases():
    cases = []
    for weights in ("none", "all", "mixed"):
        table, rows, anchor, *lists = as_tensors(gradcheck_case(weights), dtype=torch.float64)
        cases.append((table, rows, anchor.requires_grad_(), *lists))
        cases.append((table, rows, torch.zeros((), dtype=torch.float64).expand(5, 3).requires_grad_(), *lists))
    cases.append((table, rows, None, *lists))
    empty = torch.empty(0, dtype=torch.int64)
    cases.append((torch.randn(3, 4), empty, torch.zeros(0, 4, requires_grad=True), [empty, empty],
                  [torch.tensor([0]), torch.tensor([0, 0])], [None, None], ["mean", "tile"], [1, 2]))
    return cases


@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_opcheck(case):
    torch.library.opcheck(table_combine_multi, opcheck_cases()[case])


@pytest.mark.parametrize("weights", ["all", "mixed"])
def test_opcheck_backward_multi(weights):
    table, rows, _, *lists = as_tensors(gradcheck_case(weights), dtype=torch.float64)
    grads = [g.requires_grad_() for g in output_grads(table_combine_multi(table, rows, None, *lists), 0)]
    torch.library.opcheck(combine_backward_multi, (grads, *lists, rows.shape[0]))


def compile_step(table, rows, anchor, index_a, offsets_a, weight_a, index_b, offsets_b):
    pooled, tiled, summed = table_combine_multi(table, rows, anchor, [index_a, index_b, index_a],
                                                [offsets_a, offsets_b, offsets_a], [weight_a, None, None],
                                                ["mean", "tile", "sum"], [1, 3, 1])
    return pooled.square().sum() + tiled.sum() + summed.sum()


def check_compiled_step(device: str):
    compiled = torch.compile(compile_step, fullgraph=True, dynamic=True)
    gen = torch.Generator().manual_seed(2)
    table = torch.randn(20, 4, generator=gen).to(device)
    for n_rows, n_items, n_unique in ((3, 10, 6), (5, 17, 8), (1, 1, 1)):
        rows = torch.randint(-1, 20, (n_unique,), generator=gen).to(device)
        inputs = []
        for b, n in ((n_rows, n_items), (n_rows + 1, n_items + 2)):
            index = torch.randint(-1, n_unique, (n,), generator=gen).to(device)
            offsets = torch.sort(torch.randint(0, n + 1, (b + 1,), generator=gen)).values.to(device)
            inputs.append((index, offsets))
        weight = torch.rand(n_items, generator=gen).to(device)
        (index_a, offsets_a), (index_b, offsets_b) = inputs
        anchor = torch.zeros((), device=device).expand(n_unique, 4).requires_grad_()
        expected_anchor = torch.zeros((), device=device).expand(n_unique, 4).requires_grad_()
        loss = compiled(table, rows, anchor, index_a, offsets_a, weight, index_b, offsets_b)
        expected = compile_step(table, rows, expected_anchor, index_a, offsets_a, weight, index_b, offsets_b)
        loss.backward(), expected.backward()
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(anchor.grad, expected_anchor.grad)


@pytest.mark.slow
def test_compiles_fullgraph_with_backward():
    check_compiled_step("cpu")


# -- Triton launcher (interpreter on CPU, or the GPU) --------------------------------------------

def on_triton_device(args):
    return [[t.to(TRITON_DEVICE) if isinstance(t, torch.Tensor) else t for t in a] if isinstance(a, list)
            else (a.to(TRITON_DEVICE) if isinstance(a, torch.Tensor) else a) for a in args]


@pytest.mark.parametrize("row_lookup", ROW_LOOKUPS)
@settings(max_examples=20)
@given(multi_cases(max_features=4, max_rows=3, max_len=6, max_dim=5, max_unique=5, max_table=6))
def test_forward_launcher_matches_cpu(row_lookup, case):
    # several features with rows: one launch for all (_multi_combine_kernel); one: its own kernels
    args = as_tensors(case)
    with row_lookup_mode(row_lookup):
        outs = table_combine_multi_triton(*on_triton_device(args))
    for got, expected in zip(outs, table_combine_multi(*args)):
        assert got.shape == expected.shape and got.dtype == expected.dtype
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("row_lookup", ROW_LOOKUPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("anchor_kind", ["none", "dense", "zeros"])
def test_forward_launcher_one_launch_every_combiner(row_lookup, dtype, anchor_kind):
    table, rows, _, anchor, features = every_combiner_case()
    args = as_tensors((table, rows, anchor_kind, anchor, features), dtype=dtype)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-12, atol=1e-12)
    with row_lookup_mode(row_lookup):
        outs = table_combine_multi_triton(*on_triton_device(args))
    for got, expected in zip(outs, table_combine_multi(*args)):
        torch.testing.assert_close(got.cpu(), expected, **tol)


def every_combiner_case():
    """sum / mean / tile, weighted or not, rows longer than BLOCK_N, tile_len spanning slot blocks,
    a feature without items, one without rows, a batch of one row, -1 entries and rows."""
    gen = np.random.default_rng(5)
    long_row = list(gen.integers(-1, 6, 40))
    features = [
        (long_row, [0, 40], gen.uniform(0, 2, 40), "mean", 1),
        (long_row, [0, 3, 3, 40], None, "tile", 37),
        ([], [0], None, "sum", 1),
        ([], [0, 0, 0], None, "tile", 3),
        (long_row[:7], [1, 2, 7], gen.uniform(0, 2, 7), "sum", 1),
        (long_row[:5], [0, 5], None, "mean", 1),
        (long_row[:9], [0, 4, 9], None, "tile", 2),
    ]
    return gen.standard_normal((4, 3)), [0, 1, 2, 3, -1, 0], "dense", gen.standard_normal((6, 3)), features


def assert_backward_launcher_matches_cpu(case, seed, dtype=torch.float32, sliced=False):
    table, rows, _, *lists = as_tensors(case, dtype=dtype)
    grads = output_grads(table_combine_multi(table, rows, None, *lists), seed, sliced)
    expected = combine_backward_multi(grads, *lists, rows.shape[0])

    def dev(x):
        return [None if t is None else t.to(TRITON_DEVICE) for t in x]

    index, offsets, weight, combiner, tile_len = lists
    actual = segment_combine_backward_multi_triton(dev(grads), dev(index), dev(offsets), dev(weight), combiner,
                                                   tile_len, rows.shape[0])
    assert actual.dtype == dtype
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual.cpu(), expected, **tol)


@settings(max_examples=20)
@given(multi_cases(max_features=4, max_rows=3, max_len=6, max_dim=5, max_unique=5), st.integers(0, 2**32 - 1),
       st.booleans())
def test_backward_launcher_matches_cpu(case, seed, sliced):
    # several features: one launch for all (_multi_scatter_kernel); one: its own kernel
    assert_backward_launcher_matches_cpu(case, seed, sliced=sliced)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("sliced", [False, True])
def test_backward_launcher_one_launch_every_combiner(dtype, sliced):
    assert_backward_launcher_matches_cpu(every_combiner_case(), 7, dtype, sliced)


# -- CUDA == CPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@given(multi_cases(), st.integers(0, 2**32 - 1))
def test_cuda_matches_cpu(case, seed):
    cpu_args = as_tensors(case)
    cuda_args = as_tensors(case, device="cuda")
    outputs = table_combine_multi(*cpu_args)
    for got, exp in zip(table_combine_multi(*cuda_args), outputs):
        torch.testing.assert_close(got.cpu(), exp, rtol=1e-5, atol=1e-5)
    grads = output_grads(outputs, seed)
    anchors = []
    for args, device in ((cpu_args, "cpu"), (cuda_args, "cuda")):
        anchor = args[2].detach().requires_grad_()
        torch.autograd.backward(table_combine_multi(args[0], args[1], anchor, *args[3:]), [g.to(device) for g in grads])
        anchors.append(anchor.grad.cpu())
    torch.testing.assert_close(anchors[1], anchors[0], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_opcheck_cuda(case):
    torch.library.opcheck(table_combine_multi, tuple(
        [to_cuda(t) for t in a] if isinstance(a, list) else to_cuda(a) for a in opcheck_cases()[case]
    ))


@pytest.mark.gpu
@pytest.mark.slow
def test_compiles_fullgraph_with_backward_cuda():
    check_compiled_step("cuda")

"""fxrec::table_combine: the table lookup fused with the combiner (fxrec/ops/combine.py).

Defined as ``segment_combine(gather_rows(table, rows) + anchor, ...)``; checked against the
row-by-row numpy float64 oracles of tests/test_ops_combine.py applied to that composition (built
in numpy), against the composition of the two ops themselves, and its Triton kernels (under the
interpreter on CPU, and on CUDA when there is one) against the CPU kernel."""

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxrec.ops.triton import combine as triton_combine
from fxrec.ops.triton.combine import table_combine_triton  # (importing fxrec registers torch.ops.fxrec.*)
from test_ops_combine import assert_matches, backward_oracle, combine_oracle

table_combine = torch.ops.fxrec.table_combine
combine = torch.ops.fxrec.segment_combine
combine_backward = torch.ops.fxrec.segment_combine_backward
gather_rows = torch.ops.fxrec.gather_rows

HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"  # CPU: the interpreter (conftest sets TRITON_INTERPRET=1)
COMBINERS = ["sum", "mean", "tile"]
ANCHORS = ["none", "dense", "zeros", "broadcast"]  # zeros: what HashTable hands out (stride 0)


# -- inputs --------------------------------------------------------------------------------------

@st.composite
def table_cases(draw, max_rows=8, max_len=50, max_dim=40, max_unique=10, max_table=12):
    """Python-side data: (table, rows, anchor kind, anchor values, index, offsets, weight, combiner, tile_len)."""
    n_rows = draw(st.integers(0, max_rows))
    lengths = draw(st.lists(st.one_of(st.integers(0, 4), st.integers(0, max_len)), min_size=n_rows,
                            max_size=n_rows))
    lead, trail = draw(st.integers(0, 3)), draw(st.integers(0, 3))  # items outside every row
    n_items = lead + sum(lengths) + trail
    n_table = draw(st.integers(0, max_table))
    n_unique = draw(st.integers(0, max_unique))
    dim = draw(st.integers(1, max_dim))
    rows = draw(st.lists(st.integers(-1, n_table - 1), min_size=n_unique, max_size=n_unique))
    index = draw(st.lists(st.integers(-1, n_unique - 1), min_size=n_items, max_size=n_items))
    offsets = [lead]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    gen = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weight = {
        "none": None,
        "random": gen.uniform(0.0, 2.0, n_items),
        "zeros": np.zeros(n_items),
        "some_zeros": gen.uniform(0.0, 2.0, n_items) * (gen.random(n_items) < 0.5),
    }[draw(st.sampled_from(["none", "random", "zeros", "some_zeros"]))]
    table = gen.standard_normal((n_table, dim))
    anchor_kind = draw(st.sampled_from(ANCHORS))
    anchor = {
        "none": None,
        "dense": gen.standard_normal((n_unique, dim)),
        "zeros": np.zeros((n_unique, dim)),
        "broadcast": np.broadcast_to(gen.standard_normal((1, dim)), (n_unique, dim)),
    }[anchor_kind]
    combiner = draw(st.sampled_from(COMBINERS))
    tile_len = draw(st.integers(1, 6))
    return table, rows, anchor_kind, anchor, index, offsets, weight, combiner, tile_len


def make_anchor(kind, values, dtype, device):
    """The anchor tensor: dense, or broadcast with stride 0 (never materialized) like HashTable's."""
    if kind == "none":
        return None
    if kind == "zeros":
        return torch.zeros((), dtype=dtype, device=device).expand(values.shape)
    if kind == "broadcast":
        return torch.tensor(values[:1], dtype=dtype, device=device).expand(values.shape)
    return torch.tensor(values, dtype=dtype, device=device)


def as_tensors(case, dtype=torch.float32, device="cpu"):
    """The op's arguments, in its order."""
    table, rows, anchor_kind, anchor, index, offsets, weight, combiner, tile_len = case
    return (
        torch.tensor(table, dtype=dtype, device=device),
        torch.tensor(rows, dtype=torch.int64, device=device),
        make_anchor(anchor_kind, anchor, dtype, device),
        torch.tensor(index, dtype=torch.int64, device=device),
        torch.tensor(offsets, dtype=torch.int64, device=device),
        None if weight is None else torch.tensor(weight, dtype=torch.float32, device=device),
        combiner,
        tile_len,
    )


def emb_u_numpy(table, rows, anchor):
    """float64 ``gather_rows(table, rows) + anchor`` in numpy, one row at a time."""
    table = table.detach().double().numpy()
    out = np.zeros((rows.shape[0], table.shape[1]))
    for u, r in enumerate(rows.tolist()):
        if r >= 0:
            out[u] = table[r]
    if anchor is not None:
        out += anchor.detach().double().numpy()
    return out


def composed(table, rows, anchor, index, offsets, weight, combiner, tile_len):
    """The definition, through the two already-tested ops."""
    emb = gather_rows(table, rows)
    if anchor is not None:
        emb = emb + anchor
    return combine(emb, index, offsets, weight, combiner, tile_len)


# -- forward and backward vs the oracles ---------------------------------------------------------

@given(table_cases())
def test_forward_matches_oracle(case):
    args = as_tensors(case)
    table, rows, anchor, index, offsets, weight, combiner, tile_len = args
    w = None if weight is None else weight.double().numpy()
    expected, magnitude = combine_oracle(emb_u_numpy(table, rows, anchor), case[4], case[5], w, combiner, tile_len)
    out = table_combine(*args)
    assert out.dtype == torch.float32
    assert_matches(out, expected, magnitude)
    # float32: the same sums in the same order as the composition, bit for bit
    torch.testing.assert_close(out, composed(*args), rtol=0, atol=0)


@given(table_cases())
def test_forward_float64_matches_oracle(case):
    args = as_tensors(case, dtype=torch.float64)
    table, rows, anchor, index, offsets, weight, combiner, tile_len = args
    w = None if weight is None else weight.double().numpy()
    expected, magnitude = combine_oracle(emb_u_numpy(table, rows, anchor), case[4], case[5], w, combiner, tile_len)
    out = table_combine(*args)
    assert out.dtype == torch.float64
    assert_matches(out, expected, magnitude, rtol=1e-12, atol=1e-15)


@given(table_cases(), st.integers(0, 2**32 - 1))
def test_anchor_gradient_matches_oracle(case, seed):
    if case[2] == "none":
        case = (*case[:2], "dense", np.zeros((len(case[1]), np.shape(case[0])[1])), *case[4:])
    table, rows, anchor, index, offsets, weight, combiner, tile_len = as_tensors(case)
    anchor.requires_grad_()
    width = tile_len * table.shape[1] if combiner == "tile" else table.shape[1]
    grad = torch.randn(width, len(case[5]) - 1, generator=torch.Generator().manual_seed(seed)).t()  # not contiguous
    expected, magnitude = backward_oracle(
        grad.numpy(), case[4], case[5], None if weight is None else weight.double().numpy(), combiner, tile_len,
        rows.shape[0],
    )
    table_combine(table, rows, anchor, index, offsets, weight, combiner, tile_len).backward(grad)
    assert anchor.grad.shape == (rows.shape[0], table.shape[1])  # [U, dim], whatever the anchor's strides
    assert_matches(anchor.grad, expected, magnitude)
    torch.testing.assert_close(
        anchor.grad, combine_backward(grad, index, offsets, weight, combiner, tile_len, rows.shape[0]), rtol=0, atol=0
    )


def test_minus_one_rows_and_index():
    table = torch.tensor([[1.0, 2.0], [10.0, 20.0]])
    rows = torch.tensor([1, -1, 0])  # unique 1 has no table row: the anchor alone
    anchor = torch.tensor([[0.5, 0.5], [3.0, 3.5], [0.0, 0.0]])
    index, offsets = torch.tensor([0, 1, -1, 2, 1]), torch.tensor([0, 3, 3, 5])
    assert table_combine(table, rows, None, index, offsets, None, "sum", 1).tolist() == [[10, 20], [0, 0], [1, 2]]
    assert table_combine(table, rows, anchor, index, offsets, None, "mean", 1).tolist() == [
        [(10.5 + 3) / 3, (20.5 + 3.5) / 3], [0, 0], [2, 2.75]]  # the -1 item counts in the mean
    assert table_combine(table, rows, anchor, index, offsets, None, "tile", 2).tolist() == [
        [10.5, 20.5, 3, 3.5], [0, 0, 0, 0], [1, 2, 3, 3.5]]
    # the -1 row still trains its anchor (HashTable drops rows -1 when it takes gradients)
    anchor.requires_grad_()
    table_combine(table, rows, anchor, index, offsets, None, "sum", 1).sum().backward()
    assert anchor.grad.tolist() == [[1, 1], [2, 2], [1, 1]]


def test_empty_table_and_empty_batch():
    table = torch.zeros(0, 3)
    rows, index = torch.tensor([-1, -1]), torch.tensor([0, 1, 1])
    offsets = torch.tensor([0, 1, 3])
    for combiner in COMBINERS:
        out = table_combine(table, rows, None, index, offsets, None, combiner, 2)
        assert out.abs().sum() == 0 and out.shape == (2, 6 if combiner == "tile" else 3)
        empty = table_combine(torch.randn(4, 3), torch.empty(0, dtype=torch.int64), None,
                              torch.empty(0, dtype=torch.int64), torch.tensor([0]), None, combiner, 2)
        assert empty.shape == (0, 6 if combiner == "tile" else 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_composition(dtype):
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(9, 5, generator=gen).to(dtype)
    rows = torch.tensor([3, -1, 8, 0, 3])
    anchor = torch.randn(5, 5, generator=gen).to(dtype)
    index = torch.randint(-1, 5, (300,), generator=gen)
    offsets, weight = torch.tensor([0, 3, 3, 300]), torch.rand(300, generator=gen)
    for a in (None, anchor, torch.zeros((), dtype=dtype).expand(5, 5)):
        for combiner in COMBINERS:
            out = table_combine(table, rows, a, index, offsets, weight, combiner, 4)
            assert out.dtype == dtype
            # The anchor's sum is formed in float32 (module docstring): within one rounding.
            tol = dict(rtol=0, atol=0) if a is None or a.stride() == (0, 0) else dict(rtol=2e-2, atol=0.1)
            torch.testing.assert_close(out, composed(table, rows, a, index, offsets, weight, combiner, 4), **tol)


# -- autograd ------------------------------------------------------------------------------------

def gradcheck_case(weighted: bool):
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(7, 3, dtype=torch.float64, generator=gen)
    rows = torch.tensor([6, 0, -1, 2, 0])  # a -1 row, and one table row behind two unique entries
    # Duplicates, -1 entries, an empty row, a row longer than tile_len, items outside every row,
    # and (weighted) a row whose weights sum to 0.
    index = torch.tensor([4, 0, 1, 0, -1, 2, 0, 3, 3, -1, 1, 4])
    offsets = torch.tensor([1, 4, 4, 9, 11])
    weight = torch.rand(12, dtype=torch.float64, generator=gen) + 0.5 if weighted else None
    if weighted:
        weight[9:11] = torch.tensor([1.0, -1.0], dtype=torch.float64)
    return table, rows, index, offsets, weight


@pytest.mark.parametrize("anchor_kind", ["dense", "zeros"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("combiner", COMBINERS)
def test_gradcheck_anchor(combiner, weighted, anchor_kind):
    table, rows, index, offsets, weight = gradcheck_case(weighted)
    if anchor_kind == "dense":
        anchor = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    else:  # HashTable's anchor; gradcheck perturbs a dense copy (an expanded tensor has one element)
        anchor = torch.zeros((), dtype=torch.float64).expand(5, 3).clone()
    anchor.requires_grad_()

    def fn(a):
        return table_combine(table, rows, a, index, offsets, weight, combiner, 2)

    assert torch.autograd.gradcheck(fn, (anchor,))
    assert torch.autograd.gradgradcheck(fn, (anchor,))


def test_expanded_zero_anchor_gets_a_full_gradient():
    table, rows, index, offsets, weight = gradcheck_case(True)
    for combiner in COMBINERS:
        expanded = torch.zeros((), dtype=torch.float64).expand(5, 3).requires_grad_()
        dense = torch.zeros(5, 3, dtype=torch.float64, requires_grad=True)
        grad = torch.randn(4, 6 if combiner == "tile" else 3, dtype=torch.float64)
        out = table_combine(table, rows, expanded, index, offsets, weight, combiner, 2)
        torch.testing.assert_close(out, table_combine(table, rows, None, index, offsets, weight, combiner, 2),
                                   rtol=0, atol=0)
        out.backward(grad)
        table_combine(table, rows, dense, index, offsets, weight, combiner, 2).backward(grad)
        assert expanded.grad.shape == (5, 3) and expanded.grad.is_contiguous()
        torch.testing.assert_close(expanded.grad, dense.grad, rtol=0, atol=0)


def test_table_and_weight_requiring_grad_raise_on_backward():
    table, rows, index, offsets, weight = gradcheck_case(True)
    anchor = torch.zeros(5, 3, dtype=torch.float64, requires_grad=True)
    out = table_combine(table.requires_grad_(), rows, anchor, index, offsets, None, "sum", 1)
    with pytest.raises(RuntimeError, match="table gets no gradient"):
        out.sum().backward()
    out = table_combine(table.detach(), rows, anchor, index, offsets, weight.requires_grad_(), "sum", 1)
    with pytest.raises(RuntimeError, match="weights are data"):
        out.sum().backward()


def test_no_anchor_no_grad():
    table, rows, index, offsets, _ = gradcheck_case(False)
    assert not table_combine(table, rows, None, index, offsets, None, "mean", 1).requires_grad


# -- validation ----------------------------------------------------------------------------------

def valid_args():
    return dict(table=torch.randn(4, 2), rows=torch.tensor([3, -1, 0]), anchor=torch.zeros(3, 2),
                index=torch.tensor([0, 2, -1]), offsets=torch.tensor([0, 1, 3]), weight=None, combiner="sum",
                tile_len=1)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(combiner="max"), ValueError, "combiner"),
        (dict(combiner="tile", tile_len=0), ValueError, "tile_len"),
        (dict(table=torch.zeros(4, 2, dtype=torch.int64)), TypeError, "table"),
        (dict(table=torch.zeros(8)), ValueError, "table"),
        (dict(table=torch.zeros(4, 0), anchor=None), ValueError, "table"),
        (dict(rows=torch.tensor([3, -1, 0], dtype=torch.int32)), TypeError, "rows"),
        (dict(rows=torch.tensor([[3, -1, 0]])), ValueError, "rows"),
        (dict(rows=torch.tensor([4, -1, 0])), ValueError, "rows"),
        (dict(rows=torch.tensor([3, -2, 0])), ValueError, "rows"),
        (dict(anchor=torch.zeros(3, 2, dtype=torch.float64)), TypeError, "anchor"),
        (dict(anchor=torch.zeros(2, 2)), ValueError, "anchor"),
        (dict(anchor=torch.zeros(3, 3)), ValueError, "anchor"),
        (dict(anchor=torch.zeros(6)), ValueError, "anchor"),
        (dict(index=torch.tensor([0, 2, -1], dtype=torch.int32)), TypeError, "index"),
        (dict(index=torch.tensor([[0, 2, -1]])), ValueError, "index"),
        (dict(index=torch.tensor([0, 3, -1])), ValueError, "index"),  # U = 3
        (dict(offsets=torch.tensor([0, 1, 3], dtype=torch.int32)), TypeError, "offsets"),
        (dict(offsets=torch.zeros(0, dtype=torch.int64)), ValueError, "offsets"),
        (dict(offsets=torch.tensor([0, 2, 1])), ValueError, "offsets"),
        (dict(offsets=torch.tensor([0, 1, 4])), ValueError, "offsets"),
        (dict(weight=torch.ones(3, dtype=torch.int64)), TypeError, "weight"),
        (dict(weight=torch.ones(2)), ValueError, "weight"),
    ],
)
def test_bad_arguments_raise(change, error, match):
    with pytest.raises(error, match=match):
        table_combine(**{**valid_args(), **change})


@pytest.mark.gpu
def test_devices_must_match():
    args = valid_args()
    for name in ("rows", "anchor", "index", "offsets"):
        with pytest.raises(ValueError, match=name):
            table_combine(**{**{k: v.cuda() if isinstance(v, torch.Tensor) and k != name else v
                                for k, v in args.items()}})


# -- opcheck and torch.compile -------------------------------------------------------------------

def opcheck_cases():
    table, rows, index, offsets, weight = gradcheck_case(True)
    dense = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    cases = []
    for combiner in COMBINERS:
        cases.append((table, rows, dense, index, offsets, weight, combiner, 2))
        cases.append((table, rows, None, index, offsets, None, combiner, 3))
        # the expanded zero anchor that HashTable hands out
        cases.append((table, rows, torch.zeros((), dtype=torch.float64).expand(5, 3).requires_grad_(), index,
                      offsets, None, combiner, 2))
    empty = torch.empty(0, dtype=torch.int64)
    cases.append((torch.randn(3, 4), empty, torch.zeros(0, 4, requires_grad=True), empty, torch.tensor([0]), None,
                  "mean", 1))
    cases.append((torch.randn(0, 4), torch.tensor([-1]), torch.zeros(1, 4, requires_grad=True), torch.tensor([0, -1]),
                  torch.tensor([0, 2, 2]), None, "tile", 2))
    return cases


@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_opcheck(case):
    torch.library.opcheck(table_combine, opcheck_cases()[case])


def compile_step(table, rows, anchor, index, offsets, weight):
    pooled = table_combine(table, rows, anchor, index, offsets, weight, "mean", 1)
    tiled = table_combine(table, rows, anchor, index, offsets, None, "tile", 3)
    return pooled.square().sum() + tiled.sum()


def check_compiled_step(device: str):
    compiled = torch.compile(compile_step, fullgraph=True, dynamic=True)
    gen = torch.Generator().manual_seed(2)
    table = torch.randn(20, 4, generator=gen).to(device)
    for n_rows, n_items, n_unique in ((3, 10, 6), (5, 17, 8)):
        rows = torch.randint(-1, 20, (n_unique,), generator=gen).to(device)
        index = torch.randint(-1, n_unique, (n_items,), generator=gen).to(device)
        offsets = torch.sort(torch.randint(0, n_items + 1, (n_rows + 1,), generator=gen)).values.to(device)
        weight = torch.rand(n_items, generator=gen).to(device)
        anchor = torch.zeros((), device=device).expand(n_unique, 4).requires_grad_()
        expected_anchor = torch.zeros((), device=device).expand(n_unique, 4).requires_grad_()
        loss = compiled(table, rows, anchor, index, offsets, weight)
        expected = compile_step(table, rows, expected_anchor, index, offsets, weight)
        loss.backward(), expected.backward()
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(anchor.grad, expected_anchor.grad)


@pytest.mark.slow
def test_compiles_fullgraph_with_backward():
    check_compiled_step("cpu")


# -- Triton launcher (interpreter on CPU, or the GPU) --------------------------------------------

# Both ways the launchers read an item's table row: through ``rows[index[i]]`` in the combine
# kernel, or composed first (``_compose_rows_kernel``: big calls; "composed" forces it for every call).
ROW_LOOKUPS = ["indirect", "composed"]


@contextlib.contextmanager
def row_lookup_mode(row_lookup: str):
    with pytest.MonkeyPatch.context() as patch:
        if row_lookup == "composed":
            patch.setattr(triton_combine, "COMPOSE_MIN_ITEMS", 0)
            patch.setattr(triton_combine, "COMPOSE_MIN_ROW_BYTES", 0)
        yield


def assert_launcher_matches_cpu(case, dtype):
    expected = table_combine(*as_tensors(case, dtype=dtype))
    actual = table_combine_triton(*as_tensors(case, dtype=dtype, device=TRITON_DEVICE))
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-15)
    if case[7] == "tile":
        tol = dict(rtol=0, atol=0)
    torch.testing.assert_close(actual.cpu(), expected, **tol)


@pytest.mark.parametrize("row_lookup", ROW_LOOKUPS)
@settings(max_examples=25)
@given(table_cases(max_rows=3, max_len=12, max_dim=6, max_unique=5, max_table=6))
def test_launcher_matches_cpu(row_lookup, case):
    with row_lookup_mode(row_lookup):
        assert_launcher_matches_cpu(case, torch.float32)


@settings(max_examples=8)
@given(table_cases(max_rows=3, max_len=12, max_dim=6, max_unique=5, max_table=6))
def test_launcher_matches_cpu_float64(case):
    assert_launcher_matches_cpu(case, torch.float64)


def test_launcher_bfloat16_and_wide_rows_match_cpu():
    gen = torch.Generator().manual_seed(4)
    for dtype, dim in ((torch.bfloat16, 3), (torch.float32, 130)):  # 130 > BLOCK_D: the tile kernel's column loop
        table = torch.randn(6, dim, generator=gen).to(dtype)
        rows, anchor = torch.tensor([5, -1, 2, 0]), torch.randn(4, dim, generator=gen).to(dtype)
        index, offsets = torch.tensor([0, 3, -1, 3, 1, 2]), torch.tensor([0, 2, 6])
        weight = torch.rand(6, generator=gen)
        for combiner in COMBINERS:
            args = (table, rows, anchor, index, offsets, weight, combiner, 3)
            expected = table_combine(*args)
            actual = table_combine_triton(*(a.to(TRITON_DEVICE) if isinstance(a, torch.Tensor) else a for a in args))
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(actual.cpu(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("row_lookup", ROW_LOOKUPS)
@pytest.mark.parametrize("dim", [5, 130])
def test_launcher_long_rows_match_cpu(row_lookup, dim):
    # Rows longer than BLOCK_N (the reduce loop) and a tile_len spanning several slot blocks.
    gen = torch.Generator().manual_seed(7)
    table = torch.randn(50, dim, generator=gen)
    rows = torch.randint(-1, 50, (20,), generator=gen)
    index = torch.randint(-1, 20, (181,), generator=gen)
    offsets, weight = torch.tensor([0, 100, 101, 101, 181]), torch.rand(181, generator=gen)
    for anchor in (None, torch.zeros(()).expand(20, dim), torch.randn(20, dim, generator=gen)):
        for combiner in COMBINERS:
            args = (table, rows, anchor, index, offsets, weight, combiner, 70)
            expected = table_combine(*args)
            with row_lookup_mode(row_lookup):
                actual = table_combine_triton(*(a.to(TRITON_DEVICE) if isinstance(a, torch.Tensor) else a
                                                for a in args))
            torch.testing.assert_close(actual.cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("row_lookup", ROW_LOOKUPS)
def test_launcher_tolerates_unvalidated_contents(row_lookup):
    # The CUDA path does not sync to validate: bad offsets are clamped, out-of-range index entries
    # act like -1, out-of-range table rows read as zero rows; nothing outside the tensors is read.
    table = torch.ones(2, 3, device=TRITON_DEVICE)
    rows = torch.tensor([0, 9, -4, 1], device=TRITON_DEVICE)
    index = torch.tensor([0, 7, -5, 1, 3], device=TRITON_DEVICE)
    offsets = torch.tensor([-3, 2, 1, 9], device=TRITON_DEVICE)
    with row_lookup_mode(row_lookup):
        # a per-row anchor, and a stride-0 one (the one kind composed rows serve)
        for anchor in (torch.full((4, 3), 0.5), torch.full((), 0.5).expand(4, 3)):
            out = table_combine_triton(table, rows, anchor.to(TRITON_DEVICE), index, offsets, None, "sum", 1)
            # rows [0, 2), [2, 2), [1, 5); table row 9 of unique 1 reads as zeros (its anchor still counts)
            assert out.cpu().tolist() == [[1.5] * 3, [0.0] * 3, [2.0] * 3]
        out = table_combine_triton(table, rows, None, index, offsets, None, "tile", 2)
    assert out.cpu().tolist() == [[1.0] * 3 + [0.0] * 3, [0.0] * 6, [0.0] * 6]


# -- CUDA == CPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@given(table_cases())
def test_cuda_matches_cpu(case):
    cpu_args = as_tensors(case)
    cuda_args = as_tensors(case, device="cuda")
    expected = table_combine(*cpu_args)
    torch.testing.assert_close(table_combine(*cuda_args).cpu(), expected, rtol=1e-5, atol=1e-5)
    if cpu_args[2] is None:
        return
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5))
    grads = []
    for args, device in ((cpu_args, "cpu"), (cuda_args, "cuda")):
        anchor = args[2].detach().requires_grad_()
        table_combine(args[0], args[1], anchor, *args[3:]).backward(grad.to(device))
        grads.append(anchor.grad.cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("combiner", COMBINERS)
def test_cuda_matches_cpu_large(combiner):
    # The seed tutorial's sparse4 (B = 4096, rows up to 1000 ids, dim 16, tile_len 1000) on a
    # 1M-row table, with HashTable's expanded zero anchor.
    gen = torch.Generator().manual_seed(6)
    n_rows, dim, n_unique, n_table = 4096, 16, 50_000, 1 << 20
    lengths = torch.randint(0, 1001, (n_rows,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    index = torch.randint(-1, n_unique, (int(offsets[-1]),), generator=gen)
    rows = torch.randint(-1, n_table, (n_unique,), generator=gen)
    weight = torch.rand(index.shape[0], generator=gen)
    table = torch.randn(n_table, dim, generator=gen)
    args = (table, rows, torch.zeros(()).expand(n_unique, dim), index, offsets, weight, combiner, 1000)
    cuda_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    torch.testing.assert_close(table_combine(*cuda_args).cpu(), table_combine(*args), rtol=1e-4, atol=1e-4)


def to_cuda(a):
    """``a`` on CUDA; an expanded scalar stays expanded (``.cuda()`` would materialize it)."""
    if not isinstance(a, torch.Tensor):
        return a
    b = a.detach()
    b = b.flatten()[0].cuda().expand(b.shape) if b.dim() and b.stride() == (0,) * b.dim() else b.cuda()
    return b.requires_grad_(a.requires_grad)


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_opcheck_cuda(case):
    torch.library.opcheck(table_combine, tuple(to_cuda(a) for a in opcheck_cases()[case]))


@pytest.mark.gpu
@pytest.mark.slow
def test_compiles_fullgraph_with_backward_cuda():
    check_compiled_step("cuda")

"""fxrec::segment_combine / segment_combine_backward (SPEC §4.2 combiners, §4.5 gradients)
against row-by-row numpy float64 oracles, plus their Triton kernels (under the interpreter on
CPU, and on CUDA when there is one)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxrec  # noqa: F401  (registers torch.ops.fxrec.*)
from fxrec.ops.triton.combine import segment_combine_backward_triton, segment_combine_triton

combine = torch.ops.fxrec.segment_combine
combine_backward = torch.ops.fxrec.segment_combine_backward

HAS_CUDA = torch.cuda.is_available()
# Without CUDA the launchers run under TRITON_INTERPRET=1 (set by conftest) on CPU tensors.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

COMBINERS = ["sum", "mean", "tile"]
# float32 kernels vs float64 oracles: |actual - expected| <= RTOL * (the magnitude of the terms
# summed, from the oracle) + ATOL. Relative to the result no float32 sum could do better where
# terms cancel.
RTOL, ATOL = 1e-5, 1e-6


# -- numpy float64 oracles (one row, one item at a time) -----------------------------------------

def combine_oracle(emb, index, offsets, weight, combiner, tile_len):
    """(out, magnitude): out as SPEC §4.2 says, magnitude = the same with |w| and |e|."""
    emb = np.asarray(emb, dtype=np.float64)
    n_rows, dim = len(offsets) - 1, emb.shape[1]
    width = tile_len * dim if combiner == "tile" else dim
    out, mag = np.zeros((n_rows, width)), np.zeros((n_rows, width))
    for b in range(n_rows):
        items = range(offsets[b], offsets[b + 1])
        if combiner == "tile":
            for slot, i in enumerate(list(items)[:tile_len]):
                if index[i] >= 0:
                    out[b, slot * dim:(slot + 1) * dim] = emb[index[i]]
            mag[b] = np.abs(out[b])
            continue
        total = 0.0
        for i in items:
            w = 1.0 if weight is None else float(weight[i])
            total += w
            if index[i] >= 0:
                out[b] += w * emb[index[i]]
                mag[b] += abs(w) * np.abs(emb[index[i]])
        if combiner == "mean":
            if total == 0:
                out[b], mag[b] = 0.0, 0.0
            else:
                out[b], mag[b] = out[b] / total, mag[b] / abs(total)
    return out, mag


def backward_oracle(grad, index, offsets, weight, combiner, tile_len, num_rows):
    """Scatter-add of each item's (weighted) row gradient into its emb row: (grad_emb, magnitude)."""
    grad = np.asarray(grad, dtype=np.float64)
    dim = grad.shape[1] // tile_len if combiner == "tile" else grad.shape[1]
    out, mag = np.zeros((num_rows, dim)), np.zeros((num_rows, dim))
    for b in range(len(offsets) - 1):
        items = list(range(offsets[b], offsets[b + 1]))
        weights = [1.0 if weight is None else float(weight[i]) for i in items]
        total = sum(weights)
        for slot, (i, w) in enumerate(zip(items, weights)):
            if combiner == "tile":
                if slot >= tile_len:
                    break
                g = grad[b, slot * dim:(slot + 1) * dim]
            elif combiner == "mean":
                g = grad[b] * w / total if total != 0 else 0.0 * grad[b]
            else:
                g = grad[b] * w
            if index[i] >= 0:
                out[index[i]] += g
                mag[index[i]] += np.abs(g)
    return out, mag


# -- inputs --------------------------------------------------------------------------------------

@st.composite
def combine_cases(draw, max_rows=8, max_len=50, max_dim=40, max_unique=10):
    """(emb float64, index, offsets, weight or None, combiner, tile_len) as Python-side data."""
    n_rows = draw(st.integers(0, max_rows))
    lengths = draw(st.lists(st.one_of(st.integers(0, 4), st.integers(0, max_len)), min_size=n_rows,
                            max_size=n_rows))
    lead, trail = draw(st.integers(0, 3)), draw(st.integers(0, 3))  # items outside every row
    n_items = lead + sum(lengths) + trail
    n_unique = draw(st.integers(0, max_unique))
    dim = draw(st.integers(1, max_dim))
    index = draw(st.lists(st.integers(-1, n_unique - 1), min_size=n_items, max_size=n_items))
    offsets = [lead]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    weight_kind = draw(st.sampled_from(["none", "random", "zeros", "some_zeros"]))
    gen = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weight = {
        "none": None,
        "random": gen.uniform(0.0, 2.0, n_items),
        "zeros": np.zeros(n_items),
        "some_zeros": gen.uniform(0.0, 2.0, n_items) * (gen.random(n_items) < 0.5),
    }[weight_kind]
    emb = gen.standard_normal((n_unique, dim))
    combiner = draw(st.sampled_from(COMBINERS))
    tile_len = draw(st.integers(1, 6))
    return emb, index, offsets, weight, combiner, tile_len


def as_tensors(case, dtype=torch.float32, device="cpu"):
    emb, index, offsets, weight, combiner, tile_len = case
    return (
        torch.tensor(emb, dtype=dtype, device=device),
        torch.tensor(index, dtype=torch.int64, device=device),
        torch.tensor(offsets, dtype=torch.int64, device=device),
        None if weight is None else torch.tensor(weight, dtype=torch.float32, device=device),
        combiner,
        tile_len,
    )


def assert_matches(actual, expected, magnitude, rtol=RTOL, atol=ATOL):
    actual = actual.detach().cpu().double().numpy()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    bound = rtol * magnitude + atol
    assert np.all(np.abs(actual - expected) <= bound), np.abs(actual - expected).max()


# -- forward and backward vs the oracles ---------------------------------------------------------

@given(combine_cases())
def test_forward_matches_oracle(case):
    args = as_tensors(case)
    emb, index, offsets, weight, combiner, tile_len = args
    expected, magnitude = combine_oracle(
        emb.double().numpy(), case[1], case[2], None if weight is None else weight.double().numpy(), combiner, tile_len
    )
    out = combine(*args)
    assert out.dtype == torch.float32
    assert_matches(out, expected, magnitude)
    if combiner == "tile":  # copies: exact
        assert np.array_equal(out.double().numpy(), expected)


@given(combine_cases())
def test_forward_float64_matches_oracle(case):
    args = as_tensors(case, dtype=torch.float64)
    weight = args[3]
    expected, magnitude = combine_oracle(
        args[0].numpy(), case[1], case[2], None if weight is None else weight.double().numpy(), case[4], case[5]
    )
    out = combine(*args)
    assert out.dtype == torch.float64
    assert_matches(out, expected, magnitude, rtol=1e-12, atol=1e-15)


@given(combine_cases(), st.integers(0, 2**32 - 1))
def test_backward_matches_oracle(case, seed):
    emb, index, offsets, weight, combiner, tile_len = as_tensors(case)
    width = tile_len * emb.shape[1] if combiner == "tile" else emb.shape[1]
    # Transposed: the gradient reaching the op need not be contiguous.
    grad = torch.randn(width, len(case[2]) - 1, generator=torch.Generator().manual_seed(seed)).t()
    expected, magnitude = backward_oracle(
        grad.numpy(), case[1], case[2], None if weight is None else weight.double().numpy(), combiner, tile_len,
        emb.shape[0],
    )
    grad_emb = combine_backward(grad, index, offsets, weight, combiner, tile_len, emb.shape[0])
    assert_matches(grad_emb, expected, magnitude)
    # The op's autograd goes through segment_combine_backward.
    emb.requires_grad_()
    combine(emb, index, offsets, weight, combiner, tile_len).backward(grad)
    assert_matches(emb.grad, expected, magnitude)


def test_minus_one_counts_in_mean_and_fills_a_tile_slot():
    emb = torch.tensor([[2.0, 4.0]])
    index, offsets = torch.tensor([0, -1, -1, 0]), torch.tensor([0, 2, 4])
    assert combine(emb, index, offsets, None, "mean", 0).tolist() == [[1.0, 2.0], [1.0, 2.0]]
    assert combine(emb, index, offsets, None, "sum", 0).tolist() == [[2.0, 4.0], [2.0, 4.0]]
    assert combine(emb, index, offsets, None, "tile", 3).tolist() == [[2, 4, 0, 0, 0, 0], [0, 0, 2, 4, 0, 0]]
    weight = torch.tensor([0.0, 0.0, 1.0, -1.0])  # row sums 0: mean is 0 (SPEC: one rule)
    assert combine(emb, index, offsets, weight, "mean", 0).tolist() == [[0.0, 0.0], [0.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype):
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(7, 5, generator=gen).to(dtype)
    index = torch.randint(-1, 7, (300,), generator=gen)
    offsets, weight = torch.tensor([0, 3, 3, 300]), torch.rand(300, generator=gen)
    for combiner in COMBINERS:
        out = combine(emb, index, offsets, weight, combiner, 4)
        assert out.dtype == dtype
        expected = combine(emb.float(), index, offsets, weight, combiner, 4).to(dtype)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)  # one rounding of the fp32 result


# -- autograd ------------------------------------------------------------------------------------

def gradcheck_case(weighted: bool):
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    # Duplicates, -1 entries, an empty row, a row longer than tile_len, items outside every row,
    # and (weighted) a row whose weights sum to 0.
    index = torch.tensor([4, 0, 1, 0, -1, 2, 0, 3, 3, -1, 1, 4])
    offsets = torch.tensor([1, 4, 4, 9, 11])
    weight = torch.rand(12, dtype=torch.float64, generator=gen) + 0.5 if weighted else None
    if weighted:
        weight[9:11] = torch.tensor([1.0, -1.0], dtype=torch.float64)
    return emb, index, offsets, weight


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("combiner", COMBINERS)
def test_gradcheck(combiner, weighted):
    emb, index, offsets, weight = gradcheck_case(weighted)

    def fn(e):
        return combine(e, index, offsets, weight, combiner, 2)

    assert torch.autograd.gradcheck(fn, (emb,))
    assert torch.autograd.gradgradcheck(fn, (emb,))


def test_weight_requiring_grad_raises_on_backward():
    emb, index, offsets, weight = gradcheck_case(True)
    out = combine(emb, index, offsets, weight.requires_grad_(), "sum", 0)
    with pytest.raises(RuntimeError, match="weights are data"):
        out.sum().backward()


def test_gradient_rows_only_for_gathered_rows():
    # DESIGN.md: the gradient has U rows (the gathered unique rows), never the table's capacity.
    emb, index, offsets, _ = gradcheck_case(False)
    combine(emb, index, offsets, None, "sum", 0).sum().backward()
    assert emb.grad.shape == emb.shape


# -- validation ----------------------------------------------------------------------------------

def valid_args():
    return dict(emb=torch.randn(3, 2), index=torch.tensor([0, 2, -1]), offsets=torch.tensor([0, 1, 3]),
                weight=None, combiner="sum", tile_len=1)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(combiner="max"), ValueError, "combiner"),
        (dict(combiner="tile", tile_len=0), ValueError, "tile_len"),
        (dict(emb=torch.zeros(3, 2, dtype=torch.int64)), TypeError, "emb"),
        (dict(emb=torch.zeros(6)), ValueError, "emb"),
        (dict(emb=torch.zeros(3, 0)), ValueError, "emb"),
        (dict(index=torch.tensor([0, 2, -1], dtype=torch.int32)), TypeError, "index"),
        (dict(index=torch.tensor([[0, 2, -1]])), ValueError, "index"),
        (dict(offsets=torch.tensor([0, 1, 3], dtype=torch.int32)), TypeError, "offsets"),
        (dict(offsets=torch.tensor([[0, 1, 3]])), ValueError, "offsets"),
        (dict(offsets=torch.zeros(0, dtype=torch.int64)), ValueError, "offsets"),
        (dict(offsets=torch.tensor([0, 2, 1])), ValueError, "offsets"),
        (dict(offsets=torch.tensor([0, 1, 4])), ValueError, "offsets"),
        (dict(index=torch.tensor([0, 3, -1])), ValueError, "index"),
        (dict(index=torch.tensor([0, -2, 1])), ValueError, "index"),
        (dict(weight=torch.ones(3, dtype=torch.int64)), TypeError, "weight"),
        (dict(weight=torch.ones(2)), ValueError, "weight"),
    ],
)
def test_bad_arguments_raise(change, error, match):
    with pytest.raises(error, match=match):
        combine(**{**valid_args(), **change})


def test_bad_backward_arguments_raise():
    index, offsets = torch.tensor([0, 2, -1]), torch.tensor([0, 1, 3])
    with pytest.raises(ValueError, match="grad"):
        combine_backward(torch.ones(3, 2), index, offsets, None, "sum", 1, 3)  # 2 rows, not 3
    with pytest.raises(ValueError, match="grad"):
        combine_backward(torch.ones(2, 5), index, offsets, None, "tile", 2, 3)  # 5 % tile_len
    with pytest.raises(ValueError, match="num_rows"):
        combine_backward(torch.ones(2, 2), index, offsets, None, "sum", 1, -1)


# -- opcheck and torch.compile -------------------------------------------------------------------

def opcheck_cases():
    emb, index, offsets, weight = gradcheck_case(True)
    cases = []
    for combiner in COMBINERS:
        cases.append((combine, (emb, index, offsets, weight, combiner, 2)))
        cases.append((combine, (emb, index, offsets, None, combiner, 3)))
        width = 2 * 3 if combiner == "tile" else 3
        grad = torch.randn(4, width, dtype=torch.float64, requires_grad=True)
        cases.append((combine_backward, (grad, index, offsets, weight, combiner, 2, 5)))
    empty = torch.empty(0, dtype=torch.int64)
    cases.append((combine, (torch.randn(0, 4, requires_grad=True), empty, torch.tensor([0]), None, "mean", 1)))
    cases.append((combine, (torch.randn(0, 4, requires_grad=True), torch.tensor([-1, -1]), torch.tensor([0, 2, 2]),
                            None, "tile", 2)))
    cases.append((combine_backward, (torch.randn(0, 4), empty, torch.tensor([0]), None, "sum", 1, 3)))
    return cases


@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_opcheck(case):
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args)


def compile_step(emb, index, offsets, weight):
    pooled = combine(emb, index, offsets, weight, "mean", 0)
    tiled = combine(emb, index, offsets, None, "tile", 3)
    return pooled.square().sum() + tiled.sum()


def check_compiled_step(device: str):
    compiled = torch.compile(compile_step, fullgraph=True, dynamic=True)
    gen = torch.Generator().manual_seed(2)
    for n_rows, n_items in ((3, 10), (5, 17)):
        emb = torch.randn(6, 4, generator=gen).to(device).requires_grad_()
        index = torch.randint(-1, 6, (n_items,), generator=gen).to(device)
        offsets = torch.sort(torch.randint(0, n_items + 1, (n_rows + 1,), generator=gen)).values.to(device)
        weight = torch.rand(n_items, generator=gen).to(device)
        expected_emb = emb.detach().clone().requires_grad_()
        loss = compiled(emb, index, offsets, weight)
        expected = compile_step(expected_emb, index, offsets, weight)
        loss.backward(), expected.backward()
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(emb.grad, expected_emb.grad)


@pytest.mark.slow
def test_compiles_fullgraph_with_backward():
    check_compiled_step("cpu")


# -- Triton launchers (interpreter on CPU, or the GPU) -------------------------------------------

def assert_launcher_matches_cpu(case, dtype, sum_rtol=1e-6):
    """The Triton launchers against the CPU kernels. float32 sums run in another order (the
    forward in blocks, the backward's atomics in a run-dependent order): equal within rounding,
    relative to the magnitude of the terms summed (the same op of |emb| or |grad| and |weight|);
    tile copies exactly; float64 within 1e-12."""
    cpu_args = as_tensors(case, dtype=dtype)
    args = as_tensors(case, dtype=dtype, device=TRITON_DEVICE)
    emb, index, offsets, weight, combiner, tile_len = cpu_args
    magnitude_weight = None if weight is None else weight.abs()
    expected = combine(*cpu_args)
    actual = segment_combine_triton(*args)
    if combiner == "tile":
        torch.testing.assert_close(actual.cpu(), expected, rtol=0, atol=0)
    elif dtype == torch.float32:
        magnitude = combine(emb.abs(), index, offsets, magnitude_weight, combiner, tile_len)
        assert_matches(actual, expected.double().numpy(), magnitude.double().numpy(), rtol=sum_rtol, atol=1e-6)
    else:
        torch.testing.assert_close(actual.cpu(), expected, rtol=1e-12, atol=1e-15)
    # the gradient a concatenation's backward hands over: a column slice of a wider one, read in place
    rows, width = expected.shape
    wide = torch.randn((rows, width + 3), dtype=dtype, generator=torch.Generator().manual_seed(3))
    grad = wide[:, 1:width + 1]
    expected_grad = combine_backward(grad, index, offsets, weight, combiner, tile_len, emb.shape[0])
    actual_grad = segment_combine_backward_triton(wide.to(TRITON_DEVICE)[:, 1:width + 1], *args[1:], emb.shape[0])
    if dtype == torch.float32:
        magnitude = combine_backward(grad.abs(), index, offsets, magnitude_weight, combiner, tile_len, emb.shape[0])
        assert_matches(actual_grad, expected_grad.double().numpy(), magnitude.double().numpy(), rtol=sum_rtol,
                       atol=1e-6)
    else:
        tol = dict(rtol=1e-12, atol=1e-15) if combiner != "tile" else dict(rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(actual_grad.cpu(), expected_grad, **tol)


@settings(max_examples=25)
@given(combine_cases(max_rows=3, max_len=12, max_dim=6, max_unique=5))
def test_launchers_match_cpu(case):
    assert_launcher_matches_cpu(case, torch.float32)


@settings(max_examples=8)
@given(combine_cases(max_rows=3, max_len=12, max_dim=6, max_unique=5))
def test_launchers_match_cpu_float64(case):
    assert_launcher_matches_cpu(case, torch.float64)


@pytest.mark.parametrize("combiner", COMBINERS)
@pytest.mark.parametrize("weighted", [False, True])
def test_launcher_backward_hot_id_matches_cpu(combiner, weighted):
    # Row 2 is 150 of the 210 items (a hot id): 150 atomic adds into one row, against the CPU's
    # sequential index_add_.
    gen = np.random.default_rng(11)
    index = gen.permutation([2] * 150 + list(gen.integers(-1, 5, 60))).tolist()
    offsets = [0, 1, 3, 90, 90, 210]
    weight = gen.uniform(0, 2, 210).tolist() if weighted else None
    case = (gen.standard_normal((5, 4)).tolist(), index, offsets, weight, combiner, 100)
    assert_launcher_matches_cpu(case, torch.float32, sum_rtol=2e-5)  # sums of ~150 terms


@pytest.mark.parametrize("combiner", COMBINERS)
@pytest.mark.parametrize("num_rows", [12, 3000])
def test_launcher_backward_many_items_matches_cpu(combiner, num_rows):
    # 1200 items in 40 bags: into 12 embedding rows of ~100 items each (heavy duplication, as after
    # a Mod: ~100 atomic adds per row in a run-dependent order), or into 3000 rows, most of them
    # never hit (their gradient rows stay zero).
    gen = np.random.default_rng(12)
    index = gen.integers(-1, num_rows, 1200).tolist()
    offsets = np.sort(gen.integers(0, 1201, 41)).tolist()
    offsets[0], offsets[-1] = 0, 1200
    weight = gen.uniform(0, 2, 1200).tolist()
    case = (gen.standard_normal((num_rows, 3)).tolist(), index, offsets, weight, combiner, 20)
    assert_launcher_matches_cpu(case, torch.float32, sum_rtol=2e-5)


def test_launcher_bfloat16_matches_cpu():
    gen = torch.Generator().manual_seed(4)
    emb = torch.randn(4, 3, generator=gen).bfloat16()
    index, offsets, weight = torch.tensor([0, 3, -1, 3, 1]), torch.tensor([0, 2, 5]), torch.rand(5, generator=gen)
    for combiner in COMBINERS:
        args = (emb, index, offsets, weight, combiner, 2)
        expected = combine(*args)
        actual = segment_combine_triton(*(a.to(TRITON_DEVICE) if isinstance(a, torch.Tensor) else a for a in args))
        torch.testing.assert_close(actual.cpu(), expected, rtol=1e-2, atol=1e-2)


def test_launcher_tolerates_unvalidated_contents():
    # The CUDA path does not sync to validate: bad offsets are clamped, out-of-range index
    # entries act like -1; nothing outside the tensors is read or written.
    emb = torch.ones(2, 3, device=TRITON_DEVICE)
    index = torch.tensor([0, 7, -5, 1], device=TRITON_DEVICE)
    offsets = torch.tensor([-3, 2, 1, 9], device=TRITON_DEVICE)
    out = segment_combine_triton(emb, index, offsets, None, "sum", 1)
    assert out.cpu().tolist() == [[1.0] * 3, [0.0] * 3, [1.0] * 3]  # rows [0, 2), [2, 2), [1, 4)
    grad = segment_combine_backward_triton(torch.ones(3, 3, device=TRITON_DEVICE), index, offsets, None, "sum", 1, 2)
    assert grad.shape == (2, 3) and bool(grad.isfinite().all())


# -- CUDA == CPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@given(combine_cases())
def test_cuda_matches_cpu(case):
    cpu_args = as_tensors(case)
    cuda_args = as_tensors(case, device="cuda")
    expected = combine(*cpu_args)
    torch.testing.assert_close(combine(*cuda_args).cpu(), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5))
    num_rows = cpu_args[0].shape[0]
    expected_grad = combine_backward(grad, *cpu_args[1:], num_rows)
    actual_grad = combine_backward(grad.cuda(), *cuda_args[1:], num_rows)
    torch.testing.assert_close(actual_grad.cpu(), expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("combiner", COMBINERS)
def test_cuda_matches_cpu_large(combiner):
    # The seed tutorial's sparse4: B = 4096, rows up to 1000 ids, dim 16, tile_len 1000.
    gen = torch.Generator().manual_seed(6)
    n_rows, dim, n_unique = 4096, 16, 50_000
    lengths = torch.randint(0, 1001, (n_rows,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n_items = int(offsets[-1])
    index = torch.randint(-1, n_unique, (n_items,), generator=gen)
    weight = torch.rand(n_items, generator=gen)
    emb = torch.randn(n_unique, dim, generator=gen)
    args = (emb, index, offsets, weight, combiner, 1000)
    cuda_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    expected = combine(*args)
    torch.testing.assert_close(combine(*cuda_args).cpu(), expected, rtol=1e-4, atol=1e-4)
    grad = torch.randn(expected.shape, generator=gen)
    expected_grad = combine_backward(grad, *args[1:], n_unique)
    actual_grad = combine_backward(grad.cuda(), *cuda_args[1:], n_unique)
    torch.testing.assert_close(actual_grad.cpu(), expected_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_opcheck_cuda(case):
    op, args = opcheck_cases()[case]
    args = tuple(a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)


@pytest.mark.gpu
@pytest.mark.slow
def test_compiles_fullgraph_with_backward_cuda():
    check_compiled_step("cuda")

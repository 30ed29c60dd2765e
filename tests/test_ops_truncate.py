"""fxrec::sequence_truncate / _3d / _multi against pure-Python oracles (lists of indices)."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from fxrec.ops.triton.truncate import truncate_3d_triton, truncate_multi_triton, truncate_triton

HAS_CUDA = torch.cuda.is_available()
# Launchers run on the GPU when there is one, else on CPU tensors under TRITON_INTERPRET=1 (conftest).
LAUNCHER_DEVICE = "cuda" if HAS_CUDA else "cpu"

DTYPES = [torch.int64, torch.int32, torch.int8, torch.bool, torch.float16, torch.float32, torch.float64]
TRAILING = [(), (3,), (2, 2), (0,)]

truncate = torch.ops.fxrec.sequence_truncate
truncate_3d = torch.ops.fxrec.sequence_truncate_3d
truncate_multi = torch.ops.fxrec.sequence_truncate_multi


# -- helpers -------------------------------------------------------------------------------------

def make_values(n: int, trailing: tuple, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bit patterns (NaNs, infs, -0.0 for floats) plus the integer extremes."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, *trailing)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    numel = n * int(torch.tensor(trailing).prod()) if trailing else n
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    values = raw.view(dtype).reshape(shape)
    if not dtype.is_floating_point and values.numel() >= 2:
        info = torch.iinfo(dtype)
        values.view(-1)[:2] = torch.tensor([info.min, info.max], dtype=dtype)
    return values


def make_weight(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed + 1))


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    actual, expected = actual.detach().cpu().contiguous(), expected.detach().cpu().contiguous()
    assert torch.equal(actual.view(torch.uint8), expected.view(torch.uint8)), (actual, expected)


def assert_outputs_equal(actual, expected) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        if isinstance(e, (list, tuple)):
            assert_outputs_equal(a, e)
        else:
            assert_bits_equal(a, e)


def kept_part(items: list, seq_len: int, keep_last: bool) -> list:
    return items[max(len(items) - seq_len, 0):] if keep_last else items[:seq_len]


def truncate_oracle(offsets: list[int], seq_len: int, keep_last: bool) -> tuple[list[int], list[int]]:
    """(source index of every kept item, output offsets)."""
    index, out_offsets = [], [0]
    for begin, end in zip(offsets, offsets[1:]):
        kept = kept_part(list(range(begin, end)), seq_len, keep_last)
        index += kept
        out_offsets.append(out_offsets[-1] + len(kept))
    return index, out_offsets


def truncate_3d_oracle(outer: list[int], inner: list[int], seq_len: int, keep_last: bool):
    """(source index of every kept item, output outer offsets, output inner offsets)."""
    index, out_inner = [], [0]
    for begin, end in zip(outer, outer[1:]):
        kept = kept_part(list(range(begin, end)), seq_len, keep_last)
        for lst in kept:
            index += range(inner[lst], inner[lst + 1])
            out_inner.append(out_inner[-1] + inner[lst + 1] - inner[lst])
        out_inner += [out_inner[-1]] * (seq_len - len(kept))
    return index, [i * seq_len for i in range(len(outer))], out_inner


def expected_truncate(values, offsets, weight, seq_len, keep_last):
    index, out_offsets = truncate_oracle(offsets.tolist(), seq_len, keep_last)
    index = torch.tensor(index, dtype=torch.int64)
    out_weight = torch.empty(0) if weight is None else weight[index]
    return values[index], torch.tensor(out_offsets, dtype=torch.int64), out_weight


def to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


# -- strategies ----------------------------------------------------------------------------------

@st.composite
def offsets_from(draw, lengths: list[int]) -> tuple[list[int], int]:
    """Offsets over ``lengths``, starting after a few unused items and followed by a few more."""
    offsets = [draw(st.integers(0, 3))]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return offsets, offsets[-1] + draw(st.integers(0, 3))


@st.composite
def ragged_cases(draw, max_rows: int = 8, max_len: int = 8):
    """(values, offsets, weight | None, seq_len, keep_last)."""
    lengths = draw(st.lists(st.integers(0, max_len), max_size=max_rows))
    offsets, n_values = draw(offsets_from(lengths))
    seed = draw(st.integers(0, 2**31))
    values = make_values(n_values, draw(st.sampled_from(TRAILING)), draw(st.sampled_from(DTYPES)), seed)
    weight = make_weight(n_values, seed) if draw(st.booleans()) else None
    seq_len = draw(st.integers(1, max_len + 1))
    return values, torch.tensor(offsets, dtype=torch.int64), weight, seq_len, draw(st.booleans())


@st.composite
def ragged_3d_cases(draw, max_rows: int = 5, max_lists: int = 5, max_len: int = 4):
    """(values, outer_offsets, inner_offsets, weight | None, seq_len, keep_last)."""
    list_counts = draw(st.lists(st.integers(0, max_lists), max_size=max_rows))
    outer, n_lists = draw(offsets_from(list_counts))
    inner, n_values = draw(offsets_from(draw(st.lists(st.integers(0, max_len), min_size=n_lists, max_size=n_lists))))
    seed = draw(st.integers(0, 2**31))
    values = make_values(n_values, draw(st.sampled_from(TRAILING)), draw(st.sampled_from(DTYPES)), seed)
    weight = make_weight(n_values, seed) if draw(st.booleans()) else None
    seq_len = draw(st.integers(1, max_lists + 1))
    return (values, torch.tensor(outer, dtype=torch.int64), torch.tensor(inner, dtype=torch.int64), weight,
            seq_len, draw(st.booleans()))


def long_case(n_rows: int, max_len: int, seed: int, dtype=torch.int64, trailing=()):
    """Rows of 0..max_len items (some longer than 1024), offsets starting at 5, with weights."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (n_rows,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]) + 5
    n_values = int(offsets[-1]) + 7
    return offsets, make_values(n_values, trailing, dtype, seed), make_weight(n_values, seed)


# -- 2-D -----------------------------------------------------------------------------------------

@given(ragged_cases())
def test_truncate_matches_oracle(case):
    assert_outputs_equal(truncate(*case), expected_truncate(*case))


@pytest.mark.parametrize("keep_last", [False, True])
def test_truncate_long_rows(keep_last):
    # The seed tutorial: sequences up to 1999 long, seq_len 1000.
    offsets, values, weight = long_case(24, 2000, seed=3)
    case = (values, offsets, weight, 1000, keep_last)
    assert_outputs_equal(truncate(*case), expected_truncate(*case))


def test_truncate_pinned_example():
    values = torch.arange(10, 22)
    offsets = torch.tensor([1, 4, 4, 9, 11])
    out, out_offsets, weight = truncate(values, offsets, None, 2, False)  # "right": first 2
    assert out.tolist() == [11, 12, 14, 15, 19, 20] and out_offsets.tolist() == [0, 2, 2, 4, 6]
    assert weight.shape == (0,) and weight.dtype == torch.float32
    out, out_offsets, _ = truncate(values, offsets, None, 2, True)  # "left": last 2
    assert out.tolist() == [12, 13, 17, 18, 19, 20] and out_offsets.tolist() == [0, 2, 2, 4, 6]
    out, out_offsets, _ = truncate(values, offsets, None, 1, True)
    assert out.tolist() == [13, 18, 20] and out_offsets.tolist() == [0, 1, 1, 2, 3]


def test_truncate_outputs_are_fresh():
    values, offsets, weight = torch.arange(6), torch.tensor([0, 3, 6]), torch.ones(6)
    out, out_offsets, out_weight = truncate(values, offsets, weight, 10, False)
    out.fill_(-1), out_offsets.fill_(-1), out_weight.fill_(-1)
    assert values.tolist() == list(range(6)) and offsets.tolist() == [0, 3, 6] and weight.tolist() == [1.0] * 6


@pytest.mark.parametrize("seq_len", [0, -3])
def test_truncate_rejects_non_positive_seq_len(seq_len):
    with pytest.raises(ValueError, match="seq_len"):
        truncate(torch.arange(3), torch.tensor([0, 3]), None, seq_len, False)
    with pytest.raises(ValueError, match="seq_len"):
        truncate_3d(torch.arange(3), torch.tensor([0, 1]), torch.tensor([0, 3]), None, seq_len, False)
    with pytest.raises(ValueError, match=r"seq_lens\[1\]"):
        truncate_multi([torch.arange(3)] * 2, [torch.tensor([0, 3])] * 2, [None, None], [1, seq_len], [True, True])


# [0, 4, 0, 4, 0, 4]: the valid rows alone keep 12 items, more than the 4 values the CUDA path
# allocates for before its sync: the copy must stop at the allocation, the call must raise.
@pytest.mark.parametrize("offsets", [[0, 3, 2], [0, 5], [-1, 2], [0, 4, 0, 4, 0, 4]])
def test_truncate_rejects_bad_offsets(offsets):
    values, offsets = torch.arange(4), torch.tensor(offsets)
    with pytest.raises(ValueError, match="non-decreasing"):
        truncate(values, offsets, None, 2, False)
    with pytest.raises(ValueError, match="non-decreasing"):
        truncate_triton(*to(LAUNCHER_DEVICE, values, offsets), None, 2, False)


def test_truncate_rejects_bad_arguments():
    values = torch.arange(4)
    with pytest.raises(TypeError, match="offsets must be int64"):
        truncate(values, torch.tensor([0, 4], dtype=torch.int32), None, 2, False)
    with pytest.raises(ValueError, match="offsets must be 1-D"):
        truncate(values, torch.tensor([], dtype=torch.int64), None, 2, False)
    with pytest.raises(ValueError, match="weight must have one entry per item"):
        truncate(values, torch.tensor([0, 4]), torch.ones(3), 2, False)
    with pytest.raises(TypeError, match="weight must be floating point"):
        truncate(values, torch.tensor([0, 4]), torch.ones(4, dtype=torch.int64), 2, False)
    with pytest.raises(ValueError, match="values must have at least 1 dim"):
        truncate(torch.tensor(1), torch.tensor([0, 1]), None, 2, False)


# -- 3-D -----------------------------------------------------------------------------------------

def expected_truncate_3d(values, outer, inner, weight, seq_len, keep_last):
    index, out_outer, out_inner = truncate_3d_oracle(outer.tolist(), inner.tolist(), seq_len, keep_last)
    index = torch.tensor(index, dtype=torch.int64)
    out_weight = torch.empty(0) if weight is None else weight[index]
    return values[index], torch.tensor(out_outer), torch.tensor(out_inner), out_weight


@given(ragged_3d_cases())
def test_truncate_3d_matches_oracle(case):
    assert_outputs_equal(truncate_3d(*case), expected_truncate_3d(*case))


def test_truncate_3d_pads_with_empty_lists():
    # Row 0: lists [0,1], [2], [] ; row 1: no lists; row 2: [3,4,5], [6,7], [8,9,10,11].
    values = torch.arange(12)
    outer, inner = torch.tensor([0, 3, 3, 6]), torch.tensor([0, 2, 3, 3, 6, 8, 12])
    out, out_outer, out_inner, _ = truncate_3d(values, outer, inner, None, 2, False)
    assert out.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert out_outer.tolist() == [0, 2, 4, 6] and out_inner.tolist() == [0, 2, 3, 3, 3, 6, 8]
    out, out_outer, out_inner, _ = truncate_3d(values, outer, inner, None, 4, True)
    assert out.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert out_outer.tolist() == [0, 4, 8, 12]
    assert out_inner.tolist() == [0, 2, 3, 3, 3, 3, 3, 3, 3, 6, 8, 12, 12]


def test_truncate_3d_long_lists():
    inner, values, weight = long_case(40, 1500, seed=5)
    outer = torch.tensor([2, 2, 20, 21, 38])
    for keep_last in (False, True):
        case = (values, outer, inner, weight, 3, keep_last)
        assert_outputs_equal(truncate_3d(*case), expected_truncate_3d(*case))


def test_truncate_3d_rejects_bad_offsets():
    values = torch.arange(4)
    with pytest.raises(ValueError, match="non-decreasing"):
        truncate_3d(values, torch.tensor([0, 3]), torch.tensor([0, 2, 4]), None, 2, False)  # 3 > 2 lists
    with pytest.raises(ValueError, match="non-decreasing"):
        truncate_3d(values, torch.tensor([0, 2]), torch.tensor([0, 3, 1]), None, 2, False)
    with pytest.raises(ValueError, match="non-decreasing"):
        truncate_3d_triton(*to(LAUNCHER_DEVICE, values, torch.tensor([0, 2]), torch.tensor([0, 3, 9])), None, 2, False)


# -- multi ---------------------------------------------------------------------------------------

def single_calls(cases):
    outs = [truncate(*case) for case in cases]
    return [o[0] for o in outs], [o[1] for o in outs], [o[2] for o in outs]


def multi_args(cases):
    """Per-feature cases -> the multi op's five lists."""
    return [[case[i] for case in cases] for i in range(5)]


@given(st.lists(ragged_cases(max_rows=5, max_len=6), max_size=4))
def test_truncate_multi_equals_single_calls(cases):
    assert_outputs_equal(truncate_multi(*multi_args(cases)), single_calls(cases))


def test_truncate_multi_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="seq_lens has 1 entries but values has 2"):
        truncate_multi([torch.arange(3)] * 2, [torch.tensor([0, 3])] * 2, [None, None], [1], [True, True])
    with pytest.raises(ValueError, match=r"offsets\[1\] must be non-decreasing"):
        truncate_multi([torch.arange(3)] * 2, [torch.tensor([0, 3]), torch.tensor([2, 1])], [None, None],
                       [1, 1], [True, True])


# -- opcheck -------------------------------------------------------------------------------------

def opcheck_cases():
    values, offsets, weight = torch.arange(10, 22), torch.tensor([1, 4, 4, 9, 11]), torch.rand(12)
    empty = (torch.empty(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    return [
        (truncate, (values, offsets, weight, 2, True)),
        (truncate, (values.view(6, 2).float(), offsets // 2, None, 1, False)),
        (truncate, (*empty, None, 3, False)),
        (truncate_3d, (values, torch.tensor([0, 3, 3, 4]), torch.tensor([1, 3, 4, 4, 9]), weight, 2, True)),
        (truncate_3d, (*empty[:1], torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), None, 2,
                       False)),
        (truncate_multi, ([values, values.float()], [offsets, offsets[:2]], [None, weight], [2, 1], [True, False])),
        (truncate_multi, ([], [], [], [], [])),
    ]


@pytest.mark.parametrize("index", range(7))
def test_opcheck(index):
    op, args = opcheck_cases()[index]
    torch.library.opcheck(op, args)


@pytest.mark.slow
def test_compiles_fullgraph_with_data_dependent_sizes():
    def step(values, offsets, weight, outer, inner):
        single = truncate(values, offsets, weight, 3, True)
        multi = truncate_multi([values, values], [offsets, offsets], [weight, None], [2, 5], [False, True])
        return single, multi, truncate_3d(values, outer, inner, None, 2, False)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        for n_rows in (4, 7):
            offsets, values, weight = long_case(n_rows, 6, seed=n_rows)
            args = (values, offsets, weight, torch.tensor([0, 1, 1, n_rows]), offsets)
            assert_outputs_equal(compiled(*args), step(*args))


# -- Triton launchers (interpreter on CPU, or the GPU) -------------------------------------------

@settings(max_examples=20)
@given(ragged_cases(max_rows=4, max_len=5))
def test_truncate_launcher_matches_cpu(case):
    values, offsets, weight, seq_len, keep_last = case
    actual = truncate_triton(*to(LAUNCHER_DEVICE, values, offsets, weight), seq_len, keep_last)
    assert_outputs_equal(actual, truncate(*case))


@settings(max_examples=15)
@given(ragged_3d_cases(max_rows=3, max_lists=3, max_len=3))
def test_truncate_3d_launcher_matches_cpu(case):
    values, outer, inner, weight, seq_len, keep_last = case
    actual = truncate_3d_triton(*to(LAUNCHER_DEVICE, values, outer, inner, weight), seq_len, keep_last)
    assert_outputs_equal(actual, truncate_3d(*case))


def test_truncate_3d_launcher_overlapping_kept_lists():
    # Inner offsets that decrease between kept lists (list 1 = [4, 0) is not kept): rows 0 and 1
    # keep lists 0 and 2, both all 4 values, 8 items in all: more than the len(values) bound the
    # CUDA path allocates before its sync, so it copies again at the exact size.
    values, weight = make_values(4, (2,), torch.int16, seed=3), make_weight(4, seed=3)
    case = (values, torch.tensor([0, 1, 3]), torch.tensor([0, 4, 0, 4]), weight, 1, True)
    expected = expected_truncate_3d(*case)
    assert expected[0].shape[0] == 8
    assert_outputs_equal(truncate_3d(*case), expected)
    assert_outputs_equal(truncate_3d_triton(*to(LAUNCHER_DEVICE, *case[:4]), 1, True), expected)


@settings(max_examples=10)
@given(st.lists(ragged_cases(max_rows=3, max_len=4), max_size=3))
def test_truncate_multi_launcher_matches_cpu(cases):
    values, offsets, weights, seq_lens, keep_last = multi_args(cases)
    actual = truncate_multi_triton(to(LAUNCHER_DEVICE, *values), to(LAUNCHER_DEVICE, *offsets),
                                   to(LAUNCHER_DEVICE, *weights), seq_lens, keep_last)
    assert_outputs_equal(actual, single_calls(cases))


def test_truncate_multi_launcher_totals_over_row_blocks_and_empty_features():
    # A feature of more rows than one rows-kernel block (its total is summed over programs),
    # beside a feature without rows and one whose rows are all empty: each needs its offsets.
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(0, 4, (1100,), generator=gen)
    many = (torch.randint(-99, 99, (int(lengths.sum()),), generator=gen),
            torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]), None, 2, True)
    no_rows = (torch.arange(3), torch.tensor([1]), make_weight(3, seed=1), 4, False)
    empty_rows = (torch.arange(4), torch.tensor([2, 2, 2]), None, 1, False)
    cases = [many, no_rows, empty_rows]
    values, offsets, weights, seq_lens, keep_last = multi_args(cases)
    actual = truncate_multi_triton(to(LAUNCHER_DEVICE, *values), to(LAUNCHER_DEVICE, *offsets),
                                   to(LAUNCHER_DEVICE, *weights), seq_lens, keep_last)
    assert_outputs_equal(actual, single_calls(cases))


def test_truncate_launcher_rows_longer_than_a_block():
    offsets, values, weight = long_case(3, 1300, seed=11, dtype=torch.int16, trailing=(3,))
    for keep_last in (False, True):
        case = (values, offsets, weight, 1100, keep_last)
        assert_outputs_equal(truncate_triton(*to(LAUNCHER_DEVICE, values, offsets, weight), 1100, keep_last),
                             truncate(*case))


# -- CUDA ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@given(ragged_cases())
def test_truncate_cuda_matches_cpu(case):
    values, offsets, weight, seq_len, keep_last = case
    actual = truncate(*to("cuda", values, offsets, weight), seq_len, keep_last)
    assert_outputs_equal(actual, truncate(*case))


@pytest.mark.gpu
@given(ragged_3d_cases())
def test_truncate_3d_cuda_matches_cpu(case):
    values, outer, inner, weight, seq_len, keep_last = case
    actual = truncate_3d(*to("cuda", values, outer, inner, weight), seq_len, keep_last)
    assert_outputs_equal(actual, truncate_3d(*case))


@pytest.mark.gpu
@given(st.lists(ragged_cases(), max_size=5))
def test_truncate_multi_cuda_matches_cpu(cases):
    values, offsets, weights, seq_lens, keep_last = multi_args(cases)
    actual = truncate_multi(to("cuda", *values), to("cuda", *offsets), to("cuda", *weights), seq_lens, keep_last)
    assert_outputs_equal(actual, single_calls(cases))


@pytest.mark.gpu
def test_truncate_cuda_large():
    # B = 4096 rows up to 2000 long, seq_len 1000 (the seed tutorial's shape), several features.
    cases = []
    for seed, (dtype, trailing) in enumerate([(torch.int64, ()), (torch.float32, (4,)), (torch.int8, ())]):
        offsets, values, weight = long_case(4096, 2000, seed=seed, dtype=dtype, trailing=trailing)
        cases.append((values, offsets, weight if seed != 1 else None, 1000 - seed, seed % 2 == 0))
    expected = single_calls(cases)
    cuda_cases = [(*to("cuda", v, o, w), s, k) for v, o, w, s, k in cases]
    assert_outputs_equal(single_calls(cuda_cases), expected)
    assert_outputs_equal(truncate_multi(*multi_args(cuda_cases)), expected)
    inner, values, weight = long_case(4096 * 8, 40, seed=9)
    outer = torch.arange(0, 4096 * 8 + 1, 8)
    for keep_last in (False, True):
        case = (values, outer, inner, weight, 5, keep_last)
        assert_outputs_equal(truncate_3d(*to("cuda", values, outer, inner, weight), 5, keep_last), truncate_3d(*case))


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(7))
def test_opcheck_cuda(index):
    op, args = opcheck_cases()[index]
    args = tuple(a.cuda() if isinstance(a, torch.Tensor)
                 else [t.cuda() if isinstance(t, torch.Tensor) else t for t in a] if isinstance(a, list) else a
                 for a in args)
    torch.library.opcheck(op, args)

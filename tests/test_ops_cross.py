"""Tests of ``fxrec::feature_cross`` (SPEC §3.5) against a pure-Python oracle."""

import struct
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxrec  # noqa: F401  (registers torch.ops.fxrec.*)
from fxrec.ops.cross import feature_cross_with_triton
import fxrec.ops.triton.cross as triton_cross
from fxrec.ops.triton.cross import SHORT_ROW
from oracles import murmur64a

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
cross = torch.ops.fxrec.feature_cross
# Without CUDA the Triton path runs under TRITON_INTERPRET=1 (set by conftest) on CPU tensors.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# --- oracle -------------------------------------------------------------------------------


def cross_id(a: int, b: int) -> int:
    return murmur64a(struct.pack("<qq", a, b))


def keep_first(ids, weights):
    first = {}
    for i, w in zip(ids, weights):
        first.setdefault(i, w)
    return first


def oracle(x_rows, x_w, y_rows, y_w, weight_dtype):
    """x_rows/y_rows: lists of id lists; x_w/y_w: matching weight lists or None."""
    np_dtype = np.float64 if weight_dtype == torch.float64 else np.float32
    ids, offsets, weights = [], [0], []
    for b, (xr, yr) in enumerate(zip(x_rows, y_rows)):
        ux = keep_first(xr, x_w[b] if x_w is not None else [None] * len(xr))
        uy = keep_first(yr, y_w[b] if y_w is not None else [None] * len(yr))
        for xi in sorted(ux):
            for yj in sorted(uy):
                ids.append(cross_id(xi, yj))
                factors = [np_dtype(w) for w in (ux[xi], uy[yj]) if w is not None]
                with np.errstate(invalid="ignore", over="ignore"):  # inf * 0, overflow: as IEEE says
                    weights.append(np.prod(factors, dtype=np_dtype) if factors else np_dtype(1.0))
        offsets.append(len(ids))
    return ids, offsets, np.array(weights, dtype=np_dtype)


# --- inputs -------------------------------------------------------------------------------


def ragged(rows, weights=None, weight_dtype=None, prefix=(), suffix=()):
    """(values, offsets, weight) tensors; ``prefix``/``suffix`` items lie outside every row."""
    flat = [i for row in rows for i in row]
    values = torch.tensor(list(prefix) + flat + list(suffix), dtype=torch.int64)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)]) + len(prefix)
    weight = None
    if weights is not None:
        junk = [7.0] * (len(prefix)), [7.0] * len(suffix)
        weight = torch.tensor(junk[0] + [w for row in weights for w in row] + junk[1], dtype=weight_dtype)
    return values, offsets, weight


ids_st = st.one_of(
    st.integers(-3, 3),  # duplicates and negatives
    st.sampled_from([INT64_MIN, INT64_MIN + 1, INT64_MAX - 1, INT64_MAX]),
    st.integers(INT64_MIN, INT64_MAX),
)


@st.composite
def feature_st(draw, num_rows, max_len=6):
    rows = draw(st.lists(st.lists(ids_st, max_size=max_len), min_size=num_rows, max_size=num_rows))
    weight_dtype = draw(st.sampled_from([None, torch.float32, torch.float64, torch.float16]))
    weights = None
    if weight_dtype is not None:
        # Weights exactly representable in their dtype, so the oracle sees what the op sees.
        width = 16 if weight_dtype == torch.float16 else 32
        weight_st = st.floats(width=width, allow_nan=True, allow_infinity=True)
        weights = [[draw(weight_st) for _ in row] for row in rows]
    prefix = draw(st.lists(ids_st, max_size=2))
    suffix = draw(st.lists(ids_st, max_size=2))
    return rows, weights, weight_dtype, prefix, suffix


@st.composite
def cross_inputs_st(draw, max_rows=6, max_len=6):
    num_rows = draw(st.integers(0, max_rows))
    return draw(feature_st(num_rows, max_len)), draw(feature_st(num_rows, max_len))


def out_weight_dtype(x_dtype, y_dtype):
    return torch.float64 if torch.float64 in (x_dtype, y_dtype) else torch.float32


def args_of(x, y):
    (xr, xw, xd, xp, xs), (yr, yw, yd, yp, ys) = x, y
    return (*ragged(xr, xw, xd, xp, xs), *ragged(yr, yw, yd, yp, ys))


def assert_matches_oracle(x, y, result):
    (xr, xw, xd, *_), (yr, yw, yd, *_) = x, y
    weight_dtype = out_weight_dtype(xd, yd)
    ids, offsets, weights = oracle(xr, xw, yr, yw, weight_dtype)
    values, out_offsets, weight = result
    assert values.dtype == torch.int64 and out_offsets.dtype == torch.int64
    assert values.tolist() == ids
    assert out_offsets.tolist() == offsets
    assert weight.dtype == weight_dtype
    torch.testing.assert_close(weight, torch.from_numpy(weights), rtol=0, atol=0, equal_nan=True)


def assert_same(a, b):
    for p, q in zip(a, b):
        assert p.dtype == q.dtype and p.shape == q.shape
        torch.testing.assert_close(p.cpu(), q.cpu(), rtol=0, atol=0, equal_nan=True)


# --- tests --------------------------------------------------------------------------------


def test_pinned_values():
    values, offsets, _ = ragged([[1001], [1002], [1003]])
    y_values, y_offsets, _ = ragged([[1], [2], [3]])
    ids, _, _ = cross(values, offsets, None, y_values, y_offsets, None)
    assert ids.tolist() == [-7808879811642834040, -4967483181219983279, 1752425377096056168]
    same, same_offsets, _ = ragged([[1], [2], [3]])
    ids, _, _ = cross(same, same_offsets, None, same, same_offsets, None)
    assert [(i % (1 << 64)) % 1000 for i in ids.tolist()] == [216, 2, 783]


def test_oracle_murmur_matches_spec_hash_pins():
    # SPEC §3.4's byte-string pins check the oracle's MurmurHash64A independently of §3.5.
    assert murmur64a(bytes([0, 1, 2])) == -4003751876240412087
    assert murmur64a(bytes([5, 6, 7])) == 4434088491466393040


@given(cross_inputs_st())
def test_matches_oracle(inputs):
    x, y = inputs
    assert_matches_oracle(x, y, cross(*args_of(x, y)))


def long_row_inputs():
    # One row of 50 x 40 unique ids (plus duplicates) = 2000 pairs > 1024, between short rows.
    gen = torch.Generator().manual_seed(0)
    long_x = torch.randint(-(1 << 62), 1 << 62, (50,), generator=gen).tolist()
    long_y = torch.randint(-(1 << 62), 1 << 62, (40,), generator=gen).tolist()
    long_x = long_x + long_x[:5]
    long_y = long_y[:3] + long_y
    x_rows = [[1, 1, 2], long_x, []]
    y_rows = [[3], long_y, [4]]
    x_weights = [[float(i) for i in range(len(r))] for r in x_rows]
    x = (x_rows, x_weights, torch.float32, [9], [])
    y = (y_rows, None, None, [], [5, 5])
    return x, y


def test_long_row_matches_oracle():
    x, y = long_row_inputs()
    result = cross(*args_of(x, y))
    assert result[1].tolist() == [0, 2, 2002, 2002]
    assert_matches_oracle(x, y, result)


def test_row_count_mismatch():
    x_values, x_offsets, _ = ragged([[1], [2], [3]])
    y_values, y_offsets, _ = ragged([[1], [2]])
    with pytest.raises(ValueError, match="x has 3 rows but y has 2 rows"):
        cross(x_values, x_offsets, None, y_values, y_offsets, None)


def test_bad_arguments():
    values, offsets, weight = ragged([[1, 2], [3]], [[1.0, 2.0], [3.0]], torch.float32)
    with pytest.raises(TypeError, match="x_values must be int64"):
        cross(values.int(), offsets, None, values, offsets, None)
    with pytest.raises(TypeError, match="y_offsets must be int64"):
        cross(values, offsets, None, values, offsets.int(), None)
    with pytest.raises(TypeError, match="x_weight must be floating point"):
        cross(values, offsets, values, values, offsets, None)
    with pytest.raises(ValueError, match="y_weight has 2 items but y_values has 3"):
        cross(values, offsets, None, values, offsets, weight[:2])
    with pytest.raises(ValueError, match="x_offsets needs at least one element"):
        cross(values, offsets[:0], None, values, offsets[:0], None)
    for bad in ([0, 2, 1, 3], [-1, 0, 1, 3], [0, 1, 2, 4]):
        with pytest.raises(ValueError, match="y_offsets must be non-decreasing"):
            cross(values, torch.tensor([0, 1, 2, 3]), None, values, torch.tensor(bad), None)


def test_inputs_are_not_written():
    x, y = long_row_inputs()
    args = args_of(x, y)
    before = [a.clone() if a is not None else None for a in args]
    cross(*args)
    for a, b in zip(args, before):
        assert (a is None and b is None) or torch.equal(a, b)


OPCHECK_CASES = {
    "weights_both": (
        ([[5, 3, 5], [], [-1, 7, 7]], [[1.0, 2.0, 3.0], [], [4.0, 5.0, 6.0]], torch.float32, [0], []),
        ([[2, 2, 1], [0, 4], [4]], [[1.0, 2.0, 3.0], [4.0, 5.0], [6.0]], torch.float64, [], [8]),
    ),
    "weights_none": (([[1, 2], [3]], None, None, [], []), ([[4], [5, 6, 5]], None, None, [], [])),
    "weight_y_only": (([[1, 2]], None, None, [], []), ([[4, 3]], [[0.5, 2.0]], torch.float32, [1], [])),
    "empty_rows": (([[], [1]], None, None, [], []), ([[1], []], None, None, [], [])),
    "no_rows": (([], None, None, [3], []), ([], None, None, [], [])),
}


@pytest.mark.parametrize("case", OPCHECK_CASES.values(), ids=OPCHECK_CASES.keys())
def test_opcheck(case):
    torch.library.opcheck(cross, args_of(*case))


def to_device(args, device):
    return tuple(None if a is None else a.to(device) for a in args)


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@settings(max_examples=15)
@given(cross_inputs_st(max_rows=4, max_len=4))
def test_triton_path_matches_cpu(inputs):
    args = args_of(*inputs)
    assert_same(feature_cross_with_triton(*to_device(args, TRITON_DEVICE)), cross(*args))


def test_triton_path_long_row_matches_cpu():
    args = args_of(*long_row_inputs())
    assert_same(feature_cross_with_triton(*to_device(args, TRITON_DEVICE)), cross(*args))


@pytest.mark.parametrize("long_side", ["x", "y", "both"])
def test_triton_path_rows_past_short_row_fall_back_to_sorts(long_side):
    # Rows of SHORT_ROW + 6 items (with duplicates) on one or both sides, beside short rows.
    gen = torch.Generator().manual_seed(2)
    many = (torch.randint(-50, 50, (SHORT_ROW + 6,), generator=gen)).tolist()
    few = [3, -1, 3]
    x_rows = [few, many if long_side in ("x", "both") else few, []]
    y_rows = [[7], many if long_side in ("y", "both") else few, [1, 1]]
    x = (x_rows, [[float(i) for i in range(len(r))] for r in x_rows], torch.float32, [9], [])
    y = (y_rows, None, None, [], [5])
    args = args_of(x, y)
    result = feature_cross_with_triton(*to_device(args, TRITON_DEVICE))
    assert_same(result, cross(*args))
    assert_matches_oracle(x, y, tuple(t.cpu() for t in result))


@pytest.mark.filterwarnings("ignore:torch.searchsorted")  # the CPU kernel copies strided offsets
def test_triton_path_strided_inputs_match_cpu():
    # Every other id, offsets and weight: views the kernels must not read as dense.
    values = torch.tensor([5, -1, 5, -1, 7, -1, INT64_MIN, -1, 2, -1, 5, -1])
    offsets, weight = torch.tensor([0, 9, 3, 9, 6]), torch.arange(12, dtype=torch.float32)
    args = (values[::2], offsets[::2], weight[::2], values[1::2], offsets[::2], weight[1::2])
    assert_same(feature_cross_with_triton(*to_device(args, TRITON_DEVICE)), cross(*args))


def test_triton_path_tiny_and_short_rows_over_scan_blocks(monkeypatch):
    # More rows than one step of the plan kernel's final scan (its running total carries over;
    # steps of 16 rows here, to keep the interpreter fast),
    # rows of at most 8 items on both sides (the tiny path) beside rows of 9..SHORT_ROW items on
    # one side (the SHORT_ROW path), and an output longer than either input (the pair kernel's
    # relaunch at the exact size) as well as one that fits (no relaunch).
    monkeypatch.setattr(triton_cross, "_SCAN_BLOCK", 16)
    gen = torch.Generator().manual_seed(4)
    num_rows = 40
    x_rows = [torch.randint(-9, 9, (int(n),), generator=gen).tolist() for n in torch.randint(0, 3, (num_rows,))]
    y_rows = [torch.randint(-9, 9, (int(n),), generator=gen).tolist() for n in torch.randint(0, 3, (num_rows,))]
    x_rows[5] = torch.randint(-99, 99, (9,), generator=gen).tolist()
    x_rows[30], y_rows[30] = [1, 2, 3], torch.randperm(SHORT_ROW, generator=gen).tolist()
    for y_side, longer in ((y_rows, True), ([[1]] * num_rows, False)):
        x = (x_rows, None, None, [], [])
        y = (y_side, [[0.5] * len(r) for r in y_side], torch.float64, [2], [])
        args = args_of(x, y)
        result = feature_cross_with_triton(*to_device(args, TRITON_DEVICE))
        assert (result[0].numel() > max(args[0].numel(), args[3].numel())) == longer
        assert_same(result, cross(*args))
        assert_matches_oracle(x, y, tuple(t.cpu() for t in result))


@pytest.mark.parametrize("side", ["x", "y"])
@pytest.mark.parametrize("bad", [[0, 2, 1, 3], [-1, 0, 1, 3], [0, 1, 2, 4], [-2, 1, 2, 3], [4], [-1]])
def test_triton_path_rejects_bad_offsets(side, bad):
    # Decreasing, starting below 0, ending past values, a bad first entry beside good rows, and
    # bad single entries of zero-row offsets: every one is reported through the one status read.
    values = torch.tensor([1, 2, 3])
    good = torch.tensor([0, 1, 2, 3][: len(bad)])
    x_offsets, y_offsets = (torch.tensor(bad), good) if side == "x" else (good, torch.tensor(bad))
    args = to_device((values, x_offsets, None, values, y_offsets, None), TRITON_DEVICE)
    with pytest.raises(ValueError, match=f"{side}_offsets must be non-decreasing"):
        feature_cross_with_triton(*args)
    with pytest.raises(ValueError, match=f"{side}_offsets must be non-decreasing"):
        cross(*to_device(args, "cpu"))


def to_cuda(args):
    return to_device(args, "cuda")


@pytest.mark.gpu
@given(cross_inputs_st(max_rows=16, max_len=12))
def test_cuda_matches_cpu(inputs):
    args = args_of(*inputs)
    result = cross(*to_cuda(args))
    assert all(t.is_cuda for t in result)
    assert_same(result, cross(*args))


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype, y_dtype", [(torch.float32, torch.float64), (None, None), (None, torch.float32)])
def test_cuda_large_matches_cpu(x_dtype, y_dtype):
    gen = torch.Generator().manual_seed(1)
    num_rows = 4096

    def feature(max_len, id_range, dtype):
        lengths = torch.randint(0, max_len + 1, (num_rows,), generator=gen)
        lengths[::97] = 0
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)]) + 3
        values = torch.randint(-id_range, id_range, (int(offsets[-1]) + 5,), generator=gen)
        weight = None if dtype is None else torch.rand(values.shape[0], generator=gen).to(dtype)
        return values, offsets, weight

    args = (*feature(40, 30, x_dtype), *feature(60, 1 << 62, y_dtype))
    # One very long row (3000 x 2000 ids before de-duplication) on top of the short ones.
    long_x = torch.arange(3000) * 7919 - 5000
    long_y = torch.randint(INT64_MIN, INT64_MAX, (2000,), generator=gen)
    long_args = ragged([long_x.tolist(), [1]]) + ragged([long_y.tolist(), [2]])
    for case in (args, long_args):
        result = cross(*to_cuda(case))
        expected = cross(*case)
        assert expected[0].numel() > 100_000
        assert_same(result, expected)


@pytest.mark.gpu
def test_cuda_offsets_scan_over_many_programs():
    # The output offsets are written by whichever plan program finishes last, from every other
    # program's pair count: 60000 rows (thousands of programs in flight), repeated, so that a
    # missing memory-ordering guarantee would show as a wrong offset.
    gen = torch.Generator().manual_seed(6)
    num_rows = 60_000
    x_lengths = torch.randint(0, 3, (num_rows,), generator=gen)
    y_lengths = torch.randint(0, 2, (num_rows,), generator=gen)
    x_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), x_lengths.cumsum(0)])
    y_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), y_lengths.cumsum(0)])
    args = (torch.randint(-5, 5, (int(x_offsets[-1]),), generator=gen), x_offsets, None,
            torch.randint(-5, 5, (int(y_offsets[-1]),), generator=gen), y_offsets, None)
    expected = cross(*args)
    cuda_args = to_cuda(args)
    for _ in range(20):
        assert_same(cross(*cuda_args), expected)


@pytest.mark.gpu
def test_cuda_syncs_once():
    args = to_cuda(args_of(*long_row_inputs()))
    cross(*args)  # compiles the Triton kernel outside the counted call
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            cross(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compile(device):
    def crossed_mod(x_values, x_offsets, x_weight, y_values, y_offsets):
        ids, offsets, weight = cross(x_values, x_offsets, x_weight, y_values, y_offsets, None)
        return ids % 1000, offsets, weight * 2

    compiled = torch.compile(crossed_mod, fullgraph=True, dynamic=True)
    # The data-dependent output length needs Dynamo to capture dynamic output shapes.
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        for x, y in OPCHECK_CASES.values():
            x_values, x_offsets, _, y_values, y_offsets, _ = args_of(x, y)
            args = to_device((x_values, x_offsets, torch.rand(x_values.shape[0]), y_values, y_offsets), device)
            assert_same(compiled(*args), crossed_mod(*args))

"""Tagged index ops (``tags=``: several tables' ids in one index, ``table_coalesce``) against a
pure Python dict oracle keyed by (tag, id): the CPU kernel, the Triton kernel under the
interpreter (tiny inputs), opcheck, and (marked ``gpu``) CUDA == CPU."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxrec  # noqa: F401  (registers torch.ops.fxrec.*)
from fxrec.ops.table import (
    EMPTY, FILLED, MAX_TAG, OCCUPANCY, TAG_SHIFT, filled_state, new_index, run_starts, table_items, tag_dtype,
    unique_tagged,
)
from fxrec.ops.triton.table import table_find_or_insert_triton, table_find_triton
from oracles import mix64

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
GAMMA = 0x9E3779B97F4A7C15
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

find = torch.ops.fxrec.table_find


def find_or_insert(keys, state, ids, tags=None, counts=None):
    """The op, whose ``tags`` and ``counts`` have no defaults (its docstring says why)."""
    return torch.ops.fxrec.table_find_or_insert(keys, state, ids, tags, counts)

an_id = st.one_of(st.sampled_from([INT64_MIN, -1, 0, 1, INT64_MAX]), st.integers(-6, 6),
                  st.integers(INT64_MIN, INT64_MAX))
a_tag = st.sampled_from([0, 1, 2, 7, MAX_TAG])
pairs_st = st.lists(st.tuples(a_tag, an_id), max_size=24)
a_batch = st.tuples(st.sampled_from(["insert", "find"]), pairs_st)


def as_tensors(pairs, device="cpu"):
    tags = torch.tensor([t for t, _ in pairs], dtype=torch.int32, device=device)
    ids = torch.tensor([i for _, i in pairs], dtype=torch.int64, device=device)
    return ids, tags


def contents(keys, state) -> dict[tuple[int, int], int]:
    """``{(tag, id): row}`` of an index, read from its arrays directly."""
    out = {}
    for row, (k, s) in enumerate(zip(keys.tolist(), state.tolist())):
        assert s & OCCUPANCY in (EMPTY, FILLED)  # nothing left mid-write
        if s & OCCUPANCY == FILLED:
            out[(s >> TAG_SHIFT, k)] = row
        else:
            assert s == EMPTY
    return out


def run(capacity, batches, device, find_fn, insert_fn, first_occurrence):
    keys, state = new_index(capacity, device)
    oracle: dict[tuple[int, int], int] = {}
    for kind, pairs in batches:
        if kind == "find":
            queries = pairs + list(oracle)
            before = keys.clone(), state.clone()
            rows = find_fn(keys, state, *as_tensors(queries, device))
            assert rows.tolist() == [oracle.get(p, -1) for p in queries]
            assert torch.equal(keys, before[0]) and torch.equal(state, before[1])
            continue
        if len(oracle) + len(set(pairs) - oracle.keys()) > capacity:
            continue
        rows, inserted = insert_fn(keys, state, *as_tensors(pairs, device))
        seen: dict[tuple[int, int], list[tuple[int, int, bool]]] = {}
        for pos, (p, row, ins) in enumerate(zip(pairs, rows.tolist(), inserted.tolist())):
            if p in oracle:
                assert row == oracle[p] and not ins
            else:
                seen.setdefault(p, []).append((pos, row, ins))
        taken = set(oracle.values())
        for p, occ in seen.items():
            assert len({row for _, row, _ in occ}) == 1
            marked = [pos for pos, _, ins in occ if ins]
            assert len(marked) == 1
            if first_occurrence:
                assert marked[0] == occ[0][0]
            assert occ[0][1] not in taken  # the same id under two tags: two rows
            taken.add(occ[0][1])
            oracle[p] = occ[0][1]
        assert contents(keys.cpu(), state.cpu()) == oracle
    for tag in {t for t, _ in oracle}:
        ids, rows = table_items(keys.cpu(), state.cpu(), tag)
        assert dict(zip(ids.tolist(), rows.tolist())) == {i: r for (t, i), r in oracle.items() if t == tag}


@given(capacity=st.sampled_from([1, 2, 8, 64]), batches=st.lists(a_batch, min_size=1, max_size=5))
def test_cpu_matches_oracle(capacity, batches):
    run(capacity, batches, "cpu", find, find_or_insert, first_occurrence=True)


@given(capacity=st.sampled_from([2, 16, 64]), batches=st.lists(a_batch, min_size=1, max_size=3))
def test_triton_matches_oracle(capacity, batches):
    run(capacity, batches, TRITON_DEVICE, table_find_triton, table_find_or_insert_triton, first_occurrence=False)


@given(pairs=pairs_st, queries=pairs_st)
def test_triton_find_equals_cpu_find(pairs, queries):
    keys, state = new_index(64)
    find_or_insert(keys, state, *as_tensors(pairs))
    expect = find(keys, state, *as_tensors(queries))
    got = table_find_triton(keys.to(TRITON_DEVICE), state.to(TRITON_DEVICE), *as_tensors(queries, TRITON_DEVICE))
    assert got.tolist() == expect.tolist()


many_tags_st = st.one_of(a_tag, st.integers(0, MAX_TAG))
# all of one pair (every occurrence a duplicate), or pairs of many tags
dup_pairs_st = st.builds(lambda pair, n: [pair] * n, st.tuples(a_tag, an_id), st.integers(1, 6))


def narrowed(pairs, tags):
    """``tags`` in ``tag_dtype`` of their largest value: what the lookups pass."""
    return tags.to(tag_dtype(max((t for t, _ in pairs), default=0)))


# tags a uint8 / int16 sort holds, their edges included
narrow_tags_st = st.one_of(st.sampled_from([0, 1, 0xFF, 0x100, 0x7FFF]), st.integers(0, 0x7FFF))


@given(pairs=st.one_of(pairs_st, st.lists(st.tuples(many_tags_st, an_id), max_size=40), dup_pairs_st,
                       st.lists(st.tuples(narrow_tags_st, an_id), max_size=40)),
       narrow=st.booleans())
def test_unique_tagged_equals_sorted_set(pairs, narrow):
    ids, tags = as_tensors(pairs)
    uniq, uniq_tags, inverse, counts = unique_tagged(ids, narrowed(pairs, tags) if narrow else tags)
    distinct = sorted(set(pairs))
    assert list(zip(uniq_tags.tolist(), uniq.tolist())) == distinct
    assert uniq.dtype == torch.int64 and uniq_tags.dtype == torch.int32
    assert [distinct[i] for i in inverse.tolist()] == pairs
    assert counts.tolist() == [pairs.count(p) for p in distinct]


def test_tag_dtype_is_the_narrowest_that_holds_the_tags():
    for max_tag, dtype in [(0, torch.uint8), (0xFF, torch.uint8), (0x100, torch.int16), (0x7FFF, torch.int16),
                           (0x8000, torch.int32), (MAX_TAG, torch.int32)]:
        assert tag_dtype(max_tag) == dtype
        assert torch.tensor([max_tag]).to(dtype).item() == max_tag
    for bad in (-1, MAX_TAG + 1):
        with pytest.raises(ValueError, match="max_tag must lie in"):
            tag_dtype(bad)


an_int32 = st.one_of(st.sampled_from([-(2**31), -1, 0, 1, 2**31 - 1]), st.integers(-3, 3))


@given(values_dtype=st.one_of(st.tuples(st.lists(an_id, max_size=24), st.just(torch.int64)),
                              st.tuples(st.lists(an_int32, max_size=24), st.just(torch.int32))))
def test_run_starts_marks_first_and_changes(values_dtype):
    values, dtype = values_dtype
    starts = run_starts(torch.tensor(values, dtype=dtype))
    assert starts.dtype == torch.bool
    assert starts.tolist() == [i == 0 or v != values[i - 1] for i, v in enumerate(values)]


def test_tag_zero_is_untagged_and_home_slot():
    """tags of 0 are the untagged index (same slots, same states); tag t starts at
    mix64(id + t * GAMMA)."""
    ids = torch.tensor([5, -1, INT64_MIN, 5], dtype=torch.int64)
    a, b = new_index(1024), new_index(1024)
    rows_a, _ = find_or_insert(*a, ids)
    rows_b, _ = find_or_insert(*b, ids, torch.zeros(4, dtype=torch.int32))
    assert torch.equal(rows_a, rows_b) and torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    for tag in (1, 3, MAX_TAG):
        keys, state = new_index(1024)
        rows, _ = find_or_insert(keys, state, torch.tensor([42]), torch.tensor([tag], dtype=torch.int32))
        assert rows.tolist() == [mix64((42 + tag * GAMMA) % 2**64) & 1023]
        assert state[rows].tolist() == [filled_state(tag)] == [FILLED | tag << TAG_SHIFT]
        assert find(keys, state, torch.tensor([42])).tolist() == [-1]  # untagged: tag 0, absent


def test_validation():
    keys, state = new_index(8)
    ids = torch.tensor([1, 2])
    for op in (find, find_or_insert):
        with pytest.raises(TypeError, match="tags must be int32"):
            op(keys, state, ids, ids)
        with pytest.raises(ValueError, match=r"tags has shape \(1,\), ids \(2,\)"):
            op(keys, state, ids, torch.zeros(1, dtype=torch.int32))
        with pytest.raises(ValueError, match=rf"tags must lie in \[0, {MAX_TAG}\]"):
            op(keys, state, ids, torch.tensor([0, -1], dtype=torch.int32))
        with pytest.raises(ValueError, match="tags must lie in"):
            op(keys, state, ids, torch.tensor([MAX_TAG + 1, 0], dtype=torch.int32))
    assert not state.any()


# a few tables' ids (tags 0-3) in runs of one tag, as the lookups pass them, or interleaved;
# a batch is (pairs, untagged: the ids alone, tag 0)
few_tags_st = st.one_of(
    st.lists(st.tuples(st.integers(0, 3), st.lists(an_id, max_size=300)), max_size=4).map(
        lambda runs: [(t, i) for t, values in runs for i in values]),
    st.lists(st.tuples(st.integers(0, 3), an_id), max_size=40), dup_pairs_st.map(lambda p: [(p[0][0] % 4, p[0][1])] * len(p)))
counted_batches_st = st.lists(st.tuples(few_tags_st, st.booleans()), min_size=1, max_size=3)


def check_insert_counts(batches, device, insert_fn):
    """``counts[tag]`` after each batch == the distinct (tag, id) pairs inserted so far."""
    keys, state = new_index(4096, device)
    counts = torch.zeros(4, dtype=torch.int64, device=device)
    held: set[tuple[int, int]] = set()
    for pairs, untagged in batches:
        if untagged:
            pairs = [(0, i) for _, i in pairs]
        ids, tags = as_tensors(pairs, device)
        insert_fn(keys, state, ids, None if untagged else tags, counts)
        held.update(pairs)
        assert counts.tolist() == [sum(t == tag for t, _ in held) for tag in range(4)]


@given(batches=counted_batches_st)
def test_insert_counts_per_tag(batches):
    check_insert_counts(batches, "cpu", find_or_insert)


@given(batches=counted_batches_st)
def test_triton_insert_counts_per_tag(batches):
    check_insert_counts(batches, TRITON_DEVICE, table_find_or_insert_triton)


@pytest.mark.gpu
@given(batches=counted_batches_st)
def test_cuda_insert_counts_per_tag(batches):
    check_insert_counts(batches, "cuda", find_or_insert)


def test_insert_counts_validation():
    keys, state = new_index(8)
    ids, tags = torch.tensor([1, 2]), torch.tensor([0, 1], dtype=torch.int32)
    for bad in (torch.zeros(2, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int64)):
        with pytest.raises(TypeError, match="fxrec::table_find_or_insert: counts must be a 1-D int64"):
            find_or_insert(keys, state, ids, tags, bad)
    with pytest.raises(ValueError, match=r"tags must lie in \[0, 0\] \(counts has 1 entries"):
        find_or_insert(keys, state, ids, tags, torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="counts is empty"):
        find_or_insert(keys, state, ids, None, torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="counts must be contiguous"):
        find_or_insert(keys, state, ids, tags, torch.zeros(4, dtype=torch.int64)[::2])
    assert not state.any()


@pytest.mark.gpu
@given(pairs=st.one_of(st.lists(st.tuples(many_tags_st, an_id), max_size=3000), dup_pairs_st))
def test_unique_tagged_cuda_equals_cpu(pairs):
    expect = unique_tagged(*as_tensors(pairs))
    ids, tags = as_tensors(pairs, "cuda")
    got = unique_tagged(ids, narrowed(pairs, tags))
    for e, g in zip(expect, got):
        assert g.dtype == e.dtype and g.cpu().tolist() == e.tolist()


def test_unique_tagged_rejects_bad_input():
    ids, tags = as_tensors([(0, 1), (2, 3)])
    with pytest.raises(TypeError, match="fxrec::unique_tagged: ids must be a 1-D int64"):
        unique_tagged(ids.int(), tags)
    with pytest.raises(TypeError, match="fxrec::unique_tagged: ids must be a 1-D int64"):
        unique_tagged(ids[None], tags)
    for wrong in (tags.long(), tags.to(torch.int8), tags[None]):
        with pytest.raises(TypeError, match="fxrec::unique_tagged: tags must be a 1-D uint8, int16 or int32"):
            unique_tagged(ids, wrong)
    with pytest.raises(ValueError, match="fxrec::unique_tagged: tags has shape"):
        unique_tagged(ids, tags[:1])


@pytest.mark.parametrize("case", range(9))
def test_opcheck(case):
    def index():
        keys, state = new_index(16)
        find_or_insert(keys, state, torch.tensor([3, 3]), torch.tensor([0, 2], dtype=torch.int32))
        return keys, state

    tags = torch.tensor([[2, 0], [5, 2]], dtype=torch.int32)
    ids = torch.tensor([[3, 3], [3, INT64_MIN]])
    cases = [
        (find, (*index(), ids, tags)),
        (torch.ops.fxrec.table_find_or_insert, (*index(), ids, tags, None)),
        (torch.ops.fxrec.table_find_or_insert, (*index(), ids[:0], tags[:0], None)),
        (find, (*index(), ids.reshape(-1), tags.reshape(-1))),
        (unique_tagged, (ids.reshape(-1), tags.reshape(-1))),
        (unique_tagged, (ids[:0].reshape(-1), tags[:0].reshape(-1))),
        (unique_tagged, (ids.reshape(-1), tags.reshape(-1).to(torch.uint8))),
        (unique_tagged, (ids.reshape(-1), tags.reshape(-1).to(torch.int16))),
        (torch.ops.fxrec.table_find_or_insert, (*index(), ids, tags, torch.zeros(6, dtype=torch.int64))),
    ]
    op, args = cases[case]
    torch.library.opcheck(op, args)


@pytest.mark.gpu
@given(pairs=st.lists(st.tuples(a_tag, an_id), max_size=2000), queries=pairs_st)
def test_cuda_equals_cpu(pairs, queries):
    """Same (tag, id) -> row contents (rows may differ: placement depends on insertion order)."""
    cpu, cuda = new_index(4096), new_index(4096, "cuda")
    find_or_insert(*cpu, *as_tensors(pairs))
    rows, _ = find_or_insert(*cuda, *as_tensors(pairs, "cuda"))
    by_row = contents(*(t.cpu() for t in cuda))
    assert set(by_row) == set(contents(*cpu))
    assert [by_row[p] for p in pairs] == rows.cpu().tolist()
    got = find(*cuda, *as_tensors(queries + pairs, "cuda")).cpu()
    assert (got >= 0).tolist() == [p in by_row for p in queries + pairs]

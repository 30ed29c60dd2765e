"""torch.ops.fxrec.table_find / table_find_or_insert against a Python dict oracle (id -> row)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxrec  # noqa: F401  (registers torch.ops.fxrec.*)
from fxrec.ops.table import EMPTY, FILLED, new_index, table_items
from fxrec.ops.triton.table import table_find_or_insert_triton, table_find_triton
from oracles import mix64

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Without CUDA the launchers run under TRITON_INTERPRET=1 (set by conftest) on CPU tensors.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

find = torch.ops.fxrec.table_find


def find_or_insert(keys, state, ids, tags=None, counts=None):
    """The op, whose ``tags`` and ``counts`` have no defaults (its docstring says why)."""
    return torch.ops.fxrec.table_find_or_insert(keys, state, ids, tags, counts)


def home(x: int, capacity: int) -> int:
    return mix64(x) & (capacity - 1)


def ids_with_home(slot: int, capacity: int, count: int) -> list[int]:
    """The first ``count`` ids of 0, -1, 1, -2, ... whose home slot is ``slot``."""
    found, x = [], 0
    while len(found) < count:
        if home(x, capacity) == slot:
            found.append(x)
        x = -x - 1 if x >= 0 else -x
    return found


EXTREMES = [INT64_MIN, INT64_MIN + 1, -2, -1, 0, 1, 2, INT64_MAX - 1, INT64_MAX]
# Clusters: ids sharing home slot 0, and ids sharing the last slot (their probes wrap around), for
# every capacity drawn below (home slot mod 64 == 0 implies mod 16, 4, 2 == 0; 63 implies 15, ...).
COLLIDING = ids_with_home(0, 64, 8) + ids_with_home(63, 64, 8)
POOL = EXTREMES + COLLIDING
CAPACITIES = [1, 2, 4, 16, 64]

an_id = st.one_of(st.sampled_from(POOL), st.integers(-20, 20), st.integers(INT64_MIN, INT64_MAX))
a_batch = st.tuples(st.sampled_from(["insert", "find"]), st.lists(an_id, max_size=40))


def as_ids(values, device="cpu") -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


# -- the oracle checks ---------------------------------------------------------------------------


def check_index(oracle: dict[int, int], keys: torch.Tensor, state: torch.Tensor) -> None:
    """The index holds exactly the oracle's (id, row) pairs; no slot is left mid-write."""
    assert set(state.tolist()) <= {EMPTY, FILLED}
    item_ids, item_rows = table_items(keys, state)
    assert len(item_ids) == len(oracle)
    assert dict(zip(item_ids.tolist(), item_rows.tolist())) == oracle


def check_find(oracle, keys, state, values, find_fn) -> None:
    """``find`` returns the oracle's rows (-1 absent) and writes nothing."""
    before = keys.clone(), state.clone()
    rows = find_fn(keys, state, as_ids(values, keys.device))
    assert rows.dtype == torch.int64 and rows.shape == (len(values),)
    assert rows.tolist() == [oracle.get(v, -1) for v in values]
    assert torch.equal(keys, before[0]) and torch.equal(state, before[1])


def check_insert(oracle, keys, state, values, rows, inserted, first_occurrence: bool) -> None:
    """Check one find_or_insert call against the oracle, then add its new ids to the oracle."""
    assert rows.dtype == torch.int64 and rows.shape == (len(values),)
    assert inserted.dtype == torch.bool and inserted.shape == (len(values),)
    occurrences: dict[int, list[tuple[int, int, bool]]] = {}
    for pos, (v, row, ins) in enumerate(zip(values, rows.tolist(), inserted.tolist())):
        if v in oracle:
            assert row == oracle[v] and not ins  # stable across calls, not re-inserted
        else:
            occurrences.setdefault(v, []).append((pos, row, ins))
    taken = set(oracle.values())
    for v, occ in occurrences.items():
        assert len({row for _, row, _ in occ}) == 1  # duplicates in one call share one row
        marked = [pos for pos, _, ins in occ if ins]
        assert len(marked) == 1  # the caller initializes each new row exactly once
        if first_occurrence:
            assert marked[0] == occ[0][0]
        row = occ[0][1]
        assert 0 <= row < keys.numel() and row not in taken  # distinct ids, distinct rows
        taken.add(row)
        oracle[v] = row
    check_index(oracle, keys, state)


def run_batches(capacity, batches, device, find_fn, insert_fn, first_occurrence, raises_when_full):
    keys, state = new_index(capacity, device)
    oracle: dict[int, int] = {}
    for kind, values in batches:
        if kind == "find":
            check_find(oracle, keys, state, values + list(oracle), find_fn)
            continue
        if len(oracle) + len(set(values) - oracle.keys()) > capacity:
            if raises_when_full:
                before = keys.clone(), state.clone()
                with pytest.raises(ValueError, match="grow the index"):
                    insert_fn(keys, state, as_ids(values, device))
                assert torch.equal(keys, before[0]) and torch.equal(state, before[1])  # untouched
            continue
        rows, inserted = insert_fn(keys, state, as_ids(values, device))
        check_insert(oracle, keys, state, values, rows, inserted, first_occurrence)
        check_find(oracle, keys, state, list(oracle), find_fn)  # every id reachable by its probe


# -- CPU kernel ----------------------------------------------------------------------------------


@given(capacity=st.sampled_from(CAPACITIES), batches=st.lists(a_batch, min_size=1, max_size=6))
def test_cpu_matches_oracle(capacity, batches):
    run_batches(capacity, batches, "cpu", find, find_or_insert, first_occurrence=True, raises_when_full=True)


def test_home_slot_is_mix64():
    # SPEC'd slot formula: into an empty index, an id lands on mix64(id) & (capacity - 1).
    for v in POOL:
        keys, state = new_index(1024)
        rows, _ = find_or_insert(keys, state, as_ids([v]))
        assert rows.tolist() == [home(v, 1024)]


def test_collisions_probe_linearly_and_wrap():
    cluster = ids_with_home(15, 16, 5)  # home = the last slot: the probe wraps to slots 0, 1, ...
    keys, state = new_index(16)
    rows, inserted = find_or_insert(keys, state, as_ids(cluster))
    # the CPU kernel places competing ids smallest first, whatever the input order
    assert dict(zip(cluster, rows.tolist())) == dict(zip(sorted(cluster), [15, 0, 1, 2, 3]))
    assert inserted.all()


def test_shape_and_duplicates_2d():
    keys, state = new_index(64)
    ids = as_ids([[7, 7, INT64_MIN], [0, 7, INT64_MIN]])
    rows, inserted = find_or_insert(keys, state, ids)
    assert rows.shape == inserted.shape == (2, 3)
    assert rows[0, 0] == rows[0, 1] == rows[1, 1] and rows[0, 2] == rows[1, 2]
    assert inserted.tolist() == [[True, False, True], [True, False, False]]
    assert torch.equal(find(keys, state, ids), rows)
    assert find(keys, state, ids.t()).tolist() == rows.t().tolist()  # non-contiguous ids


def test_empty_ids():
    keys, state = new_index(4)
    rows, inserted = find_or_insert(keys, state, as_ids([]).reshape(0, 3))
    assert rows.shape == inserted.shape == (0, 3)
    assert find(keys, state, as_ids([])).shape == (0,)
    assert not state.any()


def test_full_table_raises():
    keys, state = new_index(4)
    find_or_insert(keys, state, as_ids([1, 2, 3]))
    before = keys.clone(), state.clone()
    with pytest.raises(ValueError, match="2 new ids do not fit the 1 free slots"):
        find_or_insert(keys, state, as_ids([4, 1, 5, 5]))
    assert torch.equal(keys, before[0]) and torch.equal(state, before[1])
    rows, inserted = find_or_insert(keys, state, as_ids([4, 4, 3]))  # exactly fills it
    assert rows[0] == rows[1] and inserted.tolist() == [True, False, False]
    assert (state == FILLED).all()
    assert find(keys, state, as_ids([99])).tolist() == [-1]  # full table: the probe wraps, ends


def test_large_batch_cpu():
    # 100k lookups of 20k distinct ids: vectorized rounds, not a loop per id
    gen = torch.Generator().manual_seed(0)
    distinct = torch.randint(INT64_MIN, INT64_MAX, (20_000,), generator=gen)
    ids = distinct[torch.randint(0, 20_000, (100_000,), generator=gen)]
    keys, state = new_index(1 << 16)
    rows, inserted = find_or_insert(keys, state, ids)
    check_bulk(keys, state, ids, rows, inserted)
    rows2, inserted2 = find_or_insert(keys, state, ids)
    assert torch.equal(rows2, rows) and not inserted2.any()


def check_bulk(keys, state, ids, rows, inserted):
    """The oracle properties, vectorized (for large inputs)."""
    n_distinct = ids.unique().numel()
    assert (rows >= 0).all()
    assert torch.equal(keys[rows], ids) and (state[rows] == FILLED).all()  # each row holds its id
    assert rows.unique().numel() == n_distinct  # one row per distinct id
    assert int(inserted.sum()) == n_distinct and ids[inserted].unique().numel() == n_distinct
    assert int((state == FILLED).sum()) == n_distinct and ((state == EMPTY) | (state == FILLED)).all()


# -- validation ----------------------------------------------------------------------------------


def test_validation():
    keys, state = new_index(8)
    ids = as_ids([1])
    for op in (find, lambda k, s, i: find_or_insert(k, s, i)):
        with pytest.raises(TypeError, match="ids must be int64"):
            op(keys, state, ids.int())
        with pytest.raises(TypeError, match="keys must be a 1-D int64"):
            op(keys.int(), state, ids)
        with pytest.raises(TypeError, match="keys must be a 1-D int64"):
            op(keys.view(2, 4), state, ids)
        with pytest.raises(TypeError, match="state must be a 1-D int32"):
            op(keys, state.long(), ids)
        with pytest.raises(ValueError, match="state has 4 slots, keys 8"):
            op(keys, state[:4], ids)
        with pytest.raises(ValueError, match="power of two, got 6"):
            op(keys[:6], state[:6], ids)
        with pytest.raises(ValueError, match="contiguous"):
            op(keys[::2], state[::2], ids)
        with pytest.raises(ValueError, match="ids are on meta"):
            op(keys, state, ids.to("meta"))
    with pytest.raises(ValueError, match="power of two, got 0"):
        new_index(0)


# -- opcheck -------------------------------------------------------------------------------------


def opcheck_cases():
    def index():
        keys, state = new_index(16)
        find_or_insert(keys, state, as_ids([3, INT64_MIN]))
        return keys, state

    return [
        (find, (*index(), as_ids([3, 4, INT64_MIN]))),
        (find, (*index(), as_ids([]))),
        (torch.ops.fxrec.table_find_or_insert, (*index(), as_ids([[3, 5], [5, -1]]), None, None)),
        (torch.ops.fxrec.table_find_or_insert, (*index(), as_ids([3, INT64_MIN]), None, None)),
        (torch.ops.fxrec.table_find_or_insert, (*index(), as_ids([]), None, None)),
    ]


@pytest.mark.parametrize("index", range(5))
def test_opcheck(index):
    op, args = opcheck_cases()[index]
    torch.library.opcheck(op, args)


@pytest.mark.slow
def test_compiled_equals_eager():
    # under torch.compile the in-place insert is functionalized: the index must still be updated
    def step(keys, state, ids):
        rows, inserted = find_or_insert(keys, state, ids)
        return rows, inserted, find(keys, state, ids + 1)

    compiled = torch.compile(step, fullgraph=True)
    eager_index, compiled_index = new_index(64), new_index(64)
    for values in ([5, 6, 5], [5, 7, 8, INT64_MIN, 8], [-1]):
        expected = step(*eager_index, as_ids(values))
        got = compiled(*compiled_index, as_ids(values))
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert all(torch.equal(a, b) for a, b in zip(compiled_index, eager_index))


# -- Triton kernels under the interpreter (tiny inputs) -------------------------------------------


@given(capacity=st.sampled_from(CAPACITIES), batches=st.lists(a_batch, min_size=1, max_size=3))
def test_triton_matches_oracle(capacity, batches):
    # CUDA gives up instead of raising when full: batches that would overflow are skipped here
    run_batches(
        capacity, batches, TRITON_DEVICE, table_find_triton, table_find_or_insert_triton,
        first_occurrence=False, raises_when_full=False,
    )  # fmt: skip


@given(capacity=st.sampled_from(CAPACITIES), values=st.lists(an_id, max_size=40), queries=st.lists(an_id, max_size=20))
def test_triton_find_equals_cpu_find(capacity, values, queries):
    # on one index, find is read-only and deterministic: CPU and Triton agree slot for slot
    keys, state = new_index(capacity)
    if len(set(values)) <= capacity:
        find_or_insert(keys, state, as_ids(values))
    ids = as_ids(values + queries)
    expected = find(keys, state, ids)
    got = table_find_triton(keys.to(TRITON_DEVICE), state.to(TRITON_DEVICE), ids.to(TRITON_DEVICE))
    assert got.tolist() == expected.tolist()


def test_triton_same_content_as_cpu():
    values = POOL * 3 + list(range(-30, 30))
    cpu = new_index(128)
    find_or_insert(*cpu, as_ids(values))
    tri = new_index(128, TRITON_DEVICE)
    table_find_or_insert_triton(*tri, as_ids(values, TRITON_DEVICE))
    assert sorted(table_items(*cpu)[0].tolist()) == sorted(table_items(*tri)[0].tolist()) == sorted(set(values))


def test_triton_full_table_gives_up():
    keys, state = new_index(8, TRITON_DEVICE)
    present = list(range(100, 108))
    rows, _ = table_find_or_insert_triton(keys, state, as_ids(present, TRITON_DEVICE))
    before = keys.clone(), state.clone()
    got, inserted = table_find_or_insert_triton(keys, state, as_ids([7, 103, 7], TRITON_DEVICE))
    assert got.tolist() == [-1, rows[3].item(), -1] and not inserted.any()
    assert torch.equal(keys, before[0]) and torch.equal(state, before[1])
    assert table_find_triton(keys, state, as_ids([7], TRITON_DEVICE)).tolist() == [-1]


# -- CUDA ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@given(capacity=st.sampled_from(CAPACITIES), batches=st.lists(a_batch, min_size=1, max_size=6))
def test_cuda_op_matches_oracle(capacity, batches):
    run_batches(capacity, batches, "cuda", find, find_or_insert, first_occurrence=False, raises_when_full=False)


@pytest.mark.gpu
def test_cuda_find_equals_cpu_find_large():
    gen = torch.Generator().manual_seed(1)
    keys, state = new_index(1 << 20)
    find_or_insert(keys, state, torch.randint(INT64_MIN, INT64_MAX, (400_000,), generator=gen))
    queries = torch.cat([keys[state == FILLED], torch.randint(INT64_MIN, INT64_MAX, (600_000,), generator=gen)])
    expected = find(keys, state, queries)
    assert torch.equal(find(keys.cuda(), state.cuda(), queries.cuda()).cpu(), expected)


@pytest.mark.gpu
def test_cuda_stress_duplicates_across_blocks():
    # 1M lookups of 100k distinct ids, each id spread over many blocks: one row per id, none lost
    gen = torch.Generator().manual_seed(2)
    distinct = torch.randint(INT64_MIN, INT64_MAX, (100_000,), generator=gen)
    ids = distinct[torch.randint(0, 100_000, (1_000_000,), generator=gen)].cuda()
    keys, state = new_index(1 << 22, "cuda")
    rows, inserted = find_or_insert(keys, state, ids)
    check_bulk(keys, state, ids, rows, inserted)
    rows2, inserted2 = find_or_insert(keys, state, ids.flip(0))
    assert torch.equal(rows2, rows.flip(0)) and not inserted2.any()
    assert torch.equal(find(keys, state, ids), rows)


@pytest.mark.gpu
def test_cuda_concurrent_streams():
    # several inserts of overlapping id sets race on one index from several streams
    gen = torch.Generator().manual_seed(3)
    distinct = torch.randint(INT64_MIN, INT64_MAX, (50_000,), generator=gen).cuda()
    keys, state = new_index(1 << 18, "cuda")
    batches = [distinct[torch.randperm(50_000, generator=gen).cuda()[:40_000]] for _ in range(4)]
    streams = [torch.cuda.Stream() for _ in batches]
    torch.cuda.synchronize()
    results = []
    for stream, batch in zip(streams, batches):
        with torch.cuda.stream(stream):
            results.append(find_or_insert(keys, state, batch))
    torch.cuda.synchronize()
    all_ids = torch.cat(batches)
    all_rows = torch.cat([rows for rows, _ in results])
    all_inserted = torch.cat([inserted for _, inserted in results])
    check_bulk(keys, state, all_ids, all_rows, all_inserted)


# -- unique_rows: a lookup's rows deduplicated ------------------------------------------------------

unique_rows = torch.ops.fxrec.unique_rows


@st.composite
def rows_and_capacity(draw):
    """Rows of an index of ``capacity`` slots, -1 (no row) among them, repeats likely; capacities
    on both sides of the marks' limit (UNIQUE_ROWS_MAX_SLOTS_PER_ENTRY slots per entry)."""
    capacity = draw(st.sampled_from([1, 2, 8, 64, 1024]))
    row = st.one_of(st.sampled_from([-1, 0, capacity - 1]), st.integers(-1, capacity - 1))
    return draw(st.lists(row, max_size=200)), capacity


def check_unique_rows(rows: list[int], capacity: int, device: str = "cpu") -> None:
    uniq, inverse = unique_rows(torch.tensor(rows, dtype=torch.int64, device=device), capacity)
    distinct = sorted(set(rows))
    assert uniq.dtype == inverse.dtype == torch.int64
    assert uniq.cpu().tolist() == distinct
    assert [distinct[i] for i in inverse.cpu().tolist()] == rows


@given(case=rows_and_capacity())
def test_unique_rows_equals_sorted_set(case):
    check_unique_rows(*case)


def test_unique_rows_marks_and_sort_agree_on_a_long_run():
    """Both ways (marks: capacity <= 8 slots per entry; a sort: more) on one hot row and a spread."""
    rows = [5] * 3000 + list(range(-1, 4096, 3)) + [5, -1]
    for capacity in (4096, 1 << 20):
        check_unique_rows(rows, capacity)


def test_unique_rows_rejects_bad_input():
    with pytest.raises(TypeError, match="fxrec::unique_rows: rows must be a 1-D int64"):
        unique_rows(torch.tensor([0, 1], dtype=torch.int32), 4)
    with pytest.raises(TypeError, match="fxrec::unique_rows: rows must be a 1-D int64"):
        unique_rows(torch.tensor([[0, 1]]), 4)
    with pytest.raises(ValueError, match="fxrec::unique_rows: capacity must be >= 1"):
        unique_rows(torch.tensor([0]), 0)


@pytest.mark.parametrize("rows,capacity", [([3, -1, 3, 0], 4), ([], 4), ([3, -1, 3, 0], 1024)])
def test_unique_rows_opcheck(rows, capacity):
    torch.library.opcheck(unique_rows, (torch.tensor(rows, dtype=torch.int64), capacity))


@pytest.mark.gpu
@given(case=rows_and_capacity())
def test_unique_rows_cuda_equals_oracle(case):
    check_unique_rows(*case, device="cuda")

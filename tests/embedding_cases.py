"""Shared by the embedding pass tests (``lookup_merge``, ``table_coalesce``): hypothesis
strategies for option sets and batches, the tutorial's batches, a loss that weighs every output
element differently, and a table's gradients keyed by id."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from fxrec.nn.initializers import NormalInitializer
from fxrec.nn.modules.embedding import EmbeddingOption
from fxrec.nn.modules.hashtable import HashTable
from raggedutil import ragged_ids

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
ids_st = st.one_of(st.integers(-3, 3), st.sampled_from([INT64_MIN, INT64_MAX, INT64_MIN + 1, 2**40, -(2**52) - 1]))
weights_st = st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0])


@st.composite
def configs(draw, tables: tuple[int, int], dims: tuple[int, int], features: tuple[int, int]):
    """``{feature: EmbeddingOption}``: between ``features`` features over ``tables`` tables of
    ``dims`` dims (each table's own grad_reduce_by), combiners, weights and trainable drawn."""
    specs = {
        f"t{i}": dict(embedding_dim=draw(st.integers(*dims)), grad_reduce_by=draw(st.sampled_from(["worker", "id"])))
        for i in range(draw(st.integers(*tables)))
    }
    options = {}
    for i in range(draw(st.integers(*features))):
        shared = draw(st.sampled_from(sorted(specs)))
        combiner = draw(st.sampled_from(["sum", "mean", "tile"]))
        options[f"f{i}"] = EmbeddingOption(
            shared_name=shared, block_size=4, initializer=NormalInitializer(0.0, 1.0), combiner=combiner,
            combiner_kwargs={"tile_len": draw(st.integers(1, 3))} if combiner == "tile" else None,
            use_weight=draw(st.booleans()), trainable=draw(st.booleans()), **specs[shared],
        )
    return options


def expected_storages(options) -> list[set[str]]:
    """The tables (shared names) that share a storage after ``table_coalesce``, for ``configs``'
    options (one initializer whose parameters do not depend on the dim): tables of one
    grad_reduce_by, the widest with every table at least half as wide, then the widest of the
    rest, and so on (a table's rows padded at most 2x)."""
    specs = {o.shared_name: (o.embedding_dim, o.grad_reduce_by) for o in options.values()}
    groups = []
    for reduce_by in {r for _, r in specs.values()}:
        rest = {name for name, (_, r) in specs.items() if r == reduce_by}
        while rest:
            widest = max(specs[name][0] for name in rest)
            group = {name for name in rest if 2 * specs[name][0] >= widest}
            groups.append(group)
            rest -= group
    return groups


@st.composite
def values(draw, b: int):
    """A feature's value for ``b`` rows: ragged (maybe weighted) or dense ``[b, F]`` int64 ids."""
    if draw(st.booleans()):
        rows = draw(st.lists(st.lists(ids_st, max_size=4), min_size=b, max_size=b))
        weights = [[draw(weights_st) for _ in row] for row in rows] if draw(st.booleans()) else None
        return ragged_ids(rows, weights)
    f = draw(st.integers(1, 3))
    return torch.tensor(draw(st.lists(st.lists(ids_st, min_size=f, max_size=f), min_size=b, max_size=b)),
                        dtype=torch.int64).reshape(b, f)


@st.composite
def cases(draw, options_strategy):
    """``(options, [batch, batch])``: batches of 0..3 rows, features in any dict order."""
    options = draw(options_strategy)
    batches = []
    for _ in range(2):
        b = draw(st.sampled_from([0, 1, 2, 3]))
        batch = {name: draw(values(b)) for name in options}
        batch = dict(sorted(batch.items(), key=lambda kv: draw(st.integers(0, 3))))  # any dict order
        batch["label"] = torch.zeros(b)
        batches.append(batch)
    return options, batches


def tutorial_batch(b: int, seed: int) -> dict:
    """``b`` rows of the tutorial's features (``examples.deepctr.embeddings``), small ids."""
    g = torch.Generator().manual_seed(seed)
    batch = {"dense2": torch.randint(0, 5, (b, 1), generator=g)}
    for name in ["sparse1", "sparse2", "sparse3", "sparse4", "sparse5", "sparse1_x_sparse2"]:
        rows = [torch.randint(-4, 6, (int(torch.randint(0, 4, (), generator=g)),), generator=g).tolist()
                for _ in range(b)]
        batch[name] = ragged_ids(rows)
    batch["label"] = torch.ones(b)
    return batch


def by_id(sd: dict) -> dict:
    """A table's state_dict with its per-id entries sorted by id (rows are not state)."""
    order = torch.argsort(sd["ids"])
    return {k: (v[order] if v.dim() and k != "step" else v) for k, v in sd.items()}


def assert_tables_equal(a: dict[str, HashTable], b: dict[str, HashTable], exact: bool = True):
    assert sorted(a) == sorted(b)
    for name in a:
        sa, sb = by_id(a[name].state_dict()), by_id(b[name].state_dict())
        assert sorted(sa) == sorted(sb), name
        for key in sa:
            if sa[key].dtype.is_floating_point and not exact:
                torch.testing.assert_close(sa[key], sb[key], rtol=1e-6, atol=1e-6, msg=f"{name}.{key}")
            else:
                assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def check_equal(plain, rewritten, batch, eval_batch, close_grads: set[str]):
    """The unrewritten engine ``plain`` and ``rewritten`` (same options) on a training batch:
    equal outputs, tables (per id) and gradients (per id; ``close_grads``: tables whose three or
    more trainable features sum in another order, to 1e-6); then on an eval batch: equal outputs,
    no inserts."""
    out_a, out_b = plain(batch), rewritten(batch)
    assert list(out_a) == list(out_b) == list(batch)
    for name in out_a:
        torch.testing.assert_close(out_a[name], out_b[name], rtol=0, atol=0)
    assert_tables_equal(plain.tables, rewritten.tables)
    la, lb = loss_of(out_a), loss_of(out_b)
    if la.requires_grad:
        la.backward()
        lb.backward()
    for name in plain.tables:
        (ia, ga), (ib, gb) = grads_by_id(plain.tables[name]), grads_by_id(rewritten.tables[name])
        assert torch.equal(ia, ib), name
        # two features' gradients add up exactly either way; three or more in another order
        tol = dict(rtol=1e-6, atol=1e-6) if name in close_grads else dict(rtol=0, atol=0)
        torch.testing.assert_close(ga, gb, **tol)
    plain.eval(), rewritten.eval()
    sizes = {name: len(t) for name, t in plain.tables.items()}
    out_a, out_b = plain(eval_batch), rewritten(eval_batch)
    for name in out_a:
        torch.testing.assert_close(out_a[name], out_b[name], rtol=0, atol=0)
    assert {name: len(t) for name, t in rewritten.tables.items()} == sizes  # eval: no inserts
    plain.train(), rewritten.train()


def loss_of(out: dict) -> torch.Tensor:
    """A scalar of every output that requires grad, each element weighed differently."""
    total = torch.zeros(())
    for i, name in enumerate(sorted(out)):
        v = out[name]
        if isinstance(v, torch.Tensor) and v.requires_grad:
            coef = torch.arange(v.numel(), dtype=v.dtype).reshape(v.shape) % 7 - 3.0 + i
            total = total + (v * coef).sum()
    return total


def grads_by_id(table):
    """``(ids, grads)`` of ``table.take_grads()``, ordered by id (rows are not comparable)."""
    rows, grads = table.take_grads()
    rows, grads = rows[rows >= 0], grads[rows >= 0]  # -1: padding
    ids = table.keys[rows]
    order = torch.argsort(ids)
    return ids[order], grads[order]

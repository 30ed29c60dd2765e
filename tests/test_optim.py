"""fxrec.optim (SPEC §5.1, §4.5): the sparse optimizers on real HashTables, against
torch.optim.AdamW / Adam and a float64 numpy reference of SPEC §5.1, plus LR schedulers, gradient
accumulation, per-table state, state_dict round-trips and errors."""

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fxrec.nn.initializers import UniformInitializer
from fxrec.nn.modules.hashtable import HashTable, filter_out_sparse_param
from fxrec.optim import SparseAdagrad, SparseAdam, SparseAdamW, SparseAdamWTF, SparseSGD

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
ADAM = ("adamwtf", "adamw", "adam")
KINDS = (*ADAM, "adagrad", "adagrad_rowwise", "sgd")


def make_table(name="t", dim=3, init=None, grad_reduce_by="worker", block_size=4):
    return HashTable([dim], block_size=block_size, name=name, initializer=init, grad_reduce_by=grad_reduce_by)


def make_optimizer(kind, tables, **hp):
    cls = {"adamwtf": SparseAdamWTF, "adamw": SparseAdamW, "adam": SparseAdam, "adagrad": SparseAdagrad,
           "adagrad_rowwise": SparseAdagrad, "sgd": SparseSGD}[kind]
    if kind.startswith("adagrad"):
        hp["rowwise"] = kind == "adagrad_rowwise"
    return cls(tables, **hp)


def rows_of(table, ids):
    return torch.ops.fxrec.table_find(table.keys, table.state, torch.as_tensor(ids, dtype=torch.int64))


def step(opt, table, ids, grads):
    """One training step whose loss gives each occurrence of ``ids`` the gradient row ``grads[i]``."""
    opt.zero_grad()
    (table(torch.as_tensor(ids, dtype=torch.int64)) * grads).sum().backward()
    opt.step()


def by_id(state: dict) -> dict:
    """A table's or optimizer's per-table state dict with its ``[n, ...]`` entries sorted by id
    (row order is not state)."""
    order = torch.argsort(state["ids"])
    n = state["ids"].numel()
    return {k: (v[order] if v.dim() >= 1 and v.shape[0] == n else v) for k, v in state.items()}


def assert_states_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# -- vs torch.optim.AdamW / Adam -------------------------------------------------------------------

def test_sparse_adamw_matches_torch_adamw_zero_init_grad_one():
    model = nn.ModuleDict({"emb": make_table(dim=4)})  # ConstantInitializer(0) by default
    opt = SparseAdamW(filter_out_sparse_param(model), lr=1e-3)
    ids = torch.tensor([5, -1, INT64_MAX])
    dense = torch.zeros(3, 4, requires_grad=True)
    adamw = torch.optim.AdamW([dense], lr=1e-3, weight_decay=0.01)
    for _ in range(3):
        opt.zero_grad()
        model["emb"](ids).sum().backward()
        opt.step()
        dense.grad = torch.ones_like(dense)
        adamw.step()
        table = model["emb"]
        torch.testing.assert_close(table.embedding[rows_of(table, ids)], dense.detach(), rtol=1e-5, atol=1e-8)
    assert (dense < -2e-3).all()  # three steps of about lr each: the comparison is not vacuous


def test_sparse_adamw_matches_torch_adamw_random_grads_every_row_touched():
    lr, betas, eps, wd = 1e-2, (0.8, 0.99), 1e-8, 0.1
    table = make_table(dim=5, init=UniformInitializer(-1.0, 1.0))
    opt = SparseAdamW([table], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    uniq = torch.tensor([INT64_MIN, -7, 0, 3, 12, INT64_MAX])
    dense = table.initializer.init_rows(uniq, 5, table.seed, table.block_size).requires_grad_()
    adamw = torch.optim.AdamW([dense], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        # every id at least once, some twice: each row gets the sum of its occurrences' gradients
        ids = torch.cat([uniq, uniq[torch.randint(0, 6, (4,), generator=gen)]])
        ids = ids[torch.randperm(ids.numel(), generator=gen)]
        grads = torch.randn(ids.numel(), 5, generator=gen)
        step(opt, table, ids, grads)
        adamw.zero_grad()
        (dense[torch.searchsorted(uniq, ids)] * grads).sum().backward()
        adamw.step()
    torch.testing.assert_close(table.embedding[rows_of(table, uniq)], dense.detach(), rtol=1e-5, atol=1e-6)
    state = adamw.state[dense]
    torch.testing.assert_close(table.slot("exp_avg", 5)[rows_of(table, uniq)], state["exp_avg"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(table.slot("exp_avg_sq", 5)[rows_of(table, uniq)], state["exp_avg_sq"], rtol=1e-5,
                               atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_without_gradient_keep_their_bits(kind):
    table = make_table(dim=3, init=UniformInitializer(-1.0, 1.0))
    opt = make_optimizer(kind, [table])
    all_ids, few = torch.arange(-3, 9), torch.tensor([-3, 4])
    step(opt, table, all_ids, torch.randn(12, 3, generator=torch.Generator().manual_seed(1)))
    rest = rows_of(table, all_ids[~torch.isin(all_ids, few)])
    before = [t[rest].clone() for t in (table.embedding, *table.slots().values())]
    for _ in range(2):
        step(opt, table, few, torch.ones(2, 3))
    for old, now in zip(before, (table.embedding, *table.slots().values())):
        assert torch.equal(now[rest], old)
    assert not torch.equal(table.embedding[rows_of(table, few)], before[0][:2])  # sanity: `few` did move


# -- vs a float64 numpy reference of SPEC §5.1 --------------------------------------------------

def reference(kind, hp, steps, init, reduce_by):
    """SPEC §5.1 per id in float64. ``steps``: [(ids, grads [len(ids), dim])]; ``init``: id ->
    initial row. Per-table scalars advance on the steps with at least one gradient row."""
    params, slots, state = {}, {}, {"step": 0, "b1p": 1.0, "b2p": 1.0}
    for ids, grads in steps:
        summed, counts = {}, {}
        for i, g in zip(ids, grads):
            if i not in params:
                params[i] = init[i].copy()
                if kind in ADAM:
                    slots[i] = {"exp_avg": np.zeros_like(g), "exp_avg_sq": np.zeros_like(g)}
                elif kind.startswith("adagrad"):
                    width = 1 if kind == "adagrad_rowwise" else len(g)
                    slots[i] = {"accum": np.full(width, hp["initial_accumulator_value"])}
                else:
                    slots[i] = {}
            summed[i] = summed.get(i, 0.0) + g
            counts[i] = counts.get(i, 0) + 1
        state["step"] += 1  # every step, with or without rows (RecIS's rule)
        if kind in ADAM:
            beta1, beta2 = hp["betas"]
            state["b1p"] *= beta1
            state["b2p"] *= beta2
            decay = {"adamwtf": 1 - hp.get("weight_decay", 0), "adamw": 1 - hp["lr"] * hp.get("weight_decay", 0),
                     "adam": 1.0}[kind]
        for i, g in summed.items():
            g = g / counts[i] if reduce_by == "id" else g
            p, s = params[i], slots[i]
            if kind in ADAM:
                p *= decay
                s["exp_avg"] = beta1 * s["exp_avg"] + (1 - beta1) * g
                s["exp_avg_sq"] = beta2 * s["exp_avg_sq"] + (1 - beta2) * g * g
                step_size = hp["lr"] * math.sqrt(1 - state["b2p"]) / (1 - state["b1p"])
                p -= step_size * s["exp_avg"] / (np.sqrt(s["exp_avg_sq"]) + hp["eps"])
            elif kind.startswith("adagrad"):
                s["accum"] = s["accum"] + (np.mean(g * g) if kind == "adagrad_rowwise" else g * g)
                p -= hp["lr"] * g / (np.sqrt(s["accum"]) + hp["eps"])
            else:
                p -= hp["lr"] * g
    return params, slots, state


ids_strategy = st.one_of(
    st.integers(-3, 3), st.sampled_from([INT64_MIN, INT64_MIN + 1, INT64_MAX - 1, INT64_MAX]),
    st.integers(INT64_MIN, INT64_MAX),
)


def hyperparameters(kind):
    if kind in ADAM:
        hp = {"lr": st.sampled_from([1e-3, 0.05]), "betas": st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.0, 0.99)]),
              "eps": st.sampled_from([1e-8, 1e-3])}
        if kind != "adam":
            hp["weight_decay"] = st.sampled_from([0.0, 0.01, 0.3])
    elif kind.startswith("adagrad"):
        hp = {"lr": st.sampled_from([1e-2, 0.3]), "eps": st.sampled_from([1e-10, 1e-3]),
              "initial_accumulator_value": st.sampled_from([0.0, 0.1])}
    else:
        hp = {"lr": st.sampled_from([1e-3, 0.5])}
    return st.fixed_dictionaries(hp)


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data())
def test_matches_numpy_reference(kind, data):
    hp = data.draw(hyperparameters(kind), label="hp")
    dim = data.draw(st.integers(1, 4), label="dim")
    reduce_by = data.draw(st.sampled_from(["worker", "id"]), label="grad_reduce_by")
    id_lists = data.draw(st.lists(st.lists(ids_strategy, max_size=8), min_size=1, max_size=4), label="ids")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    # quarters in [-5, 5]: exact in float32 (0 included), so only the optimizer rounds
    steps = [(ids, rng.integers(-20, 21, size=(len(ids), dim)) / 4.0) for ids in id_lists]
    table = make_table(dim=dim, init=UniformInitializer(-1.0, 1.0), grad_reduce_by=reduce_by)
    opt = make_optimizer(kind, {"t": table}, **hp)
    for ids, grads in steps:
        step(opt, table, torch.tensor(ids, dtype=torch.int64).reshape(-1), torch.tensor(grads, dtype=torch.float32))

    all_ids = sorted({i for ids, _ in steps for i in ids})
    init_rows = table.initializer.init_rows(torch.tensor(all_ids, dtype=torch.int64), dim, table.seed, table.block_size)
    init = {i: row.double().numpy() for i, row in zip(all_ids, init_rows)}
    params, slots, state = reference(kind, hp, steps, init, reduce_by)
    assert len(table) == len(all_ids)
    rows = rows_of(table, all_ids)
    expected = np.array([params[i] for i in all_ids]).reshape(-1, dim)
    np.testing.assert_allclose(table.embedding[rows].double().numpy(), expected, rtol=1e-5, atol=1e-6)
    for name, slot in table.slots().items():
        expected = np.array([slots[i][name] for i in all_ids]).reshape(len(all_ids), slot.shape[1])
        np.testing.assert_allclose(slot[rows].double().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert opt.table_state["t"]["step"] == state["step"]
    if kind in ADAM:  # the same float64 products, in the same order
        assert (opt.table_state["t"]["b1p"], opt.table_state["t"]["b2p"]) == (state["b1p"], state["b2p"])
    assert int(table.step) == len(steps)  # the eviction counter: every optimizer step


# -- LR schedulers ---------------------------------------------------------------------------------

def test_step_lr_drives_the_lr_used():
    table = make_table(dim=2)
    opt = SparseSGD(filter_out_sparse_param(nn.ModuleList([table])), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for expected in (-1.0, -1.5, -1.75):
        step(opt, table, [7], torch.ones(1, 2))
        sched.step()
        assert torch.equal(table.embedding[rows_of(table, [7])], torch.full((1, 2), expected))
    assert opt.param_groups[0]["lr"] == 0.125


def test_lambda_lr_zero_freezes_adamw_decay_included():
    # SparseAdamW's decay 1 - lr * wd uses the group's current lr: with lr 0 nothing moves.
    table = make_table(dim=3, init=UniformInitializer(-1.0, 1.0))
    opt = SparseAdamW([table], lr=0.1, weight_decay=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 0.0)
    step(opt, table, [1, 2], torch.ones(2, 3))
    sched.step()
    frozen = table.embedding.clone()
    step(opt, table, [1, 2], torch.ones(2, 3))
    assert torch.equal(table.embedding, frozen)
    assert opt.table_state["t"]["step"] == 2  # the moments did advance


# -- gradient accumulation and grad_reduce_by ------------------------------------------------------

def test_grad_accumulation_averages_worker_grads():
    gen = torch.Generator().manual_seed(3)
    x1, x2 = torch.tensor([1, 2, 2, 3]), torch.tensor([2, 3, 4, 4])
    g1, g2 = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    micro, whole = (make_table(dim=3, init=UniformInitializer(-1.0, 1.0)) for _ in range(2))
    opt_micro, opt_whole = SparseSGD([micro], lr=1.0), SparseSGD([whole], lr=1.0)
    opt_micro.set_grad_accum_steps(2)
    opt_micro.zero_grad()
    for x, g in ((x1, g1), (x2, g2)):
        ((micro(x) * g).sum() / 4).backward()  # each micro-batch's mean loss
    opt_micro.step()
    opt_whole.zero_grad()
    ((whole(torch.cat([x1, x2])) * torch.cat([g1, g2])).sum() / 8).backward()  # the whole batch's
    opt_whole.step()
    ids = torch.tensor([1, 2, 3, 4])
    moved = micro.embedding[rows_of(micro, ids)]
    torch.testing.assert_close(moved, whole.embedding[rows_of(whole, ids)], rtol=1e-6, atol=1e-7)
    init = micro.initializer.init_rows(ids, 3, micro.seed, micro.block_size)
    assert (moved - init).abs().max() > 0.1


def test_grad_reduce_by_id_means_over_all_occurrences_of_the_accumulated_micro_batches():
    table = make_table(dim=2, grad_reduce_by="id")
    opt = SparseSGD([table], lr=1.0)
    opt.set_grad_accum_steps(2)  # no effect on "id": the mean already averages
    g1, g2 = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), torch.tensor([[8.0, -1.0]])
    opt.zero_grad()
    (table(torch.tensor([5, 5, 6])) * g1).sum().backward()
    (table(torch.tensor([5])) * g2).sum().backward()
    opt.step()
    expected = -torch.stack([(g1[0] + g1[1] + g2[0]) / 3, g1[2]])
    torch.testing.assert_close(table.embedding[rows_of(table, [5, 6])], expected)


def test_zero_grad_drops_pending_grads():
    table = make_table(dim=2)
    opt = SparseAdamWTF([table])
    table(torch.tensor([1, 2])).sum().backward()
    opt.zero_grad()
    opt.step()
    assert torch.equal(table.embedding, torch.zeros_like(table.embedding))
    assert opt.table_state["t"]["step"] == 1 and int(table.step) == 1  # the counters move every step


# -- per-table state -----------------------------------------------------------------------------

def test_bias_correction_counters_advance_every_step():
    """RecIS's rule: a table's b1p/b2p advance on every optimizer step, so a table first fed on
    the third step takes Adam's third step (bias corrections of step 3), not its first."""
    a, b = make_table("a", dim=3), make_table("b", dim=3)
    opt = SparseAdam(filter_out_sparse_param(nn.ModuleList([a, b])), lr=1e-3)
    for k in range(3):
        opt.zero_grad()
        loss = a(torch.tensor([1, 2])).sum()
        if k == 2:  # b gets its first gradient on the third step
            loss = loss + b(torch.tensor([9])).sum()
        loss.backward()
        opt.step()
    assert opt.table_state["a"] == {"step": 3, "b1p": 1.0 * 0.9 * 0.9 * 0.9, "b2p": 1.0 * 0.999 * 0.999 * 0.999}
    assert opt.table_state["b"] == opt.table_state["a"]
    assert int(a.step) == int(b.step) == 3
    # b's row: one update with zero moments before it, at step 3's bias corrections
    b1p, b2p = 0.9**3, 0.999**3
    m, v = (1 - 0.9) * 1.0, (1 - 0.999) * 1.0
    expected = -1e-3 * math.sqrt(1 - b2p) / (1 - b1p) * m / (math.sqrt(v) + 1e-8)
    torch.testing.assert_close(b.embedding[rows_of(b, [9])], torch.full((1, 3), expected), rtol=1e-5, atol=1e-8)


def test_table_state_is_tensors_updated_in_place():
    """The per-table counters are tensors on the table's device, advanced in place (a compiled
    step guards on no Python number); state_dict gives 0-d copies, load_state_dict copies back in
    place."""
    table = make_table(dim=2)
    opt = SparseAdamW([table], lr=0.1)
    state = opt.table_state["t"]
    held = dict(state)
    assert state["step"].dtype == torch.int64 and state["step"].dim() == 0
    assert all(state[k].dtype == torch.float64 and state[k].numel() == 1 for k in ("b1p", "b2p"))
    assert all(v.device == table.embedding.device for v in state.values())
    for _ in range(2):
        step(opt, table, [1], torch.ones(1, 2))
    assert all(opt.table_state["t"][k] is held[k] for k in held)
    assert int(held["step"]) == 2 and float(held["b1p"]) == 0.9 * 0.9 and float(held["b2p"]) == 0.999 * 0.999
    saved = opt.state_dict()["state"]["t"]
    assert all(saved[k].dim() == 0 and saved[k].dtype == held[k].dtype for k in held)
    step(opt, table, [1], torch.ones(1, 2))
    assert int(saved["step"]) == 2  # a copy, not the live tensor
    opt.load_state_dict(roundtrip({"state": {"t": saved}, "param_groups": opt.state_dict()["param_groups"]}))
    assert all(opt.table_state["t"][k] is held[k] for k in held)
    assert int(held["step"]) == 2 and float(held["b1p"]) == 0.9 * 0.9


# -- state_dict ----------------------------------------------------------------------------------

def make_model():
    return nn.ModuleDict({
        "user": make_table("user", dim=4, init=UniformInitializer(-0.5, 0.5)),
        "item": make_table("item", dim=2, init=UniformInitializer(-0.5, 0.5), grad_reduce_by="id"),
    })


def train(model, opt, batch):
    uid, iid, gu, gi = batch
    opt.zero_grad()
    ((model["user"](uid) * gu).sum() + (model["item"](iid) * gi).sum()).backward()
    opt.step()


def batches(n, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        uid = torch.randint(-20, 20, (10,), generator=gen)
        iid = torch.cat([torch.randint(0, 6, (5,), generator=gen), torch.tensor([INT64_MIN, INT64_MAX])])
        out.append((uid, iid, torch.randn(10, 4, generator=gen), torch.randn(7, 2, generator=gen)))
    return out


HP = {"adamwtf": {"lr": 0.01}, "adamw": {"lr": 0.01}, "adam": {"lr": 0.01},
      "adagrad": {"lr": 0.1, "initial_accumulator_value": 0.1},
      "adagrad_rowwise": {"lr": 0.1, "initial_accumulator_value": 0.1}, "sgd": {"lr": 0.1}}


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_is_bit_exact(kind):
    model = make_model()
    opt = make_optimizer(kind, filter_out_sparse_param(model), **HP[kind])
    first, second = batches(2, seed=0), batches(2, seed=1)
    for batch in first:
        train(model, opt, batch)
    opt.param_groups[0]["lr"] *= 0.5  # as a scheduler would
    model_state, opt_state = roundtrip(model.state_dict()), roundtrip(opt.state_dict())
    # The optimizer's state must restore the slots on its own: load the tables without theirs.
    model_state = {k: v for k, v in model_state.items() if ".slot." not in k}

    fresh = make_model()
    fresh.load_state_dict(model_state)
    fresh_opt = make_optimizer(kind, filter_out_sparse_param(fresh), **HP[kind])
    fresh_opt.load_state_dict(opt_state)
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert fresh_opt.table_state == opt.table_state
    for batch in second:
        train(model, opt, batch)
        train(fresh, fresh_opt, batch)
    for name in ("user", "item"):
        prefix = f"{name}."
        tables = [{k[len(prefix):]: v for k, v in m.state_dict().items() if k.startswith(prefix)}
                  for m in (model, fresh)]
        assert_states_equal(*(by_id(t) for t in tables))
        assert_states_equal(*(by_id(o.state_dict()["state"][name]) for o in (opt, fresh_opt)))
    if kind != "sgd":
        assert any(k.startswith("slot.") for k in opt.state_dict()["state"]["user"])


def test_state_dict_keys_tables_by_name():
    model = make_model()
    opt = SparseAdamWTF(filter_out_sparse_param(model))
    train(model, opt, batches(1, seed=0)[0])
    state = opt.state_dict()
    assert sorted(state["state"]) == ["item", "user"]
    user = state["state"]["user"]
    assert set(user) == {"step", "b1p", "b2p", "ids", "slot.exp_avg", "slot.exp_avg_sq"}
    assert user["ids"].numel() == len(model["user"]) and user["slot.exp_avg"].shape == (len(model["user"]), 4)
    assert all(isinstance(v, torch.Tensor) for entry in state["state"].values() for v in entry.values())
    assert state["param_groups"][0]["param_names"] == ["user", "item"]


# -- errors --------------------------------------------------------------------------------------

def test_table_errors():
    with pytest.raises(ValueError, match="no tables"):
        SparseAdamWTF({})
    with pytest.raises(ValueError, match="no tables"):
        SparseSGD([])
    with pytest.raises(TypeError, match="'f64'"):
        SparseAdamW([HashTable([2], block_size=4, dtype=torch.float64, name="f64")])
    with pytest.raises(TypeError, match="'x'"):
        SparseAdam({"x": torch.zeros(2)})
    t = make_table("dup")
    with pytest.raises(ValueError, match="'dup'"):
        SparseSGD([t, make_table("dup")])
    assert list(SparseSGD([make_table("a"), make_table("b")]).tables) == ["a", "b"]


@pytest.mark.parametrize("make, bad", [
    (lambda t: SparseAdamWTF([t], lr=-1.0), "lr"),
    (lambda t: SparseAdamW([t], lr=float("nan")), "lr"),
    (lambda t: SparseAdam([t], lr="0.1"), "lr"),
    (lambda t: SparseAdam([t], betas=(1.0, 0.999)), r"betas\[0\]"),
    (lambda t: SparseAdam([t], betas=(0.9, -0.1)), r"betas\[1\]"),
    (lambda t: SparseAdamW([t], betas=(0.9,)), "betas"),
    (lambda t: SparseAdamW([t], eps=-1e-8), "eps"),
    (lambda t: SparseAdamW([t], weight_decay=-0.1), "weight_decay"),
    (lambda t: SparseAdamWTF([t], weight_decay=2.0), "weight_decay"),
    (lambda t: SparseAdagrad([t], initial_accumulator_value=-1.0), "initial_accumulator_value"),
    (lambda t: SparseAdagrad([t], rowwise="yes"), "rowwise"),
    (lambda t: SparseSGD([t], lr=math.inf), "lr"),
    (lambda t: SparseSGD([t]).set_grad_accum_steps(0), "accumulation"),
    (lambda t: SparseSGD([t]).add_param_group({"params": [torch.zeros(1)]}), "one param group"),
])
def test_hyperparameter_errors(make, bad):
    with pytest.raises(ValueError, match=bad):
        make(make_table())


def test_recis_beta_keywords():
    opt = SparseAdamWTF([make_table()], beta1=0.8, beta2=0.99)
    assert opt.param_groups[0]["betas"] == (0.8, 0.99)
    with pytest.raises(ValueError, match="not both"):
        SparseAdamWTF([make_table()], betas=(0.5, 0.9), beta1=0.8)


def test_load_state_dict_errors():
    table = make_table("a")
    opt = SparseAdagrad([table], rowwise=True)
    step(opt, table, [1, 2], torch.ones(2, 3))
    state = opt.state_dict()
    with pytest.raises(ValueError, match="unknown table.*'a'"):
        SparseAdagrad([make_table("b")], rowwise=True).load_state_dict(state)
    with pytest.raises(ValueError, match="table 'a' lacks 2 of the 2 ids"):
        SparseAdagrad([make_table("a")], rowwise=True).load_state_dict(state)  # model state not loaded
    fresh = [make_table("a") for _ in range(2)]
    for t in fresh:
        t.load_state_dict({k: v for k, v in table.state_dict().items() if not k.startswith("slot.")})
    with pytest.raises(ValueError, match="'a'.*slot.accum"):
        SparseAdagrad([fresh[0]], rowwise=False).load_state_dict(state)  # [n, 1] accumulators into [n, dim]
    with pytest.raises(ValueError, match="no state for table.*'c'"):
        SparseAdagrad([fresh[1], make_table("c")], rowwise=True).load_state_dict(state)
    # nothing was written by the failed loads; the valid one restores the accumulators
    assert torch.equal(fresh[1].slot("accum", 1)[rows_of(fresh[1], [1, 2])], torch.zeros(2, 1))
    SparseAdagrad([fresh[1]], rowwise=True).load_state_dict(state)
    assert torch.equal(fresh[1].slot("accum", 1)[rows_of(fresh[1], [1, 2])], torch.ones(2, 1))


# -- CUDA ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_training_equals_cpu(kind):
    """The same steps on a CUDA table and a CPU table: the same ids, rows within float rounding
    (the CUDA gradient sums run in another order)."""
    gen = torch.Generator().manual_seed(0)
    tables = {d: HashTable([8], block_size=16, name="t", initializer=UniformInitializer(-0.1, 0.1), device=d)
              for d in ("cpu", "cuda")}
    optimizers = {d: make_optimizer(kind, [t]) for d, t in tables.items()}
    for _ in range(4):
        ids = torch.randint(-50, 50, (300,), generator=gen)
        grads = torch.randn(300, 8, generator=gen)
        for d in tables:
            step(optimizers[d], tables[d], ids.to(d), grads.to(d))
    cpu, cuda = by_id(tables["cpu"].state_dict()), by_id({k: v.cpu() for k, v in tables["cuda"].state_dict().items()})
    assert torch.equal(cpu["ids"], cuda["ids"])
    for key in cpu:
        torch.testing.assert_close(cuda[key], cpu[key], rtol=1e-5, atol=1e-6)

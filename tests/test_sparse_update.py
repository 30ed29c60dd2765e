"""fxrec::sparse_adam_update / sparse_adagrad_update / sparse_sgd_update (SPEC §5.1) against
numpy float64 oracles and torch.optim.AdamW, plus their Triton kernels (under the interpreter on
CPU, and on CUDA when there is one)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxrec  # noqa: F401  (registers torch.ops.fxrec.*)
from fxrec.ops.triton.sparse_update import (
    sparse_adagrad_update_triton,
    sparse_adam_update_triton,
    sparse_sgd_update_triton,
)

adam_update = torch.ops.fxrec.sparse_adam_update
adagrad_update = torch.ops.fxrec.sparse_adagrad_update
sgd_update = torch.ops.fxrec.sparse_sgd_update

HAS_CUDA = torch.cuda.is_available()
# Without CUDA the launchers run under TRITON_INTERPRET=1 (set by conftest) on CPU tensors.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

# The float32 kernels against float64 oracles: |actual - expected| <= RTOL * (sum of the absolute
# values of the terms the kernel added). Relative to the result itself no float32 kernel could
# do better where terms cancel (p - update with p ~ update).
RTOL = 1e-5


# -- numpy float64 oracles -----------------------------------------------------------------------

def adam_oracle(p, m, v, rows, g, lr, beta1, beta2, eps, decay, bc1, bc2):
    """SPEC §5.1 row by row in float64. Returns the new (p, m, v) and each one's term magnitude."""
    p, m, v = (np.array(x, dtype=np.float64) for x in (p, m, v))
    mag_p, mag_m, mag_v = np.abs(p), np.abs(m), np.abs(v)
    step_size = lr * math.sqrt(bc2) / bc1
    for i, r in enumerate(rows):
        if r < 0:  # padding: skipped
            continue
        gi = g[i].astype(np.float64)
        p[r] = p[r] * decay
        mag_m[r] = abs(beta1 * m[r]) + abs((1 - beta1) * gi)
        m[r] = beta1 * m[r] + (1 - beta1) * gi
        v[r] = beta2 * v[r] + (1 - beta2) * gi * gi
        mag_v[r] = v[r]
        denom = np.sqrt(v[r]) + eps
        mag_p[r] = np.abs(p[r]) + step_size * mag_m[r] / denom
        p[r] = p[r] - step_size * m[r] / denom
    return (p, m, v), (mag_p, mag_m, mag_v)


def adagrad_oracle(p, acc, rows, g, lr, eps, rowwise):
    p, acc = np.array(p, dtype=np.float64), np.array(acc, dtype=np.float64)
    mag_p, mag_acc = np.abs(p), np.abs(acc)
    for i, r in enumerate(rows):
        if r < 0:  # padding: skipped
            continue
        gi = g[i].astype(np.float64)
        acc[r] = acc[r] + (np.mean(gi * gi) if rowwise else gi * gi)
        mag_acc[r] = acc[r]
        update = lr * gi / (np.sqrt(acc[r]) + eps)
        mag_p[r] = np.abs(p[r]) + np.abs(update)
        p[r] = p[r] - update
    return (p, acc), (mag_p, mag_acc)


def sgd_oracle(p, rows, g, lr):
    p = np.array(p, dtype=np.float64)
    mag_p = np.abs(p)
    for i, r in enumerate(rows):
        if r < 0:  # padding: skipped
            continue
        mag_p[r] = np.abs(p[r]) + np.abs(lr * g[i])
        p[r] = p[r] - lr * g[i].astype(np.float64)
    return (p,), (mag_p,)


def assert_matches_oracle(actual: list[torch.Tensor], before: list[torch.Tensor], rows: list[int], expected, mags):
    untouched = np.setdiff1d(np.arange(actual[0].shape[0]), np.array(rows, dtype=np.int64))
    for a, b, e, mag in zip(actual, before, expected, mags):
        a = a.double().numpy()
        err = np.abs(a - e)
        bound = RTOL * mag
        worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else None
        assert (err <= bound).all(), f"error {err[worst]} > bound {bound[worst]} at {worst}"
        # Lazy: rows without a gradient keep their bits.
        assert np.array_equal(a[untouched], b.double().numpy()[untouched])


# -- strategies ----------------------------------------------------------------------------------

@st.composite
def tables(draw, max_capacity: int = 40, max_dim: int = 70):
    """(capacity, dim, rows: unique but for -1 padding, possibly empty, any order, seed, grad scale)."""
    capacity = draw(st.integers(1, max_capacity))
    dim = draw(st.integers(1, max_dim))
    rows = draw(st.lists(st.integers(0, capacity - 1), unique=True, max_size=capacity))
    padding = draw(st.integers(0, 3))
    rows = draw(st.permutations(rows + [-1] * padding))
    return capacity, dim, rows, draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from([1e-3, 1.0, 100.0]))


def randn(shape, gen, scale=1.0):
    return torch.randn(shape, generator=gen) * scale


def adam_state(capacity, dim, n_rows, seed, grad_scale):
    gen = torch.Generator().manual_seed(seed)
    return (randn((capacity, dim), gen), randn((capacity, dim), gen, 0.1),
            torch.rand((capacity, dim), generator=gen) * 0.1, randn((n_rows, dim), gen, grad_scale))


adam_hparams = st.fixed_dictionaries({
    "lr": st.floats(1e-4, 1.0),
    "beta1": st.floats(0.0, 0.99),
    "beta2": st.floats(0.9, 0.9999),
    "eps": st.sampled_from([1e-8, 1e-6, 1e-3]),
    "decay": st.floats(0.9, 1.0),
    "step": st.integers(1, 100),
})


def bc(*values, device="cpu"):
    """Adam's bias corrections as the op takes them: 0-d float64 tensors."""
    return tuple(torch.tensor(float(v), dtype=torch.float64, device=device) for v in values)


def adam_args(h, device="cpu"):
    """The op's scalar arguments for hyperparameters ``h`` at update step ``h['step']`` (the bias
    corrections as 0-d float64 tensors on ``device``)."""
    bc1, bc2 = 1 - h["beta1"] ** h["step"], 1 - h["beta2"] ** h["step"]
    return (h["lr"], h["beta1"], h["beta2"], h["eps"], h["decay"], *bc(bc1, bc2, device=device))


def oracle_args(args):
    """``adam_args``' values as floats, for the oracle."""
    return tuple(float(a) for a in args)


# -- vs torch.optim.AdamW (SPEC §5.1) ------------------------------------------------------------

def test_sparse_adamw_matches_torch_adamw():
    lr, betas, eps, wd = 1e-3, (0.9, 0.999), 1e-8, 0.01
    capacity, dim, rows = 10, 4, torch.tensor([7, 1, 4])
    param, exp_avg, exp_avg_sq = (torch.zeros(capacity, dim) for _ in range(3))
    dense = torch.zeros(len(rows), dim, requires_grad=True)
    adamw = torch.optim.AdamW([dense], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    b1p = b2p = 1.0  # SparseAdamW's per-table running products
    for _ in range(3):
        dense.grad = torch.ones_like(dense)
        adamw.step()
        b1p, b2p = b1p * betas[0], b2p * betas[1]
        adam_update(param, exp_avg, exp_avg_sq, rows, torch.ones(len(rows), dim),
                    lr, betas[0], betas[1], eps, 1 - lr * wd, *bc(1 - b1p, 1 - b2p))
        state = adamw.state[dense]
        torch.testing.assert_close(param[rows], dense.detach(), rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(exp_avg[rows], state["exp_avg"], rtol=1e-5, atol=0)
        torch.testing.assert_close(exp_avg_sq[rows], state["exp_avg_sq"], rtol=1e-5, atol=0)
    assert (param[rows] < -2e-3).all()  # three steps of about lr each: the check is not vacuous
    untouched = torch.tensor([r for r in range(capacity) if r not in rows.tolist()])
    for slot in (param, exp_avg, exp_avg_sq):
        assert torch.equal(slot[untouched], torch.zeros(len(untouched), dim))


def test_sparse_adamwtf_decay_has_no_lr_factor():
    # SparseAdamWTF: decay = 1 - weight_decay. Three steps of the optimizer loop vs the oracle's.
    lr, beta1, beta2, eps, wd = 1e-3, 0.9, 0.999, 1e-8, 0.01
    gen = torch.Generator().manual_seed(0)
    rows = [5, 0, 3]
    param, exp_avg, exp_avg_sq = randn((6, 8), gen), torch.zeros(6, 8), torch.zeros(6, 8)
    before = param.clone()
    expected = [param.numpy().astype(np.float64), np.zeros((6, 8)), np.zeros((6, 8))]
    b1p = b2p = 1.0
    for _ in range(3):
        grads = randn((3, 8), gen)
        b1p, b2p = b1p * beta1, b2p * beta2
        hp = (lr, beta1, beta2, eps, 1 - wd, 1 - b1p, 1 - b2p)
        adam_update(param, exp_avg, exp_avg_sq, torch.tensor(rows), grads, *hp[:5], *bc(*hp[5:]))
        expected, mags = adam_oracle(*expected, rows, grads.numpy(), *hp)
    assert_matches_oracle([param, exp_avg, exp_avg_sq], [before, torch.zeros(6, 8), torch.zeros(6, 8)],
                          rows, expected, mags)
    # 3 steps of decay 0.99 shrink |p| by ~3 %: an lr-scaled decay (1 - lr * wd) would be far off.
    shrink = np.abs(param[rows].numpy()).sum() / np.abs(before[rows].numpy()).sum()
    assert 0.96 < shrink < 0.98


# -- every op vs its numpy oracle ----------------------------------------------------------------

@given(table=tables(), h=adam_hparams)
def test_adam_matches_oracle(table, h):
    capacity, dim, rows, seed, grad_scale = table
    param, exp_avg, exp_avg_sq, grads = adam_state(capacity, dim, len(rows), seed, grad_scale)
    before = [t.clone() for t in (param, exp_avg, exp_avg_sq)]
    adam_update(param, exp_avg, exp_avg_sq, torch.tensor(rows, dtype=torch.int64), grads, *adam_args(h))
    expected, mags = adam_oracle(*(t.numpy() for t in before), rows, grads.numpy(), *oracle_args(adam_args(h)))
    assert_matches_oracle([param, exp_avg, exp_avg_sq], before, rows, expected, mags)


@given(table=tables(), lr=st.floats(1e-4, 1.0), eps=st.sampled_from([1e-10, 1e-8, 1e-3]), rowwise=st.booleans())
def test_adagrad_matches_oracle(table, lr, eps, rowwise):
    capacity, dim, rows, seed, grad_scale = table
    gen = torch.Generator().manual_seed(seed)
    param = randn((capacity, dim), gen)
    accum = torch.rand((capacity, 1 if rowwise else dim), generator=gen)
    grads = randn((len(rows), dim), gen, grad_scale)
    before = [param.clone(), accum.clone()]
    adagrad_update(param, accum, torch.tensor(rows, dtype=torch.int64), grads, lr, eps, rowwise)
    expected, mags = adagrad_oracle(*(t.numpy() for t in before), rows, grads.numpy(), lr, eps, rowwise)
    assert_matches_oracle([param, accum], before, rows, expected, mags)


@given(table=tables(), lr=st.floats(1e-4, 10.0))
def test_sgd_matches_oracle(table, lr):
    capacity, dim, rows, seed, grad_scale = table
    gen = torch.Generator().manual_seed(seed)
    param, grads = randn((capacity, dim), gen), randn((len(rows), dim), gen, grad_scale)
    before = param.clone()
    sgd_update(param, torch.tensor(rows, dtype=torch.int64), grads, lr)
    expected, mags = sgd_oracle(before.numpy(), rows, grads.numpy(), lr)
    assert_matches_oracle([param], [before], rows, expected, mags)


def test_nan_gradient_poisons_only_its_row():
    param, m, v = torch.ones(4, 3), torch.zeros(4, 3), torch.zeros(4, 3)
    grads = torch.tensor([[1.0, float("nan"), 1.0], [1.0, 1.0, 1.0]])
    adam_update(param, m, v, torch.tensor([2, 0]), grads, 0.1, 0.9, 0.999, 1e-8, 1.0, *bc(0.1, 0.001))
    assert torch.isnan(param[2, 1]) and torch.isnan(m[2, 1]) and torch.isnan(v[2, 1])
    assert not torch.isnan(param[[0, 1, 3]]).any() and not torch.isnan(param[2, [0, 2]]).any()


def test_strided_views_update_in_place():
    # Slots may be views of a larger buffer (e.g. columns of a coalesced table).
    buffer = torch.zeros(6, 10)
    param, accum = buffer[:, 2:7], torch.ones(12, 5)[::2]
    rows, grads = torch.tensor([4, 1]), torch.full((2, 5), 2.0)
    adagrad_update(param, accum, rows, grads, 0.5, 0.0, False)
    # acc = 1 + 4 = 5; p = 0 - 0.5 * 2 / sqrt(5)
    assert torch.equal(buffer[[1, 4], 2:7], torch.full((2, 5), -1 / math.sqrt(5)))
    assert torch.equal(accum[[1, 4]], torch.full((2, 5), 5.0))
    assert (buffer[:, :2] == 0).all() and (buffer[:, 7:] == 0).all() and (buffer[[0, 2, 3, 5]] == 0).all()


# -- validation ----------------------------------------------------------------------------------

def _adam(param=None, exp_avg=None, exp_avg_sq=None, rows=None, grads=None, bcs=None):
    args = [torch.zeros(5, 3) if x is None else x for x in (param, exp_avg, exp_avg_sq)]
    rows = torch.tensor([0, 2]) if rows is None else rows
    grads = torch.zeros(2, 3) if grads is None else grads
    adam_update(*args, rows, grads, 1e-3, 0.9, 0.999, 1e-8, 1.0, *(bcs or bc(0.1, 0.001)))


@pytest.mark.parametrize("kwargs, error, name", [
    ({"param": torch.zeros(5, 3, dtype=torch.float64)}, TypeError, "param"),
    ({"param": torch.zeros(15)}, ValueError, "param"),
    ({"param": torch.zeros(5, 0), "exp_avg": torch.zeros(5, 0), "exp_avg_sq": torch.zeros(5, 0),
      "grads": torch.zeros(2, 0)}, ValueError, "param"),
    ({"exp_avg": torch.zeros(5, 3, dtype=torch.bfloat16)}, TypeError, "exp_avg"),
    ({"exp_avg_sq": torch.zeros(4, 3)}, ValueError, "exp_avg_sq"),
    ({"rows": torch.tensor([0, 2], dtype=torch.int32)}, TypeError, "rows"),
    ({"rows": torch.tensor([[0, 2]])}, ValueError, "rows"),
    ({"rows": torch.tensor([0, 5])}, ValueError, "rows"),
    ({"rows": torch.tensor([-2, 2])}, ValueError, "rows"),
    ({"grads": torch.zeros(3, 3)}, ValueError, "grads"),
    ({"grads": torch.zeros(2, 4)}, ValueError, "grads"),
    ({"grads": torch.zeros(2, 3, dtype=torch.float16)}, TypeError, "grads"),
    ({"bcs": (torch.tensor(0.1), torch.tensor(0.001, dtype=torch.float64))}, TypeError, "bias_correction1"),
    ({"bcs": (torch.tensor(0.1, dtype=torch.float64), torch.tensor([0.001], dtype=torch.float64))}, TypeError,
     "bias_correction2"),
])
def test_adam_rejects_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        _adam(**kwargs)


def test_adagrad_and_sgd_reject_bad_arguments():
    rows, grads = torch.tensor([1]), torch.zeros(1, 4)
    with pytest.raises(ValueError, match="accum"):  # row-wise wants [capacity, 1]
        adagrad_update(torch.zeros(3, 4), torch.zeros(3, 4), rows, grads, 0.1, 1e-8, True)
    with pytest.raises(ValueError, match="accum"):
        adagrad_update(torch.zeros(3, 4), torch.zeros(3, 1), rows, grads, 0.1, 1e-8, False)
    with pytest.raises(TypeError, match="param"):
        sgd_update(torch.zeros(3, 4, dtype=torch.float64), rows, grads, 0.1)
    with pytest.raises(ValueError, match="rows"):
        sgd_update(torch.zeros(3, 4), torch.tensor([3]), grads, 0.1)


# -- opcheck -------------------------------------------------------------------------------------

def opcheck_cases(device="cpu"):
    gen = torch.Generator().manual_seed(1)
    t = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    pos = lambda *shape: torch.rand(*shape, generator=gen).to(device)  # noqa: E731
    rows = torch.tensor([3, -1, 5], device=device)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    adam_hp = (1e-2, 0.9, 0.999, 1e-8, 0.99, *bc(0.19, 0.002, device=device))
    return [
        (adam_update, (t(6, 4), t(6, 4), pos(6, 4), rows, t(3, 4), *adam_hp)),
        (adam_update, (t(6, 4), t(6, 4), pos(6, 4), empty, t(0, 4), *adam_hp)),
        (adagrad_update, (t(6, 4), pos(6, 4), rows, t(3, 4), 0.1, 1e-8, False)),
        (adagrad_update, (t(6, 4), pos(6, 1), rows, t(3, 4), 0.1, 1e-8, True)),
        (adagrad_update, (t(6, 4), pos(6, 1), empty, t(0, 4), 0.1, 1e-8, True)),
        (sgd_update, (t(6, 4), rows, t(3, 4), 0.1)),
        (sgd_update, (t(6, 4), empty, t(0, 4), 0.1)),
    ]


@pytest.mark.parametrize("index", range(len(opcheck_cases())))
def test_opcheck(index):
    op, args = opcheck_cases()[index]
    torch.library.opcheck(op, args)


# -- Triton kernels vs the CPU kernels -----------------------------------------------------------
# Both sides run the same correctly rounded float32 operations in the same order (IEEE sqrt/div,
# no FMA), so they agree bit for bit; only the row-wise Adagrad mean sums in another order.

def _launcher_case(capacity, dim, rows, seed):
    gen = torch.Generator().manual_seed(seed)
    param, m, v = randn((capacity, dim), gen), randn((capacity, dim), gen), torch.rand((capacity, dim), generator=gen)
    grads = randn((len(rows), dim), gen)
    if len(rows):
        grads[0, 0] = float("nan")  # NaN propagates alike
    return param, m, v, torch.tensor(rows, dtype=torch.int64), grads


def _assert_same(actual: list[torch.Tensor], expected: list[torch.Tensor], exact: bool):
    for a, e in zip(actual, expected):
        if exact:
            assert torch.equal(a.cpu().nan_to_num(7.0), e.nan_to_num(7.0)), (a, e)
        else:
            # The row's mean of g*g sums in another order: the accumulator's last bits differ,
            # so p - lr*g/sqrt(acc) may differ by a few ulp of the O(1) update even where the
            # result cancels to near 0: an absolute term of that size, not of the result's.
            torch.testing.assert_close(a.cpu(), e, rtol=1e-6, atol=1e-6, equal_nan=True)


@settings(max_examples=30)
@given(table=tables(max_capacity=12, max_dim=40), h=adam_hparams, rowwise=st.booleans())
def test_triton_launchers_match_cpu_kernels(table, h, rowwise):
    capacity, dim, rows, seed, _ = table
    param, m, v, idx, grads = _launcher_case(capacity, dim, rows, seed)
    accum = v[:, :1].clone() if rowwise else v.clone()
    on = lambda *ts: [t.clone().to(TRITON_DEVICE) for t in ts]  # noqa: E731

    cpu = [param.clone(), m.clone(), v.clone()]
    adam_update(*cpu, idx, grads, *adam_args(h))
    tri = on(param, m, v)
    sparse_adam_update_triton(*tri, *on(idx, grads), *adam_args(h, TRITON_DEVICE))
    _assert_same(tri, cpu, exact=True)

    cpu = [param.clone(), accum.clone()]
    adagrad_update(*cpu, idx, grads, h["lr"], h["eps"], rowwise)
    tri = on(param, accum)
    sparse_adagrad_update_triton(*tri, *on(idx, grads), h["lr"], h["eps"], rowwise)
    _assert_same(tri, cpu, exact=not rowwise)

    cpu = [param.clone()]
    sgd_update(*cpu, idx, grads, h["lr"])
    tri = on(param)
    sparse_sgd_update_triton(*tri, *on(idx, grads), h["lr"])
    _assert_same(tri, cpu, exact=True)


def test_triton_launchers_strided_views_and_long_rows():
    # Column views (row stride != dim) and dim > BLOCK_D (several column tiles, row-wise loop).
    gen = torch.Generator().manual_seed(3)
    for dim in (3, 200):
        base = randn((9, dim + 5), gen)
        rows, grads = torch.tensor([8, 2, 5]), randn((3, dim), gen)
        accum = torch.rand((9, 2), generator=gen)
        expected = [base.clone(), accum.clone()]
        adagrad_update(expected[0][:, 5:], expected[1][:, 1:], rows, grads, 0.1, 1e-8, True)
        actual = [base.clone().to(TRITON_DEVICE), accum.clone().to(TRITON_DEVICE)]
        sparse_adagrad_update_triton(actual[0][:, 5:], actual[1][:, 1:], rows.to(TRITON_DEVICE),
                                     grads.to(TRITON_DEVICE), 0.1, 1e-8, True)
        _assert_same(actual, expected, exact=False)
        assert torch.equal(actual[0][:, :5].cpu(), base[:, :5]) and torch.equal(actual[1][:, 0].cpu(), accum[:, 0])


def test_triton_launchers_skip_rows_out_of_range():
    # The no-sync CUDA path cannot raise for bad rows: it must not write outside the table.
    param, grads = torch.zeros(8, 3, device=TRITON_DEVICE), torch.ones(4, 3, device=TRITON_DEVICE)
    table = param[2:6]  # rows 0..3 of a view: -1 and 4 would land in param's rows 1 and 6
    sparse_sgd_update_triton(table, torch.tensor([-1, 4, 1, 2**40], device=TRITON_DEVICE), grads, 1.0)
    expected = torch.zeros(8, 3)
    expected[3] = -1.0
    assert torch.equal(param.cpu(), expected)


# -- CUDA ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@settings(max_examples=30)
@given(table=tables(max_capacity=300, max_dim=200), h=adam_hparams, rowwise=st.booleans())
def test_cuda_matches_cpu(table, h, rowwise):
    capacity, dim, rows, seed, _ = table
    _check_cuda_matches_cpu(*_launcher_case(capacity, dim, rows, seed), h, rowwise)


@pytest.mark.gpu
@pytest.mark.parametrize("rowwise", [False, True])
def test_cuda_matches_cpu_large(rowwise):
    # A 1M-row table, 100k rows updated, dim 64.
    gen = torch.Generator().manual_seed(0)
    capacity, n_rows, dim = 1_000_000, 100_000, 64
    param, m = randn((capacity, dim), gen), randn((capacity, dim), gen, 0.1)
    v = torch.rand((capacity, dim), generator=gen)
    rows = torch.randperm(capacity, generator=gen)[:n_rows]
    grads = randn((n_rows, dim), gen)
    h = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "decay": 1 - 1e-5, "step": 7}
    _check_cuda_matches_cpu(param, m, v, rows, grads, h, rowwise)


def _check_cuda_matches_cpu(param, m, v, rows, grads, h, rowwise):
    # Expected bit-identical but for the row-wise mean (see the Triton module); asserted to 1e-6.
    accum = v[:, :1].clone() if rowwise else v.clone()
    cuda = lambda *ts: [t.clone().cuda() for t in ts]  # noqa: E731
    close = lambda a, e: [  # noqa: E731
        torch.testing.assert_close(x.cpu(), y, rtol=1e-6, atol=1e-7, equal_nan=True) for x, y in zip(a, e)
    ]
    cpu, gpu = [param.clone(), m.clone(), v.clone()], cuda(param, m, v)
    adam_update(*cpu, rows, grads, *adam_args(h))
    adam_update(*gpu, *cuda(rows, grads), *adam_args(h, "cuda"))
    close(gpu, cpu)
    cpu, gpu = [param.clone(), accum.clone()], cuda(param, accum)
    adagrad_update(*cpu, rows, grads, h["lr"], h["eps"], rowwise)
    adagrad_update(*gpu, *cuda(rows, grads), h["lr"], h["eps"], rowwise)
    if rowwise:  # the mean's ulps move p - step by ulps of p's magnitude, whatever the result's
        scale = max(1.0, float(param.abs().max()))
        for x, y in zip(gpu, cpu):
            torch.testing.assert_close(x.cpu(), y, rtol=1e-6, atol=4 * 2**-24 * scale, equal_nan=True)
    else:
        close(gpu, cpu)
    cpu, gpu = [param.clone()], cuda(param)
    sgd_update(*cpu, rows, grads, h["lr"])
    sgd_update(*gpu, *cuda(rows, grads), h["lr"])
    close(gpu, cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(len(opcheck_cases())))
def test_opcheck_cuda(index):
    op, args = opcheck_cases("cuda")[index]
    torch.library.opcheck(op, args)


_PTX_OF_ADAM_KERNEL = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fxrec.ops.triton.sparse_update import _sparse_adam_kernel as kernel
types = {"param": "*fp32", "exp_avg": "*fp32", "exp_avg_sq": "*fp32", "grads": "*fp32", "rows": "*i64",
         "bias_correction1": "*fp64", "bias_correction2": "*fp64", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"}
floats = ("decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "lr", "eps")
# a Python float argument binds as fp32 unless the kernel annotates its type (as the launcher binds it)
signature = {p.name: types.get(p.name, (p.annotation_type or "fp32") if p.name in floats else "i64")
             for p in kernel.params}
try:
    compiled = triton.compile(ASTSource(kernel, signature, {"BLOCK_R": 128, "BLOCK_D": 16}),
                              target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
except Exception as error:  # no CUDA backend (ptxas) in this Triton build
    print("NO-CUDA-BACKEND", error)
else:
    print(compiled.asm["ptx"])
"""


def test_adam_kernel_step_size_is_ieee_float64_in_ptx():
    """The CUDA Adam kernel forms lr * sqrt(bc2) / bc1 in float64 like the CPU kernel's torch ops:
    compiled for sm_90 (no GPU needed; a process without the interpreter), lr is a float64
    parameter and the PTX uses the correctly rounded float64 mul / sqrt / div and one
    round-to-nearest float32 conversion, no FMA."""
    import os
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    ptx = subprocess.run([sys.executable, "-c", _PTX_OF_ADAM_KERNEL], env=env, capture_output=True, text=True,
                         check=True, timeout=300).stdout
    if ptx.startswith("NO-CUDA-BACKEND"):
        pytest.skip(f"Triton cannot compile for CUDA here: {ptx}")
    assert re.search(r"\.param \.f64 \w+_param_\d+", ptx)
    for op in ("mul.rn.f64", "sqrt.rn.f64", "div.rn.f64", "cvt.rn.f32.f64"):
        assert ptx.count(op) == 1, op
    assert not re.search(r"fma\.\w+\.f64|sqrt\.approx|div\.(approx|full)", ptx)

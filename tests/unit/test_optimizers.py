"""Sparse optimizers against torch.optim (sgd, adagrad, adam) and a scalar FTRL reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recps.embedding.config import OptimizerConfig
from recps.embedding.errors import (
    ConfigError,
    DtypeError,
    InvalidArgumentError,
    ShapeError,
)
from recps.embedding.optimizers import (
    AdagradOptimizer,
    AdamOptimizer,
    FtrlOptimizer,
    SgdOptimizer,
    SparseOptimizer,
    make_optimizer,
)

RTOL, ATOL = 1e-5, 1e-6
KINDS = {
    "sgd": SgdOptimizer,
    "adagrad": AdagradOptimizer,
    "adam": AdamOptimizer,
    "ftrl": FtrlOptimizer,
}


def _torch_optimizer(
    cfg: OptimizerConfig, params: list[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    if cfg.kind == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.kind == "adagrad":
        return torch.optim.Adagrad(
            params,
            lr=cfg.lr,
            lr_decay=0.0,
            weight_decay=cfg.weight_decay,
            initial_accumulator_value=cfg.initial_accumulator,
            eps=cfg.eps,
        )
    assert cfg.kind == "adam"
    return torch.optim.Adam(
        params,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )


def _run_dense(
    cfg: OptimizerConfig, w0: np.ndarray, grads: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Ours and torch's weights and state after every row got every gradient.

    Returns (our weights, our state, torch's weights, torch's per-parameter state).
    """
    opt = make_optimizer(cfg)
    n, dim = w0.shape
    w = w0.copy()
    state = opt.init_state(n, dim)
    for t, g in enumerate(grads, start=1):
        opt.update(w, state, g, np.full(n, t, dtype=np.int64))

    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    topt = _torch_optimizer(cfg, [p])
    for g in grads:
        p.grad = torch.from_numpy(g.copy())
        topt.step()
    torch_state = {k: v.numpy() for k, v in topt.state[p].items() if v.dim() == 2}
    return w, state, p.detach().numpy(), torch_state


def _random_problem(
    seed: int, n: int, dim: int, steps: int, scale: float = 1.0
) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    w0 = rng.uniform(-0.5, 0.5, (n, dim)).astype(np.float32)
    grads = [(rng.standard_normal((n, dim)) * scale).astype(np.float32) for _ in range(steps)]
    return w0, grads


# ---------------------------------------------------------------------------------------
# against torch, dense: every row updated every step


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_sgd_matches_torch(weight_decay: float) -> None:
    cfg = OptimizerConfig("sgd", lr=0.1, weight_decay=weight_decay)
    w0, grads = _random_problem(0, 7, 5, 6)
    ours, state, ref, _ = _run_dense(cfg, w0, grads)
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL)
    assert state.shape == (7, 0)


@pytest.mark.parametrize(
    ("initial_accumulator", "weight_decay"), [(0.0, 0.0), (0.1, 0.0), (0.0, 0.01), (0.5, 0.1)]
)
def test_adagrad_matches_torch(initial_accumulator: float, weight_decay: float) -> None:
    cfg = OptimizerConfig(
        "adagrad", lr=0.05, initial_accumulator=initial_accumulator, weight_decay=weight_decay
    )
    w0, grads = _random_problem(1, 9, 6, 8)
    ours, state, ref, torch_state = _run_dense(cfg, w0, grads)
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(state, torch_state["sum"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("weight_decay", [0.0, 0.02])
def test_adam_matches_torch(weight_decay: float) -> None:
    cfg = OptimizerConfig("adam", lr=0.01, weight_decay=weight_decay)
    w0, grads = _random_problem(2, 8, 4, 10)
    ours, state, ref, torch_state = _run_dense(cfg, w0, grads)
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(state[:, :4], torch_state["exp_avg"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(state[:, 4:], torch_state["exp_avg_sq"], rtol=RTOL, atol=ATOL)


def test_adam_per_row_steps_match_one_torch_adam_per_row() -> None:
    cfg = OptimizerConfig("adam", lr=0.02, beta1=0.8, beta2=0.99, weight_decay=0.01)
    opt = make_optimizer(cfg)
    n, dim = 6, 5
    rng = np.random.default_rng(3)
    table = rng.uniform(-0.5, 0.5, (n, dim)).astype(np.float32)
    state_table = opt.init_state(n, dim)
    counts = np.zeros(n, dtype=np.int64)

    params = [torch.nn.Parameter(torch.from_numpy(table[i].copy())) for i in range(n)]
    topts = [_torch_optimizer(cfg, [p]) for p in params]

    for _ in range(12):
        rows = np.flatnonzero(rng.random(n) < 0.5)
        grads = rng.standard_normal((rows.size, dim)).astype(np.float32)
        counts[rows] += 1
        # Gather, update the contiguous copies, scatter back: as a store does.
        w, s = table[rows], state_table[rows]
        opt.update(w, s, grads, counts[rows])
        table[rows], state_table[rows] = w, s
        for g, i in zip(grads, rows, strict=True):
            params[i].grad = torch.from_numpy(g.copy())
            topts[i].step()

    assert len(set(counts.tolist())) > 1, "the test needs rows with different step counts"
    ref = np.stack([p.detach().numpy() for p in params])
    np.testing.assert_allclose(table, ref, rtol=RTOL, atol=ATOL)


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["sgd", "adagrad", "adam"]),
    n=st.integers(0, 9),
    dim=st.integers(1, 17),
    steps=st.integers(1, 5),
    lr=st.floats(1e-3, 0.5),
    weight_decay=st.sampled_from([0.0, 1e-3, 0.1]),
    initial_accumulator=st.sampled_from([0.0, 0.1, 1.0]),
    scale=st.sampled_from([1e-3, 1.0, 10.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_torch_property(
    kind: str,
    n: int,
    dim: int,
    steps: int,
    lr: float,
    weight_decay: float,
    initial_accumulator: float,
    scale: float,
    seed: int,
) -> None:
    cfg = OptimizerConfig(
        kind, lr=lr, weight_decay=weight_decay, initial_accumulator=initial_accumulator
    )
    w0, grads = _random_problem(seed, n, dim, steps, scale)
    ours, _, ref, _ = _run_dense(cfg, w0, grads)
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------
# ftrl against a scalar reference, written straight from the paper's formulas


def _ftrl_reference(
    cfg: OptimizerConfig, w0: np.ndarray, grads: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights, z and n after all steps, in float64 scalar arithmetic."""
    rows, cols = w0.shape
    w = w0.astype(np.float64)
    z = np.zeros_like(w)
    acc = np.zeros_like(w)
    alpha, beta, l1, l2 = cfg.lr, cfg.ftrl_beta, cfg.l1, cfg.l2
    for g in grads:
        for i in range(rows):
            for j in range(cols):
                gij = float(g[i, j])
                n_new = acc[i, j] + gij * gij
                sigma = (math.sqrt(n_new) - math.sqrt(acc[i, j])) / alpha
                z[i, j] += gij - sigma * w[i, j]
                acc[i, j] = n_new
                if abs(z[i, j]) <= l1:
                    w[i, j] = 0.0
                else:
                    sign = 1.0 if z[i, j] > 0 else -1.0
                    w[i, j] = -(z[i, j] - sign * l1) / ((beta + math.sqrt(n_new)) / alpha + l2)
    return w, z, acc


def _run_ftrl(
    cfg: OptimizerConfig, w0: np.ndarray, grads: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    opt = make_optimizer(cfg)
    w = w0.copy()
    state = opt.init_state(*w0.shape)
    for t, g in enumerate(grads, start=1):
        opt.update(w, state, g, np.full(w0.shape[0], t, dtype=np.int64))
    return w, state


@pytest.mark.parametrize(
    ("l1", "l2", "beta"), [(0.0, 0.0, 1.0), (0.0, 0.5, 0.1), (1.0, 0.1, 1.0), (2.5, 0.0, 0.5)]
)
def test_ftrl_matches_scalar_reference(l1: float, l2: float, beta: float) -> None:
    cfg = OptimizerConfig("ftrl", lr=0.1, ftrl_beta=beta, l1=l1, l2=l2)
    # Non-zero starting weights: sigma * w must use the current (initializer's) weights.
    w0, grads = _random_problem(4, 10, 7, 6)
    ours, state = _run_ftrl(cfg, w0, grads)
    ref_w, ref_z, ref_n = _ftrl_reference(cfg, w0, grads)
    np.testing.assert_allclose(ours, ref_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state[:, :7], ref_z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state[:, 7:], ref_n, rtol=1e-5, atol=1e-6)
    if l1 > 0:
        pruned = np.abs(ref_z) <= l1
        assert pruned.any() and not pruned.all(), "the test needs both pruned and live weights"
        assert np.all(ours[pruned] == 0.0)
        assert not np.signbit(ours[pruned]).any(), "pruned weights are +0, not -0"
        assert np.all(ours[~pruned] != 0.0)


def test_ftrl_large_l1_zeroes_everything() -> None:
    cfg = OptimizerConfig("ftrl", lr=0.1, l1=1e6)
    w0, grads = _random_problem(5, 4, 3, 3)
    ours, _ = _run_ftrl(cfg, w0, grads)
    assert np.array_equal(ours, np.zeros_like(ours))


def test_ftrl_zero_beta_and_l2_stays_finite_for_untouched_coordinates() -> None:
    # (beta + sqrt(n))/alpha + l2 is 0 where n is still 0: must give w = 0, not 0/0 = NaN.
    cfg = OptimizerConfig("ftrl", lr=0.1, ftrl_beta=0.0, l1=0.0, l2=0.0)
    w0 = np.zeros((2, 3), np.float32)
    g = np.array([[1.0, 0.0, -2.0], [0.0, 0.0, 0.0]], np.float32)
    ours, _ = _run_ftrl(cfg, w0, [g, g])
    ref, _, _ = _ftrl_reference(cfg, w0.astype(np.float64), [g, g])
    ref = np.nan_to_num(ref, nan=0.0)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 6),
    dim=st.integers(1, 9),
    steps=st.integers(1, 4),
    lr=st.floats(0.01, 1.0),
    beta=st.floats(0.01, 2.0),
    l1=st.sampled_from([0.0, 0.1, 1.0]),
    l2=st.sampled_from([0.0, 0.1, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_ftrl_property(
    n: int, dim: int, steps: int, lr: float, beta: float, l1: float, l2: float, seed: int
) -> None:
    cfg = OptimizerConfig("ftrl", lr=lr, ftrl_beta=beta, l1=l1, l2=l2)
    w0, grads = _random_problem(seed, n, dim, steps)
    ours, state = _run_ftrl(cfg, w0, grads)
    ref_w, ref_z, _ = _ftrl_reference(cfg, w0, grads)
    # float32 vs float64 may flip a coordinate whose |z| is within rounding of l1; skip those.
    clear = np.abs(np.abs(ref_z) - l1) > 1e-4 * (1.0 + np.abs(ref_z))
    np.testing.assert_allclose(ours[clear], ref_w[clear], rtol=1e-4, atol=1e-6)
    assert np.isfinite(state).all()


# ---------------------------------------------------------------------------------------
# shapes, dtypes, factory, edge cases


@pytest.mark.parametrize("kind", list(KINDS))
def test_state_width_and_init_state(kind: str) -> None:
    opt = make_optimizer(OptimizerConfig(kind, initial_accumulator=0.25))
    expected_width = {"sgd": 0, "adagrad": 16, "adam": 32, "ftrl": 32}[kind]
    assert opt.state_width(16) == expected_width
    state = opt.init_state(5, 16)
    assert state.shape == (5, expected_width)
    assert state.dtype == np.float32
    fill = 0.25 if kind == "adagrad" else 0.0
    assert np.all(state == fill)
    assert opt.init_state(0, 16).shape == (0, expected_width)


@pytest.mark.parametrize("kind", list(KINDS))
def test_empty_batch_is_a_no_op(kind: str) -> None:
    opt = make_optimizer(OptimizerConfig(kind))
    w = np.empty((0, 8), np.float32)
    opt.update(w, opt.init_state(0, 8), np.empty((0, 8), np.float32), np.empty(0, np.int64))


@pytest.mark.parametrize("kind", list(KINDS))
def test_make_optimizer_returns_the_right_class(kind: str) -> None:
    cfg = OptimizerConfig(kind, lr=0.3)
    opt = make_optimizer(cfg)
    assert type(opt) is KINDS[kind]
    assert isinstance(opt, SparseOptimizer)
    assert opt.kind == kind
    assert opt.config is cfg


def test_class_rejects_config_of_another_kind() -> None:
    with pytest.raises(ConfigError):
        AdamOptimizer(OptimizerConfig("sgd"))


@pytest.mark.parametrize("kind", list(KINDS))
def test_update_is_in_place_and_leaves_grads_alone(kind: str) -> None:
    opt = make_optimizer(OptimizerConfig(kind, lr=0.1, weight_decay=0.01))
    w0, (g,) = _random_problem(6, 5, 4, 1)
    w, state = w0.copy(), opt.init_state(5, 4)
    state_before, g_before = state.copy(), g.copy()
    opt.update(w, state, g, np.ones(5, np.int64))
    assert not np.array_equal(w, w0)
    if state.size:
        assert not np.array_equal(state, state_before)
    assert np.array_equal(g, g_before)


@pytest.mark.parametrize("kind", ["adagrad", "adam"])
def test_zero_eps_and_zero_grads_stay_finite(kind: str) -> None:
    opt = make_optimizer(OptimizerConfig(kind, eps=0.0))
    w = np.ones((2, 3), np.float32)
    g = np.zeros((2, 3), np.float32)
    g[0, 0] = 1.0
    opt.update(w, opt.init_state(2, 3), g, np.ones(2, np.int64))
    assert np.isfinite(w).all()
    assert np.all(w.ravel()[1:] == 1.0)


def test_update_validates_arguments() -> None:
    opt = make_optimizer(OptimizerConfig("adam"))
    w = np.zeros((3, 4), np.float32)
    s = opt.init_state(3, 4)
    g = np.zeros((3, 4), np.float32)
    steps = np.ones(3, np.int64)
    with pytest.raises(DtypeError):
        opt.update(w.astype(np.float64), s, g, steps)
    with pytest.raises(DtypeError):
        opt.update(w, s, g.astype(np.float16), steps)
    with pytest.raises(DtypeError):
        opt.update(w, s, g, steps.astype(np.float32))
    with pytest.raises(ShapeError):
        opt.update(w, s, g[:, :3], steps)
    with pytest.raises(ShapeError):
        opt.update(w, s[:, :4], g, steps)
    with pytest.raises(ShapeError):
        opt.update(w, s, g, steps[:2])
    with pytest.raises(ShapeError):
        opt.update(w.ravel(), s, g, steps)
    with pytest.raises(InvalidArgumentError):
        opt.update(w, s, g, np.zeros(3, np.int64))

"""Kernel-regression problem, metrics and the exact incremental regressor."""

from __future__ import annotations

import math

import numpy as np
import pytest

from freeshap_ray.errors import KernelError
from freeshap_ray.utility import (
    UTILITIES,
    IncrementalRegressor,
    RegressionProblem,
    accuracy,
    accuracy_per_test,
    neg_cross_entropy,
    neg_cross_entropy_per_test,
    resolve_utility,
)

from .helpers import solve_tol


def raw_kernels(kind: str, n: int, m: int, c: int, d: int = 40, seed: int = 0):
    """Random PSD kernels from random (per-class) gradient features, plus labels."""
    rng = np.random.default_rng(seed)
    if kind == "first_logit":
        phi = rng.normal(size=(n + m, d)) * 30.0
        k = phi @ phi.T
        k_train, k_test = k[:n, :n], k[n:, :n]
    else:
        grads = rng.normal(size=(n + m, c, d)) * 30.0
        k = np.einsum("icx,jdx->ijcd", grads, grads)
        k_train, k_test = k[:n, :n], k[n:, :n]
    y = rng.integers(0, c, size=n + m)
    return k_train, k_test, y[:n], y[n:]


def direct_predict(k_train, k_test, y_train, c, subset, lam, div):
    """Independent reference: flatten by hand and use numpy.linalg.solve."""
    n = k_train.shape[0]
    if k_train.ndim == 2:
        K, KT = k_train / div, k_test / div
        T = np.eye(c)[y_train]
        rows = np.asarray(subset)
    else:
        K = np.block([[k_train[i, j] for j in range(n)] for i in range(n)]) / div
        KT = np.block([[k_test[i, j] for j in range(n)] for i in range(k_test.shape[0])]) / div
        T = np.eye(c)[y_train].reshape(-1, 1)
        rows = np.array([i * c + a for i in subset for a in range(c)], dtype=np.int64)
    A = K[np.ix_(rows, rows)] + lam * np.eye(rows.size)
    F = KT[:, rows] @ np.linalg.solve(A, T[rows])
    return F.reshape(k_test.shape[0], c)


KINDS = [("first_logit", 2), ("first_logit", 3), ("full", 2), ("full", 3)]


@pytest.mark.parametrize("kind,c", KINDS)
def test_predict_matches_direct_solve(kind, c):
    lam, div = 1e-3, 1e2
    k_train, k_test, y_train, y_test = raw_kernels(kind, 12, 7, c, seed=c)
    prob = RegressionProblem.from_kernels(k_train, k_test, y_train, y_test, n_classes=c, lam=lam,
                                          kernel_divisor=div)
    assert prob.group == (1 if kind == "first_logit" else c)
    assert prob.n_classes == c
    rng = np.random.default_rng(1)
    for size in (1, 3, 7, 12):
        subset = rng.choice(12, size=size, replace=False)
        want = direct_predict(k_train, k_test, y_train, c, subset, lam, div)
        got = prob.predict(subset)
        assert got.shape == (7, c)
        np.testing.assert_allclose(got, want, rtol=0, atol=solve_tol(prob) * np.abs(want).max())
    np.testing.assert_array_equal(prob.predict(np.array([], dtype=np.int64)), np.zeros((7, c)))
    full = direct_predict(k_train, k_test, y_train, c, range(12), lam, div)
    np.testing.assert_allclose(prob.predict(), full, rtol=0, atol=solve_tol(prob) * np.abs(full).max())


@pytest.mark.parametrize("kind,c", KINDS)
@pytest.mark.parametrize("block", [1, 5])
def test_incremental_matches_direct_every_prefix(kind, c, block):
    n, m = 30, 9
    k_train, k_test, y_train, y_test = raw_kernels(kind, n, m, c, seed=10 + c)
    prob = RegressionProblem.from_kernels(k_train, k_test, y_train, y_test, n_classes=c, lam=1e-4,
                                          kernel_divisor=1e3)
    perm = np.random.default_rng(c + block).permutation(n)
    reg = IncrementalRegressor(prob)
    preds = []
    for start in range(0, n, block):
        chunk = perm[start:start + block]
        preds.extend(reg.extend(chunk) if block > 1 else [reg.add(int(chunk[0]))])
    assert reg.size == n
    np.testing.assert_array_equal(reg.order, perm)
    for k, got in enumerate(preds):
        want = direct_predict(k_train, k_test, y_train, c, perm[:k + 1], 1e-4, 1e3)
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)
        assert err <= solve_tol(prob), (k, err)
    np.testing.assert_allclose(reg.predictions, preds[-1])


@pytest.mark.parametrize("kind,c", [("first_logit", 2), ("full", 3)])
def test_incremental_stays_exact_on_rank_deficient_reference_scaling(kind, c):
    """Rank 10 < n = 60 with the reference lam=1e-6 and divisor 1e4 (cond ~1e7): no drift."""
    k_train, k_test, y_train, y_test = raw_kernels(kind, 60, 20, c, d=10, seed=4)
    prob = RegressionProblem.from_kernels(k_train, k_test, y_train, y_test, n_classes=c)
    perm = np.random.default_rng(0).permutation(60)
    preds = IncrementalRegressor(prob).extend(perm)
    for k in (9, 10, 11, 30, 59):
        want = prob.predict(perm[:k + 1])
        assert np.abs(preds[k] - want).max() <= solve_tol(prob) * np.abs(want).max()


def test_incremental_rejects_repeated_point():
    prob = RegressionProblem.from_kernels(*raw_kernels("first_logit", 5, 3, 2), lam=1e-3, kernel_divisor=1e2)
    reg = IncrementalRegressor(prob)
    reg.add(2)
    with pytest.raises(ValueError, match="already added"):
        reg.add(2)
    with pytest.raises(ValueError, match="indices must be in"):
        reg.add(7)


def test_indefinite_kernel_raises_in_incremental():
    k = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 2.0], [0.0, 2.0, 1.0]])  # eigenvalue -1
    prob = RegressionProblem.from_kernels(k, np.ones((2, 3)), [0, 1, 0], [0, 1], lam=1e-6, kernel_divisor=1.0)
    reg = IncrementalRegressor(prob)
    reg.add(0)
    reg.add(2)
    with pytest.raises(KernelError, match=r"not positive semi-definite.*training point 1 \(position 2"):
        reg.add(1)
    assert reg.size == 2  # failed step left the state unchanged
    reg2 = IncrementalRegressor(prob)
    with pytest.raises(KernelError, match=r"training point 1 .*pivot -[23]"):
        reg2.extend(np.array([0, 2, 1]))
    with pytest.raises(KernelError, match="not positive semi-definite"):
        prob.predict()


def test_negative_diagonal_raises_in_incremental():
    k = np.array([[-1.0, 0.0], [0.0, 1.0]])
    prob = RegressionProblem.from_kernels(k, np.ones((1, 2)), [0, 1], [1], lam=1e-6, kernel_divisor=1.0)
    with pytest.raises(KernelError, match="training point 0"):
        IncrementalRegressor(prob).add(0)


# ---- metrics -------------------------------------------------------------------------------------


def test_accuracy_hand_checked():
    pred = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    y = np.array([0, 1, 1, 1])
    np.testing.assert_array_equal(accuracy_per_test(pred, y), [1.0, 1.0, 0.0, 0.0])  # tie -> class 0
    assert accuracy(pred, y) == 0.5
    batch = np.stack([pred, -pred])
    np.testing.assert_array_equal(accuracy_per_test(batch, y), [[1, 1, 0, 0], [0, 0, 1, 0]])


def test_neg_cross_entropy_hand_checked():
    pred = np.array([[0.0, math.log(3.0)], [2.0, 2.0], [1000.0, 0.0]])
    y = np.array([1, 0, 1])
    want = np.array([math.log(3 / 4), math.log(1 / 2), -1000.0])
    np.testing.assert_allclose(neg_cross_entropy_per_test(pred, y), want, rtol=1e-12)
    assert neg_cross_entropy(pred, y) == pytest.approx(want.mean(), rel=1e-12)


def test_neg_cross_entropy_matches_scipy_log_softmax():
    from scipy.special import log_softmax

    rng = np.random.default_rng(5)
    pred = rng.normal(scale=300.0, size=(3, 40, 4))
    y = rng.integers(0, 4, size=40)
    want = np.take_along_axis(log_softmax(pred, axis=-1), np.broadcast_to(y[:, None], (3, 40, 1)), -1)[..., 0]
    np.testing.assert_allclose(neg_cross_entropy_per_test(pred, y), want, rtol=1e-12, atol=1e-12)


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError):
        accuracy(np.zeros((3, 2)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError):
        neg_cross_entropy(np.zeros((3, 2)), np.array([0, 1, 2]))


@pytest.mark.parametrize("c", [2, 3, 5])
def test_empty_set_values(c):
    y = np.array([0, 0, 1, 0])
    acc, ce = UTILITIES["accuracy"], UTILITIES["neg_ce"]
    assert acc.empty_value(y, c) == 1.0 / c
    np.testing.assert_array_equal(acc.empty_per_test(y, c), np.full(4, 1.0 / c))
    assert ce.empty_value(y, c) == pytest.approx(-math.log(c), rel=1e-15)
    np.testing.assert_allclose(ce.empty_per_test(y, c), np.full(4, -math.log(c)))
    # neg_ce's empty value is the softmax of zero logits
    assert ce(np.zeros((4, c)), y) == pytest.approx(-math.log(c), rel=1e-15)


def test_utility_batch_matches_single():
    rng = np.random.default_rng(3)
    preds, y = rng.normal(size=(4, 6, 3)), rng.integers(0, 3, size=6)
    for name in ("accuracy", "neg_ce"):
        u = UTILITIES[name]
        np.testing.assert_allclose(u.batch(preds, y), [u(p, y) for p in preds])
        np.testing.assert_allclose(u.batch(preds, y, per_test=True), [u.per_test(p, y) for p in preds])


def test_resolve_utility_callables():
    pred, y = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), np.array([0, 1, 1])
    assert resolve_utility("accuracy") is UTILITIES["accuracy"]
    with pytest.raises(ValueError, match="unknown name"):
        resolve_utility("f1")
    scalar = resolve_utility(lambda p, t: float(np.mean(p[np.arange(len(t)), t])))
    assert scalar(pred, y) == pytest.approx(2 / 3)
    assert scalar.empty_value(y, 2) == 0.0
    with pytest.raises(ValueError, match="per-test"):
        scalar.per_test(pred, y)
    vector = resolve_utility(lambda p, t: p[np.arange(len(t)), t] * 3.0)
    np.testing.assert_array_equal(vector.per_test(pred, y), [3.0, 3.0, 0.0])
    assert vector(pred, y) == pytest.approx(2.0)
    bad = resolve_utility(lambda p, t: np.zeros(7))
    with pytest.raises(ValueError, match="shape"):
        bad(pred, y)


# ---- validation ----------------------------------------------------------------------------------


def test_n_classes_inferred_and_checked():
    k_train, k_test, _, _ = raw_kernels("first_logit", 4, 2, 2)
    prob = RegressionProblem.from_kernels(k_train, k_test, [0, 0, 0, 0], [0, 0])
    assert prob.n_classes == 2 and prob.T.shape == (4, 2)
    prob = RegressionProblem.from_kernels(k_train, k_test, [0, 1, 0, 0], [4, 0])
    assert prob.n_classes == 5
    with pytest.raises(KernelError, match="y_test: 1 labels outside"):
        RegressionProblem.from_kernels(k_train, k_test, [0, 1, 0, 0], [2, 0], n_classes=2)
    with pytest.raises(KernelError, match="y_train"):
        RegressionProblem.from_kernels(k_train, k_test, [0, -1, 0, 0], [1, 0])
    with pytest.raises(KernelError, match="y_train: expected shape"):
        RegressionProblem.from_kernels(k_train, k_test, [0, 1, 0], [1, 0])
    kf_train, kf_test, y_train, y_test = raw_kernels("full", 4, 2, 3)
    with pytest.raises(KernelError, match="n_classes"):
        RegressionProblem.from_kernels(kf_train, kf_test, y_train, y_test, n_classes=2)


def test_kernel_wrong_shapes():
    k_train, k_test, y_train, y_test = raw_kernels("first_logit", 4, 2, 2)
    with pytest.raises(KernelError, match=r"k_train: .*got shape \(4, 3\)"):
        RegressionProblem.from_kernels(k_train[:, :3], k_test, y_train, y_test)
    with pytest.raises(KernelError, match=r"k_test_train: expected shape \(m, 4\).*got \(2, 3\)"):
        RegressionProblem.from_kernels(k_train, k_test[:, :3], y_train, y_test)
    with pytest.raises(KernelError, match="k_train: expected 2 dims"):
        RegressionProblem.from_kernels(k_train[None], k_test, y_train, y_test)
    kf_train, kf_test, y_train, y_test = raw_kernels("full", 4, 2, 3)
    with pytest.raises(KernelError, match=r"k_test_train: expected shape \(m, 4, 3, 3\)"):
        RegressionProblem.from_kernels(kf_train, kf_test[:, :, :2, :2], y_train, y_test)
    with pytest.raises(KernelError, match="k_test_train"):
        RegressionProblem.from_kernels(kf_train, k_test, y_train, y_test)


def test_kernel_non_finite():
    k_train, k_test, y_train, y_test = raw_kernels("first_logit", 4, 2, 2)
    bad = k_train.copy()
    bad[1, 2] = bad[2, 1] = np.nan
    with pytest.raises(KernelError, match="k_train: 2 non-finite"):
        RegressionProblem.from_kernels(bad, k_test, y_train, y_test)
    bad_t = k_test.copy()
    bad_t[0, 0] = np.inf
    with pytest.raises(KernelError, match="k_test_train: 1 non-finite"):
        RegressionProblem.from_kernels(k_train, bad_t, y_train, y_test)


def test_kernel_not_symmetric():
    k_train, k_test, y_train, y_test = raw_kernels("first_logit", 4, 2, 2)
    bad = k_train.copy()
    bad[0, 3] += 1e-3 * np.abs(k_train).max()
    with pytest.raises(KernelError, match="k_train: not symmetric"):
        RegressionProblem.from_kernels(bad, k_test, y_train, y_test)
    tiny = k_train.copy()
    tiny[0, 3] += 1e-9 * np.abs(k_train).max()  # within tolerance: accepted and symmetrised
    prob = RegressionProblem.from_kernels(tiny, k_test, y_train, y_test)
    np.testing.assert_array_equal(prob.K, prob.K.T)
    kf_train, kf_test, y_train, y_test = raw_kernels("full", 4, 2, 2)
    badf = kf_train.copy()
    badf[0, 1, 0, 1] += 1.0 + 1e-3 * np.abs(kf_train).max()  # k[i,j,c,d] must equal k[j,i,d,c]
    with pytest.raises(KernelError, match="not symmetric"):
        RegressionProblem.from_kernels(badf, kf_test, y_train, y_test)


def test_full_flattening_layout():
    kf_train, kf_test, y_train, y_test = raw_kernels("full", 3, 2, 2)
    prob = RegressionProblem.from_kernels(kf_train, kf_test, y_train, y_test, lam=1e-3, kernel_divisor=10.0)
    assert prob.K.shape == (6, 6) and prob.KT.shape == (4, 6) and prob.T.shape == (6, 1)
    assert prob.K[1 * 2 + 0, 2 * 2 + 1] == pytest.approx(kf_train[1, 2, 0, 1] / 10.0)
    assert prob.KT[1 * 2 + 1, 0 * 2 + 0] == pytest.approx(kf_test[1, 0, 1, 0] / 10.0)
    np.testing.assert_array_equal(prob.T[:, 0].reshape(3, 2), np.eye(2)[y_train])


def test_bad_parameters():
    k_train, k_test, y_train, y_test = raw_kernels("first_logit", 4, 2, 2)
    with pytest.raises(ValueError, match="lam"):
        RegressionProblem.from_kernels(k_train, k_test, y_train, y_test, lam=0.0)
    with pytest.raises(ValueError, match="kernel_divisor"):
        RegressionProblem.from_kernels(k_train, k_test, y_train, y_test, kernel_divisor=-1.0)

"""Cleaning math against brute force: exact LOO, influence (finite differences), TracIn, curves, ranking."""

from __future__ import annotations

import numpy as np
import pytest

from freeshap_ray.apps.kernel_baselines import KernelSurrogate, baseline_scores, tracin_values
from freeshap_ray.apps.curves import (
    curve_sizes,
    detection_curve,
    normalise_per_class,
    prefix_utilities,
    random_curves,
    rank_order,
    removal_curves,
)
from freeshap_ray.utility import RegressionProblem
from freeshap_ray.utility.metrics import accuracy, neg_cross_entropy

from .helpers import solve_tol, utility_tol

DIV = 1e4


def _kernels(kind: str, n: int, m: int, c: int = 3, d: int = 6, seed: int = 0):
    """Random low-rank PSD kernels (times DIV, as the pipeline stores them) and labels."""
    rng = np.random.default_rng(seed)
    if kind == "first_logit":
        X, Z = rng.normal(size=(n, d)), rng.normal(size=(m, d))
        k_tr, k_te = X @ X.T * DIV, Z @ X.T * DIV
    else:
        X, Z = rng.normal(size=(n, c, d)), rng.normal(size=(m, c, d))
        k_tr = np.einsum("icp,jep->ijce", X, X) * DIV
        k_te = np.einsum("icp,jep->ijce", Z, X) * DIV
    return k_tr, k_te, rng.integers(0, c, n), rng.integers(0, c, m)


def _problem(kind, n=12, m=7, lam=1e-3, seed=0):
    k_tr, k_te, y, yt = _kernels(kind, n, m, seed=seed)
    return RegressionProblem.from_kernels(k_tr, k_te, y, yt, n_classes=3, lam=lam, kernel_divisor=DIV), (k_tr, k_te, y, yt)


def _without(n, i):
    return np.array([j for j in range(n) if j != i])


@pytest.mark.parametrize("kind", ["first_logit", "full"])
@pytest.mark.parametrize("lam", [1e-6, 1e-2])
def test_loo_predictions_equal_brute_force_resolves(kind, lam):
    prob, (k_tr, _k_te, y, _yt) = _problem(kind, lam=lam)
    sur = KernelSurrogate.fit(prob)
    loo_train = sur.loo_train_predictions()
    loo_test = sur.loo_test_predictions(np.arange(prob.n))
    tol = solve_tol(prob)  # the LOO identities and the re-solves are backward-stable solves of K + λI
    for i in range(prob.n):
        rest = _without(prob.n, i)
        # the held-out point as the only "test" point of a problem fitted on the others
        sub = RegressionProblem.from_kernels(k_tr[np.ix_(rest, rest)], k_tr[np.ix_([i], rest)], y[rest], y[[i]],
                                             n_classes=3, lam=lam, kernel_divisor=DIV)
        ref_train = sub.predict()[0]
        ref_test = prob.predict(rest)
        scale = max(1.0, np.abs(ref_train).max())
        assert np.abs(loo_train[i] - ref_train).max() <= tol * scale, i
        assert np.abs(loo_test[i] - ref_test).max() <= tol * max(1.0, np.abs(ref_test).max()), i


@pytest.mark.parametrize("kind", ["first_logit", "full"])
def test_loo_values_and_margin_equal_brute_force(kind):
    prob, _ = _problem(kind, lam=1e-2)
    scores = baseline_scores(prob, ["loo", "loo_margin"], utility="neg_ce")
    full = neg_cross_entropy(prob.predict(), prob.y_test)
    ref = np.array([full - neg_cross_entropy(prob.predict(_without(prob.n, i)), prob.y_test) for i in range(prob.n)])
    assert np.allclose(scores["loo"], ref, rtol=0, atol=utility_tol(prob, np.abs(prob.predict()).max()))
    acc = baseline_scores(prob, ["loo"], utility="accuracy")["loo"]
    full_acc = accuracy(prob.predict(), prob.y_test)
    ref_acc = np.array([full_acc - accuracy(prob.predict(_without(prob.n, i)), prob.y_test) for i in range(prob.n)])
    assert np.array_equal(acc, ref_acc)
    pred = KernelSurrogate.fit(prob).loo_train_predictions()
    for i in range(prob.n):
        others = np.delete(pred[i], prob.y_train[i])
        assert scores["loo_margin"][i] == pytest.approx(pred[i, prob.y_train[i]] - others.max())


@pytest.mark.parametrize("kind", ["first_logit", "full"])
def test_influence_is_the_derivative_of_the_weighted_ridge_test_loss(kind):
    """d/dε of the test squared loss when point i's loss is weighted (1 + ε) equals -influence_i."""
    prob, _ = _problem(kind, lam=0.3)
    infl = KernelSurrogate.fit(prob).influence_values()
    g = prob.group
    Y = np.zeros((prob.m, prob.n_classes))
    Y[np.arange(prob.m), prob.y_test] = 1.0
    Y = Y.reshape(prob.m * g, -1)

    def loss(i, eps):
        w = np.ones(prob.n * g)
        w[i * g:(i + 1) * g] += eps
        F = prob.KT @ np.linalg.solve(prob.K + prob.lam * np.diag(1.0 / w), prob.T)
        return 0.5 * np.sum((F - Y) ** 2)

    h = 1e-5
    fd = np.array([(loss(i, h) - loss(i, -h)) / (2 * h) for i in range(prob.n)])
    assert np.allclose(-fd, infl, rtol=1e-5, atol=1e-8 * np.abs(infl).max())
    assert np.abs(infl).max() > 0


@pytest.mark.parametrize("kind", ["first_logit", "full"])
def test_tracin_matches_explicit_gradient_products(kind):
    prob, (k_tr, k_te, y, yt) = _problem(kind)
    got = tracin_values(prob)
    c = 3
    ref = np.zeros(prob.n)
    for i in range(prob.n):
        gi = np.full(c, 1 / c)
        gi[y[i]] -= 1
        for t in range(prob.m):
            gt = np.full(c, 1 / c)
            gt[yt[t]] -= 1
            k = k_te[t, i] * np.eye(c) if kind == "first_logit" else k_te[t, i]
            ref[i] += gt @ k @ gi / DIV
    assert np.allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_random_baseline_is_seeded():
    prob, _ = _problem("first_logit")
    a = baseline_scores(prob, ["random"], seed=3)["random"]
    assert np.array_equal(a, baseline_scores(prob, ["random"], seed=3)["random"])
    assert not np.array_equal(a, baseline_scores(prob, ["random"], seed=4)["random"])
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_scores(prob, ["shapley"])


def test_rank_order_and_per_class_normalisation():
    scores = np.array([0.5, -1.0, 0.2, -1.0, 3.0, 10.0])
    assert rank_order(scores).tolist() == [1, 3, 2, 0, 4, 5]  # ties by index
    labels = np.array([0, 0, 0, 1, 1, 1])
    z = normalise_per_class(scores, labels)
    for c in (0, 1):
        assert z[labels == c].mean() == pytest.approx(0) and z[labels == c].std() == pytest.approx(1)
    order = rank_order(scores, labels, per_class_normalise=True)
    assert order[0] == 1 and set(order.tolist()) == set(range(6))
    with pytest.raises(ValueError, match="NaN"):
        rank_order(np.array([0.0, np.nan]))


def test_detection_curve_auc_and_recall():
    flipped = np.array([1, 0, 0, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    perfect = detection_curve(np.array([0, 3, 1, 2, 4, 5, 6, 7, 8, 9]), flipped)
    assert perfect.recall_at(0.2) == 1.0 and perfect.recall_at(0.1) == 0.5
    assert perfect.auc == pytest.approx(1 - 0.2 / 2)
    worst = detection_curve(np.array([1, 2, 4, 5, 6, 7, 8, 9, 0, 3]), flipped)
    assert worst.recall_at(0.8) == 0.0 and worst.auc == pytest.approx(0.2 / 2)
    rng = np.random.default_rng(0)
    big = rng.random(20000) < 0.1
    aucs = [detection_curve(rng.permutation(20000), big).auc for _ in range(5)]
    assert abs(np.mean(aucs) - 0.5) < 0.02
    x, y = detection_curve(rng.permutation(20000), big).downsample(101)
    assert x.size == 101 and x[0] == 0 and x[-1] == 1 and y[-1] == 1


@pytest.mark.parametrize("kind", ["first_logit", "full"])
def test_prefix_and_removal_curves_equal_direct_solves(kind):
    prob, _ = _problem(kind, n=30, m=9, lam=1e-3, seed=1)
    rng = np.random.default_rng(0)
    order = rng.permutation(prob.n)
    sizes = [0, 1, 5, 17, 30]
    got = prefix_utilities(prob, order, sizes)
    for k in sizes[1:]:
        pred = prob.predict(order[:k])
        assert got[k][0] == pytest.approx(accuracy(pred, prob.y_test))
        assert got[k][1] == pytest.approx(neg_cross_entropy(pred, prob.y_test), rel=1e-8)
    assert got[0] == (pytest.approx(1 / 3), pytest.approx(-np.log(3)))

    scores = rng.normal(size=prob.n)
    rows = removal_curves(prob, scores, steps=5, method="x")
    fractions, counts = curve_sizes(prob.n, 5)
    desc = np.argsort(-scores, kind="stable")
    for r in rows:
        if r["curve"] == "remove_high":
            kept = np.sort(desc[int(round(r["fraction"] * prob.n)):])
        elif r["curve"] == "remove_low":
            kept = desc[: prob.n - int(round(r["fraction"] * prob.n))]
        else:
            kept = desc[: int(round(r["fraction"] * prob.n))]
        assert r["n_train"] == kept.size
        if kept.size:
            assert r["accuracy"] == pytest.approx(accuracy(prob.predict(kept), prob.y_test))
    assert len(rows) == 3 * len(fractions)
    rnd = random_curves(prob, steps=5, repeats=3, seed=0)
    assert {r["method"] for r in rnd} == {"random"} and all(r["accuracy_std"] >= 0 for r in rnd)

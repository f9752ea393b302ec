"""Feature-space (primal) regression: FeatureProblem, PrimalRegressor, solver choice, feature baselines.

Tolerances are error bounds. Both the dual (Cholesky of ``K_SS + λI``) and the primal (orthogonal QR
updates of ``[√λI; Φ̃_S]``, normal matrix ``A_S = Φ̃_SᵀΦ̃_S + λI``) are backward stable, so each is within
``safety · rows · cond · eps`` of the exact predictions (relative to their magnitude), and their
difference within the sum. For the primal, ``rows = N + D`` (the stacked least-squares matrix) and, for
every prefix, ``cond(A_S) <= (λ_max(Φ̃ᵀΦ̃) + λ) / λ`` (``A_S <= A_N`` in the Loewner order and ``λ_min(A_S)
>= λ``); for the dual :func:`~tests.helpers.solve_tol`.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from freeshap_ray.apps import FeatureSurrogate, KernelSurrogate, baseline_scores, prefix_utilities, removal_curves
from freeshap_ray.errors import KernelError
from freeshap_ray.utility import (
    UTILITIES,
    FeatureProblem,
    IncrementalRegressor,
    PrimalRegressor,
    RegressionProblem,
    choose_solver,
    make_regressor,
    solver_costs,
)
from freeshap_ray.valuation import full_utility, permutation_for, run_permutation

from .helpers import EPS, primal_tol, solve_tol


def make_features(kind: str, n: int, m: int, c: int, D: int, *, scale: float = 30.0, rank: int | None = None,
                  seed: int = 0):
    """Raw features ``(n, D)`` / ``(n, c, D)`` (rank ``rank`` if given), test features and labels."""
    rng = np.random.default_rng(seed)
    shape = (n + m, D) if kind == "first_logit" else (n + m, c, D)
    if rank is None:
        phi = rng.normal(size=shape)
    else:
        phi = rng.normal(size=shape[:-1] + (rank,)) @ rng.normal(size=(rank, D)) / np.sqrt(rank)
    y = rng.integers(0, c, size=n + m)
    return phi[:n] * scale, phi[n:] * scale, y[:n], y[n:]


def pair_tol(fp: FeatureProblem, dp: RegressionProblem) -> float:
    """Bound on the relative difference of primal and dual predictions of any subset."""
    return primal_tol(fp) + solve_tol(dp)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def walk(reg, perm: np.ndarray, blocks: list[int]) -> np.ndarray:
    """Predictions of every prefix of ``perm`` added in blocks of the given sizes (cycled)."""
    out, start, j = [], 0, 0
    while start < perm.size:
        chunk = perm[start:start + blocks[j % len(blocks)]]
        out.append(reg.extend(chunk) if chunk.size > 1 else reg.add(int(chunk[0]))[None])
        start += chunk.size
        j += 1
    return np.concatenate(out)


# ---- primal == dual on every prefix ------------------------------------------------------------------------

SHAPES = [(40, 12), (12, 50)]  # n > D and n < D
KINDS = [("first_logit", 2), ("full", 3)]


@pytest.mark.parametrize("kind,c", KINDS)
@pytest.mark.parametrize("n,D", SHAPES)
@pytest.mark.parametrize("blocks", [[1], [5, 3, 17, 1]])
def test_primal_equals_dual_on_every_prefix(kind, c, n, D, blocks):
    """Issue goal ≤ 1e-8 relative: with λ = 1 on features of scale 3 (after /√div) cond ≤ ~4e3, so the
    derived bound is below 1e-8 (asserted) and the test checks the derived bound."""
    ptr, pte, ytr, yte = make_features(kind, n, 9, c, D, seed=n + c)
    fp = FeatureProblem.from_features(ptr, pte, ytr, yte, n_classes=c, lam=1.0, kernel_divisor=1e2)
    dp = fp.to_dual()
    tol = pair_tol(fp, dp)
    assert tol <= 1e-8
    perm = np.random.default_rng(len(blocks)).permutation(n)
    reg = PrimalRegressor(fp)
    got = walk(reg, perm, blocks)
    want = IncrementalRegressor(dp).extend(perm)
    assert got.shape == want.shape == (n, 9, c)
    for k in range(n):
        assert rel(got[k], want[k]) <= tol, k
    assert reg.size == n and np.array_equal(reg.order, perm)
    np.testing.assert_array_equal(reg.predictions, got[-1])
    assert rel(fp.predict(perm[: n // 2]), dp.predict(perm[: n // 2])) <= tol  # direct solve, smaller space
    assert rel(fp.predict(), dp.predict()) <= tol


@pytest.mark.parametrize("kind,c", KINDS)
@pytest.mark.parametrize("n,D,rank", [(200, 10, None), (15, 200, None), (60, 30, 5)])
def test_primal_on_rank_deficient_reference_scaling(kind, c, n, D, rank):
    """λ = 1e-6, divisor 1e4 (cond(A) ~ 1e7-1e8): n ≫ D (K rank-deficient), n ≪ D (A has D - n·g
    eigenvalues λ) and rank-5 features (both sides deficient). Error within the derived bound."""
    ptr, pte, ytr, yte = make_features(kind, n, 11, c, D, rank=rank, seed=7)
    fp = FeatureProblem.from_features(ptr, pte, ytr, yte, n_classes=c)
    dp = fp.to_dual()
    tol = pair_tol(fp, dp)
    assert 1e-9 < tol < 1e-2  # ill-conditioned, yet the bound is meaningful
    perm = np.random.default_rng(1).permutation(n)
    got = walk(PrimalRegressor(fp), perm, [16])
    want = IncrementalRegressor(dp).extend(perm)
    errs = [rel(got[k], want[k]) for k in range(n)]
    assert max(errs) <= tol, (int(np.argmax(errs)), max(errs), tol)


def test_float32_storage_is_kept_and_exact():
    ptr, pte, ytr, yte = make_features("first_logit", 30, 5, 2, 8)
    p32 = FeatureProblem.from_features(ptr.astype(np.float32), pte.astype(np.float32), ytr, yte)
    p64 = FeatureProblem.from_features(ptr.astype(np.float32).astype(np.float64),
                                       pte.astype(np.float32).astype(np.float64), ytr, yte)
    assert p32.phi_train.dtype == np.float32 and not p32.phi_train.flags.writeable
    src = np.ascontiguousarray(ptr, dtype=np.float32)
    assert np.shares_memory(FeatureProblem.from_features(src, pte, ytr, yte).phi_train, src)  # no copy
    assert src.flags.writeable  # the caller's array is untouched
    perm = np.arange(30)
    # float32 -> float64 is exact, so every computation is the same float64 arithmetic
    np.testing.assert_array_equal(PrimalRegressor(p32).extend(perm), PrimalRegressor(p64).extend(perm))
    np.testing.assert_array_equal(p32.predict(), p64.predict())
    assert p32.digest() != p64.digest() and p32.digest() == FeatureProblem.from_features(
        ptr.astype(np.float32), pte.astype(np.float32), ytr, yte).digest()


def test_full_features_flatten_like_full_kernels():
    c, div = 3, 1e2
    ptr, pte, ytr, yte = make_features("full", 6, 4, c, 5)
    fp = FeatureProblem.from_features(ptr, pte, ytr, yte, lam=1e-3, kernel_divisor=div)
    assert (fp.kind, fp.group, fp.n_classes, fp.n, fp.m, fp.dim) == ("full", 3, 3, 6, 4, 5)
    kp = RegressionProblem.from_kernels(np.einsum("icx,jdx->ijcd", ptr, ptr), np.einsum("icx,jdx->ijcd", pte, ptr),
                                        ytr, yte, lam=1e-3, kernel_divisor=div)
    dp = fp.to_dual()
    # same entries up to the rounding of two differently scaled length-D dot products (γ_{D+2} Σ|terms|)
    bound = (fp.dim + 2) * EPS * (np.abs(ptr.reshape(18, 5)) @ np.abs(ptr.reshape(18, 5)).T) / div
    assert np.all(np.abs(dp.K - kp.K) <= 2 * bound)
    np.testing.assert_array_equal(dp.T, kp.T)
    flat = FeatureProblem.from_features(ptr.reshape(18, 5), pte.reshape(12, 5), ytr, yte, n_classes=3,
                                        kind="full", lam=1e-3, kernel_divisor=div)
    np.testing.assert_array_equal(flat.to_dual().K, dp.K)


# ---- TMC, curves -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,c", KINDS)
def test_tmc_marginals_equal_on_features_and_kernel(kind, c):
    ptr, pte, ytr, yte = make_features(kind, 30, 12, c, 10, seed=3)
    fp = FeatureProblem.from_features(ptr, pte, ytr, yte, n_classes=c, lam=1e-2, kernel_divisor=1e2)
    dp = fp.to_dual()
    tol = pair_tol(fp, dp)
    perm = permutation_for(30, seed=0, perm_id=2)
    pred_scale = max(np.abs(dp.predict(perm[:k])).max() for k in range(1, 31))
    # neg. cross-entropy is 2-Lipschitz (max norm) in the logits; a marginal is a difference of two
    u_tol = 4 * tol * max(1.0, pred_scale)
    a = run_permutation(fp, perm, "neg_ce", truncation_tol=0, block_size=7)
    b = run_permutation(dp, perm, "neg_ce", truncation_tol=0, block_size=7)
    np.testing.assert_allclose(a.marginals, b.marginals, rtol=0, atol=u_tol)
    assert abs(a.v_full - b.v_full) <= u_tol and a.v_empty == b.v_empty
    # accuracy is exact where no prediction is within the bound of a tie (checked, not assumed)
    preds = IncrementalRegressor(dp).extend(perm)
    top2 = np.sort(preds, axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 2 * tol * pred_scale
    a = run_permutation(fp, perm, "accuracy", truncation_tol=0.05)
    b = run_permutation(dp, perm, "accuracy", truncation_tol=0.05)
    assert a.truncated_at == b.truncated_at
    np.testing.assert_array_equal(a.marginals, b.marginals)


def test_make_regressor_picks_by_problem_type():
    ptr, pte, ytr, yte = make_features("first_logit", 5, 2, 2, 3)
    fp = FeatureProblem.from_features(ptr, pte, ytr, yte)
    assert isinstance(make_regressor(fp), PrimalRegressor)
    assert isinstance(make_regressor(fp.to_dual()), IncrementalRegressor)
    with pytest.raises(TypeError, match="problem"):
        make_regressor(object())


def test_prefix_curves_equal_on_features_and_kernel():
    ptr, pte, ytr, yte = make_features("full", 25, 10, 3, 8, seed=5)
    fp = FeatureProblem.from_features(ptr, pte, ytr, yte, lam=1e-2, kernel_divisor=1e2)
    dp = fp.to_dual()
    tol = pair_tol(fp, dp)
    order = np.random.default_rng(0).permutation(25)
    sizes = [0, 1, 7, 19, 25]
    a, b = prefix_utilities(fp, order, sizes), prefix_utilities(dp, order, sizes)
    scale = max(np.abs(dp.predict(order[:k])).max() for k in sizes[1:])
    for k in sizes:
        assert a[k][0] == b[k][0]
        assert abs(a[k][1] - b[k][1]) <= 2 * tol * max(1.0, scale)


# ---- feature-space baselines -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,c", KINDS)
@pytest.mark.parametrize("n,D,lam,div", [(30, 8, 1e-2, 1e2), (12, 40, 1e-2, 1e2), (30, 8, 1e-6, 1e4)])
def test_feature_surrogate_equals_kernel_surrogate(kind, c, n, D, lam, div):
    """LOO (train and test predictions, values, margin), influence and TracIn from features equal the
    dual's. ``w_i = (I - H_II)⁻¹ e_I`` amplifies the solve error by ``κ = max_i ‖(I - H_II)⁻¹‖``."""
    ptr, pte, ytr, yte = make_features(kind, n, 9, c, D, seed=11)
    fp = FeatureProblem.from_features(ptr, pte, ytr, yte, n_classes=c, lam=lam, kernel_divisor=div)
    dp = fp.to_dual()
    fs, ks = FeatureSurrogate.fit(fp), KernelSurrogate.fit(dp)
    tol = pair_tol(fp, dp)
    g = fp.group
    kappa = max(np.linalg.norm(np.linalg.inv(lam * ks.B_blocks[i]), 2) for i in range(n))  # (λ B_II)⁻¹
    w = np.abs(ks._w).max()
    loo_tol = kappa * tol * (1.0 + w)
    assert loo_tol < 1e-3
    np.testing.assert_allclose(fs.loo_train_predictions(), ks.loo_train_predictions(), rtol=0, atol=loo_tol)
    p_scale = max(1.0, np.abs(ks.P).max() * g)
    np.testing.assert_allclose(fs.loo_test_predictions(np.arange(n)), ks.loo_test_predictions(np.arange(n)),
                               rtol=0, atol=loo_tol * p_scale + tol * np.abs(ks.F).max())
    np.testing.assert_allclose(fs.loo_margin(), ks.loo_margin(), rtol=0, atol=2 * loo_tol)
    np.testing.assert_allclose(fs.test_predictions(), ks.test_predictions(), rtol=0, atol=tol * np.abs(ks.F).max())
    # influence: Σ_b (PᵀR)_b (F_train - T)_b, each factor within tol of its magnitude (residual: of |T| ≤ 1)
    Q = np.abs(ks.P.T @ (ks.F - ks._test_targets()))
    e = np.abs(dp.lam * ks.alpha)
    infl_tol = 2 * tol * ((Q * (1.0 + e)).reshape(n, -1).sum(axis=1)).max()
    np.testing.assert_allclose(fs.influence_values(), ks.influence_values(), rtol=0, atol=infl_tol)
    # TracIn: no solve, only length-(D) and length-(M) dot products: γ_{D+M} times the sum of |terms|
    gt = np.full((fp.m, c), 1 / c)
    gt[np.arange(fp.m), yte] -= 1
    gi = np.full((n, c), 1 / c)
    gi[np.arange(n), ytr] -= 1
    terms = (np.abs(dp.KT).T @ np.abs(gt.reshape(fp.m * g, -1))) * np.abs(gi.reshape(n * g, -1))
    tr_tol = 2 * (fp.dim + fp.m * g) * EPS * terms.reshape(n, -1).sum(axis=1).max()
    np.testing.assert_allclose(fs.tracin_values(), ks.tracin_values(), rtol=0, atol=tr_tol)
    # baseline_scores dispatches on the problem type; LOO accuracy values are exact away from ties
    a = baseline_scores(fp, ["loo", "loo_margin", "influence", "tracin"], utility="neg_ce")
    b = baseline_scores(dp, ["loo", "loo_margin", "influence", "tracin"], utility="neg_ce")
    loo_pred_scale = max(1.0, np.abs(ks.loo_test_predictions(np.arange(n))).max())
    np.testing.assert_allclose(a["loo"], b["loo"], rtol=0,
                               atol=4 * (loo_tol * p_scale + tol * np.abs(ks.F).max()) * loo_pred_scale)


# ---- memory: nothing n×n -----------------------------------------------------------------------------------


def test_primal_pipeline_never_allocates_n_by_n():
    """n = 30,000, D = 64: TMC (full walk), direct predict, baselines and removal curves under a
    tracemalloc peak of n²·8/50 = 144 MB; one n×n float64 is 7.2 GB, even an n×n bool 0.9 GB."""
    n, m, D = 30_000, 40, 64
    ptr, pte, ytr, yte = make_features("first_logit", n, m, 2, D, scale=1.0, seed=2)
    ptr, pte = ptr.astype(np.float32), pte.astype(np.float32)
    fp = FeatureProblem.from_features(ptr, pte, ytr, yte, lam=1e-2, kernel_divisor=1.0)
    bound = n * n * 8 // 50
    with threadpool_limits(1):  # many small BLAS calls: extra threads only contend on a busy machine
        tracemalloc.start()
        try:
            res = run_permutation(fp, permutation_for(n, seed=0, perm_id=0), "neg_ce", truncation_tol=0,
                                  block_size=256)
            scores = baseline_scores(fp, ["loo", "loo_margin", "influence", "tracin"], utility="accuracy")
            rows = removal_curves(fp, scores["loo_margin"], steps=2, method="loo_margin")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < bound, f"peak {peak / 2**20:.0f} MiB"
    assert res.truncated_at == n and np.isfinite(res.marginals).all()
    assert abs(res.marginals.sum() - (res.v_full - res.v_empty)) < 1e-6
    assert len(rows) == 9 and all(np.isfinite(s).all() for s in scores.values())


# ---- solver choice -----------------------------------------------------------------------------------------


def test_choose_solver_clear_cases():
    assert choose_solver(100_000, 500, 2048) == "primal"  # n³ ≫ n·D²
    assert choose_solver(2_000, 500, 8192) == "dual"  # small n, huge D
    assert choose_solver(100_000, 500, 0) == "dual"  # no features
    assert choose_solver(100_000, 500, 8192, expected_prefix_len=300) == "dual"  # early truncation
    # ... unless the n×n kernel does not fit: 2·(1e5)²·8 B = 160 GB
    assert choose_solver(100_000, 500, 8192, expected_prefix_len=300, memory_bytes=64e9) == "primal"
    assert choose_solver(20_000, 300, 4096, g=10) == "primal"  # full kernel: 2e5 rows
    c = solver_costs(5000, 500, 2048, expected_prefix_len=5000)
    assert c["dual"]["flops"] == pytest.approx(5000**3 / 3 + 500 * 5000**2)
    assert c["primal"]["bytes"] == 8 * (2048**2 + 2048 * 500)
    with pytest.raises(ValueError, match="^n:"):
        solver_costs(0, 5, 5)
    with pytest.raises(ValueError, match="^D:"):
        choose_solver(10, 5, -1)


# ---- validation and errors ---------------------------------------------------------------------------------


def test_from_features_validation_names_the_argument():
    ptr, pte, ytr, yte = make_features("first_logit", 6, 3, 2, 4)
    with pytest.raises(KernelError, match="^phi_test: feature dimension 5"):
        FeatureProblem.from_features(ptr, np.zeros((3, 5)), ytr, yte)
    with pytest.raises(KernelError, match="^phi_train: expected a non-empty"):
        FeatureProblem.from_features(ptr[:, :0], pte, ytr, yte)
    with pytest.raises(KernelError, match="^y_train: expected shape \\(6,\\)"):
        FeatureProblem.from_features(ptr, pte, ytr[:5], yte)
    bad = pte.copy()
    bad[1, 2] = np.nan
    with pytest.raises(KernelError, match="^phi_test: 1 non-finite"):
        FeatureProblem.from_features(ptr, bad, ytr, yte)
    with pytest.raises(KernelError, match="^phi_train: expected a real float"):
        FeatureProblem.from_features(ptr.astype(complex), pte, ytr, yte)
    with pytest.raises(KernelError, match="^y_test: 1 labels outside"):
        FeatureProblem.from_features(ptr, pte, ytr, np.array([0, 1, 2]), n_classes=2)
    with pytest.raises(ValueError, match="^lam:"):
        FeatureProblem.from_features(ptr, pte, ytr, yte, lam=0.0)
    with pytest.raises(ValueError, match="^kind:"):
        FeatureProblem.from_features(ptr, pte, ytr, yte, kind="diag")
    fptr, fpte, fy, fyt = make_features("full", 6, 3, 3, 4)
    with pytest.raises(KernelError, match="^n_classes: 2 given but phi_train has 3"):
        FeatureProblem.from_features(fptr, fpte, fy, fyt, n_classes=2)
    with pytest.raises(KernelError, match="^n_classes: a full problem needs"):
        FeatureProblem.from_features(fptr.reshape(18, 4), fpte.reshape(9, 4), fy, fyt, kind="full")
    with pytest.raises(KernelError, match="^phi_test: expected \\(n, 3, D\\) or \\(n\\*3, D\\)"):
        FeatureProblem.from_features(fptr, fpte.reshape(9, 4)[:8], fy, fyt)
    with pytest.raises(KernelError, match="^phi_train: expected a non-empty \\(n, D\\)"):
        FeatureProblem.from_features(fptr, fpte, fy, fyt, kind="first_logit")
    ok = FeatureProblem.from_features(ptr.astype(int), pte, ytr, yte)  # integers are read as float64
    assert ok.phi_train.dtype == np.float64


def test_primal_regressor_rejects_bad_points_and_overflow():
    ptr, pte, ytr, yte = make_features("first_logit", 6, 3, 2, 4)
    reg = PrimalRegressor(FeatureProblem.from_features(ptr, pte, ytr, yte))
    reg.add(2)
    with pytest.raises(ValueError, match="already added"):
        reg.add(2)
    with pytest.raises(ValueError, match="indices must be in"):
        reg.add(7)
    assert reg.size == 1 and reg.extend(np.array([], dtype=np.int64)).shape == (0, 3, 2)
    # column norms of 1e308-sized features overflow float64: a clear KernelError, and the regressor stays dead
    huge = FeatureProblem.from_features(np.full((10, 4), 1e308), np.ones((2, 4)), np.zeros(10, int), [0, 1],
                                        kernel_divisor=1.0)
    dead = PrimalRegressor(huge)
    with pytest.raises(KernelError, match="non-finite .*overflow float64"):
        dead.extend(np.arange(10))
    with pytest.raises(KernelError, match="failed earlier"):
        dead.add(0)


def test_feature_predict_matches_explicit_solve():
    """Both branches of FeatureProblem.predict (dual space when s·g <= D, else D×D) against numpy.linalg.solve."""
    ptr, pte, ytr, yte = make_features("first_logit", 20, 6, 3, 7, seed=9)
    fp = FeatureProblem.from_features(ptr, pte, ytr, yte, lam=1e-1, kernel_divisor=1e2)
    X, XT = ptr / 10.0, pte / 10.0
    T = np.eye(3)[ytr]
    tol = pair_tol(fp, fp.to_dual())
    for subset in (np.array([3, 1, 4]), np.arange(5, 20), None):
        S = np.arange(20) if subset is None else subset
        want = XT @ np.linalg.solve(X[S].T @ X[S] + 0.1 * np.eye(7), X[S].T @ T[S])
        assert rel(fp.predict(subset), want) <= tol
    np.testing.assert_array_equal(fp.predict(np.array([], dtype=np.int64)), np.zeros((6, 3)))
    assert UTILITIES["accuracy"](fp.predict(), yte) == full_utility(fp, "accuracy")


def test_row_blocking_does_not_change_results(monkeypatch):
    """Feature row blocks of 3 rows vs one block. Integer-valued features make every Gram/product entry an
    exact float64 sum (so those are equal bit for bit); solves differ only by rounding (derived bound)."""
    import freeshap_ray.utility.features as features

    rng = np.random.default_rng(4)
    ptr, pte = rng.integers(-3, 4, size=(40, 6)).astype(np.float16), rng.integers(-3, 4, size=(7, 6)).astype(np.float16)
    ytr, yte = rng.integers(0, 3, 40), rng.integers(0, 3, 7)
    fp = FeatureProblem.from_features(ptr, pte, ytr, yte, lam=1e-1, kernel_divisor=4.0)
    Y = rng.normal(size=(7, 3))
    one = dict(gram=fp.gram(), gram_s=fp.gram(np.arange(5, 30)), tt=fp.train_t_times(fp.T), kt=fp.kt_t_times(Y),
               pred=fp.predict(), sur=FeatureSurrogate.fit(fp))
    monkeypatch.setattr(features, "ROW_BLOCK_ELEMENTS", 3 * fp.dim)
    assert fp.row_step() == 3
    np.testing.assert_array_equal(fp.gram(), one["gram"])
    np.testing.assert_array_equal(fp.gram(np.arange(5, 30)), one["gram_s"])
    np.testing.assert_array_equal(fp.train_t_times(fp.T), one["tt"])
    np.testing.assert_array_equal(fp.kt_t_times(Y), one["kt"])
    tol = primal_tol(fp)
    assert rel(fp.predict(), one["pred"]) <= 2 * tol
    sur, ref = FeatureSurrogate.fit(fp), one["sur"]
    assert rel(sur.H_blocks, ref.H_blocks) <= 2 * tol
    # w_i = e_i / (1 - h_ii) and F - P[:, i] w_i: the solve bound times κ = 1/(1 - max h), |w| and |P|
    X, XT = fp.train_features(), fp.test_features()
    P = XT @ np.linalg.solve(X.T @ X + fp.lam * np.eye(fp.dim), X.T)
    atol = 2 * tol / (1 - ref.H_blocks.max()) * (1 + np.abs(ref._w).max()) * max(1.0, np.abs(P).max())
    np.testing.assert_allclose(sur.loo_test_predictions(np.arange(40)), ref.loo_test_predictions(np.arange(40)),
                               rtol=0, atol=atol)
    np.testing.assert_array_equal(sur.tracin_values(), ref.tracin_values())


# ---- branch / leave-one-out requests (stratified sampling on features) --------------------------------------


def _leverage_bound(fp: FeatureProblem) -> float:
    """``max ‖(I - H_jj)⁻¹‖`` over points and prefixes: ``1 - leverage >= λ / (λ_max(Φ̃ᵀΦ̃) + λ)``."""
    top = max(float(np.linalg.eigvalsh(fp.gram())[-1]), 0.0)
    return (top + fp.lam) / fp.lam


@pytest.mark.parametrize("kind,c", KINDS)
def test_branch_and_loo_updates_equal_direct_solves(kind, c):
    """``F(S + j) - F(S)`` and ``F(S) - F(S - j)`` from the QR form equal direct float64 solves; a removal is
    a downdate, amplified by ``κ = max ‖(I - H_jj)⁻¹‖`` (bounded by the conditioning, asserted small)."""
    ptr, pte, ytr, yte = make_features(kind, 24, 9, c, 10, seed=21)
    fp = FeatureProblem.from_features(ptr, pte, ytr, yte, n_classes=c, lam=1.0, kernel_divisor=1e2)
    dp = fp.to_dual()
    perm = np.random.default_rng(4).permutation(24)
    reg = PrimalRegressor(fp)
    reg.extend(perm[:11])
    base = dp.predict(perm[:11])
    scale = max(1.0, max(np.abs(dp.predict(np.append(perm[:11], j))).max() for j in perm[11:]))
    tol = pair_tol(fp, dp) * scale
    out, inside = perm[11:17], perm[3:9]
    want = np.stack([dp.predict(np.append(perm[:11], j)) - base for j in out])
    np.testing.assert_allclose(reg.branch_updates(out), want, rtol=0, atol=2 * tol)
    kappa = _leverage_bound(fp)
    loo_tol = 2 * kappa * tol
    assert loo_tol < 1e-3
    want = np.stack([base - dp.predict(perm[:11][perm[:11] != j]) for j in inside])
    np.testing.assert_allclose(reg.loo_updates(inside), want, rtol=0, atol=loo_tol)
    assert reg.size == 11 and np.array_equal(reg.order, perm[:11])  # nothing was added or removed
    with pytest.raises(ValueError, match="is in the prefix"):
        reg.branch_updates(inside[:1])
    with pytest.raises(ValueError, match="is not in the prefix"):
        reg.loo_updates(out[:1])


@pytest.mark.parametrize("kind,c", KINDS)
def test_stratified_records_equal_on_features_and_kernel(kind, c):
    """A stratified sample on features (the QR walk stops at every requested size) records the same sizes,
    walk and, within the bounds, the same marginals as on the kernel (continuous utilities: 2-Lipschitz), with
    one shared size per sample (the default on features) and with independent sizes (the default on kernels)."""
    from freeshap_ray.valuation.stratified import geometric_edges, stratified_sample, uniform_plan

    n = 30
    ptr, pte, ytr, yte = make_features(kind, n, 8, c, 12, seed=6)
    fp = FeatureProblem.from_features(ptr, pte, ytr, yte, n_classes=c, lam=1.0, kernel_divisor=1e2)
    dp = fp.to_dual()
    scale = max(1.0, float(np.abs(dp.predict()).max()), max(np.abs(dp.predict([i])).max() for i in range(n)))
    u_tol = 4 * 2 * _leverage_bound(fp) * pair_tol(fp, dp) * scale
    assert u_tol < 1e-3
    plan = uniform_plan(n, geometric_edges(n))
    for utility, shared in (("neg_ce", True), ("margin", True), ("neg_ce", False)):
        for k in range(2 * len(plan.cycle)):
            a = stratified_sample(fp, plan, 0, k, utility, shared_size=shared)
            b = stratified_sample(dp, plan, 0, k, utility, shared_size=shared)
            assert np.array_equal(a.sizes, b.sizes) and a.walked == b.walked
            if shared:
                assert np.unique(a.sizes[a.sizes >= 0]).size <= 1
            np.testing.assert_allclose(a.marginals, b.marginals, rtol=0, atol=u_tol, err_msg=f"{utility} {k}")
    default = stratified_sample(fp, plan, 0, len(plan.cycle) - 1, "neg_ce")  # features: one size per sample
    assert np.unique(default.sizes[default.sizes >= 0]).size == 1

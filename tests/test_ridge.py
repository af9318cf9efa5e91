"""The voxelwise ridge (neuroguide.models.ridge): penalties by exact leave-one-out error, against scikit-learn's
RidgeCV (its efficient leave-one-out mode) and numpy solves at the chosen penalties."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroguide.models.ridge import fit_ridge, ridge_loo_path

ALPHAS = np.logspace(-2, 5, 15)


def _problem(n: int, d: int, v: int = 10, seed: int = 0):
    """Features of varied scale and non-zero mean; voxels from clean to pure noise (their best penalties differ)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n + 40, d)) * rng.uniform(0.5, 3, d) + rng.normal(size=d)
    Y = X @ rng.normal(size=(d, v)) / np.sqrt(d) + rng.normal(size=(n + 40, v)) * np.geomspace(0.05, 20, v) + 3.0
    return X[:n], Y[:n], X[n:]


@pytest.mark.parametrize("n,d", [(150, 20), (60, 200), (60, 59)])  # D < n, D > n, D = n - 1 (Xc of full rank n - 1)
def test_penalties_and_fits_equal_scikit_learns_leave_one_out(n, d):
    from sklearn.linear_model import RidgeCV

    X, Y, Xt = _problem(n, d)
    fit = fit_ridge(X, Y, ALPHAS, device="cpu")
    xs = lambda a: (a - fit.x_mean) / fit.x_scale  # noqa: E731  (the same standardized features)
    sk = RidgeCV(alphas=ALPHAS, alpha_per_target=True, fit_intercept=True).fit(xs(X), Y)
    print(f"n={n} D={d}: alphas {fit.alphas} (scikit-learn {sk.alpha_})")
    assert len(set(fit.alphas.tolist())) > 2  # a penalty per voxel, not one for all
    np.testing.assert_array_equal(fit.alphas, sk.alpha_)
    np.testing.assert_allclose(fit.loo_mse, -sk.best_score_, rtol=1e-8)  # the leave-one-out MSE itself
    np.testing.assert_allclose(fit.predict(Xt), sk.predict(xs(Xt)), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("n,d", [(150, 20), (60, 200)])
def test_weights_are_numpy_solves_at_the_chosen_penalties(n, d):
    X, Y, Xt = _problem(n, d, seed=1)
    X0, Y0 = X.copy(), Y.copy()
    fit = fit_ridge(X, Y, ALPHAS, device="cpu")
    assert np.array_equal(X, X0) and np.array_equal(Y, Y0)  # the caller's arrays are left as they were
    Xs = (X - X.mean(0)) / X.std(0)
    for v, a in enumerate(fit.alphas):  # the intercept unpenalized: centred y, and its mean added back
        w = np.linalg.solve(Xs.T @ Xs + a * np.eye(d), Xs.T @ (Y[:, v] - Y[:, v].mean()))
        np.testing.assert_allclose(fit.coef[:, v], w, rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(fit.intercept[v], Y[:, v].mean(), rtol=1e-12)


def test_loo_errors_are_refits_without_each_row():
    """The criterion itself on unstandardized X: each row predicted by the fit on the others (re-centred)."""
    X, Y, _ = _problem(40, 8, v=3, seed=2)
    pens = [0.1, 10.0, 1000.0]
    path = ridge_loo_path(torch.tensor(X), torch.tensor(Y), pens)
    ref = np.zeros((len(pens), Y.shape[1]))
    for j, p in enumerate(pens):
        for i in range(len(X)):
            rest = np.arange(len(X)) != i
            xm, ym = X[rest].mean(0), Y[rest].mean(0)
            w = np.linalg.solve((X[rest] - xm).T @ (X[rest] - xm) + p * np.eye(X.shape[1]), (X[rest] - xm).T @ (Y[rest] - ym))
            ref[j] += ((X[i] - xm) @ w + ym - Y[i]) ** 2 / len(X)
    np.testing.assert_allclose(path.loo.numpy(), ref, rtol=1e-10)
    np.testing.assert_array_equal(path.best.numpy(), ref.argmin(0))


def test_float32_residuals_chunks_and_voxel_order_change_nothing_that_matters():
    X, Y, Xt = _problem(300, 64, v=40, seed=3)
    ref = fit_ridge(X, Y, ALPHAS, device="cpu", dtype=torch.float64)
    f32 = fit_ridge(X.astype(np.float32), Y.astype(np.float32), ALPHAS, device="cpu")  # float32 residuals
    same = float(np.mean(f32.alphas == ref.alphas))
    print(f"float32 residuals: the float64 penalty for {100 * same:.0f}% of voxels; largest prediction difference "
          f"{np.abs(f32.predict(Xt) - ref.predict(Xt)).max():.2e}")
    assert same >= 0.95 and np.abs(f32.predict(Xt) - ref.predict(Xt)).max() < 1e-3 * np.abs(ref.predict(Xt)).max()
    perm = np.random.default_rng(0).permutation(Y.shape[1])
    chunked = fit_ridge(X, Y[:, perm], ALPHAS, device="cpu", chunk=7)  # 6 chunks, voxels reordered
    np.testing.assert_array_equal(chunked.alphas, ref.alphas[perm])
    np.testing.assert_allclose(chunked.predict(Xt), ref.predict(Xt)[:, perm], rtol=1e-10, atol=1e-10)
    part = fit_ridge(X, Y[:, 5:9], ALPHAS, device="cpu").columns(slice(1, 3))  # a voxel's fit is its own
    np.testing.assert_allclose(part.predict(Xt), ref.columns(slice(6, 8)).predict(Xt), rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_gpu_fit_equals_cpu_fit():
    X, Y, Xt = _problem(200, 50, seed=4)
    cpu, gpu = fit_ridge(X, Y, ALPHAS, device="cpu"), fit_ridge(X, Y, ALPHAS, device="cuda")
    np.testing.assert_array_equal(cpu.alphas, gpu.alphas)
    np.testing.assert_allclose(gpu.predict(Xt), cpu.predict(Xt), rtol=1e-9, atol=1e-9)


def test_bad_input_is_refused_with_the_reason():
    X, Y, _ = _problem(30, 5, v=2)
    with pytest.raises(ValueError, match=r"NaN or inf"):
        fit_ridge(X, np.where(np.eye(30, 2) > 0, np.nan, Y), ALPHAS, device="cpu")
    with pytest.raises(ValueError, match=r"expected a non-empty list of positive finite penalties"):
        fit_ridge(X, Y, [0.0, 1.0], device="cpu")
    with pytest.raises(ValueError, match=r"same N"):
        fit_ridge(X, Y[:-1], ALPHAS, device="cpu")

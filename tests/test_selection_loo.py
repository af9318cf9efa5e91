"""Criterion B's penalty choice: the closed-form leave-one-out of selection.ridge_loo against brute-force refits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroguide.evaluation.analyses.selection.core import _folds, ridge_cv_predictions

ALPHAS = np.logspace(-4, 4, 17)  # the default grid of relative alphas


def _ridge(x: np.ndarray, y: np.ndarray, penalty: float):
    """(w (D, K), b0 (K,)) minimising ||y - b0 - x w||^2 + penalty ||w||^2: centred on these rows, the intercept
    unpenalized; solved in the smaller of the D x D and n x n systems."""
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    if xc.shape[1] <= xc.shape[0]:
        w = np.linalg.solve(xc.T @ xc + penalty * np.eye(xc.shape[1]), xc.T @ yc)
    else:
        w = xc.T @ np.linalg.solve(xc @ xc.T + penalty * np.eye(len(xc)), yc)
    return w, ym - xm @ w


def _penalty(x: np.ndarray, alpha: float) -> float:
    """The code's absolute penalty: relative alpha x trace of the centred Gram matrix / min(n, D)."""
    return alpha * float(((x - x.mean(0)) ** 2).sum()) / min(x.shape)


def _brute_loo(x: np.ndarray, y: np.ndarray, penalties) -> np.ndarray:
    """(A, K) mean squared error of predicting each row from the ridge refit on the other rows (re-centred on
    them), at each absolute penalty; a penalty of 0 is the minimum-norm least-squares fit."""
    n = len(x)
    out = np.zeros((len(penalties), y.shape[1]))
    for j, p in enumerate(penalties):
        for i in range(n):
            rest = np.arange(n) != i
            if p == 0:
                xm, ym = x[rest].mean(0), y[rest].mean(0)
                w = np.linalg.lstsq(x[rest] - xm, y[rest] - ym, rcond=None)[0]
                b0 = ym - xm @ w
            else:
                w, b0 = _ridge(x[rest], y[rest], p)
            out[j] += (x[i] @ w + b0 - y[i]) ** 2
    return out / n


def _problem(n: int, d: int, sites: int = 8, seed: int = 0):
    """Features with a non-zero mean; sites read out 3 features, with noise from 0.1 to 10 (different best alphas)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) + 2.0
    y = x[:, :3] @ rng.normal(size=(3, sites)) / np.sqrt(3) + rng.normal(size=(n, sites)) * np.geomspace(0.1, 10, sites)
    return x, y


@pytest.mark.parametrize("dim", [400, 12])  # dual (D > n) and primal (D < n) branches
def test_ridge_cv_chooses_each_sites_alpha_by_true_leave_one_out(dim):
    """Per fold and site, the chosen alpha is the one with the lowest brute-force leave-one-out error on the
    training fold, and the out-of-fold predictions are the training fold's ridge fit at that alpha."""
    n, folds = 60, 5
    x, y = _problem(n, dim, sites=12, seed=3)
    pred, chosen = ridge_cv_predictions(torch.tensor(x), torch.tensor(y), folds, ALPHAS, seed=0)
    ref_chosen, ref_pred = np.zeros((folds, y.shape[1])), np.zeros_like(y)
    for f, test in enumerate(_folds(n, folds, 0)):
        train = np.setdiff1d(np.arange(n), test)
        loo = _brute_loo(x[train], y[train], [_penalty(x[train], a) for a in ALPHAS])
        best = loo.argmin(0)
        ref_chosen[f] = ALPHAS[best]
        for k, b in enumerate(best):
            w, b0 = _ridge(x[train], y[train][:, [k]], _penalty(x[train], ALPHAS[b]))
            ref_pred[test, k] = (x[test] @ w + b0)[:, 0]
    print(f"D={dim}: brute-force alphas {sorted(set(ref_chosen.ravel().tolist()))}, "
          f"code's {sorted(set(chosen.numpy().ravel().tolist()))}")
    assert len(set(ref_chosen.ravel().tolist())) > 2  # the sites need different penalties
    np.testing.assert_allclose(chosen.numpy(), ref_chosen, rtol=1e-6)
    np.testing.assert_allclose(pred.numpy(), ref_pred, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dim", [400, 48, 47, 12])  # D > n, D = n and D = n - 1 (rank n - 1), D < n - 1
def test_ridge_loo_errors_equal_brute_force_refits(dim):
    from neuroguide.evaluation.analyses.selection.core import ridge_loo

    x, y = _problem(48, dim)
    fit = ridge_loo(torch.tensor(x), torch.tensor(y), ALPHAS)
    penalties = [_penalty(x, a) for a in ALPHAS]
    np.testing.assert_allclose(fit.penalty.numpy(), penalties, rtol=1e-12)
    loo = _brute_loo(x, y, penalties)
    np.testing.assert_allclose(fit.loo.numpy(), loo, rtol=1e-9)
    np.testing.assert_allclose(fit.alpha.numpy(), ALPHAS[loo.argmin(0)])


@pytest.mark.parametrize("dim", [400, 47])  # the centred X has rank n - 1: the fit interpolates as alpha -> 0
def test_ridge_loo_at_a_vanishing_penalty_is_the_interpolating_fits(dim):
    """Where 1 - h and the residual both go to 0 with the penalty, their ratio is the leave-one-out error of the
    minimum-norm interpolating fit, not 0 (nor 0/0)."""
    from neuroguide.evaluation.analyses.selection.core import ridge_loo

    x, y = _problem(48, dim)
    fit = ridge_loo(torch.tensor(x), torch.tensor(y), [1e-12])
    ref = _brute_loo(x, y, [0.0])
    print(f"D={dim}: LOO error at alpha 1e-12 {fit.loo[0].numpy()}, min-norm refits {ref[0]}")
    assert bool(torch.isfinite(fit.loo).all()) and float(fit.loo.min()) > 0
    np.testing.assert_allclose(fit.loo.numpy(), ref, rtol=1e-6)


def test_ridge_alphas_must_be_positive():
    x, y = torch.randn(20, 30), torch.randn(20, 2)
    for bad in ([0.0, 1.0], [], [float("nan")]):
        with pytest.raises(ValueError, match=r"ridge alphas=.*expected a non-empty list of positive finite"):
            ridge_cv_predictions(x, y, 2, bad)

"""Ridge regression with a penalty per target chosen by exact leave-one-out error, from one decomposition
(:func:`ridge_loo_path`, shared by the encoding models and the evaluation's criterion B), and the per-layer fits
of an encoding model (:func:`fit_ridge`, :func:`fit_layers`).

For features ``X`` (n, D) and targets ``Y`` (n, K) the fit at penalty ``p`` minimises ``||y - b0 - X w||^2 + p
||w||^2`` (the intercept ``b0`` unpenalized); its hat matrix is ``H = 11^T/n + Xc (Xc^T Xc + p I)^-1 Xc^T`` (Xc: X
centred on these rows; the 1/n is the intercept's share). The leave-one-out error of target k is ``mean_i (e_ik /
(1 - h_i))^2`` (e: residuals of the fit on all n rows, h: the diagonal of H), the exact squared error of predicting
row i from the fit on the other n - 1 rows at the same ``p`` (re-centred on them). One eigendecomposition of the
smaller of ``Xc^T Xc`` and ``Xc Xc^T`` gives every penalty in closed form; each target takes the penalty of the
grid with the lowest error (ties: the smaller), and its weights are those of the fit on all n rows at it. This is
what scikit-learn's ``RidgeCV(alpha_per_target=True)`` computes (its default efficient leave-one-out mode).
Everything runs on the device of the inputs (CPU or GPU), in chunks of targets.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch

from neuroguide.metrics import nanmedian, pearson_r

log = logging.getLogger("neuroguide")

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 8, 21))


def column_space(xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lam (r,), u (n, r), xtu (D, r)) of the centred ``xc`` (n, D): its non-zero squared singular values, an
    orthonormal basis of its column space and ``xc^T u``, from the eigendecomposition of the smaller of ``xc^T xc``
    (D <= n; then ``u = xc v / sqrt(lam)``, ``xtu = v sqrt(lam)``) and ``xc xc^T``. Directions with eigenvalue <=
    max(n, D) x machine eps x the largest are null; so is the constant vector (``xc^T 1 = 0``), which is also
    dropped by its alignment, in case rounding lifts its eigenvalue above that threshold."""
    n, d = xc.shape
    if d <= n:
        lam, v = torch.linalg.eigh(xc.T @ xc)
    else:
        lam, u = torch.linalg.eigh(xc @ xc.T)
    keep = lam > lam.max().clamp_min(0) * max(n, d) * torch.finfo(lam.dtype).eps
    lam = lam[keep]
    if d <= n:
        v = v[:, keep]
        u = (xc @ v) / lam.sqrt()
        xtu = v * lam.sqrt()
    else:
        u = u[:, keep]
        xtu = xc.T @ u
    ok = u.sum(0).abs() / math.sqrt(n) <= 0.5
    return lam[ok], u[:, ok], xtu[:, ok]


class LooPath(NamedTuple):
    """:func:`ridge_loo_path` on one training set: A penalties, K targets, D features."""

    loo: torch.Tensor  # (A, K) float64: leave-one-out mean squared error of each target at each penalty
    best: torch.Tensor  # (K,) long: index of each target's penalty (lowest loo; ties: the first)
    coef: torch.Tensor  # (D, K) float64: weights of the fit on all n rows at that penalty
    intercept: torch.Tensor  # (K,) float64: predict(x) = x @ coef + intercept

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.coef) @ self.coef + self.intercept


def ridge_loo_path(x: torch.Tensor, y: torch.Tensor, penalties, dtype: torch.dtype | None = None,
                   chunk: int | None = None) -> LooPath:
    """Exact leave-one-out error of ridge with an unpenalized intercept, x (n, D) -> y (n, K), at each of the
    absolute ``penalties`` (A,), each target's penalty chosen by it, and the fits at the chosen penalties.

    The decomposition (:func:`column_space`), the projections ``z = u^T yc``, the leverages and the weights are
    float64; the residuals at each penalty, ``e = (yc - u z) + u (p / (lam + p) * z)`` (the part of y no penalty
    fits, plus the shrunk part; two terms that never cancel, so the ratio ``e / (1 - h)`` stays the true one when
    D >= n - 1 and ``p`` is small, where both go to 0 together), are computed in ``dtype`` (default float64;
    float32 is ~3x faster on a CPU with a relative error ~1e-6 in the errors, which may flip the choice between
    two penalties of nearly equal error). ``chunk`` targets at a time (default: n x chunk <= 2^24 values).
    Costs one eigendecomposition of a min(n, D)-square matrix and, per penalty, an (n, r) x (r, K) product."""
    dev = x.device
    x, pen = x.to(torch.float64), torch.as_tensor(penalties, dtype=torch.float64).reshape(-1).to(dev)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or len(x) < 3:
        raise ValueError(f"ridge: expected x (n, D) and y (n, K) with the same n >= 3; got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if pen.numel() == 0 or not bool(torch.isfinite(pen).all()) or float(pen.min()) <= 0:
        raise ValueError(f"ridge penalties={pen.tolist()}: expected a non-empty list of positive finite penalties "
                         "(at 0 the leave-one-out error of D >= n features is 0/0)")
    dtype = dtype or torch.float64
    n, d = x.shape
    xm = x.mean(0)
    lam, u, xtu = column_space(x - xm)
    shrink = pen[None, :] / (lam[:, None] + pen[None, :])  # (r, A): the residual's share of each direction
    u2 = u.square()
    full = u.shape[1] == n - 1  # the column space of Xc is all of 1^perp (D >= n - 1): nothing lies outside it
    lev_out = torch.zeros(n, dtype=torch.float64, device=dev) if full else (1 - 1 / n - u2.sum(1)).clamp_min(0)
    inv2 = (1 / (lev_out[:, None] + u2 @ shrink).square() / n).T.contiguous().to(dtype)  # (A, n): 1 / (n (1 - h_i)^2)
    u_l, shrink_l = u.to(dtype), shrink.to(dtype)
    k_all = y.shape[1]
    loo = torch.empty(len(pen), k_all, dtype=torch.float64, device=dev)
    coef = torch.empty(d, k_all, dtype=torch.float64, device=dev)
    ym = torch.empty(k_all, dtype=torch.float64, device=dev)
    best = torch.empty(k_all, dtype=torch.long, device=dev)
    step = int(chunk or max(1, 2 ** 24 // n))
    for s in range(0, k_all, step):
        yc = y[:, s:s + step].to(dev, torch.float64, copy=True)  # never the caller's array, centred below
        ym[s:s + step] = yc.mean(0)
        yc -= ym[s:s + step]
        z = u.T @ yc  # (r, k)
        out = None if full else (yc - u @ z).to(dtype)  # (n, k): the part of y outside the column space
        z_l = z.to(dtype)
        del yc
        for j in range(len(pen)):
            fitted = shrink_l[:, j:j + 1] * z_l
            resid = u_l @ fitted if out is None else torch.addmm(out, u_l, fitted)
            loo[j, s:s + step] = (inv2[j] @ resid.square_()).to(torch.float64)
        best[s:s + step] = torch.argmin(loo[:, s:s + step], 0)
        coef[:, s:s + step] = xtu @ (z / (lam[:, None] + pen[best[s:s + step]][None, :]))
    return LooPath(loo, best, coef, ym - xm @ coef)


@dataclass
class RidgeFit:
    """A fitted voxelwise ridge: ``predict(X) = ((X - x_mean) / x_scale) @ coef + intercept``."""

    coef: np.ndarray  # (D, V) on standardized features
    intercept: np.ndarray  # (V,)
    alphas: np.ndarray  # (V,) the chosen penalty of each voxel
    x_mean: np.ndarray  # (D,)
    x_scale: np.ndarray  # (D,)
    loo_mse: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (V,) leave-one-out MSE at the chosen alpha

    def predict(self, X: np.ndarray) -> np.ndarray:
        return ((np.asarray(X, np.float64) - self.x_mean) / self.x_scale) @ self.coef + self.intercept

    def linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (V, D), bias (V,)) of the ``nn.Linear`` on raw features that predicts the same."""
        w = self.coef / self.x_scale[:, None]
        return (torch.as_tensor(w.T.copy(), dtype=torch.float32),
                torch.as_tensor(self.intercept - self.x_mean @ w, dtype=torch.float32))

    def columns(self, cols) -> "RidgeFit":
        """The fit of the voxels ``cols`` only (each voxel's ridge is its own)."""
        return RidgeFit(self.coef[:, cols], self.intercept[cols], self.alphas[cols], self.x_mean, self.x_scale,
                        self.loo_mse[cols] if self.loo_mse.size else self.loo_mse)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto``: the GPU when one is visible, else the CPU; other names as given (``cpu``, ``cuda``, ``cuda:1``)."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def fit_ridge(X: np.ndarray, Y: np.ndarray, alphas: Sequence[float] = DEFAULT_ALPHAS, device: str = "auto",
              dtype: torch.dtype | None = None, chunk: int | None = None) -> RidgeFit:
    """Fit a ridge per column of ``Y`` (N, V) on ``X`` (N, D), on these rows only: ``X`` standardized with its own
    mean and std (over all N rows, so each left-out row still shares in them: a slight optimism of the
    leave-one-out error, as in any fit on pre-standardized features), the penalty of each voxel the one of
    ``alphas`` with the lowest exact leave-one-out error (:func:`ridge_loo_path`), its weights refit on all rows.
    On ``device`` (auto: the GPU when visible); the residuals in ``dtype`` (default: float64 for float64 X, else
    float32), everything else in float64."""
    X, Y = np.asarray(X), np.asarray(Y)
    if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
        raise ValueError(f"fit_ridge: expected X (N, D) and Y (N, V) with the same N; got {X.shape} and {Y.shape}")
    if len(X) < 3:
        raise ValueError(f"fit_ridge: {len(X)} training images are too few for a leave-one-out choice of the penalty")
    if not (np.isfinite(X).all() and np.isfinite(Y).all()):
        raise ValueError("fit_ridge: the features or the responses hold NaN or inf values; a ridge needs finite "
                         "values (drop those voxels or images first)")
    dev = resolve_device(device)
    if dtype is None:
        dtype = torch.float64 if X.dtype == np.float64 else torch.float32
    x = torch.as_tensor(X).to(dev, torch.float64)
    x_mean, x_scale = x.mean(0), x.std(0, correction=0)
    x_scale[x_scale < 1e-8] = 1.0
    path = ridge_loo_path((x - x_mean) / x_scale, torch.as_tensor(Y), alphas, dtype, chunk)
    grid = np.asarray(alphas, np.float64)
    best = path.best.cpu().numpy()
    loo = path.loo.gather(0, path.best[None]).reshape(-1)
    return RidgeFit(path.coef.cpu().numpy(), path.intercept.cpu().numpy(), grid[best], x_mean.cpu().numpy(),
                    x_scale.cpu().numpy(), loo.cpu().numpy())


@dataclass
class LayerFit:
    """One layer's ridge and its per-voxel Pearson r on the validation (and test) images."""

    layer: str
    fit: RidgeFit
    val_r: np.ndarray
    test_r: np.ndarray | None = None
    n_features: int = 0

    @property
    def val_r_median(self) -> float:
        return float(nanmedian(torch.as_tensor(self.val_r)))

    def columns(self, cols) -> "LayerFit":
        """The same layer's fit and scores for the voxels ``cols`` only (a region among those fitted together)."""
        return LayerFit(self.layer, self.fit.columns(cols), self.val_r[cols],
                        None if self.test_r is None else self.test_r[cols], self.n_features)


def _r(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    return pearson_r(torch.as_tensor(pred), torch.as_tensor(np.asarray(y, np.float64))).numpy()


def fit_layers(features: Mapping[str, Mapping[str, np.ndarray]], y_fit: np.ndarray, y_val: np.ndarray,
               y_test: np.ndarray | None = None, alphas: Sequence[float] = DEFAULT_ALPHAS,
               device: str = "auto") -> list[LayerFit]:
    """One ridge per layer: ``features[layer] = {"fit": (n_fit, D), "val": (n_val, D), "test": (n_test, D)}``.

    Fitted (penalties included) on the ``fit`` images only; scored on ``val`` (the layer choice,
    :func:`best_layer`) and, when given, on ``test`` (reported, never used to choose)."""
    out = []
    for layer, f in features.items():
        fit = fit_ridge(f["fit"], y_fit, alphas, device)
        test_r = None if y_test is None else _r(fit.predict(f["test"]), y_test)
        out.append(LayerFit(layer, fit, _r(fit.predict(f["val"]), y_val), test_r, int(np.asarray(f["fit"]).shape[1])))
        log.info("layer %s: %d features, median val r %.3f, median alpha %.3g", layer, out[-1].n_features,
                 out[-1].val_r_median, float(np.median(fit.alphas)))
    return out


def best_layer(fits: Sequence[LayerFit]) -> LayerFit:
    """The layer with the highest median validation r (ties: the first, i.e. the shallowest listed)."""
    scores = [f.val_r_median for f in fits]
    scores = [s if np.isfinite(s) else -np.inf for s in scores]
    return fits[int(np.argmax(scores))]

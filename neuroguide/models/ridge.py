"""Voxelwise ridge regression with a cross-validated penalty per voxel (himalaya), and the per-layer fits of
an encoding model.

For features ``X`` (N, D) and responses ``Y`` (N, V) of the *training* images: ``X`` is standardized with
its own mean and std, ``Y`` centred; for each voxel ``v`` the penalty ``alpha_v`` is the one of the grid
with the best K-fold cross-validated score on those images (``himalaya.ridge.solve_ridge_cv_svd``,
``local_alpha=True``), and ``w_v = (Xs^T Xs + alpha_v I)^-1 Xs^T y_v`` is refit on all of them. Test images
never enter the fit or the penalty. himalaya runs on its ``torch`` backend (``torch_cuda`` on a GPU).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from neuroguide.metrics import nanmedian, pearson_r

log = logging.getLogger("neuroguide")

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 8, 21))


@dataclass
class RidgeFit:
    """A fitted voxelwise ridge: ``predict(X) = ((X - x_mean) / x_scale) @ coef + intercept``."""

    coef: np.ndarray  # (D, V) on standardized features
    intercept: np.ndarray  # (V,)
    alphas: np.ndarray  # (V,) the chosen penalty of each voxel
    x_mean: np.ndarray  # (D,)
    x_scale: np.ndarray  # (D,)
    cv_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (V,) CV score at the chosen alpha

    def predict(self, X: np.ndarray) -> np.ndarray:
        return ((np.asarray(X, np.float64) - self.x_mean) / self.x_scale) @ self.coef + self.intercept

    def linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (V, D), bias (V,)) of the ``nn.Linear`` on raw features that predicts the same."""
        w = self.coef / self.x_scale[:, None]
        return (torch.as_tensor(w.T.copy(), dtype=torch.float32),
                torch.as_tensor(self.intercept - self.x_mean @ w, dtype=torch.float32))


def resolve_backend(name: str = "auto") -> str:
    """``auto``: himalaya's ``torch_cuda`` when a GPU is visible, else ``torch``; other names as given."""
    if name == "auto":
        return "torch_cuda" if torch.cuda.is_available() else "torch"
    return name


@contextlib.contextmanager
def himalaya_backend(name: str = "auto") -> Iterator:
    """himalaya's backend ``name`` inside (it is global state in himalaya), the previous one restored after."""
    from himalaya.backend import get_backend, set_backend

    before = get_backend().name
    backend = set_backend(resolve_backend(name), on_error="raise")
    try:
        yield backend
    finally:
        set_backend(before, on_error="warn")


def fit_ridge(X: np.ndarray, Y: np.ndarray, alphas: Sequence[float] = DEFAULT_ALPHAS, cv: int = 5,
              backend: str = "auto", n_targets_batch: int | None = None) -> RidgeFit:
    """Fit a ridge per column of ``Y`` (N, V) on ``X`` (N, D), the penalty of each chosen by ``cv``-fold
    cross-validation over ``alphas`` on these rows only (see the module doc). Computes in X's float dtype."""
    X, Y = np.asarray(X), np.asarray(Y)
    if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
        raise ValueError(f"fit_ridge: expected X (N, D) and Y (N, V) with the same N; got {X.shape} and {Y.shape}")
    if len(X) < 2 * cv:
        raise ValueError(f"fit_ridge: {len(X)} training images are too few for {cv}-fold cross-validation of the "
                         "penalty; use more images or a smaller task.cv")
    dtype = np.float64 if X.dtype == np.float64 else np.float32
    x_mean = X.mean(0, dtype=np.float64)
    x_scale = X.std(0, dtype=np.float64)
    x_scale[x_scale < 1e-8] = 1.0
    y_mean = Y.mean(0, dtype=np.float64)
    Xs = ((X - x_mean) / x_scale).astype(dtype)
    Yc = (Y - y_mean).astype(dtype)
    from himalaya.ridge import solve_ridge_cv_svd

    with himalaya_backend(backend) as b:
        best, coef, cv_scores = solve_ridge_cv_svd(
            b.asarray(Xs), b.asarray(Yc), alphas=b.asarray(np.asarray(alphas, dtype)), cv=int(cv), local_alpha=True,
            fit_intercept=False, n_targets_batch=n_targets_batch, n_targets_batch_refit=n_targets_batch, warn=False)
        best, coef, cv_scores = (np.asarray(b.to_numpy(v), np.float64) for v in (best, coef, cv_scores))
    return RidgeFit(coef, y_mean, best, x_mean, x_scale, cv_scores.reshape(-1))


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


def _r(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    return pearson_r(torch.as_tensor(pred), torch.as_tensor(np.asarray(y, np.float64))).numpy()


def fit_layers(features: Mapping[str, Mapping[str, np.ndarray]], y_fit: np.ndarray, y_val: np.ndarray,
               y_test: np.ndarray | None = None, alphas: Sequence[float] = DEFAULT_ALPHAS, cv: int = 5,
               backend: str = "auto") -> list[LayerFit]:
    """One ridge per layer: ``features[layer] = {"fit": (n_fit, D), "val": (n_val, D), "test": (n_test, D)}``.

    Fitted (penalties included) on the ``fit`` images only; scored on ``val`` (the layer choice,
    :func:`best_layer`) and, when given, on ``test`` (reported, never used to choose)."""
    out = []
    for layer, f in features.items():
        fit = fit_ridge(f["fit"], y_fit, alphas, cv, backend)
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

"""Linear centered kernel alignment (Kornblith et al. 2019), beside RSA; used for layer selection.

For patterns X (N, K1) and Y (N, K2) of the same N stimuli, columns centered::

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
              = <X X^T, Y Y^T>_F / (||X X^T||_F ||Y Y^T||_F)

(the feature-space and the stimulus-space forms; the cheaper one is used). It is 1 for identical
inputs and invariant to orthogonal transforms and isotropic scaling of either side, but not to
arbitrary invertible linear maps (e.g. scaling features by different factors).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from neuroguide.evaluation.metrics.rdm import check_patterns

CKA_RANGE = (0.0, 1.0)  # linear CKA is in [0, 1]: figures use this colour range, not the data's


def linear_cka(x, y, *, dtype: torch.dtype = torch.float64) -> float:
    """Linear CKA of (N, K1) and (N, K2) patterns (extra dims flattened). NaN if one side is constant."""
    x = check_patterns(x, "x").to(dtype)
    y = check_patterns(y, "y").to(dtype=dtype, device=x.device)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: x has {x.shape[0]} stimuli, y has {y.shape[0]}: both must hold the patterns of "
                         "the same stimuli, in the same order")
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    n, k1, k2 = x.shape[0], x.shape[1], y.shape[1]
    if k1 * k2 + k1 * k1 + k2 * k2 <= 3 * n * n:  # feature space: (K, K) matrices
        hsic = (y.T @ x).square().sum()
        nx = (x.T @ x).square().sum().sqrt()
        ny = (y.T @ y).square().sum().sqrt()
    else:  # stimulus space: (N, N) Gram matrices
        gx, gy = x @ x.T, y @ y.T
        hsic = (gx * gy).sum()
        nx, ny = gx.square().sum().sqrt(), gy.square().sum().sqrt()
    if nx == 0 or ny == 0:
        return float("nan")
    return float(hsic / (nx * ny))


def cka_matrix(rows: Mapping[str, torch.Tensor], cols: Mapping[str, torch.Tensor] | None = None) -> np.ndarray:
    """(len(rows), len(cols)) linear CKA between every pair of pattern sets (``cols`` defaults to ``rows``)."""
    symmetric = cols is None
    cols = rows if cols is None else cols
    out = np.full((len(rows), len(cols)), np.nan)
    for i, a in enumerate(rows.values()):
        for j, b in enumerate(cols.values()):
            if symmetric and j < i:
                out[i, j] = out[j, i]
                continue
            out[i, j] = linear_cka(a, b)
    return out


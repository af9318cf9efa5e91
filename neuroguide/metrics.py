"""The project's one Pearson r: per column (voxel, site, unit) between two (N, K) arrays.

Built on torchmetrics' ``pearson_corrcoef``. Every correlation of a model with measured or predicted
responses (per voxel, site or unit: the predictor and IT scores, split-half reliability, neural
alignment, layer selection) goes through :func:`pearson_r` so that NaN handling and shapes are the
same everywhere. The one exception is RSA (:mod:`neuroguide.evaluation.metrics.rdm`): correlation distances
between all stimulus pairs and Spearman comparisons of RDMs are computed there in chunked matrix form
(tested against rsatoolbox), since a per-pair call would be far too slow.
"""
from __future__ import annotations

import torch
from torchmetrics.functional import pearson_corrcoef


def pearson_r(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pearson r of each column.

    Args:
        pred, target: (N, K) or (N,) tensors, N >= 2 samples.
    Returns:
        (K,) tensor (or a scalar for 1-D inputs). A column with zero variance gives NaN.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pearson_r: shapes differ, pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
    if pred.shape[0] < 2:
        raise ValueError(f"pearson_r needs at least 2 samples along dim 0, got {pred.shape[0]}")
    p = pred.detach().double()
    t = target.detach().double()
    squeeze = p.ndim == 1
    if squeeze:
        p, t = p[:, None], t[:, None]
    pz = p - p.mean(0)
    tz = t - t.mean(0)
    # zero-variance columns are undefined: report NaN rather than torchmetrics' warning + 0
    zero = (pz.abs().sum(0) == 0) | (tz.abs().sum(0) == 0)
    r = pearson_corrcoef(p, t) if p.shape[1] > 1 else pearson_corrcoef(p[:, 0], t[:, 0]).reshape(1)
    r = r.float()
    r[zero] = float("nan")
    return r[0] if squeeze else r


def rowwise_pearson_r(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson r of each row (e.g. per image across outputs): (N, K), (N, K) -> (N,)."""
    return pearson_r(a.T, b.T)


def nan_pearson_r(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-column Pearson r of (N, K) tensors over the rows where both are finite (via ``pearson_r``).

    A column with fewer than 3 such rows gives NaN.
    """
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    ok = torch.isfinite(pred) & torch.isfinite(target)
    if bool(ok.all()):
        return pearson_r(pred, target)
    out = torch.full((pred.shape[1],), float("nan"))
    for k in range(pred.shape[1]):
        m = ok[:, k]
        if int(m.sum()) >= 3:
            out[k] = pearson_r(pred[m, k], target[m, k])
    return out


def nanmedian(x: torch.Tensor) -> torch.Tensor:
    """Median ignoring NaN, the mean of the two middle values for an even count (as numpy and
    scipy report it; ``torch.nanmedian`` returns the lower one). NaN when nothing is finite."""
    x = torch.as_tensor(x).detach().flatten().double()
    if x.numel() == 0 or torch.isnan(x).all():
        return torch.tensor(float("nan"))
    return torch.nanquantile(x, 0.5).float()


def voxel_scores(pred: torch.Tensor, voxels: torch.Tensor, nc: torch.Tensor | None = None,
                 nc_threshold: float = 0.0) -> dict[str, torch.Tensor]:
    """The NSD scores of every model that predicts voxels (predictors, encoding models).

    ``r`` (V,): per-voxel Pearson r of (N, V) predictions against the (N, V) measured responses;
    ``r_nc`` (V_kept,): ``r / sqrt(NC / 100)`` over the voxels with ``NC >= nc_threshold`` (percent), when
    ``nc`` (V,) is given.
    """
    r = pearson_r(pred, voxels)
    out = {"r": r}
    if nc is not None and torch.as_tensor(nc).numel() == r.numel():
        out["r_nc"] = nc_normalized(r, nc, nc_threshold)
    return out


def nc_normalized(r: torch.Tensor, nc: torch.Tensor, nc_threshold: float = 0.0) -> torch.Tensor:
    """``r / sqrt(NC / 100)`` of the voxels with ``NC >= nc_threshold`` (NC in percent): (V,), (V,) -> (V_kept,)."""
    r, nc = torch.as_tensor(r), torch.as_tensor(nc).detach().cpu().float()
    keep = nc >= nc_threshold
    return r[keep] / torch.sqrt(nc[keep].clamp_min(1e-6) / 100.0)


def voxel_score_summary(split: str, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The logged keys of :func:`voxel_scores`: ``<split>/r_median``, ``r_mean`` and, on the test split (whose
    images and repeats the noise ceiling is computed from), ``r_nc_median``, ``r_nc_mean``, ``n_voxels_nc``."""
    r = scores["r"]
    out = {f"{split}/r_median": nanmedian(r), f"{split}/r_mean": torch.nanmean(r)}
    if "r_nc" in scores and split == "test":  # the noise ceiling is the test (shared) images' own
        kept = scores["r_nc"]
        out[f"{split}/r_nc_median"] = nanmedian(kept)
        out[f"{split}/r_nc_mean"] = torch.nanmean(kept) if kept.numel() else torch.tensor(float("nan"))
        out[f"{split}/n_voxels_nc"] = torch.tensor(float(kept.numel()))
    return out

"""Pictures of RSA: RDM panels, classical MDS of the stimuli, and second-order MDS of models and regions.

MDS uses classical (Torgerson) MDS by eigendecomposition on ``sqrt(d)``: for both RDM kinds of
:mod:`neuroguide.evaluation.metrics.rdm` ``sqrt(d)`` is proportional to a Euclidean distance between
(normalized) patterns, so the embedding is exact up to the dropped dimensions.

The figure builders return a matplotlib ``Figure`` (the caller saves it with
:func:`neuroguide.evaluation.plots.save_figure`, 120 dpi); panels sit in a grid of at most
``MAX_COLS`` columns, so a figure stays under ~2000 px wide however many layers and regions it shows.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from neuroguide.evaluation.metrics.rdm import n_stimuli, squareform, sub_rdm

MAX_COLS = 4
PANEL_IN = 3.4  # inches per panel side (408 px at 120 dpi)
MEASURES = {"correlation": "1 - Pearson r", "euclidean": "squared Euclidean distance / K"}
SCORE_NAMES = {"spearman": "Spearman r", "tau-a": "Kendall tau-a", "cosine": "cosine"}
MAX_CLASSES = 20  # more classes than this are coloured on a continuous scale, without a legend
MAX_ANNOTATED = 40  # stimuli written next to their MDS point when no more than this many are shown


# ----------------------------------------------------------------------------- MDS
def classical_mds(dist: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """Classical (Torgerson) MDS: (N, N) distances -> (N, dims) coordinates.

    ``B = -1/2 J D^2 J`` (J the centering matrix), coordinates = top eigenvectors x sqrt(eigenvalues);
    negative eigenvalues (non-Euclidean input) are set to 0.
    """
    d = torch.as_tensor(dist, dtype=torch.float64)
    n = d.shape[0]
    if d.ndim != 2 or d.shape[1] != n:
        raise ValueError(f"classical_mds: expected a square distance matrix, got shape {tuple(d.shape)}")
    j = torch.eye(n, dtype=torch.float64) - 1.0 / n
    b = -0.5 * j @ (d * d) @ j
    evals, evecs = torch.linalg.eigh((b + b.T) / 2)
    idx = torch.argsort(evals, descending=True)[:dims]
    return evecs[:, idx] * evals[idx].clamp(min=0).sqrt()


def rdm_mds(vec: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """Stimulus coordinates (N, dims) of an RDM vector (N (N - 1) / 2,) by classical MDS on ``sqrt(d)``
    (NaN entries take the mean dissimilarity). Builds the N x N matrix: for large N take a
    :func:`~neuroguide.evaluation.metrics.rdm.sub_rdm` first."""
    v = torch.as_tensor(vec, dtype=torch.float64)
    v = torch.nan_to_num(v, nan=float(torch.nanmean(v)) if torch.isfinite(v).any() else 0.0)
    return classical_mds(squareform(v.clamp(min=0).sqrt()), dims)


def _shown(n: int, max_show: int) -> np.ndarray:
    """Indices of at most ``max_show`` of n stimuli, evenly spaced."""
    return np.unique(np.linspace(0, n - 1, min(n, max_show)).round().astype(int))


# ----------------------------------------------------------------------------- figures
def _grid(n_panels: int, extra_w: float = 1.2, panel_h: float = PANEL_IN + 0.6):
    """(figure, flat list of axes) for ``n_panels`` panels in at most MAX_COLS columns; spare axes hidden."""
    from neuroguide.evaluation.plots import plt

    cols = min(MAX_COLS, max(1, n_panels))
    rows = -(-n_panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_IN * cols + extra_w, panel_h * rows), squeeze=False,
                             layout="constrained")
    axes = list(axes.ravel())
    for ax in axes[n_panels:]:
        ax.set_axis_off()
    return fig, axes[:n_panels]


def rdm_figure(rdms: Mapping[str, torch.Tensor], *, method: str = "correlation",
               scores: Mapping[str, Sequence[str]] | None = None, max_show: int = 400):
    """RDM panels: each RDM's dissimilarities as percentiles (rank-transformed, so models and brain
    regions share one colour scale and one colour bar).

    Args:
        rdms: ``{panel title: (N (N - 1) / 2,) RDM vector}``, e.g. ``{"model layer4": ..., "region V1": ...}``.
        method: the RDM method, named on the colour bar.
        scores: ``{panel title: [lines]}`` added under a panel's title (e.g. ``"Spearman r vs V1 = 0.41"``).
        max_show: at most this many stimuli (evenly spaced) are drawn.
    Returns:
        the matplotlib Figure.
    """
    scores = scores or {}
    fig, axes = _grid(len(rdms))
    im = None
    for ax, (name, vec) in zip(axes, rdms.items()):
        v = torch.as_tensor(vec, dtype=torch.float64)
        n = n_stimuli(v.numel())
        show = _shown(n, max_show)
        iu = np.triu_indices(len(show), 1)
        vals = sub_rdm(v, show).numpy()[iu]
        pct = np.zeros((len(show), len(show)))
        pct[iu] = np.argsort(np.argsort(vals)) / max(1, len(vals) - 1)
        im = ax.imshow(pct + pct.T, cmap="viridis", vmin=0, vmax=1)
        lines = [name] + list(scores.get(name, ())) + [f"{n} stimuli" + (f" ({len(show)} shown)" if len(show) < n else "")]
        ax.set_title("\n".join(lines), fontsize=11)
        ax.set_xlabel("stimulus", fontsize=9)
        ax.set_ylabel("stimulus", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    measure = MEASURES.get(method, method)
    fig.colorbar(im, ax=axes, shrink=0.8, label=f"dissimilarity ({measure}), percentile within the RDM")
    return fig


def mds_figure(rdms: Mapping[str, torch.Tensor], *, labels=None, label_names: Sequence[str] | None = None,
               reference: str | None = None, max_show: int = 400):
    """Classical MDS of the stimuli under each RDM, one panel per RDM.

    Points are coloured by class with a legend when ``labels`` (N,) are given (``label_names[k]`` names
    class k); otherwise by their position on the first MDS axis of the RDM ``reference`` (default: the
    first; e.g. a brain region), with a colour bar, so a panel that keeps the colour gradient keeps that
    RDM's geometry. At most ``MAX_ANNOTATED`` shown
    stimuli are written next to their points (their index). Returns the matplotlib Figure.
    """
    names = list(rdms)
    fig, axes = _grid(len(names), extra_w=2.0)
    coords = {}
    for name in names:
        v = torch.as_tensor(rdms[name], dtype=torch.float64)
        show = _shown(n_stimuli(v.numel()), max_show)
        sub = sub_rdm(v, show)
        fill = float(torch.nanmean(sub[torch.isfinite(sub)])) if torch.isfinite(sub).any() else 0.0
        coords[name] = (show, classical_mds(torch.nan_to_num(sub, nan=fill).clamp(min=0).sqrt()).numpy())
    reference = names[0] if reference is None else reference
    show0, xy0 = coords[reference]
    classes = None if labels is None else np.asarray(torch.as_tensor(labels).cpu())
    discrete = classes is not None and len(np.unique(classes)) <= MAX_CLASSES
    handles = {}
    sc = None
    for ax, name in zip(axes, names):
        show, xy = coords[name]
        if discrete:
            for k, cls in enumerate(np.unique(classes)):
                sel = classes[show] == cls
                label = str(label_names[int(cls)]) if label_names is not None else f"class {cls}"
                handles[label] = ax.scatter(xy[sel, 0], xy[sel, 1], s=18, color=_tab20(k), label=label)
        else:
            c = classes[show] if classes is not None else np.interp(show, show0, xy0[:, 0])
            sc = ax.scatter(xy[:, 0], xy[:, 1], s=18, c=c, cmap="viridis")
        if len(show) <= MAX_ANNOTATED:
            for i, (x, y) in zip(show, xy):
                ax.annotate(str(i), (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
        ax.set_title(f"{name}\nMDS of the stimuli", fontsize=11)
        ax.set_xlabel("MDS 1", fontsize=9)
        ax.set_ylabel("MDS 2", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if discrete:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=9, title="class")
    else:
        fig.colorbar(sc, ax=axes, shrink=0.8, label="class" if classes is not None else f"position on MDS 1 of {reference}")
    return fig


def _tab20(k: int):
    from neuroguide.evaluation.plots import plt

    return plt.get_cmap("tab20")(k % 20)


def models_mds_figure(sim: np.ndarray, names: Sequence[str], title: str, kinds: Sequence[str] | None = None):
    """Second-order MDS: one labelled point per RDM (model or region), distance ``1 - similarity``;
    ``sim`` (R, R). ``kinds`` (e.g. "model" / "region" per name) colours the points, with a legend."""
    from neuroguide.evaluation.plots import plt

    d = torch.as_tensor(np.nan_to_num(1.0 - sim, nan=1.0))
    d = (d + d.T) / 2
    d.fill_diagonal_(0)
    xy = classical_mds(d.clamp(min=0)).numpy()
    kinds = list(kinds) if kinds is not None else ["model"] * len(names)
    fig, ax = plt.subplots(figsize=(6.5, 5.5), layout="constrained")
    for k, kind in enumerate(dict.fromkeys(kinds)):
        sel = np.array([x == kind for x in kinds])
        ax.scatter(xy[sel, 0], xy[sel, 1], s=40, color=_tab20(2 * k), label=kind)
    for (x, y), name in zip(xy, names):
        ax.annotate(name, (x, y), fontsize=10, xytext=(4, 4), textcoords="offset points")
    ax.set_title(title, fontsize=12)
    ax.set_xlabel("MDS 1")
    ax.set_ylabel("MDS 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=9)
    return fig

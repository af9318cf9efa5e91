"""Shared helpers of the evaluation analyses: eps names for metric keys and labels, CSV tables,
and figures (matplotlib, Agg backend, PNG, written atomically)."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from neuroguide.attacks.eps import check_eps_units, linf_k, parse_eps, parse_eps_for  # noqa: E402
from neuroguide.utils.io import atomic_path  # noqa: E402


def check_eps_list(eps_list, name: str = "eps_list", norm: str | None = None, fix: str | None = None) -> list[float]:
    """The eps grid sorted ascending: a non-empty list of distinct finite eps > 0, or a ValueError naming ``name``,
    what was found and the fix.

    Items may be numbers or fractions such as ``"8/255"`` (Hydra reads ``[8/255,16/255]`` as strings);
    with ``norm="linf"`` each is snapped to the nearest k/255 within a tolerance
    (:func:`neuroguide.attacks.eps.snap_linf`), so ``0.0313725`` and ``8/255`` are the same eps (and given
    together, a duplicate). Every analysis computes on the returned, sorted grid, so ``[2, 0.5, 1]`` and
    ``[0.5, 1, 2]`` give the same results and "the largest eps" is the last one. Each eps's units are checked
    (:func:`neuroguide.attacks.eps.check_eps_units`: a Linf eps >= 1 is refused, a k/255 value as an L2 eps warned
    about; ``fix`` says how to make it Linf in that warning)."""
    if eps_list is None:
        raise ValueError(f"{name} is None: give a non-empty list of positive eps, e.g. {name}=[0.5, 1.0, 2.0]")
    if isinstance(eps_list, (int, float, str)):
        eps_list = [eps_list]
    vals = list(eps_list)
    if not vals:
        raise ValueError(f"{name} is empty: give at least one positive eps, e.g. {name}=[0.5, 1.0, 2.0] "
                         "(L2 in [0,1] pixel units, Linf as k/255)")
    out = []
    for v in vals:
        try:
            f = parse_eps_for(v, norm or "l2", name)
        except ValueError:
            raise ValueError(f"{name} holds {v!r}, which is not a number; expected positive numbers (L2, e.g. 1.0) "
                             "or fractions k/255 (Linf, e.g. 8/255)") from None
        if not math.isfinite(f) or f <= 0:
            raise ValueError(f"{name} holds {v!r}: every eps must be a finite number > 0 (found {vals}); "
                             "remove it (clean results are reported separately)")
        out.append(check_eps_units(f, norm or "l2", name, v, fix=fix, in_list=True))
    dup = sorted({f for f in out if out.count(f) > 1})
    if dup:
        snapped = " and snapped to k/255" if str(norm).lower() in ("linf", "fgsm", "inf") else ""
        raise ValueError(f"{name} holds the same eps more than once: {[v for v, f in zip(vals, out) if f in dup]} "
                         f"parse{snapped} to {dup} (found {vals}); give each eps once")
    return sorted(out)


def eps_tag(norm: str, eps: float) -> str:
    """Metric-key name of an eps: ``l2_1.0``, ``linf_2_255`` (k/255 when eps*255 is within
    :data:`neuroguide.attacks.eps.SNAP_TOL` of a whole number, so ``0.0313725`` is ``linf_8_255``)."""
    norm = norm.lower()
    eps = parse_eps(eps)
    if norm in ("linf", "fgsm"):
        k = linf_k(eps)
        if k is not None:
            return f"{norm}_{k}_255"
        return f"{norm}_{eps:g}"
    return f"{norm}_{float(eps)!r}" if len(repr(float(eps))) < 10 else f"{norm}_{eps:g}"


def eps_label(norm: str, eps: float) -> str:
    """Human label of an eps: ``1.0`` or ``2/255``."""
    tag = eps_tag(norm, eps)
    return tag.split("_", 1)[1].replace("_", "/")


def write_csv(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """Rows (dicts) as a CSV file, written atomically."""
    columns = list(columns or (list(rows[0]) if rows else []))
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: _cell(r.get(k)) for k in columns})
    return Path(path)


def _cell(v):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(float(v))  # numpy 2 writes np.float64 as "np.float64(...)"
    return v


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save ``fig`` as PNG (atomically) and close it."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def curve_figure(panels: Sequence[dict], path: str | os.PathLike, *, title: str | None = None,
                 logx: bool = False, logy: bool = False) -> Path:
    """One axis per panel; each panel ``{"title", "xlabel", "ylabel", "curves": [...], "hlines": [...]}``
    (``"integer_x": True`` puts ticks at whole numbers only, e.g. epochs).

    A curve is ``{"x", "y", "yerr" (optional, drawn as a band), "label", "style" (optional fmt)}``; an
    hline is ``{"y", "label"}`` (dashed grey).
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        bottom = None
        if logy:  # a band reaching below zero is drawn down to the axis floor: a decade under the lowest mean
            ys = [v for c in panel.get("curves", []) for v in np.asarray(c["y"], float) if np.isfinite(v) and v > 0]
            ys += [h["y"] for h in panel.get("hlines", []) if h["y"] > 0]
            bottom = min(ys) / 10 if ys else None
        for c in panel.get("curves", []):
            x, y = np.asarray(c["x"], float), np.asarray(c["y"], float)
            line = ax.plot(x, y, c.get("style", "o-"), label=c.get("label"))[0]
            if c.get("yerr") is not None:
                e = np.asarray(c["yerr"], float)
                lo = np.maximum(y - e, bottom) if bottom is not None else y - e
                ax.fill_between(x, lo, y + e, color=line.get_color(), alpha=0.2)
        if bottom is not None:
            ax.set_ylim(bottom=bottom)
        for h in panel.get("hlines", []):
            ax.axhline(h["y"], ls="--", color="grey", lw=1, label=h.get("label"))
        if panel.get("integer_x"):
            xs = [v for c in panel.get("curves", []) for v in np.asarray(c["x"], float)]
            if xs and min(xs) == max(xs):  # one point: a range of whole numbers around it
                ax.set_xlim(min(xs) - 1, max(xs) + 1)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.set_title(panel.get("title", ""))
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        if any(c.get("label") for c in panel.get("curves", [])) or panel.get("hlines"):
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def heatmap_figure(matrices: Sequence[tuple[str, np.ndarray]], row_names: Iterable[str], col_names: Iterable[str],
                   path: str | os.PathLike, **kwargs) -> Path:
    """:func:`heatmap` saved as a PNG at ``path``."""
    return save_figure(heatmap(matrices, row_names, col_names, **kwargs), path)


def heatmap(matrices: Sequence[tuple[str, np.ndarray]], row_names: Iterable[str], col_names: Iterable[str], *,
            xlabel: str = "target", ylabel: str = "source", cbar_label: str = "", title: str | None = None,
            vmin: float | None = None, vmax: float | None = None, max_annotated: int = 12):
    """Side-by-side heatmaps with one shared colour scale; ``matrices`` = [(title, (S, T) array)].

    ``vmin`` / ``vmax`` fix the colour range (give a measure's own range, e.g. [0, 1] for CKA, so small
    differences are not stretched over the whole scale); by default the finite data range. Values are
    written in the cells when a matrix has at most ``max_annotated`` rows and columns. Returns the Figure.
    """
    row_names, col_names = list(row_names), list(col_names)
    vals = np.concatenate([np.asarray(m, float).ravel() for _, m in matrices])
    finite = vals[np.isfinite(vals)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    vmin, vmax = (lo if vmin is None else vmin), (hi if vmax is None else vmax)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    n = len(matrices)
    panel_w = max(3.6, 0.9 * len(col_names) + 1.6)
    fig, axes = plt.subplots(1, n, figsize=(1.2 + panel_w * n, 2.0 + 0.7 * len(row_names)), squeeze=False)
    im = None
    for k, (ax, (name, m)) in enumerate(zip(axes[0], matrices)):
        m = np.asarray(m, float)
        im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap="viridis")
        ax.set_xticks(range(len(col_names)), col_names, rotation=45, ha="right")
        ax.set_yticks(range(len(row_names)), row_names if k == 0 else [])  # rows are shared: named once
        ax.set_xlabel(xlabel)
        if k == 0:
            ax.set_ylabel(ylabel)
        ax.set_title(name)
        if max(m.shape) <= max_annotated:
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    v = m[i, j]
                    colour = "black" if np.isfinite(v) and v > vmin + 0.6 * (vmax - vmin) else "white"
                    ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=8, color=colour)
    fig.colorbar(im, ax=list(axes[0]), label=cbar_label, shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def amplified(delta: np.ndarray) -> np.ndarray:
    """Perturbations (N, ...) made visible: ``0.5 + delta / (2 max|delta|)`` per image (grey = no change)."""
    delta = np.asarray(delta, float)
    m = np.maximum(np.abs(delta).reshape(len(delta), -1).max(1), 1e-12)
    return np.clip(0.5 + delta / (2 * m.reshape(-1, *([1] * (delta.ndim - 1)))), 0, 1)


def image_grid_figure(columns: Sequence[tuple[str, np.ndarray]], path: str | os.PathLike, *,
                      row_labels: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Images in a grid saved as a PNG: ``columns`` = [(title, (R, H, W, 3) or (R, 3, H, W) array in [0, 1])],
    one row per image (all columns hold R images); ``row_labels`` (R,) name the rows."""
    cols = []
    for name, a in columns:
        a = np.asarray(a, float)
        if a.ndim == 4 and a.shape[1] in (1, 3) and a.shape[-1] not in (1, 3):
            a = a.transpose(0, 2, 3, 1)
        cols.append((name, np.clip(a, 0, 1)))
    n_rows = len(cols[0][1]) if cols else 0
    if not cols or n_rows == 0 or any(len(a) != n_rows for _, a in cols):
        raise ValueError(f"image grid: expected columns of the same number (>= 1) of images, got "
                         f"{[(n, len(a)) for n, a in cols]}")
    fig, axes = plt.subplots(n_rows, len(cols), figsize=(1.7 * len(cols), 1.7 * n_rows + 0.4), squeeze=False)
    for j, (name, a) in enumerate(cols):
        for i in range(n_rows):
            ax = axes[i, j]
            img = a[i]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j == 0 and row_labels is not None:
                ax.set_ylabel(str(row_labels[i]), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)

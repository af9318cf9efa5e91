"""The shape-bias measure (model-vs-human ``ShapeBias.analysis``) and its table and figure.

    shape_bias = #shape decisions / (#shape decisions + #texture decisions)

over the cue-conflict images whose shape and texture categories differ.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger("neuroguide")


@dataclass
class ShapeBiasResult:
    """Shape bias of a set of decisions, overall and per shape category."""

    shape_bias: float
    n_shape: int
    n_texture: int
    n_other: int
    n_conflict: int  # images with shape != texture that entered the count
    n_same_dropped: int  # images with shape == texture, dropped
    per_category: list[dict] = field(default_factory=list)

    def metrics(self, prefix: str) -> dict:
        m = {prefix: self.shape_bias, f"{prefix}/n_shape_decisions": self.n_shape,
             f"{prefix}/n_texture_decisions": self.n_texture, f"{prefix}/n_images": self.n_conflict}
        for row in self.per_category:
            m[f"{prefix}/{row['category']}"] = row["shape_bias"]
        return m


def _ratio(a: int, b: int) -> float:
    return a / (a + b) if a + b else float("nan")


def shape_bias(shape: Sequence, texture: Sequence, decision: Sequence, categories: Sequence | None = None
               ) -> ShapeBiasResult:
    """Shape bias of decisions on cue-conflict images (labels of any hashable type).

    Args:
        shape, texture, decision: one entry per image: its shape category, texture category, and the
            category the model chose.
        categories: order of the per-category table (default: sorted shape categories).
    """
    shape, texture, decision = list(shape), list(texture), list(decision)
    if not (len(shape) == len(texture) == len(decision)):
        raise ValueError(f"shape ({len(shape)}), texture ({len(texture)}) and decision ({len(decision)}) must have one "
                         "entry per image")
    keep = [i for i in range(len(shape)) if shape[i] != texture[i]]
    if not keep:
        raise ValueError(f"none of the {len(shape)} images is a cue conflict (shape == texture for all): "
                         "shape bias is undefined")
    is_shape = {i: decision[i] == shape[i] for i in keep}
    is_texture = {i: decision[i] == texture[i] for i in keep}
    n_s, n_t = sum(is_shape.values()), sum(is_texture.values())
    cats = list(categories) if categories is not None else sorted({shape[i] for i in keep}, key=str)
    rows = []
    for c in cats:
        idx = [i for i in keep if shape[i] == c]
        cs, ct = sum(is_shape[i] for i in idx), sum(is_texture[i] for i in idx)
        rows.append({"category": c, "n_images": len(idx), "shape_decisions": cs, "texture_decisions": ct,
                     "other_decisions": len(idx) - cs - ct, "shape_bias": _ratio(cs, ct)})
    if n_s + n_t == 0:
        log.warning("shape bias: none of %d cue-conflict decisions matched the shape or the texture: undefined", len(keep))
    return ShapeBiasResult(_ratio(n_s, n_t), n_s, n_t, len(keep) - n_s - n_t, len(keep), len(shape) - len(keep), rows)


def shape_bias_figure(result: ShapeBiasResult, path: str | os.PathLike, title: str = "") -> Path:
    """Geirhos et al.'s plot: a marker per (shape) category at its shape bias, a line at the overall value."""
    from neuroguide.evaluation.plots import plt, save_figure

    rows = [r for r in result.per_category if r["n_images"]]
    fig, ax = plt.subplots(figsize=(4.6, 0.32 * max(len(rows), 4) + 1.4))
    ys = np.arange(len(rows))
    xs = [r["shape_bias"] for r in rows]
    ax.scatter(xs, ys, marker="D", color="tab:red", zorder=3)
    if math.isfinite(result.shape_bias):
        ax.axvline(result.shape_bias, color="tab:red", lw=1.5, label=f"mean {result.shape_bias:.2f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(ys, [str(r["category"]) for r in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of 'shape' decisions")
    top = ax.secondary_xaxis("top", functions=(lambda v: 1 - v, lambda v: 1 - v))
    top.set_xlabel("fraction of 'texture' decisions")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def _write(result: ShapeBiasResult, per_image: list[dict], out_dir: Path, stem: str, title: str) -> None:
    from neuroguide.evaluation.plots import write_csv

    cols = ["category", "n_images", "shape_decisions", "texture_decisions", "other_decisions", "shape_bias"]
    overall = {"category": "all", "n_images": result.n_conflict, "shape_decisions": result.n_shape,
               "texture_decisions": result.n_texture, "other_decisions": result.n_other, "shape_bias": result.shape_bias}
    write_csv(out_dir / f"{stem}.csv", result.per_category + [overall], cols)
    write_csv(out_dir / f"{stem}_decisions.csv", per_image, list(per_image[0]) if per_image else ["image"])
    shape_bias_figure(result, out_dir / f"{stem}.png", title)


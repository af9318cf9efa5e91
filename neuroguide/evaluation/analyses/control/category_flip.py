"""Category preference flip and super-stimuli within eps (Guo et al. 2022, Fig. 2C).

For a site (a unit of a layer, an IT site, or the mean response of a region) and class-labelled images:

1. clean responses ``r(x)`` of all labelled images; the preferred category ``A`` = the category with the highest
   mean response, the least preferred ``B`` = the lowest (categories with fewer than ``min_per_category`` images
   are left out);
2. images of ``B`` are perturbed upward (maximize ``r(x + d)``, ``||d|| <= eps``) at every eps of a grid
   (Guo et al.: L2, up to 10);
3. the flip eps is where the mean perturbed response of ``B``'s images reaches the mean clean response of ``A``
   (the red line of Fig. 2C): linear interpolation between the grid points that bracket it (with eps = 0 the clean
   mean), exact when the response grows linearly in eps; NaN with ``flip_reached = 0`` when not within the grid.
   The same per image (``flip_eps_median_image``: the median over the images, NaN images counted as above).
   A site without a preference (the most and least preferred means tie, or its clean responses do not spread, e.g.
   a dead unit) cannot flip: its flip quantities are NaN, not 0 (:attr:`FlipResult.can_flip`);
4. the super-stimulus curve: the mean perturbed response against eps relative to the best natural image (the
   highest clean response over all labelled images), in units of the sd of the clean responses; the first eps at
   which it passes the best natural image (``super_eps``) and the fraction of images past it at each eps.

For a linear site ``r = w . x`` away from the pixel bounds ``r(x + d*) = r(x) + eps ||w||_2`` (L2), so the flip
eps of image ``x`` is ``(mean_A - r(x)) / ||w||_2`` and that of the mean curve ``(mean_A - mean_B) / ||w||_2``
(tests/test_control.py).

The eps grid is sorted ascending (:func:`neuroguide.evaluation.plots.check_eps_list`), so the order in which it is
written changes nothing (tests/test_eps_grid.py).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from neuroguide.attacks import objectives, pgd_attack
from neuroguide.attacks.steps import get_step_class
from neuroguide.evaluation.analyses.control.region_control import responses
from neuroguide.models.features import device_of
from neuroguide.evaluation.responses import spread
from neuroguide.evaluation.plots import check_eps_list, curve_figure, write_csv

log = logging.getLogger("neuroguide")

KEY = "eval.control.category_flip"


def first_crossing(eps: Sequence[float], values: np.ndarray, level: float, start: float) -> float:
    """The smallest eps at which the piecewise-linear curve through ``(0, start)`` and ``(eps_i, values_i)`` (E,),
    taken in order of eps whatever the order given, reaches ``level`` (0 when ``start`` already does; NaN when no
    grid point does, or ``level`` is NaN)."""
    order = np.argsort(np.asarray(eps, float), kind="stable")
    xs = np.concatenate([[0.0], np.asarray(eps, float)[order]])
    ys = np.concatenate([[start], np.asarray(values, float)[order]])
    if ys[0] >= level:
        return 0.0
    for i in range(1, len(xs)):
        if ys[i] >= level:
            return float(xs[i - 1] + (level - ys[i - 1]) / (ys[i] - ys[i - 1]) * (xs[i] - xs[i - 1]))
    return math.nan


@dataclass
class FlipResult:
    """One site. C categories, M attacked images of the least preferred category, E radii.

    Attributes:
        eps: (E,) the radii, sorted ascending on construction (with the rows of ``perturbed``).
        category_means: (C,) mean clean response per category (NaN for categories left out).
        preferred, non_preferred: category indices A and B (equal when every category mean ties).
        clean: (M,) clean responses of the attacked images; perturbed: (E, M) after the upward attack.
        best_natural: highest clean response over all labelled images; sd: std of the clean responses (NaN when
            they do not spread, :func:`neuroguide.evaluation.responses.spread`).
    """

    site: str
    norm: str
    eps: list[float]
    category_means: np.ndarray
    preferred: int
    non_preferred: int
    clean: np.ndarray
    perturbed: np.ndarray
    best_natural: float
    sd: float

    def __post_init__(self):
        order = np.argsort(np.asarray(self.eps, float), kind="stable")
        self.eps = [float(self.eps[i]) for i in order]
        self.perturbed = np.asarray(self.perturbed, float)[order]

    @property
    def preferred_mean(self) -> float:
        return float(self.category_means[self.preferred])

    @property
    def has_spread(self) -> bool:
        """Whether the clean responses spread (sd finite and > 0): the super-stimulus quantities need it."""
        return bool(np.isfinite(self.sd) and self.sd > 0)

    @property
    def can_flip(self) -> bool:
        """Whether the site prefers a category: the preferred mean exceeds the non-preferred one and the responses
        spread. A site with tied category means or without spread (a dead unit) has nothing to flip to."""
        a, b = self.preferred_mean, float(self.category_means[self.non_preferred])
        return bool(self.has_spread and np.isfinite(a) and np.isfinite(b) and a > b)

    @property
    def curve(self) -> np.ndarray:
        """(E,) mean perturbed response of the non-preferred images."""
        return self.perturbed.mean(1)

    @property
    def flip_eps(self) -> float:
        """Where the mean curve reaches the preferred category's mean (NaN: not within the grid, or no preference)."""
        if not self.can_flip:
            return math.nan
        return first_crossing(self.eps, self.curve, self.preferred_mean, float(self.clean.mean()))

    @property
    def flip_eps_per_image(self) -> np.ndarray:
        """(M,) each image's own flip eps (NaN where not within the grid; all NaN without a preference)."""
        if not self.can_flip:
            return np.full(len(self.clean), math.nan)
        return np.array([first_crossing(self.eps, self.perturbed[:, i], self.preferred_mean, float(self.clean[i]))
                         for i in range(len(self.clean))])

    @property
    def super_eps(self) -> float:
        """Where the mean curve passes the best natural image (NaN: not within the grid, or no spread)."""
        if not self.has_spread:
            return math.nan
        return first_crossing(self.eps, self.curve, self.best_natural, float(self.clean.mean()))

    @property
    def relative_to_best_sd(self) -> np.ndarray:
        """(E,) ``(mean perturbed response - best natural) / sd`` (NaN without spread)."""
        return (self.curve - self.best_natural) / self.sd if self.has_spread else np.full(len(self.eps), math.nan)

    def summary(self) -> dict:
        per_image = self.flip_eps_per_image
        fe = self.flip_eps
        med = float(np.median(np.where(np.isnan(per_image), np.inf, per_image))) if len(per_image) else math.inf
        flip, spread_ok = self.can_flip, self.has_spread  # without: reached / fractions are undefined (NaN), not 0
        return {"flip_eps": fe, "flip_reached": float(np.isfinite(fe)) if flip else math.nan,
                "flip_eps_median_image": med if math.isfinite(med) else math.nan,  # NaN: half the images never flip
                "flip_fraction_images": float(np.isfinite(per_image).mean()) if flip else math.nan,
                "super_eps": self.super_eps,
                "super_reached": float(np.isfinite(self.super_eps)) if spread_ok else math.nan,
                "relative_to_best_sd": float(self.relative_to_best_sd[-1]),  # at the largest eps
                "super_fraction_images": float((self.perturbed[-1] > self.best_natural).mean()) if spread_ok
                else math.nan,
                "preferred": float(self.preferred), "non_preferred": float(self.non_preferred),
                "preferred_mean": self.preferred_mean, "non_preferred_mean": float(self.category_means[self.non_preferred]),
                "best_natural": self.best_natural, "sd": self.sd, "n_images": float(len(self.clean))}

    def rows(self) -> list[dict]:
        rel = self.relative_to_best_sd
        return [{"site": self.site, "norm": self.norm, "eps": e, "mean_response": float(self.curve[i]),
                 "relative_to_best_sd": float(rel[i]), "fraction_above_best": float((self.perturbed[i] > self.best_natural).mean()),
                 "preferred_mean": self.preferred_mean, "best_natural": self.best_natural,
                 "clean_non_preferred_mean": float(self.clean.mean())} for i, e in enumerate(self.eps)]


def category_preference(resp: torch.Tensor, labels: torch.Tensor, min_per_category: int = 2) -> tuple[np.ndarray, int, int]:
    """(C,) mean response per category (NaN below ``min_per_category`` images), the most and least preferred (the
    same index when every mean ties: the site has no preference, see :attr:`FlipResult.can_flip`)."""
    resp, labels = resp.double().cpu(), labels.long().cpu()
    C = int(labels.max()) + 1
    means = np.full(C, math.nan)
    for c in range(C):
        sel = labels == c
        if int(sel.sum()) >= min_per_category:
            means[c] = float(resp[sel].mean())
    if np.isfinite(means).sum() < 2:
        counts = torch.bincount(labels, minlength=C).tolist()
        raise ValueError(f"category flip needs at least 2 categories with >= {min_per_category} images each "
                         f"({KEY}.min_per_category); images per category: {counts}. Fix: use more labelled images "
                         f"({KEY}.n_category_images=null reads all of the held-out split)")
    return means, int(np.nanargmax(means)), int(np.nanargmin(means))


def _site_objective(site: int | None, direction: str = "up"):
    return objectives.MeanResponse(direction) if site is None else objectives.Unit(int(site), direction)


def _scalar(resp: torch.Tensor, site: int | None) -> torch.Tensor:
    return resp.mean(1) if site is None else resp[:, int(site)]


def category_flip(forward: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, site: int | None = None,
                  eps_list: Sequence = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0), norm: str = "l2",
                  n_images: int | None = 16, min_per_category: int = 2, steps: int = 20,
                  step_size: float | None = None, random_start: bool = False, restarts: int = 1, schedule: str = "pgd",
                  batch_size: int = 64, generator: torch.Generator | None = None, victim: nn.Module | None = None,
                  progress: bool = True) -> FlipResult:
    """The flip analysis for one site (module docstring).

    Args:
        forward: (B, 3, H, W) in [0, 1] -> (B, K) responses.
        images, labels: (N, 3, H, W) labelled images in [0, 1] and their (N,) class indices.
        site: a column of the response, or None for the mean over all columns (the region).
        n_images: at most this many images of the least preferred category are perturbed (None: all).
    """
    norm = get_step_class(norm).norm
    eps_list = check_eps_list(eps_list, f"{KEY}.eps_list", norm=norm)
    if labels is None or len(labels) != len(images):
        raise ValueError(f"category flip: expected one label per image, got {None if labels is None else len(labels)} "
                         f"labels for {len(images)} images")
    resp = responses(forward, images, batch_size)
    if site is not None and not 0 <= int(site) < resp.shape[1]:
        raise ValueError(f"{KEY}.units holds {site}, out of range: the response has {resp.shape[1]} columns")
    r = _scalar(resp, site)
    means, pref, nonpref = category_preference(r, labels, min_per_category)
    idx = torch.nonzero(labels.cpu() == nonpref).flatten()
    if n_images:
        idx = idx[:int(n_images)]
    x = images[idx].detach().float().cpu()
    device = device_of(forward)
    obj = _site_objective(site)
    perturbed = np.zeros((len(eps_list), len(x)))
    for e, eps in enumerate(tqdm(eps_list, desc="category flip", disable=not progress, leave=False)):
        adv = []
        for b in range(0, len(x), batch_size):
            res = pgd_attack(forward, x[b:b + batch_size].to(device), obj, eps=eps, norm=norm, steps=steps,
                             step_size=step_size, random_start=random_start, restarts=restarts, schedule=schedule,
                             victim=victim or forward, generator=generator)
            adv.append(res.x_adv.detach().float().cpu())
        perturbed[e] = _scalar(responses(forward, torch.cat(adv), batch_size), site).numpy()
    return FlipResult(site="mean" if site is None else str(int(site)), norm=norm, eps=eps_list, category_means=means,
                      preferred=pref, non_preferred=nonpref, clean=r[idx].numpy().astype(float), perturbed=perturbed,
                      best_natural=float(r.max()), sd=spread(r))


def evaluate(forward: nn.Module, images: torch.Tensor, labels: torch.Tensor, out_dir: str | os.PathLike, *,
             per_unit: bool = False, unit_names: Sequence | None = None, prefix: str = "eval/control/category_flip",
             victim=None, seed: int | None = 0, progress: bool = True, **params) -> dict:
    """:func:`category_flip` on the mean response (one site, ``mean``) or, with ``per_unit``, on each column of the
    response as its own site (named by ``unit_names``, e.g. the unit indices; default the column numbers), written to
    ``category_flip.csv`` and ``category_flip.png``. Keys ``{prefix}/<site>/<name>`` per site and, over sites,
    ``{prefix}/flip_eps`` (median over sites, a site that never flips counting as beyond every eps: NaN when half or
    more never flip), ``flip_eps_sd`` (over the sites that flipped), ``flip_reached`` (fraction of sites),
    ``relative_to_best_sd`` (at the largest eps, mean over sites whose responses spread), ``super_reached``,
    ``n_sites`` and ``n_sites_without_preference``. A site without a preference (tied category means or no spread,
    e.g. a dead unit at ``layer=avgpool``) cannot flip: it is logged by name and left out of ``flip_eps``,
    ``flip_eps_sd`` and ``flip_reached`` (NaN when no site has a preference)."""
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    if per_unit:
        k = responses(forward, images[:1]).shape[1]
        names = [str(n) for n in (unit_names if unit_names is not None else range(k))]
        sites = list(range(k))
    else:
        sites, names = [None], ["mean"]
    results = []
    for s, name in zip(tqdm(sites, desc="category flip sites", disable=not progress or len(sites) == 1, leave=False),
                       names):
        res = category_flip(forward, images, labels, site=s, generator=gen, victim=victim, progress=progress, **params)
        res.site = name
        results.append(res)
    metrics: dict = {}
    for res in results:
        for k, v in res.summary().items():
            metrics[f"{prefix}/{res.site}/{k}"] = float(v)
        if not res.can_flip:
            log.warning("category flip, site %s: no category preference (category means %s, sd %.4g over %d images): "
                        "it cannot flip; flip_eps = NaN, left out of the flip_eps and flip_reached over sites",
                        res.site, np.array2string(res.category_means, precision=4), res.sd, len(labels))
        elif not np.isfinite(res.flip_eps):
            log.warning("category flip, site %s: the perturbed non-preferred images (category %d) never reach the "
                        "preferred category's mean (%d, %.4g) within %s eps <= %g: flip_eps = NaN, flip_reached = 0",
                        res.site, res.non_preferred, res.preferred, res.preferred_mean, res.norm, res.eps[-1])
    flips = np.array([r.flip_eps for r in results if r.can_flip])
    ok = np.isfinite(flips)
    # median over sites, a site that never flips counting as beyond every eps (as per image): the mean over the sites
    # that flipped would be biased low whenever some do not
    med = float(np.median(np.where(ok, flips, np.inf))) if len(flips) else math.nan
    metrics[f"{prefix}/flip_eps"] = med if math.isfinite(med) else math.nan
    metrics[f"{prefix}/flip_eps_sd"] = float(flips[ok].std()) if ok.sum() > 1 else math.nan
    metrics[f"{prefix}/flip_reached"] = float(ok.mean()) if len(flips) else math.nan
    spreading = [r for r in results if r.has_spread]
    metrics[f"{prefix}/relative_to_best_sd"] = (float(np.mean([r.relative_to_best_sd[-1] for r in spreading]))
                                                if spreading else math.nan)
    metrics[f"{prefix}/super_reached"] = (float(np.mean([np.isfinite(r.super_eps) for r in spreading]))
                                          if spreading else math.nan)
    metrics[f"{prefix}/n_sites"] = float(len(results))
    metrics[f"{prefix}/n_sites_without_preference"] = float(len(results) - len(flips))
    out_dir = Path(out_dir)
    write_csv(out_dir / "category_flip.csv", [row for r in results for row in r.rows()])
    figure(results, out_dir / "category_flip.png")
    return metrics


def figure(results: Sequence[FlipResult], path: str | os.PathLike) -> Path:
    """Fig. 2C: the mean response of the perturbed non-preferred images against eps, relative to the best natural
    image (in sd), with the preferred category's mean (the flip level) and the non-preferred clean mean."""
    curves, hlines = [], [{"y": 0.0, "label": "best natural image"}]
    for r in results:
        sd = r.sd if r.sd > 0 else 1.0
        x = [0.0] + list(r.eps)
        y = [(float(r.clean.mean()) - r.best_natural) / sd] + list(r.relative_to_best_sd)
        err = [0.0] + [float(r.perturbed[i].std() / sd) for i in range(len(r.eps))]
        curves.append({"x": x, "y": y, "yerr": err, "label": f"site {r.site}: cat {r.non_preferred} perturbed up"})
        if len(results) == 1:  # the flip level, the red dashed line of Fig. 2C
            level = (r.preferred_mean - r.best_natural) / sd
            curves.append({"x": [0.0, r.eps[-1]], "y": [level, level], "style": "r--",
                           "label": f"preferred cat {r.preferred} mean"})
    title = "flip eps " + ", ".join("no preference" if not r.can_flip else "never" if not np.isfinite(r.flip_eps)
                                    else f"{r.flip_eps:.3g}" for r in results)
    return curve_figure([{"title": title, "xlabel": f"eps ({results[0].norm})",
                          "ylabel": "(response - best natural) / sd", "curves": curves, "hlines": hlines}], path,
                        title="category preference flip (Guo et al. Fig. 2C)")


__all__ = ["category_flip", "category_preference", "first_crossing", "FlipResult", "evaluate", "figure"]

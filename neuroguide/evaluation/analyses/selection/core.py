"""Choosing the base network of the IT model (Guo et al., Appendix 6.1, Fig. 6).

For every (adversarial training eps, layer) pair of a backbone, two criteria on the IT recordings:

A. **linear CKA** (Kornblith et al. 2019; :func:`neuroguide.evaluation.metrics.cka.linear_cka`) between the
   layer's flattened activations X (N, D) and the IT responses Y (N, sites);
B. **cross-validated linear predictivity**: ridge regression (unpenalized intercept) from X to each site,
   k-fold over images. In each training fold of n images, site k's penalty is the ``p = alpha * ||Xc||_F^2 /
   min(n, D)`` (Xc: the fold's centred X; alpha on a relative grid, default 10^-4 .. 10^4) with the lowest
   exact leave-one-out error ``mean_i (e_ik / (1 - h_i))^2`` (e: residuals of the fold's fit, h: diagonal of
   the hat matrix ``11^T/n + Xc (Xc^T Xc + p I)^-1 Xc^T``), i.e. the error of predicting each image from the
   fit on the fold's other n - 1 images, re-centred on them (:func:`ridge_loo`; one eigendecomposition per
   fold); the fold's test images are predicted by the fit on the whole fold at that penalty. The score is the
   per-site Pearson r of these out-of-fold predictions (median over sites, and divided by sqrt of the
   split-half reliability).

C. **transfer of layer-targeted perturbations to the brain** (with ``brain``, see
   :mod:`neuroguide.evaluation.analyses.selection.brain_transfer`): perturbations that maximally change the layer's
   representation are shown to the brain (a callable ``images -> (N, sites)``, e.g. a simulated brain), and
   the pair is scored by how much the sites move, ``mean |delta b_i| / sigma_i`` (column ``brain_change``).

The table (CSV) has one row per pair; the figure shows each criterion as a layer x eps heatmap
with the best pair marked by an asterisk.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from neuroguide.metrics import nan_pearson_r, nanmedian
from neuroguide.evaluation.metrics.cka import linear_cka
from neuroguide.models.features import activations
from neuroguide.models.ridge import ridge_loo_path

log = logging.getLogger("neuroguide")


def _folds(n: int, n_folds: int, seed: int) -> list[np.ndarray]:
    if n_folds < 2 or n < 2 * n_folds:
        raise ValueError(f"n_folds={n_folds} needs 2 <= n_folds <= N/2 images; N={n}")
    return np.array_split(np.random.default_rng(seed).permutation(n), n_folds)


class RidgeLOO(NamedTuple):
    """Leave-one-out ridge on one training set (:func:`ridge_loo`); A alphas, K sites, r = rank of the centred X."""

    loo: torch.Tensor  # (A, K) leave-one-out mean squared error of each site at each alpha
    penalty: torch.Tensor  # (A,) absolute penalties: alpha * ||X - mean||_F^2 / min(n, D)
    alpha: torch.Tensor  # (K,) chosen relative alpha of each site (lowest loo; ties: the smaller alpha)
    pred: torch.Tensor | None  # (N_test, K) predictions of x_test at each site's chosen alpha, or None


def _relative_alphas(alphas: Sequence[float] | None) -> torch.Tensor:
    rel = torch.tensor(list(alphas) if alphas is not None else np.logspace(-4, 4, 17), dtype=torch.float64)
    if rel.numel() == 0 or not bool(torch.isfinite(rel).all()) or float(rel.min()) <= 0:
        raise ValueError(f"ridge alphas={rel.tolist()}: expected a non-empty list of positive finite relative "
                         "penalties (at alpha=0 the leave-one-out error of D >= n features is 0/0)")
    return rel


def ridge_loo(x: torch.Tensor, y: torch.Tensor, alphas: Sequence[float] | None = None,
              x_test: torch.Tensor | None = None) -> RidgeLOO:
    """Exact leave-one-out error of ridge with an unpenalized intercept, x (n, D) -> y (n, K), for each alpha.

    The fit at absolute penalty ``p`` minimises ``||y - b0 - X w||^2 + p ||w||^2``; ``p = alpha * s`` with
    ``s = ||Xc||_F^2 / min(n, D)`` (the trace of the centred Gram matrix over min(n, D); Xc = X - its column
    means over these n rows), so one grid of relative ``alphas`` (default 10^-4 .. 10^4) fits layers of any
    scale. The errors, the choice and the fit are :func:`neuroguide.models.ridge.ridge_loo_path`'s (float64):
    ``mean_i (e_ik / (1 - h_i))^2`` with h the diagonal of the hat matrix ``11^T/n + Xc (Xc^T Xc + p I)^-1
    Xc^T``, the exact squared error of predicting row i from the fit on the other n - 1 rows (re-centred on
    them); as p -> 0 with D >= n - 1 it tends to the leave-one-out error of the minimum-norm interpolating fit.
    """
    x, y = x.double(), y.double()
    rel = _relative_alphas(alphas)
    n, d = x.shape
    penalty = rel * float((x - x.mean(0)).pow(2).sum()) / min(n, d)
    fit = ridge_loo_path(x, y, penalty)
    pred = None if x_test is None else fit.predict(x_test.double())
    return RidgeLOO(fit.loo, penalty, rel[fit.best], pred)


def ridge_cv_predictions(x: torch.Tensor, y: torch.Tensor, n_folds: int = 5, alphas: Sequence[float] | None = None,
                         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-fold ridge predictions of ``y`` (N, K) from ``x`` (N, D) with an unpenalized intercept.

    For each of ``n_folds`` random folds of the images, each site's relative alpha is the one with the lowest
    exact leave-one-out error on the training fold (:func:`ridge_loo`: penalty = alpha x the training fold's
    ``||Xc||_F^2 / min(n_train, D)``; default alphas 10^-4 .. 10^4), and the fold's images are predicted by the
    ridge fit on the whole training fold at that penalty. Returns (predictions (N, K), chosen relative alpha per
    fold and site (n_folds, K)).
    """
    rel = _relative_alphas(alphas)
    pred = torch.empty(y.shape, dtype=torch.float64)
    chosen = []
    for test in _folds(len(x), n_folds, seed):
        train = np.setdiff1d(np.arange(len(x)), test)
        fit = ridge_loo(x[train], y[train], rel.tolist(), x[test])
        pred[test] = fit.pred
        chosen.append(fit.alpha)
    return pred.float(), torch.stack(chosen).float()


def _fill_nan(y: torch.Tensor) -> torch.Tensor:
    """Missing (image, site) targets replaced by the site's mean (for CKA and the ridge fits only)."""
    m = torch.nanmean(y, 0)
    return torch.where(torch.isfinite(y), y, m.expand_as(y))


def selection_scores(networks: Mapping[float, tuple[nn.Module, nn.Module]], images,
                     responses: torch.Tensor, layers: Sequence[str], reliability: torch.Tensor | None = None,
                     n_folds: int = 5, alphas: Sequence[float] | None = None, pool: int | None = None,
                     batch_size: int = 64, seed: int = 0) -> list[dict]:
    """One row per (eps, layer): ``at_eps, layer, cka, r_median, r_mean`` (and ``r_corrected_median``).

    Args:
        networks: eps -> (network taking [0, 1] images, the module the layer names refer to).
        images: (N, 3, H, W) in [0, 1] (tensor or dataset); responses: (N, sites) mean responses
            (NaN = not recorded).
        reliability: (sites,) split-half reliability of ``responses`` for the corrected r.
    """
    y = responses.double()
    y_filled = _fill_nan(y)
    rows = []
    for eps, (network, root) in networks.items():
        acts = activations(network, images, layers, batch_size=batch_size, pool=pool, root=root, progress=True)
        for layer in layers:
            x = acts[layer]
            pred, _ = ridge_cv_predictions(x, y_filled, n_folds, alphas, seed)
            r = nan_pearson_r(pred.double(), y)
            row = {"at_eps": float(eps), "layer": layer, "dim": int(x.shape[1]), "cka": linear_cka(x, y_filled),
                   "r_median": float(nanmedian(r)), "r_mean": float(torch.nanmean(r))}
            if reliability is not None:
                rc = torch.where(reliability > 0, r / reliability.clamp_min(1e-12).sqrt(), torch.nan)
                row["r_corrected_median"] = float(nanmedian(rc))
            rows.append(row)
            log.info("selection eps=%s %s: CKA %.3f, median r %.3f", eps, layer, row["cka"], row["r_median"])
    return rows


def best_pair(rows: Sequence[dict], metric: str) -> tuple[float, str]:
    """(eps, layer) with the highest ``metric``."""
    ok = [r for r in rows if math.isfinite(r[metric])]
    if not ok:
        raise ValueError(f"no finite {metric} in the selection table")
    r = max(ok, key=lambda r: r[metric])
    return r["at_eps"], r["layer"]


FIGURE_METRICS = (("cka", "A. CKA to IT"), ("r_median", "B. CV predictivity (median r)"),
                  ("brain_change", "C. layer attacks on the brain (|db|/sigma)"))


def _add_criterion_c(rows: list[dict], networks, images, layers: Sequence[str], cfg: Mapping) -> bool:
    """Criterion C's ``brain_change`` (and ``brain_change_sd``, ``layer_change``) added to each row, from a brain
    callable (``brain``) or a lab's recordings (``brain_recordings`` of the ``brain_stimuli`` file); with
    ``brain_stimuli`` alone, the stimuli file is written for the lab. Returns whether the column was added."""
    from neuroguide.data.hdf5_images import as_8bit
    from neuroguide.evaluation.analyses.selection import lab
    from neuroguide.evaluation.analyses.selection.brain_transfer import (brain_change_rows, brain_responses, layer_perturbations,
                                                          make_brain, site_sigma)

    stimuli, recordings = cfg.get("brain_stimuli"), cfg.get("brain_recordings")
    if cfg.get("brain") is None and not stimuli and not recordings:
        log.info("selection: no brain given (selection.brain=null, no brain_stimuli / brain_recordings): criterion C "
                 "(transfer of layer-targeted perturbations to the brain) is not computed")
        return False
    budget = {"eps": float(cfg.get("brain_eps", 1.0)), "norm": str(cfg.get("brain_norm", "l2")),
              "steps": int(cfg.get("brain_steps", 32)), "restarts": int(cfg.get("brain_restarts", 1)),
              "n_images": int(cfg.get("brain_n_images") or 64), "image_size": int(cfg.get("image_size", 224)),
              "seed": int(cfg.get("seed", 0))}
    candidates = [(float(e), layer) for e in networks for layer in layers]
    batch = int(cfg.get("batch_size", 64))
    if recordings:
        if not stimuli:
            raise ValueError("selection.brain_recordings needs selection.brain_stimuli: the stimuli file the lab "
                             "recorded (written by a run with brain_stimuli=<file> and no recordings)")
        clean, adv, change = lab.read_brain_recordings(stimuli, recordings, candidates, budget)
        c_rows = brain_change_rows(clean, adv, site_sigma(clean, "selection.brain_recordings"), change)
    else:
        pick = np.unique(np.linspace(0, len(images) - 1, min(budget["n_images"], len(images))).round().astype(int))
        x = as_8bit(torch.stack([images[int(i)] for i in pick]))  # the clean images as shown (8-bit)
        perturbed = layer_perturbations(networks, x, layers, eps=budget["eps"], norm=budget["norm"],
                                        steps=budget["steps"], restarts=budget["restarts"], batch_size=batch,
                                        seed=budget["seed"])
        if cfg.get("brain") is None:
            lab.write_brain_stimuli(stimuli, x, perturbed, budget)
            return False
        brain = make_brain(cfg["brain"], cfg.get("brain_repeats"))
        sigma = site_sigma(brain_responses(brain, images, batch))  # over all selection images
        adv = {k: brain_responses(brain, xa, batch) for k, (xa, _) in perturbed.items()}
        c_rows = brain_change_rows(brain_responses(brain, x, batch), adv, sigma,
                                   {k: c for k, (_, c) in perturbed.items()})
    by_pair = {(r["at_eps"], r["layer"]): r for r in c_rows}
    for r in rows:
        c = by_pair[(r["at_eps"], r["layer"])]
        r.update(brain_change=c["brain_change"], brain_change_sd=c["brain_change_sd"], layer_change=c["layer_change"])
    return True


def selection_figure(rows: Sequence[dict], path: str | os.PathLike,
                     metrics: Sequence[tuple[str, str]] = FIGURE_METRICS[:2]) -> Path:
    """Layer (rows) x eps (columns) heatmap per metric, best pair marked with a black asterisk (Fig. 6)."""
    from neuroguide.evaluation.plots import plt, save_figure

    eps = sorted({r["at_eps"] for r in rows})
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(1.5 + 2.6 * len(metrics) + 0.5 * len(eps) * len(metrics),
                                                       1.2 + 0.45 * len(layers)), squeeze=False)
    for ax, (metric, title) in zip(axes[0], metrics):
        m = np.full((len(layers), len(eps)), np.nan)
        for r in rows:
            m[layers.index(r["layer"]), eps.index(r["at_eps"])] = r[metric]
        im = ax.imshow(m, cmap="viridis", aspect="auto")
        be, bl = best_pair(rows, metric)
        ax.text(eps.index(be), layers.index(bl), "*", ha="center", va="center", fontsize=22, color="black",
                fontweight="bold")
        ax.set_xticks(range(len(eps)), [f"{e:g}" for e in eps])
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("adversarial training eps")
        ax.set_ylabel("layer")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return save_figure(fig, path)


def run_selection(config: Mapping) -> dict:
    """The whole sweep from a plain config; writes ``selection.csv`` and ``selection.png`` in ``out_dir``.

    Keys: ``it_file``; ``out_dir``; ``backbone`` (default resnet50); ``eps`` (list, default the keys of
    ``robust_weights``); ``layers`` (names in the backbone); ``robust_weights`` ({eps: path or null},
    null = random init, allowed for eps 0 only); ``image_size`` (224); ``n_folds`` (5); ``pool``
    (null); ``max_images`` (null = all); ``batch_size`` (64); ``seed`` (0). Criterion C: ``brain`` (null: not
    computed; a callable, or a mapping with ``_target_`` instantiated by Hydra, e.g. a simulated brain),
    ``brain_repeats`` (null: the brain's noise-free call; n: its ``record(images, n)``, repeat-averaged),
    ``brain_eps`` (1.0), ``brain_norm`` (l2), ``brain_steps`` (32), ``brain_restarts`` (1), ``brain_n_images``
    (64 perturbed images spread over the selection images; the sites' sigma is over all of them); for a lab,
    ``brain_stimuli`` (a file to write the clean and perturbed images to, for recording) and ``brain_recordings``
    (the lab's IT file of their recordings, scored against ``brain_stimuli``; :mod:`selection_lab`). Returns
    ``{"rows", "best": {metric: (eps, layer)}, "csv", "png"}``.
    """
    from neuroguide.data.it import ITImages, read_it, split_half_reliability
    from neuroguide.evaluation.plots import write_csv
    from neuroguide.models.backbones import build_network, layer_root
    from neuroguide.models.robust_weights import load_robust_weights, robust_weights_path

    cfg = dict(config)
    for key in ("it_file", "out_dir", "layers"):
        if cfg.get(key) in (None, [], ""):
            raise ValueError(f"selection config needs {key!r} (found {cfg.get(key)!r}); keys: it_file, out_dir, "
                             "backbone, eps, layers, robust_weights, image_size, n_folds, pool")
    table = {float(k): v for k, v in dict(cfg.get("robust_weights") or {}).items()}
    eps_list = [float(e) for e in (cfg.get("eps") or sorted(table))]
    if not eps_list:
        raise ValueError("selection config: give eps=[...] or robust_weights={eps: path}")
    rec = read_it(cfg["it_file"])
    rows_idx = np.arange(rec.n_images)
    if cfg.get("max_images"):
        perm = np.random.default_rng(int(cfg.get("seed", 0))).permutation(rec.n_images)
        rows_idx = np.sort(perm[:int(cfg["max_images"])])
    images = ITImages(rec.path, rows_idx, int(cfg.get("image_size", 224)))  # read batch by batch
    responses = torch.from_numpy(rec.mean_response(rows_idx))
    reliability = torch.from_numpy(split_half_reliability(rec.responses[rows_idx], seed=int(cfg.get("seed", 0))))

    name = cfg.get("backbone", "resnet50")
    networks = {}
    for eps in eps_list:
        net = build_network(name)
        path = table.get(eps)
        if path is None and eps != 0:
            robust_weights_path(eps, table, key="robust_weights")  # raises: names the key and the fix
        if path is not None:
            load_robust_weights(layer_root(net), robust_weights_path(eps, table, key="robust_weights"))
        else:
            log.warning("selection: eps=0 has no checkpoint, using a randomly initialised %s", name)
        networks[eps] = (net, layer_root(net))
    rows = selection_scores(networks, images, responses, list(cfg["layers"]), reliability,
                            n_folds=int(cfg.get("n_folds", 5)), pool=cfg.get("pool"),
                            batch_size=int(cfg.get("batch_size", 64)), seed=int(cfg.get("seed", 0)))
    metrics = list(FIGURE_METRICS[:2])
    if _add_criterion_c(rows, networks, images, list(cfg["layers"]), cfg):
        metrics.append(FIGURE_METRICS[2])
    out = Path(cfg["out_dir"])
    csv_path = write_csv(out / "selection.csv", rows)
    png = selection_figure(rows, out / "selection.png", metrics)
    best = {m: best_pair(rows, m) for m, _ in metrics}
    log.info("selection: best (eps, layer) %s", best)
    return {"rows": rows, "best": best, "csv": csv_path, "png": png}

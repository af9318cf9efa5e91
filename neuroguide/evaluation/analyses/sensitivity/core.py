"""Unit adversarial sensitivity (Guo et al. 2022, eqs. 1-3) on any named layer of any model.

For unit ``i`` (a penultimate feature, a neural-head unit, a predictor voxel, an IT site) with
response ``h_i``:

    s_i(x, eps) = max_{||d|| <= eps} |h_i(x) - h_i(x + d)|          (image-specific, eq. 1 / 3)
    s_i(eps)    = E_x s_i(x, eps)                                    (eq. 2)
    s~_i(eps)   = s_i(eps) / sigma_i,   sigma_i = std_x h_i(x) over many clean images

``sigma_i`` is the unit's dynamic range over a separate, larger set of clean images (the paper's "many
different clean images"; :func:`evaluate` via ``evaluate.py`` uses all held-out stimuli of the model), not
the std over the few attacked images: over 8 images that std is a noisy estimate whose errors do not
cancel in the ratio (``E[1 / sigma_hat] > 1 / sigma``), so ``s~`` comes out inflated. A warning names the
numbers when fewer than ``SIGMA_IMAGES_PER_ATTACKED`` (10) times the attacked images are used.

The layer: Guo et al. measure the units of the penultimate layer (the average pool of a ResNet), so
``layer="auto"`` means the kind's ``sensitivity_units`` (:mod:`neuroguide.tasks.kinds`): ``avgpool`` (the penultimate features)
for a classifier (task ``guidance``), the region response (voxels, IT sites) for a predictor, encoding or IT model
(:func:`auto_layer`); ``region``, ``penultimate``, ``output`` or a layer name choose explicitly.

The two directions ``max h_i(x + d) - h_i(x)`` ("up") and ``max h_i(x) - h_i(x + d)`` ("down") are
solved separately and the larger is kept (sec. 3.2); each with ``restarts`` random starts and the
Guo schedule (or plain PGD) of :mod:`neuroguide.attacks.pgd`. The paper's budget is 250 steps x best of
100 restarts (``experiment=guo2022_sensitivity``); the default 128 steps x 1 restart found 97-98% of its
sensitivity with 1/195 of the gradient evaluations (``benchmarks/sensitivity_budget.py``). Units,
directions, eps, images and restarts are all stacked along the batch axis: each row's objective is its own
unit, so one backward pass serves many units.

Measured responses with repeats (e.g. recorded IT sites, or a simulated noisy neuron) use the
paper's sign-corrected, negatively biased estimator (sec. 3.1)::

    E_j |r_i(x_j) - r_i(x_j + d_ij)|  >=  1/M sum_j sign(f_i(x_j) - f_i(x_j + d_ij)) (r_i(x_j) - r_i(x_j + d_ij))

with ``f_i`` the model the perturbations were made on and ``r_i`` the repeat-averaged measurement.
The plain mean of ``|r(x) - r(x + d)|`` is biased upwards by measurement noise.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from neuroguide.attacks import objectives, pgd_attack
from neuroguide.attacks.objectives import direction_sign
from neuroguide.evaluation.metrics.estimators import naive_sensitivity, repeat_mean, sign_corrected_sensitivity
from neuroguide.evaluation.responses import kind_of, resolve_layer
from neuroguide.evaluation.plots import check_eps_list, curve_figure, eps_tag, write_csv
from neuroguide.evaluation.metrics.statistics import sd
from neuroguide.models.features import LayerOutput, device_of, evaluation_mode

Measure = Callable[[torch.Tensor], torch.Tensor]

SIGMA_IMAGES_PER_ATTACKED = 10  # sigma_i from at least this many times the attacked images, or a warning


# ----------------------------------------------------------------------------- result
@dataclass
class SensitivityResult:
    """Per-unit sensitivities. E eps values, U units, D directions, N images.

    Attributes:
        change: (E, U, D, N) best response change ``max_d sign * (h_i(x + d) - h_i(x))`` per direction
            (>= 0: ``d = 0`` is feasible).
        clean: (N, U) clean responses ``h_i(x)`` of the attacked images.
        sigma: (U,) ``sigma_i``, the std of ``h_i`` over the ``n_sigma`` clean images of ``sigma_images``
            (or over the attacked images when none were given), or the ``sigma`` passed in.
        n_sigma: how many clean images ``sigma`` is the std over (None when ``sigma`` was passed in).
        measured: with measured responses, ``{"delta_f", "delta_r"}`` (E, U, N) model and measured
            changes along the chosen direction, ``"clean"`` (N, U) repeat means, ``"sigma"`` (U,) the std
            of the measured repeat means over the same clean images as ``sigma``.
    """

    layer: str | None
    norm: str
    schedule: str
    eps: torch.Tensor
    units: torch.Tensor
    directions: tuple[str, ...]
    change: torch.Tensor
    clean: torch.Tensor
    sigma: torch.Tensor
    grad_evals: int
    measured: dict | None = field(default=None)
    n_sigma: int | None = None

    @property
    def n_images(self) -> int:
        """Attacked images N."""
        return int(self.change.shape[-1])

    @property
    def per_image(self) -> torch.Tensor:
        """(E, U, N) ``s_i(x, eps)``: the larger of the two directions."""
        return self.change.amax(dim=2)

    @property
    def s(self) -> torch.Tensor:
        """(E, U) ``s_i(eps) = E_x s_i(x, eps)``."""
        return self.per_image.mean(dim=-1)

    @property
    def s_norm(self) -> torch.Tensor:
        """(E, U) ``s~_i(eps) = s_i(eps) / sigma_i`` (NaN for a unit with sigma_i = 0)."""
        return torch.where(self.sigma > 0, self.s / self.sigma, torch.full_like(self.s, math.nan))

    @property
    def s_measured(self) -> torch.Tensor | None:
        """(E, U) sign-corrected estimate from measured responses (None without them)."""
        if self.measured is None:
            return None
        return (torch.sign(self.measured["delta_f"]) * self.measured["delta_r"]).nanmean(dim=-1)

    @property
    def s_measured_naive(self) -> torch.Tensor | None:
        """(E, U) plain ``mean |delta r|`` (positively biased by noise; for comparison)."""
        return None if self.measured is None else self.measured["delta_r"].abs().nanmean(dim=-1)

    def rows(self) -> list[dict]:
        """One row per (eps, unit): eps, unit, sigma, s, s_norm, the numbers of attacked images and of the
        clean images sigma came from (empty when sigma was given), and s per direction (+ measured)."""
        out = []
        per_dir = self.change.mean(dim=-1)  # (E, U, D)
        for e, eps in enumerate(self.eps.tolist()):
            for u, unit in enumerate(self.units.tolist()):
                row = {"layer": self.layer or "output", "norm": self.norm, "schedule": self.schedule, "eps": eps,
                       "unit": unit, "sigma": float(self.sigma[u]), "s": float(self.s[e, u]),
                       "s_norm": float(self.s_norm[e, u]), "n_images": self.n_images,
                       "n_sigma_images": self.n_sigma if self.n_sigma is not None else ""}
                for d, name in enumerate(self.directions):
                    row[f"s_{name}"] = float(per_dir[e, u, d])
                if self.measured is not None:
                    sm = float(self.s_measured[e, u])
                    row.update(s_measured=sm, s_measured_naive=float(self.s_measured_naive[e, u]),
                               sigma_measured=float(self.measured["sigma"][u]),
                               s_measured_norm=sm / float(self.measured["sigma"][u]))
                out.append(row)
        return out

    def summary(self) -> list[dict]:
        """One row per eps: mean and sd across units of ``s`` and ``s~`` (the curve of Fig. 1)."""
        out = []
        for e, eps in enumerate(self.eps.tolist()):
            ok = self.sigma > 0  # a unit silent on every clean image has no dynamic range to normalize by
            row = {"eps": eps, "mean": float(self.s[e].mean()), "sd": sd(self.s[e]),
                   "mean_norm": float(self.s_norm[e][ok].mean()) if ok.any() else math.nan,
                   "sd_norm": sd(self.s_norm[e][ok]), "n_units": int(ok.sum())}
            if self.measured is not None:
                sm = self.s_measured[e] / self.measured["sigma"]
                row.update(mean_norm_measured=float(sm.nanmean()), sd_norm_measured=sd(sm))
            out.append(row)
        return out

    def to_dataframe(self):
        """The per-unit table as a pandas DataFrame (pandas imported on demand)."""
        import pandas as pd

        return pd.DataFrame(self.rows())

    def write_csv(self, path: str | os.PathLike) -> Path:
        rows = self.rows()
        return write_csv(path, rows, list(rows[0]))


# ----------------------------------------------------------------------------- the analysis
def _pick_units(units, k: int) -> torch.Tensor:
    if units is None:
        return torch.arange(k)
    if isinstance(units, int):
        if units < 1:
            raise ValueError(f"units={units}: give a number of units >= 1, a list of unit indices, or None for all")
        if units >= k:
            return torch.arange(k)
        g = torch.Generator().manual_seed(0)
        return torch.randperm(k, generator=g)[:units].sort().values
    idx = torch.as_tensor(list(units) if not isinstance(units, torch.Tensor) else units).long().flatten()
    if idx.numel() == 0:
        raise ValueError("units is empty: give unit indices, a number of units, or None for all")
    bad = idx[(idx < 0) | (idx >= k)]
    if bad.numel():
        raise ValueError(f"units {bad.tolist()} are out of range: the layer has {k} units (valid 0..{k - 1})")
    return idx


@torch.no_grad()
def _responses(forward: nn.Module, images: torch.Tensor, batch_size: int, device,
               units: torch.Tensor | None = None) -> torch.Tensor:
    """(N, K) responses (or (N, U) of ``units``), ``batch_size`` images per forward pass."""
    out = []
    for i in range(0, len(images), batch_size):
        h = forward(images[i:i + batch_size].to(device).float()).float()
        out.append((h if units is None else h[:, units.to(h.device)]).cpu())
    return torch.cat(out)


def unit_sensitivity(model: nn.Module, images: torch.Tensor, layer: str | None, eps_list: Sequence[float], *,
                     units: int | Sequence[int] | None = None, norm: str = "l2", restarts: int = 1, steps: int = 128,
                     schedule: str = "guo", directions: Sequence[str] = ("up", "down"), batch_size: int = 128,
                     step_size: float | None = None, steps_per_phase: bool = False, sigma: torch.Tensor | None = None,
                     sigma_images: torch.Tensor | None = None, responses_with_repeats: Measure | None = None,
                     generator: torch.Generator | None = None, progress: bool = True) -> SensitivityResult:
    """``s_i(x, eps)`` for every (eps, unit, image), with both directions and restarts, in big batches.

    Args:
        model: takes (B, 3, H, W) in [0, 1].
        images: (N, 3, H, W) clean images in [0, 1].
        layer: a name of ``model.named_modules()`` (e.g. "avgpool", "neural_head", "readout"), or None
            for the model's output. Its output is flattened to (B, K) units.
        eps_list: radii (> 0) in [0, 1] pixel units (L2) or k/255 (Linf); computed (and returned) sorted.
        units: None (all K), a number n (n units drawn with a fixed seed), or a list of indices.
        norm, restarts, steps, schedule, step_size, steps_per_phase: passed to :func:`neuroguide.attacks.pgd_attack`
            (``steps_per_phase``: the Guo schedule's ``steps`` in each of its two phases, not split over them).
        directions: "up" and/or "down"; ``s`` keeps the larger.
        batch_size: rows per forward pass, counting restarts (jobs of ``batch_size // restarts``).
        sigma: (K,) or (U,) per-unit std to normalize with (overrides ``sigma_images``).
        sigma_images: (M, 3, H, W) clean images in [0, 1] whose response std is ``sigma_i``: a separate,
            larger set than ``images`` (e.g. all held-out stimuli; at least 10x ``images`` or a warning).
            Responses are computed in batches of ``batch_size`` (the images may stay on the CPU). Without
            it (and without ``sigma``), ``sigma_i`` falls back to the std over ``images``, with a warning.
        responses_with_repeats: a measurement ``images (B, 3, H, W) -> (B, K, R)`` responses with
            repeats (NaN = missing) of the same K units, e.g. recorded or simulated neurons; when given,
            ``result.s_measured`` holds the sign-corrected estimate on it.
    Returns:
        :class:`SensitivityResult`.
    """
    eps_vals = check_eps_list(eps_list, "eval.sensitivity.eps_list", norm)  # sorted, distinct
    forward = LayerOutput(model, layer)  # KeyError listing valid layer names for a bad one
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images: expected (N, 3, H, W) in [0, 1] with N >= 1, got {tuple(images.shape)}")
    if sigma_images is not None and (sigma_images.ndim != 4 or sigma_images.shape[1:] != images.shape[1:]):
        raise ValueError(f"sigma_images: expected (M, {', '.join(map(str, images.shape[1:]))}) clean images like "
                         f"images, got {tuple(sigma_images.shape)}")
    dirs = tuple(directions)
    if not dirs:
        raise ValueError("directions is empty: use ('up', 'down') (or one of them)")
    signs = torch.tensor([direction_sign(d) for d in dirs])
    device = device_of(model)
    images = images.detach().float().cpu()
    n = images.shape[0]

    with evaluation_mode(model):
        clean_all = _responses(forward, images, batch_size, device)  # (N, K)
    k = clean_all.shape[1]
    unit_idx = _pick_units(units, k)
    clean = clean_all[:, unit_idx]  # (N, U)
    n_sigma = None
    if sigma is not None:
        sig = torch.as_tensor(sigma, dtype=torch.float32).flatten().cpu()
        if sig.numel() == k:
            sig = sig[unit_idx]
        elif sig.numel() != len(unit_idx):
            raise ValueError(f"sigma has {sig.numel()} values; expected one per layer unit ({k}) or per chosen unit "
                             f"({len(unit_idx)})")
    else:
        if sigma_images is None:
            sig_clean = clean  # the attacked images themselves: a noisy sigma_i (see the module docstring)
        else:
            with evaluation_mode(model):
                sig_clean = _responses(forward, sigma_images, batch_size, device, unit_idx)  # (M, U)
        n_sigma = sig_clean.shape[0]
        if n_sigma < 2:
            raise ValueError(f"sigma_i is the std over clean images: got {n_sigma} image(s); give sigma_images with "
                             f"many clean images (or pass sigma=)")
        if n_sigma < SIGMA_IMAGES_PER_ATTACKED * n:
            what = "the attacked images themselves (no sigma_images given)" if sigma_images is None else \
                "sigma_images"
            warnings.warn(f"unit sensitivity: sigma_i is the std over {n_sigma} clean images from {what}, fewer than "
                          f"{SIGMA_IMAGES_PER_ATTACKED} x the {n} attacked images = {SIGMA_IMAGES_PER_ATTACKED * n}; "
                          f"a std over few images is noisy and inflates s/sigma on average. Give more clean images "
                          f"(evaluate.py: eval.sensitivity.n_sigma_images=null uses all held-out stimuli) or attack "
                          f"fewer (eval.sensitivity.n_images).", stacklevel=2)
        sig = sig_clean.double().std(dim=0).float()

    meas_clean = meas_sigma = None
    if responses_with_repeats is not None:
        def measured_means(x: torch.Tensor) -> torch.Tensor:  # (M, U) repeat means, batch by batch
            return torch.cat([repeat_mean(_measure(responses_with_repeats, x[j:j + batch_size].to(device), k))
                              for j in range(0, len(x), batch_size)])[:, unit_idx]

        meas_clean = measured_means(images)  # (N, U)
        meas_sigma = measured_means(sigma_images) if sigma_images is not None else meas_clean

    E, U, D = len(eps_vals), len(unit_idx), len(dirs)
    # every job is one (eps, unit, direction, image); flattened in that order
    grid = torch.stack(torch.meshgrid(torch.arange(E), torch.arange(U), torch.arange(D), torch.arange(n),
                                      indexing="ij"), dim=-1).reshape(-1, 4)
    eps_t = torch.tensor(eps_vals, dtype=torch.float32)
    change = torch.empty(len(grid))
    f_adv = torch.empty(len(grid))
    r_adv = torch.empty(len(grid)) if meas_clean is not None else None
    per_call = max(1, batch_size // restarts)
    evals = 0
    bar = tqdm(range(0, len(grid), per_call), desc=f"unit sensitivity ({layer or 'output'})", disable=not progress,
               leave=False)
    for start in bar:
        job = grid[start:start + per_call]
        e, u, d, i = job.unbind(1)
        x = images[i].to(device)
        obj = objectives.Unit(unit_idx[u].to(device), signs[d].to(device))
        res = pgd_attack(forward, x, obj, eps=eps_t[e].to(device), norm=norm, steps=steps, step_size=step_size,
                         random_start=True, restarts=restarts, schedule=schedule, steps_per_phase=steps_per_phase,
                         victim=model, generator=generator)
        evals += res.grad_evals
        value = res.value.float().cpu()  # sign * h_u(x_adv)
        f_adv[start:start + len(job)] = signs[d] * value
        change[start:start + len(job)] = (value - signs[d] * clean[i, u]).clamp(min=0)
        if r_adv is not None:
            r = repeat_mean(_measure(responses_with_repeats, res.x_adv.detach(), k))
            r_adv[start:start + len(job)] = r[torch.arange(len(job)), unit_idx[u]]
    change = change.reshape(E, U, D, n)

    measured = None
    if meas_clean is not None:
        best = change.argmax(dim=2, keepdim=True)  # the direction kept for s_i(x, eps)
        f_adv = f_adv.reshape(E, U, D, n).gather(2, best)[:, :, 0]
        r_adv = r_adv.reshape(E, U, D, n).gather(2, best)[:, :, 0]
        measured = {"delta_f": f_adv - clean.T[None], "delta_r": r_adv - meas_clean.T[None], "clean": meas_clean,
                    "sigma": sd(meas_sigma, 0)}
    return SensitivityResult(layer=layer, norm=norm, schedule=schedule, eps=eps_t, units=unit_idx, directions=dirs,
                             change=change, clean=clean, sigma=sig, grad_evals=evals, measured=measured,
                             n_sigma=n_sigma)


def _measure(measure: Measure, images: torch.Tensor, k: int) -> torch.Tensor:
    with torch.no_grad():
        r = torch.as_tensor(measure(images)).float().cpu()
    if r.ndim == 2:
        r = r[..., None]
    if r.ndim != 3 or r.shape[0] != images.shape[0] or r.shape[1] != k:
        raise ValueError(f"responses_with_repeats must map ({images.shape[0]}, 3, H, W) images to ({images.shape[0]}, "
                         f"{k}, R) responses (the same {k} units as the layer, R repeats); got {tuple(r.shape)}")
    return r


# ----------------------------------------------------------------------------- evaluate.py entry
def auto_layer(model: nn.Module) -> str | None:
    """The layer ``layer="auto"`` stands for: the kind's ``sensitivity_units`` (:mod:`neuroguide.tasks.kinds`):
    the penultimate features (``avgpool``) of a classifier (task ``guidance``), as in Guo et al. sec. 3.2; the region
    response (the output: voxels, IT sites, or whatever the model returns) for predictors, encoding and IT models and
    models without ``neuroguide_info``."""
    return resolve_layer(model, kind_of(model)[1].sensitivity_units, "eval.sensitivity.layer")


def evaluate(model: nn.Module, images: torch.Tensor, out_dir: str | os.PathLike, *, layer: str | None = "auto",
             eps_list: Sequence[float] = (0.25, 0.5, 1.0, 2.0), norm: str = "l2",
             units: int | Sequence[int] | None = 32,
             restarts: int = 1, steps: int = 128, schedule: str = "guo", directions: Sequence[str] = ("up", "down"),
             steps_per_phase: bool = False, batch_size: int = 128, sigma_images: torch.Tensor | None = None,
             responses_with_repeats: Measure | None = None,
             key_prefix: str = "eval/sensitivity", seed: int | None = 0, progress: bool = True) -> dict:
    """Run :func:`unit_sensitivity`; write ``sensitivity_<layer>.csv`` (per unit) and
    ``sensitivity_<layer>.png`` (mean +/- sd of ``s~`` across units against eps, like Fig. 1 of
    Guo et al.) into ``out_dir``.

    ``layer="auto"``: see :func:`auto_layer`; ``"region"``, ``"penultimate"``, ``"output"`` / None or a layer name
    (:func:`neuroguide.evaluation.responses.resolve_layer`). ``sigma_images``: the clean
    images ``sigma_i`` is the std over (see :func:`unit_sensitivity`; evaluate.py passes all held-out stimuli).

    Returns flat metrics: ``{key_prefix}/{norm}_{eps}/mean_norm``, ``.../sd_norm``, ``.../mean`` (absolute
    ``s``), with measured responses also ``.../mean_norm_measured``; ``{key_prefix}/n_units`` (units
    with sigma > 0, over which the normalized means are taken), ``{key_prefix}/n_images`` (attacked images)
    and ``{key_prefix}/n_sigma_images`` (clean images sigma came from). ``seed`` fixes the random starts.
    """
    layer = auto_layer(model) if layer == "auto" else resolve_layer(model, layer, "eval.sensitivity.layer")
    res = unit_sensitivity(model, images, layer, eps_list, units=units, norm=norm, restarts=restarts, steps=steps,
                           schedule=schedule, steps_per_phase=steps_per_phase, directions=directions,
                           batch_size=batch_size, sigma_images=sigma_images,
                           responses_with_repeats=responses_with_repeats, progress=progress,
                           generator=torch.Generator().manual_seed(seed) if seed is not None else None)
    out_dir = Path(out_dir)
    name = (layer or "output").replace("/", "_")
    res.write_csv(out_dir / f"sensitivity_{name}.csv")
    summary = res.summary()
    eps = [r["eps"] for r in summary]
    curves = [{"x": eps, "y": [r["mean_norm"] for r in summary], "yerr": [r["sd_norm"] for r in summary],
               "label": f"model units ({len(res.units)})"}]
    if res.measured is not None:
        curves.append({"x": eps, "y": [r["mean_norm_measured"] for r in summary],
                       "yerr": [r["sd_norm_measured"] for r in summary], "label": "measured (sign-corrected)",
                       "style": "s--"})
    curve_figure([{"title": f"{name}: unit adversarial sensitivity", "xlabel": f"{norm} eps",
                   "ylabel": "normalized sensitivity s/sigma", "curves": curves,
                   "hlines": [{"y": 1.0, "label": f"sigma ({res.n_sigma or 'given'} clean images)"}]}],
                 out_dir / f"sensitivity_{name}.png", logx=True, logy=True)
    metrics = {f"{key_prefix}/n_units": summary[0]["n_units"], f"{key_prefix}/n_images": res.n_images}
    if res.n_sigma is not None:
        metrics[f"{key_prefix}/n_sigma_images"] = res.n_sigma
    for r in summary:
        tag = eps_tag(norm, r["eps"])
        metrics[f"{key_prefix}/{tag}/mean_norm"] = r["mean_norm"]
        metrics[f"{key_prefix}/{tag}/sd_norm"] = r["sd_norm"]
        metrics[f"{key_prefix}/{tag}/mean"] = r["mean"]
        if "mean_norm_measured" in r:
            metrics[f"{key_prefix}/{tag}/mean_norm_measured"] = r["mean_norm_measured"]
    return metrics


__all__ = ["unit_sensitivity", "evaluate", "auto_layer", "SensitivityResult", "sign_corrected_sensitivity",
           "naive_sensitivity", "repeat_mean"]

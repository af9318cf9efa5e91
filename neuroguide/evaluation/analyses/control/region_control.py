"""Targeted control of a region's response (McNeal & Murty): drive it up or down within eps.

The controlled quantity is the mean response ``m(x) = 1/K sum_k r_k(x)`` of the model's region (its voxels,
IT sites, a guided classifier's neural head; :func:`neuroguide.evaluation.responses.response_function`), or
of chosen units (``units``), or of a layer's units (``layer=avgpool``). For each eps (L2 in [0, 1] pixel
units, Linf as k/255) and direction, the one attack engine maximizes

    up:     +m(x + d)                        (objectives.MeanResponse("up"))
    down:   -m(x + d)                        (objectives.MeanResponse("down"))
    target: -(m(x + d) - t)^2  (scalar t)    or  -1/K ||r(x + d) - t||^2  (a (K,) pattern t)   (MSEToTarget)

over ``||d|| <= eps``, ``x + d`` in [0, 1], and the achieved change is reported in units of the std of
``m`` over natural images (the model's held-out stimuli):

    change_sd(eps, up)   = mean_x (m(x + d) - m(x)) / sd_nat(m)
    change_sd(eps, down) = mean_x (m(x) - m(x + d)) / sd_nat(m)

For a linear region ``m = w . x`` away from the pixel bounds the optimum is ``d = eps w / ||w||_2`` (L2) or
``eps sign(w)`` (Linf), so the change is exactly ``eps ||w||_2`` or ``eps ||w||_1``; the default attack starts at
the image (no random start), where plain PGD reaches that optimum exactly (tests/test_control.py).

The category flip of Guo et al. Fig. 2C lives in :mod:`neuroguide.evaluation.analyses.control.category_flip`, the super-stimuli in
:mod:`neuroguide.evaluation.analyses.control.superstimuli`.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from neuroguide.attacks import objectives, pgd_attack
from neuroguide.attacks.steps import get_step_class
from neuroguide.evaluation.plots import (amplified, check_eps_list, curve_figure, eps_label, eps_tag,
                                         image_grid_figure, write_csv)
from neuroguide.evaluation.metrics import statistics
from neuroguide.evaluation.responses import response_function, spread
from neuroguide.evaluation.checks import safe_name
from neuroguide.models.features import OUTPUT, activations, device_of

log = logging.getLogger("neuroguide")

DIRECTIONS = ("up", "down", "target")
KEY = "eval.control"  # the config section, named in error messages


# ----------------------------------------------------------------------------- checks
def check_directions(directions, target=None, key: str = f"{KEY}.directions") -> list[str]:
    """The directions as a list of ``up`` / ``down`` / ``target``; ``target`` is added when a target is given."""
    if isinstance(directions, str):
        directions = [directions]
    dirs = [str(d).lower() for d in (directions or [])]
    unknown = [d for d in dirs if d not in DIRECTIONS]
    if unknown:
        raise ValueError(f"{key} holds {unknown}: expected a list of {list(DIRECTIONS)} (e.g. {key}=[up,down]); "
                         "'target' drives the response towards eval.control.target")
    if target is not None and "target" not in dirs:
        dirs.append("target")
    if "target" in dirs and target is None:
        raise ValueError(f"{key} asks for 'target' but eval.control.target is null: set a target value (a number for "
                         "the mean response, or a list with one value per response column), or drop 'target'")
    if not dirs:
        raise ValueError(f"{key} is empty: give at least one direction, e.g. {key}=[up,down]")
    return list(dict.fromkeys(dirs))


def check_target(target, n_columns: int, key: str = f"{KEY}.target") -> torch.Tensor | None:
    """``target`` as a float tensor of shape () (the mean response) or (K,) (one value per response column)."""
    if target is None:
        return None
    try:
        t = torch.as_tensor(target, dtype=torch.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected a number or a list of {n_columns} numbers, got {target!r}") from None
    if t.ndim == 1 and t.numel() == 1:
        t = t[0]
    if not (t.ndim == 0 or t.shape == (n_columns,)):
        raise ValueError(f"{key} has shape {tuple(t.shape)}, but the response has {n_columns} columns: expected a "
                         f"number (the mean response's target) or a list of {n_columns} values (one per column). "
                         "Fix the target, or pick the columns with eval.control.units")
    if not torch.isfinite(t).all():
        raise ValueError(f"{key} must be finite, got {target!r}")
    return t


def eps_lists(eps_l2, eps_linf, key: str = KEY) -> dict[str, list[float]]:
    """``{"l2": [...], "linf": [...]}`` from the two lists; an empty list (or None) skips its threat model, but not
    both (a ValueError naming the keys)."""
    skipped = [e is None or (not isinstance(e, (str, int, float)) and len(list(e)) == 0) for e in (eps_l2, eps_linf)]
    if all(skipped):
        raise ValueError(f"{key}.eps_l2 and {key}.eps_linf are both empty (got {eps_l2!r} and {eps_linf!r}): give at "
                         f"least one eps, e.g. {key}.eps_l2=[0.5,1.0] or {key}.eps_linf=[1/255,2/255]")
    out = {}
    if not skipped[0]:
        out["l2"] = check_eps_list(eps_l2, f"{key}.eps_l2", norm="l2")
    if not skipped[1]:
        out["linf"] = check_eps_list(eps_linf, f"{key}.eps_linf", norm="linf")
    return out


# ----------------------------------------------------------------------------- responses
class MeanOf(nn.Module):
    """``forward(x) -> inner(x).mean(1, keepdim=True)``: (B, K) -> (B, 1), the region's mean response."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).flatten(1).mean(dim=1, keepdim=True)


def responses(forward: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(N, K) float32 CPU responses of ``forward`` to ``images`` (N, 3, H, W), in eval mode (the one activation
    extractor, :func:`neuroguide.models.features.activations`)."""
    return activations(forward, images, [OUTPUT], batch_size=batch_size)[OUTPUT]


# ----------------------------------------------------------------------------- the attack
@dataclass
class ControlResult:
    """Region control at E radii of one norm, D directions, N images (K response columns).

    Attributes:
        clean: (N,) mean response ``m(x)`` of the attacked images.
        perturbed: (E, D, N) ``m(x + d)``.
        sd: std of ``m`` over ``n_sd_images`` natural images; ``nat_mean`` its mean there.
        target: the target (() or (K,)) or None; ``error_clean`` (N,) / ``error`` (E, N): distance to it in sd units
            (``|m - t| / sd``, or the RMS over columns of ``(r_k - t_k) / sd_k`` for a (K,) pattern).
        x_adv: {(eps index, direction): (n_show, C, H, W)} perturbed images kept for the figure.
    """

    norm: str
    eps: list[float]
    directions: list[str]
    clean: torch.Tensor
    perturbed: torch.Tensor
    sd: float
    nat_mean: float
    n_sd_images: int
    target: torch.Tensor | None = None
    error_clean: torch.Tensor | None = None
    error: torch.Tensor | None = None
    x_adv: dict | None = None

    def change(self) -> torch.Tensor:
        """(E, D, N) achieved change along each direction (``up``: m(x+d) - m(x); ``down``: m(x) - m(x+d);
        ``target`` with a scalar t: towards t, ``sign(t - m(x)) (m(x+d) - m(x))``; with a pattern: the change of m)."""
        delta = self.perturbed - self.clean
        signs = []
        for d in self.directions:
            if d == "target":
                s = torch.sign(self.target - self.clean) if self.target is not None and self.target.ndim == 0 \
                    else torch.ones_like(self.clean)
            else:
                s = torch.full_like(self.clean, objectives.direction_sign(d))
            signs.append(s)
        return delta * torch.stack(signs)[None]

    def change_sd(self) -> torch.Tensor:
        """(E, D) mean change over images in units of ``sd`` (NaN when sd is 0)."""
        c = self.change().mean(-1)
        return c / self.sd if self.sd > 0 else torch.full_like(c, math.nan)

    def rows(self) -> list[dict]:
        """One row per (eps, direction)."""
        c, csd = self.change(), self.change_sd()
        out = []
        for e, eps in enumerate(self.eps):
            for d, name in enumerate(self.directions):
                se = statistics.standard_error(c[e, d]) / self.sd if self.sd > 0 else math.nan  # NaN with 1 image
                row = {"norm": self.norm, "eps": eps, "direction": name, "change": float(c[e, d].mean()),
                       "change_sd": float(csd[e, d]), "change_sd_se": se,
                       "clean_mean": float(self.clean.mean()), "perturbed_mean": float(self.perturbed[e, d].mean()),
                       "sd": self.sd, "n_images": len(self.clean), "n_sd_images": self.n_sd_images}
                if name == "target" and self.error is not None:
                    row.update(error_sd=float(self.error[e].mean()), error_clean_sd=float(self.error_clean.mean()))
                out.append(row)
        return out


def _target_error(resp: torch.Tensor, target: torch.Tensor, sd: float, sd_cols: torch.Tensor) -> torch.Tensor:
    """(N,) distance of responses (N, K) to the target in sd units (see :class:`ControlResult`)."""
    if target.ndim == 0:
        return (resp.mean(1) - target).abs() / sd if sd > 0 else torch.full((len(resp),), math.nan)
    ok = sd_cols > 0
    return (((resp - target) / sd_cols.clamp_min(1e-12))[:, ok] ** 2).mean(1).sqrt()


def control_curve(forward: nn.Module, images: torch.Tensor, *, norm: str, eps_list: Sequence, sd_images: torch.Tensor,
                  directions: Sequence[str] = ("up", "down"), target=None, steps: int = 20,
                  step_size: float | None = None, random_start: bool = False, restarts: int = 1,
                  schedule: str = "pgd", batch_size: int = 64, n_show: int = 4, show_eps: float | None = None,
                  generator: torch.Generator | None = None, victim: nn.Module | None = None,
                  progress: bool = True) -> ControlResult:
    """Drive the mean response of ``forward`` up / down / towards ``target`` at each eps (module docstring).

    Args:
        forward: (B, 3, H, W) in [0, 1] -> (B, K) responses (``response_function``).
        images: (N, 3, H, W) images to perturb, in [0, 1].
        sd_images: (M, 3, H, W) natural images whose response spread ``sd`` normalizes the change.
        eps_list: radii of ``norm`` (Linf as k/255 or ``"k/255"``), attacked and reported sorted ascending.
        target: a number (the mean response's target) or (K,) (a response pattern), raw response units.
        steps, step_size, random_start, restarts, schedule: the attack (:func:`neuroguide.attacks.pgd_attack`).
        n_show: perturbed images kept for the figure (the first ``n_show``), at ``show_eps`` (default: the largest).
    """
    norm = get_step_class(norm).norm
    eps_list = check_eps_list(eps_list, f"{KEY}.eps_{norm}", norm=norm)
    directions = check_directions(directions, target)
    device = device_of(forward)
    images = images.detach().float().cpu()
    nat = responses(forward, sd_images, batch_size)
    sd_cols = statistics.sd(nat, dim=0)  # (K,), NaN with one image: no column is used then
    m_nat = nat.mean(1)
    sd = spread(m_nat)
    if not sd > 0:
        log.warning("control: the mean response has no spread over the %d natural images (sd %g): change_sd is NaN",
                    len(m_nat), sd)
    target = check_target(target, nat.shape[1])
    clean_resp = responses(forward, images, batch_size)
    show_e = len(eps_list) - 1 if show_eps is None else int(np.argmin([abs(e - show_eps) for e in eps_list]))
    perturbed = torch.zeros(len(eps_list), len(directions), len(images))
    err = torch.zeros(len(eps_list), len(images)) if target is not None else None
    kept = {}
    jobs = [(e, d) for e in range(len(eps_list)) for d in range(len(directions))]
    for e, d in tqdm(jobs, desc=f"control {norm}", disable=not progress, leave=False):
        name = directions[d]
        fwd, obj = forward, None
        if name == "target":
            fwd = MeanOf(forward) if target.ndim == 0 else forward
            obj = objectives.MSEToTarget(target.reshape(-1).to(device))
        else:
            obj = objectives.MeanResponse(name)
        x_adv = []
        for b in range(0, len(images), batch_size):
            x = images[b:b + batch_size].to(device)
            res = pgd_attack(fwd, x, obj, eps=eps_list[e], norm=norm, steps=steps, step_size=step_size,
                             random_start=random_start, restarts=restarts, schedule=schedule, victim=victim or forward,
                             generator=generator)
            x_adv.append(res.x_adv.detach().float().cpu())
        x_adv = torch.cat(x_adv)
        resp = responses(forward, x_adv, batch_size)
        perturbed[e, d] = resp.mean(1)
        if name == "target":
            err[e] = _target_error(resp, target, sd, sd_cols)
        if e == show_e:
            kept[(e, name)] = x_adv[:n_show]
    return ControlResult(norm=norm, eps=eps_list, directions=directions, clean=clean_resp.mean(1), perturbed=perturbed,
                         sd=sd, nat_mean=float(m_nat.mean()), n_sd_images=len(nat), target=target,
                         error_clean=_target_error(clean_resp, target, sd, sd_cols) if target is not None else None,
                         error=err, x_adv={"eps_index": show_e, "images": images[:n_show], **{k[1]: v for k, v in
                                                                                                 kept.items()}})


# ----------------------------------------------------------------------------- outputs
def metrics_of(results: Sequence[ControlResult], prefix: str = "eval/control") -> dict:
    """Flat keys ``{prefix}/{norm}_{eps}/{direction}/change_sd`` (+ ``change``, ``change_sd_se``; ``error_sd`` and
    ``error_clean_sd`` for the target), and ``{prefix}/sd``, ``{prefix}/clean_mean``, ``{prefix}/n_sd_images``."""
    out: dict = {}
    for res in results:
        for row in res.rows():
            base = f"{prefix}/{eps_tag(res.norm, row['eps'])}/{row['direction']}"
            for k in ("change_sd", "change", "change_sd_se", "error_sd", "error_clean_sd"):
                if k in row:
                    out[f"{base}/{k}"] = float(row[k])
    if results:
        r = results[0]
        out.update({f"{prefix}/sd": r.sd, f"{prefix}/nat_mean": r.nat_mean, f"{prefix}/clean_mean": float(r.clean.mean()),
                    f"{prefix}/n_sd_images": r.n_sd_images, f"{prefix}/n_images": len(r.clean)})
    return out


def curve_panels(results_by_model: Mapping[str, Sequence[ControlResult]]) -> list[dict]:
    """One panel per norm, one line per (model, direction): change_sd against eps with its standard error."""
    panels: dict[str, dict] = {}
    single = len(results_by_model) == 1
    for model, results in results_by_model.items():
        for res in results:
            p = panels.setdefault(res.norm, {"title": f"{res.norm} control", "ylabel": "achieved change / sd (natural)",
                                             "xlabel": "eps" + (" (x/255)" if res.norm == "linf" else " (L2, pixels)"),
                                             "curves": []})
            c = res.change()
            x = [e * 255 if res.norm == "linf" else e for e in res.eps]
            for d, name in enumerate(res.directions):
                se = [statistics.standard_error(c[e, d]) / res.sd if res.sd > 0 else math.nan for e in range(len(res.eps))]
                p["curves"].append({"x": x, "y": res.change_sd()[:, d].tolist(), "yerr": se,
                                    "label": name if single else f"{model} {name}"})
    return list(panels.values())


def image_grid(res: ControlResult, path: str | os.PathLike, title: str = "") -> Path | None:
    """Original, pushed up, pushed down (and towards the target), and each amplified perturbation, one row per image."""
    kept = res.x_adv or {}
    x0 = kept.get("images")
    if x0 is None or len(x0) == 0:
        return None
    cols = [("original", x0.numpy())]
    pushed = [d for d in res.directions if d in kept]
    names = {"up": "pushed up", "down": "pushed down", "target": "to target"}
    cols += [(names[d], kept[d].numpy()) for d in pushed]
    cols += [(f"{d} perturbation (ampl.)", amplified((kept[d] - x0).numpy())) for d in pushed]
    e = kept["eps_index"]
    labels = [f"m {float(res.clean[i]):.3g}\n" + " ".join(f"{d} {float(res.perturbed[e, res.directions.index(d), i]):.3g}"
                                                       for d in pushed) for i in range(len(x0))]
    e = res.eps[e]
    return image_grid_figure(cols, path, row_labels=labels,
                             title=f"{title}{res.norm} eps {eps_label(res.norm, e)}".strip())


def write_outputs(results_by_model: Mapping[str, Sequence[ControlResult]], out_dir: str | os.PathLike) -> None:
    """``control.csv`` (all rows), ``control_curve.png`` (one line per model and direction) and one image grid per
    model and norm (``control_images[_<model>]_<norm>.png``)."""
    out_dir = Path(out_dir)
    rows = [{"model": m, **row} for m, rs in results_by_model.items() for r in rs for row in r.rows()]
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    write_csv(out_dir / "control.csv", rows, cols)
    curve_figure(curve_panels(results_by_model), out_dir / "control_curve.png",
                 title="targeted control of the mean response")
    single = len(results_by_model) == 1
    for m, rs in results_by_model.items():
        for r in rs:
            stem = f"control_images_{r.norm}" if single else f"control_images_{safe_name(m)}_{r.norm}"
            image_grid(r, out_dir / f"{stem}.png", title="" if single else f"{m}: ")


def run_control(model: nn.Module, images: torch.Tensor, sd_images: torch.Tensor, *, layer="region", units=None,
                eps_l2=(0.25, 0.5, 1.0, 2.0), eps_linf=("1/255", "2/255", "4/255"), directions=("up", "down"),
                target=None, steps: int = 20, step_size: float | None = None, random_start: bool = False,
                restarts: int = 1, schedule: str = "pgd", batch_size: int = 64, n_show: int = 4, seed: int | None = 0,
                progress: bool = True) -> list[ControlResult]:
    """:func:`control_curve` for each norm on the region response of ``model`` (``layer``: "region" = the region,
    or a layer name; ``units``: columns of it). Raises a ValueError naming ``eval.control.layer`` for a classifier
    without a region response."""
    lists = eps_lists(eps_l2, eps_linf)
    directions = check_directions(directions, target)
    forward, _ = response_function(model, layer, units, key=f"{KEY}.layer")
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    return [control_curve(forward, images, norm=norm, eps_list=eps, sd_images=sd_images, directions=directions,
                          target=target, steps=steps, step_size=step_size, random_start=random_start,
                          restarts=restarts, schedule=schedule, batch_size=batch_size, n_show=n_show, generator=gen,
                          victim=model, progress=progress)
            for norm, eps in lists.items()]


__all__ = ["control_curve", "run_control", "ControlResult", "metrics_of", "write_outputs", "check_directions",
           "check_target", "eps_lists", "MeanOf", "responses"]

"""Transfer attacks: perturbations made on a source model, applied to a target model.

For every source ``s``, adversarial images ``x + d_s`` are made on ``s`` with the one engine
(:func:`neuroguide.attacks.pgd_attack`); every target ``t`` is then evaluated on them. The result is a
source x target matrix (McNeal & Murty; Guo et al.'s attack transfer), next to a control made of random
directions with the same per-image norm as ``d_s`` (L2 norm for L2 attacks, Linf norm for Linf attacks),
measured after clipping to [0, 1] (:func:`random_control`).

Classification (labels given): the attack maximizes the source's cross-entropy and the entry is the
target's accuracy drop ``acc_t(x) - acc_t(x + d_s)``.

Neural outputs (labels None): the attack moves the source's response away from its clean response
(``objective="change"``: maximize ``mean_k (f_s,k(x + d) - f_s,k(x))^2``) or pushes the region's mean
response ``"up"`` / ``"down"``, ``m_t(x) = mean_k f_t,k(x)`` (the mean over the target's outputs: for a
predictor, encoding or IT model its region response). Each entry comes in two units:

    change_t = 1/(N K) sum_{n,k} |f_t,k(x_n + d_n) - f_t,k(x_n)| / sigma_t,k      ("change")
    change_t = 1/N sum_n sign * (m_t(x_n + d_n) - m_t(x_n)) / sigma(m_t)           ("up" / "down")

with ``sigma`` the std over the N attacked clean images (keys ``change``, ``random_change``: every output
for "change"; a std over few images is noisy, so these are comparable within a matrix only), and

    region_change_sd_t = 1/N sum_n |m_t(x_n + d_n) - m_t(x_n)| / sd_t                ("change")
    region_change_sd_t = 1/N sum_n sign * (m_t(x_n + d_n) - m_t(x_n)) / sd_t         ("up" / "down")

with ``sd_t`` the std of ``m_t`` over the natural held-out images (``sigma_images``; evaluate.py: the model's
held-out split, ``eval.transfer.n_sigma_images``): the unit of effect-matched transfer and targeted control
(:mod:`neuroguide.evaluation.transfer_effect`, :mod:`neuroguide.evaluation.control`), keys
``region_change_sd``, ``random_region_change_sd``. NaN, with a warning, where ``sd_t`` is 0 or undefined.

All models must take the same input size (the perturbation lives in pixel space).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from neuroguide.attacks import objectives, pgd_attack
from neuroguide.attacks.objectives import direction_sign
from neuroguide.models.features import OUTPUT, activations, device_of
from neuroguide.attacks.steps import get_step_class, scale_in_box
from neuroguide.evaluation.plots import check_eps_list, eps_label, eps_tag, heatmap_figure, write_csv
from neuroguide.evaluation.checks import check_input_sizes, check_labels, safe_name
from neuroguide.evaluation.responses import spread

NEURAL_OBJECTIVES = ("change", "up", "down")
NORM_RTOL = 0.01  # the control's per-image norm counts as matched within 1% of the attack's

log = logging.getLogger("neuroguide")


def random_like(delta: torch.Tensor, norm: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random directions with the same per-row norm as ``delta`` (B, C, H, W), before any clipping.

    L2: a Gaussian direction scaled to ``||delta_b||_2``; Linf: random signs times ``||delta_b||_inf``.
    """
    get_step_class(norm)
    flat = delta.flatten(1)
    if norm.lower() == "linf":
        r = torch.randint(0, 2, delta.shape, generator=generator).to(delta) * 2 - 1
        return r * flat.abs().amax(1).reshape(-1, *([1] * (delta.ndim - 1)))
    g = torch.randn(delta.shape, generator=generator).to(delta)
    scale = flat.norm(dim=1) / g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g * scale.reshape(-1, *([1] * (delta.ndim - 1)))


def random_control(images: torch.Tensor, delta: torch.Tensor, norm: str,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Images ``x + r`` in [0, 1] with ``r`` a random direction whose norm *after* clipping equals the
    per-image norm of ``delta`` (the attack's perturbation, ``x + delta`` in [0, 1]).

    Clipping a random direction at pixels near 0 or 1 shortens it (to about 0.8 of the attack's L2 norm with
    60% of the pixels at 0 or 1), so the direction is rescaled after clipping: L2: ``r = clip(t g)`` with ``t``
    found per image (:func:`neuroguide.attacks.steps.scale_in_box`, Newton's method on the clipped norm);
    Linf: random signs times ``||delta||_inf``, whose clipped Linf norm is already ``||delta||_inf`` as
    soon as one pixel has room ``||delta||_inf`` in its drawn direction. Where no scale can reach the norm
    (too few pixels free to move), the control keeps the largest norm it can reach: compare the norms
    with :func:`perturbation_norms`.
    """
    key = get_step_class(norm).norm
    r = random_like(delta, key, generator)
    if key == "linf":
        return (images + r).clamp(0, 1)
    flat = r.flatten(1)
    x0 = images.flatten(1).to(flat.dtype)
    target = delta.flatten(1).norm(dim=1).to(flat.dtype)
    t0 = torch.ones_like(target)  # ||r|| = target, so ||clip(r)|| <= target
    d = scale_in_box(flat, -x0, 1 - x0, target, t0, t_max=1e6)
    return (x0 + d).clamp(0, 1).reshape(images.shape).to(images.dtype)


def perturbation_norms(x: torch.Tensor, images: torch.Tensor, norm: str) -> torch.Tensor:
    """(N,) per-image norm of ``x - images``: L2, or Linf for ``norm="linf"``."""
    return _norms(x - images, get_step_class(norm).norm)


def _norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm.lower() == "linf" else flat.norm(dim=1)


def _outputs(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, K) flattened float32 CPU outputs of ``model`` on ``images`` (N, 3, H, W)."""
    return activations(model, images, [OUTPUT], batch_size=batch_size)[OUTPUT]


def _score(out_clean: torch.Tensor, out_pert: torch.Tensor, labels: torch.Tensor | None, objective: str) -> float:
    """Accuracy drop (labels) or normalized response change of one target."""
    if labels is not None:
        return float((out_clean.argmax(1) == labels).double().mean() - (out_pert.argmax(1) == labels).double().mean())
    if objective == "change":
        sigma = out_clean.std(0)
        ok = sigma > 0
        return float(((out_pert - out_clean).abs()[:, ok] / sigma[ok]).mean())
    m0, m1 = out_clean.mean(1), out_pert.mean(1)
    sd = m0.std()
    return float(direction_sign(objective) * (m1 - m0).mean() / sd) if sd > 0 else float("nan")


@dataclass
class TransferResult:
    """Source x target matrices (S = T = the models, in the given order).

    Attributes:
        adversarial: (S, T) accuracy drop or response change of target t on source s's attacks.
        random: (S, T) the same for random directions of the same per-image norm.
        delta_norm, random_norm: (S,) mean per-image norm of the attack and control perturbations
            (after [0, 1] clipping).
        random_norm_matched: (S,) fraction of images whose control reaches the attack's norm within 1%
            (1.0 unless too few pixels are free to move; see :func:`random_control`).
        metric: "acc_drop" or "change".
        region_change, random_region_change: (S, T) neural outputs only: the change of target t's mean output
            in its held-out sd (``region_change_sd`` in the module docstring); None for classification.
        region_sd: (T,) that sd of each model's mean output over the natural images (None for classification).
        n_sigma: how many natural images ``region_sd`` is the std over.
    """

    names: list[str]
    eps: float
    norm: str
    metric: str
    adversarial: np.ndarray
    random: np.ndarray
    delta_norm: np.ndarray
    random_norm: np.ndarray
    clean_acc: np.ndarray | None = None
    random_norm_matched: np.ndarray | None = None
    region_change: np.ndarray | None = None
    random_region_change: np.ndarray | None = None
    region_sd: np.ndarray | None = None
    n_sigma: int | None = None

    def rows(self) -> list[dict]:
        out = []
        for i, s in enumerate(self.names):
            for j, t in enumerate(self.names):
                region = {} if self.region_change is None else {
                    "region_change_sd": float(self.region_change[i, j]),
                    "random_region_change_sd": float(self.random_region_change[i, j]),
                    "target_region_sd": float(self.region_sd[j]), "n_sigma_images": self.n_sigma}
                out.append({"source": s, "target": t, "norm": self.norm, "eps": self.eps, "metric": self.metric,
                            "adversarial": float(self.adversarial[i, j]), "random": float(self.random[i, j]),
                            "delta_norm": float(self.delta_norm[i]), "random_norm": float(self.random_norm[i]),
                            "random_norm_matched": (float(self.random_norm_matched[i])
                                                    if self.random_norm_matched is not None else ""),
                            "target_clean_acc": float(self.clean_acc[j]) if self.clean_acc is not None else "",
                            **region})
        return out


def _region_change(m_clean: torch.Tensor, out_pert: torch.Tensor, sd: float, objective: str) -> float:
    """``region_change_sd`` of one target (module docstring): ``m_clean`` (N,) float64, ``out_pert`` (N, K)."""
    dm = out_pert.double().mean(1) - m_clean
    dm = dm.abs() if objective == "change" else direction_sign(objective) * dm
    return float(dm.mean() / sd)  # sd NaN where undefined: NaN


def natural_images(stim, n: int | None = None) -> torch.Tensor:
    """Natural images to take a response's sd over, from evaluation stimuli ``stim``
    (:class:`neuroguide.evaluation.stimuli.Stimuli`): ``n`` images spread over the held-out split, read again
    (None: all of it), when ``stim`` knows its split; else the first ``n`` (None: all) of ``stim.images``."""
    if stim.split is not None:
        return stim.split(n).images
    return stim.images[:n] if n else stim.images


def transfer_matrix(models: Mapping[str, nn.Module], images: torch.Tensor, labels: torch.Tensor | None, *,
                    eps: float, norm: str = "l2", steps: int = 10, step_size: float | None = None,
                    restarts: int = 1, objective: str = "change", batch_size: int = 128,
                    sigma_images: torch.Tensor | None = None,
                    input_sizes: Mapping[str, int] | None = None, generator: torch.Generator | None = None,
                    progress: bool = True) -> TransferResult:
    """Attack each source, evaluate each target: see the module docstring.

    Args:
        models: name -> model, each taking (B, 3, H, W) in [0, 1] to logits or responses (B, K).
        images: (N, 3, H, W) clean images in [0, 1].
        labels: (N,) class indices for classifiers, or None for neural-output models.
        eps, norm, steps, step_size, restarts: the attack (one engine, plain PGD).
        objective: for neural outputs, "change", "up" or "down".
        sigma_images: (M, 3, H, W) natural images in [0, 1] over which each target's mean output has the sd of
            ``region_change_sd`` (neural outputs only; default ``images``).
        input_sizes: name -> input size, for models that do not declare one.
    """
    if not models:
        raise ValueError("models is empty: give a dict name -> model with at least one model")
    eps = check_eps_list([eps], "eval.transfer.eps", norm)[0]
    get_step_class(norm)
    if images.ndim != 4:
        raise ValueError(f"images: expected (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    if labels is not None:
        labels = check_labels(images, labels)
    elif objective not in NEURAL_OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not known: expected one of {NEURAL_OBJECTIVES}")
    check_input_sizes(models, images, input_sizes)
    names = list(models)
    images = images.detach().float().cpu()
    clean = {n: _outputs(m, images, batch_size) for n, m in models.items()}
    S = len(names)
    neural = labels is None
    region_sd = n_sigma = None
    if neural:
        nat = images if sigma_images is None else sigma_images.detach().float().cpu()
        n_sigma = len(nat)
        region_sd = np.array([spread(_outputs(models[n], nat, batch_size).double().mean(1)) for n in names])
        if not np.isfinite(region_sd).all():
            log.warning("transfer: the mean output of %s has no spread over the %d natural images (std 0 or "
                        "undefined), so its region_change_sd is NaN. Fix: more natural images "
                        "(eval.transfer.n_sigma_images=null)", [n for n, v in zip(names, region_sd)
                                                                if not np.isfinite(v)], n_sigma)
    m_clean = {n: clean[n].double().mean(1) for n in names}
    reg, reg_rnd = np.full((S, S), np.nan), np.full((S, S), np.nan)
    adv, rnd = np.zeros((S, S)), np.zeros((S, S))
    dn, rn, matched = np.zeros(S), np.zeros(S), np.zeros(S)
    for i, src in enumerate(tqdm(names, desc="transfer sources", disable=not progress, leave=False)):
        model = models[src]
        device = device_of(model)
        x_adv = []
        for b in range(0, len(images), batch_size):
            x = images[b:b + batch_size].to(device)
            if labels is not None:
                obj = objectives.CrossEntropy(labels[b:b + batch_size].to(device))
            elif objective == "change":
                obj = objectives.ResponseChange(clean[src][b:b + batch_size].to(device))
            else:
                obj = objectives.MeanResponse(objective)
            res = pgd_attack(model, x, obj, eps=eps, norm=norm, steps=steps, step_size=step_size, random_start=True,
                             restarts=restarts, generator=generator)
            x_adv.append(res.x_adv.detach().float().cpu())
        x_adv = torch.cat(x_adv)
        delta = x_adv - images
        x_rnd = random_control(images, delta, norm, generator)
        d_norm, r_norm = _norms(delta, norm), _norms(x_rnd - images, norm)
        dn[i], rn[i] = float(d_norm.mean()), float(r_norm.mean())
        matched[i] = float((r_norm >= (1 - NORM_RTOL) * d_norm).float().mean())
        if matched[i] < 1:
            log.warning("transfer: the random control of source %r reaches the attack's %s norm (within %g%%) on "
                        "only %.1f%% of the images: too few pixels are free to move (mean norm %.4g vs %.4g)",
                        src, norm, 100 * NORM_RTOL, 100 * matched[i], rn[i], dn[i])
        for j, tgt in enumerate(names):
            out_adv, out_rnd = _outputs(models[tgt], x_adv, batch_size), _outputs(models[tgt], x_rnd, batch_size)
            adv[i, j] = _score(clean[tgt], out_adv, labels, objective)
            rnd[i, j] = _score(clean[tgt], out_rnd, labels, objective)
            if neural:
                reg[i, j] = _region_change(m_clean[tgt], out_adv, region_sd[j], objective)
                reg_rnd[i, j] = _region_change(m_clean[tgt], out_rnd, region_sd[j], objective)
    clean_acc = None
    if labels is not None:
        clean_acc = np.array([float((clean[n].argmax(1) == labels).float().mean()) for n in names])
    metric = "acc_drop" if labels is not None else "change"
    return TransferResult(names=names, eps=eps, norm=norm.lower(), metric=metric, adversarial=adv, random=rnd,
                          delta_norm=dn, random_norm=rn, clean_acc=clean_acc, random_norm_matched=matched,
                          region_change=reg if neural else None, random_region_change=reg_rnd if neural else None,
                          region_sd=region_sd, n_sigma=n_sigma)


def evaluate(models: Mapping[str, nn.Module], images: torch.Tensor, labels: torch.Tensor | None,
             out_dir: str | os.PathLike, *, eps: float | Sequence[float] = 1.0, norm: str = "l2", steps: int = 10,
             step_size: float | None = None, restarts: int = 1, objective: str = "change", batch_size: int = 128,
             sigma_images: torch.Tensor | None = None, input_sizes: Mapping[str, int] | None = None,
             key_prefix: str = "eval/transfer", seed: int | None = 0, progress: bool = True) -> dict:
    """Transfer matrices at each eps; writes ``transfer_<norm>_<eps>.csv`` and ``.png`` (heatmaps of the
    attack and the random control side by side) into ``out_dir``.

    Returns flat metrics: ``{key_prefix}/{norm}_{eps}/{source}/{target}/{metric}`` and ``.../random_{metric}``
    (metric ``acc_drop`` or ``change``), and per eps ``diag_mean`` (white-box), ``offdiag_mean``
    (transfer), ``random_mean`` (control) and ``random_norm_matched`` (the lowest, over sources, fraction
    of images whose control reaches the attack's norm within 1%; 1.0 unless too few pixels can move).
    Neural outputs also give ``.../{source}/{target}/region_change_sd`` and ``.../random_region_change_sd`` (the
    change of the target's mean output in its sd over ``sigma_images``, the unit of effect-matched transfer and
    control), per eps ``diag_mean_region_change_sd``, ``offdiag_mean_region_change_sd``,
    ``random_mean_region_change_sd``, and ``{key_prefix}/n_sigma_images``.
    ``seed`` fixes the random starts and the control directions.
    """
    eps_list = check_eps_list(eps, "eval.transfer.eps", norm)  # sorted, distinct
    out_dir = Path(out_dir)
    metrics: dict = {}
    for e in eps_list:
        res = transfer_matrix(models, images, labels, eps=e, norm=norm, steps=steps, step_size=step_size,
                              restarts=restarts, objective=objective, batch_size=batch_size,
                              sigma_images=sigma_images, input_sizes=input_sizes, progress=progress,
                              generator=torch.Generator().manual_seed(seed) if seed is not None else None)
        tag = eps_tag(res.norm, e)
        write_csv(out_dir / f"transfer_{tag}.csv", res.rows())
        what = "accuracy drop" if res.metric == "acc_drop" else "response change / sigma"
        heatmap_figure([("attack made on source", res.adversarial), ("random, same norm", res.random)],
                       res.names, res.names, out_dir / f"transfer_{tag}.png", cbar_label=what,
                       title=f"transfer, {res.norm} eps {eps_label(res.norm, e)}")
        for i, s in enumerate(res.names):
            for j, t in enumerate(res.names):
                base = f"{key_prefix}/{tag}/{safe_name(s)}/{safe_name(t)}"
                metrics[f"{base}/{res.metric}"] = float(res.adversarial[i, j])
                metrics[f"{base}/random_{res.metric}"] = float(res.random[i, j])
                if res.region_change is not None:
                    metrics[f"{base}/region_change_sd"] = float(res.region_change[i, j])
                    metrics[f"{base}/random_region_change_sd"] = float(res.random_region_change[i, j])
        S = len(res.names)
        off = ~np.eye(S, dtype=bool)
        metrics[f"{key_prefix}/{tag}/diag_mean"] = float(np.diag(res.adversarial).mean())
        metrics[f"{key_prefix}/{tag}/offdiag_mean"] = float(res.adversarial[off].mean()) if S > 1 else float("nan")
        metrics[f"{key_prefix}/{tag}/random_mean"] = float(res.random.mean())
        metrics[f"{key_prefix}/{tag}/random_norm_matched"] = float(res.random_norm_matched.min())
        if res.region_change is not None:
            metrics[f"{key_prefix}/{tag}/diag_mean_region_change_sd"] = float(np.diag(res.region_change).mean())
            metrics[f"{key_prefix}/{tag}/offdiag_mean_region_change_sd"] = (
                float(res.region_change[off].mean()) if S > 1 else float("nan"))
            metrics[f"{key_prefix}/{tag}/random_mean_region_change_sd"] = float(res.random_region_change.mean())
            metrics[f"{key_prefix}/n_sigma_images"] = res.n_sigma
    return metrics


__all__ = ["transfer_matrix", "evaluate", "TransferResult", "random_like", "random_control", "perturbation_norms",
           "natural_images"]

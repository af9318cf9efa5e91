"""Effect-matched transfer (McNeal & Murty): transfer compared at a fixed *effect* instead of a fixed eps.

At a fixed eps (:mod:`neuroguide.evaluation.analyses.transfer.fixed_eps`) a robust source barely moves its own prediction, so its
perturbations cannot be expected to move anyone else's. McNeal & Murty fix the effect first: for each source
model ``s`` and image ``x_n``, the smallest perturbation that changes the source's *own* prediction by a target
effect, then the same perturbation applied to every target model ("perturbations from robust models now
transfer to all models").

The prediction is the region's mean predicted response ``m(x) = mean_k r_k(x)`` (``r`` =
:func:`neuroguide.evaluation.responses.response_function`: the voxels of a predictor or encoding model, the
sites of an IT model, a guided classifier's neural head; or ``units`` of a ``layer``), pushed ``up`` or
``down`` (``sign`` = +1 / -1). Its effect on a model, in units of that model's own spread over natural images:

    effect_t(x_n) = sign * (m_t(x_n + d_n) - m_t(x_n)) / sd_t,     sd_t = std_n m_t(x_n) over natural images

For each source the target effect ``e`` (``target_units="sd"``: ``e * sd_s`` in response units; ``"raw"``:
``e`` in response units) is found by bisection on eps, each image its own bracket ``[lo, hi]``: one attack
(:func:`neuroguide.attacks.pgd_attack`, objective :class:`~neuroguide.attacks.objectives.MeanResponse`) at
``eps_max`` for all images; images that do not reach ``e`` there are *unreachable* (eps NaN, left out of the
means, counted, and a warning names how many); then ``bisection_steps`` halvings, every image of a step in one
batch with its own eps (the midpoint of its bracket). The eps reported is the bracket's upper end, the smallest
eps tried whose attack reached ``e``: within ``eps_max / 2**bisection_steps`` above the smallest eps at which
the attack reaches ``e``. Its perturbation ``d_n`` is applied to every target, and a random direction of the
same per-image norm (:func:`neuroguide.evaluation.analyses.transfer.fixed_eps.random_control`) is the control.

The attack starts at the clean image (``random_start=False``) by default, so the effect reached is a
deterministic function of eps and the bisection compares like with like.
"""
from __future__ import annotations

import inspect
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
from neuroguide.attacks.objectives import direction_sign
from neuroguide.attacks.steps import get_step_class
from neuroguide.evaluation.metrics import statistics
from neuroguide.evaluation.plots import check_eps_list, heatmap_figure, write_csv
from neuroguide.evaluation.responses import region_layer, response_function, spread
from neuroguide.evaluation.analyses.transfer.fixed_eps import NORM_RTOL, natural_images, perturbation_norms, random_control
from neuroguide.evaluation.checks import check_input_sizes, safe_name
from neuroguide.models.features import OUTPUT, activations, device_of

KEY = "eval.transfer.effect"
TARGET_UNITS = ("sd", "raw")
# eps_max="auto": the bracket's top per norm. L2 10 in [0, 1] pixel units (Guo et al.'s largest eps); Linf 32/255 (a
# Linf eps of 10 would be the whole [0, 1] box, and 12 halvings of it leave a resolution of 0.6/255)
EPS_MAX_AUTO = {"l2": 10.0, "linf": 32 / 255}

log = logging.getLogger("neuroguide")


def region_mean(forward: nn.Module, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """(N,) float64 CPU mean response ``m(x_n) = mean_k r_k(x_n)`` of ``forward`` ((B, 3, H, W) -> (B, K))."""
    return activations(forward, images, [OUTPUT], batch_size=batch_size)[OUTPUT].double().mean(1)


def natural_sd(m: torch.Tensor, name: str) -> float:
    """The std (N - 1) of a model's mean response over natural images; a ValueError when it is 0 or undefined."""
    sd = spread(m)
    if not sd > 0:
        bad = m.numel() - statistics.n_finite(m)
        raise ValueError(f"model {name!r}: its mean response has std {statistics.sd(m):g} over the {m.numel()} natural "
                         f"images{f' ({bad} of them non-finite)' if bad else ''}, so an effect in sd units is "
                         "undefined. Expected >= 2 images on which the response varies: give more "
                         f"images ({KEY}.n_sigma_images) or another layer/units ({KEY}.layer, {KEY}.units)")
    return sd


def resolve_eps_max(eps_max, norm: str) -> float:
    """``eps_max`` as a float: ``"auto"`` (or None) is :data:`EPS_MAX_AUTO` of ``norm`` (10.0 for L2, 32/255 for
    Linf); a number or a fraction such as ``"32/255"`` is checked (> 0, snapped to k/255 for Linf)."""
    norm = get_step_class(norm).norm
    if eps_max is None or (isinstance(eps_max, str) and eps_max.strip().lower() == "auto"):
        return EPS_MAX_AUTO[norm]
    return check_eps_list([eps_max], f"{KEY}.eps_max", norm)[0]


@dataclass
class EffectBisection:
    """One source's bisection.

    Attributes:
        eps: (N,) the smallest eps found per image (NaN where unreachable within ``eps_max``).
        x_adv: (N, 3, H, W) the perturbed images at that eps (the clean image where unreachable), CPU.
        change: (N,) the source's achieved ``sign * (m(x + d) - m(x))`` in response units (NaN where unreachable).
        reachable: (N,) bool.
        resolution: ``eps_max / 2**bisection_steps``.
    """

    eps: torch.Tensor
    x_adv: torch.Tensor
    change: torch.Tensor
    reachable: torch.Tensor
    resolution: float


def bisect_eps(forward: nn.Module, images: torch.Tensor, target_change: float, *, direction: str = "up",
               eps_max: float | str = "auto", bisection_steps: int = 12, norm: str = "l2", steps: int = 10,
               step_size: float | None = None, random_start: bool = False, restarts: int = 1,
               batch_size: int = 128, generator: torch.Generator | None = None, name: str = "source",
               progress: bool = True) -> EffectBisection:
    """Per image, the smallest eps in ``(0, eps_max]`` (to ``eps_max / 2**bisection_steps``) whose attack changes
    ``sign * m(x)`` by at least ``target_change`` (response units); see the module docstring.

    Args:
        forward: (B, 3, H, W) in [0, 1] -> (B, K) responses (e.g. from ``response_function``).
        images: (N, 3, H, W) clean images in [0, 1].
        target_change: > 0, in response units.
        eps_max: the bracket's top, or "auto" (:func:`resolve_eps_max`: 10.0 for L2, 32/255 for Linf).
    """
    if not target_change > 0 or not math.isfinite(target_change):
        raise ValueError(f"{KEY}.target: the effect to reach must be a finite number > 0, got {target_change!r}")
    eps_max = resolve_eps_max(eps_max, norm)
    if int(bisection_steps) != bisection_steps or bisection_steps < 0:
        raise ValueError(f"{KEY}.bisection_steps must be an integer >= 0 (halvings of [0, eps_max]), "
                         f"got {bisection_steps!r}")
    if restarts > 1 and not random_start:
        raise ValueError(f"{KEY}.restarts={restarts} with random_start=false repeats one attack: set "
                         f"{KEY}.random_start=true for restarts, or restarts=1")
    sign = direction_sign(direction)
    obj = objectives.MeanResponse(sign)
    device = device_of(forward)
    x = images.detach().float().to(device)
    m0 = region_mean(forward, images, batch_size).to(device)
    n = x.shape[0]

    def attack(idx: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        res = pgd_attack(forward, x[idx], obj, eps=eps.to(x.dtype), norm=norm, steps=steps, step_size=step_size,
                         random_start=random_start, restarts=restarts, batch_size=batch_size, generator=generator)
        return res.x_adv.detach(), res.value.double() - sign * m0[idx]  # value = sign * m(x_adv)

    lo = torch.zeros(n, dtype=torch.float64, device=device)
    hi = torch.full((n,), float(eps_max), dtype=torch.float64, device=device)
    everything = torch.arange(n, device=device)
    best_x, change = attack(everything, hi)
    reachable = change >= target_change
    idx = everything[reachable]
    bar = tqdm(range(int(bisection_steps)), desc=f"bisection on eps ({name})", disable=not progress, leave=False)
    for _ in bar:
        if idx.numel() == 0:
            break
        mid = (lo[idx] + hi[idx]) / 2
        x_mid, c_mid = attack(idx, mid)
        ok = c_mid >= target_change
        hi[idx[ok]], lo[idx[~ok]] = mid[ok], mid[~ok]
        best_x[idx[ok]], change[idx[ok]] = x_mid[ok], c_mid[ok]
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=device)
    best_x = torch.where(reachable.reshape(-1, *([1] * (x.ndim - 1))), best_x, x)
    return EffectBisection(eps=torch.where(reachable, hi, nan).cpu(), x_adv=best_x.float().cpu(),
                           change=torch.where(reachable, change, nan).cpu(), reachable=reachable.cpu(),
                           resolution=float(eps_max) / 2 ** int(bisection_steps))


@dataclass
class EffectTransferResult:
    """Source x target matrices of effect-matched transfer (S = T = the models, in order).

    Attributes:
        effect: (S, T) mean over reachable images of target t's effect (its own sd units) of source s's
            perturbations; the diagonal is each source's achieved effect (>= the target in sd units).
        random: (S, T) the same for random directions of the same per-image norm.
        eps: (S, N) per-image eps each source needed (NaN: unreachable).
        per_image_effect, per_image_random: (S, T, N) per-image effects (NaN where unreachable).
        random_norm_matched: (S,) fraction of reachable images whose control reaches the attack's norm within 1%.
        target_change: (S,) the change each source had to reach, in its response units.
        sd: (S,) each model's natural sd of its mean response.
    """

    names: list[str]
    norm: str
    direction: str
    target: float
    target_units: str
    resolution: float
    effect: np.ndarray
    random: np.ndarray
    eps: np.ndarray
    per_image_effect: np.ndarray
    per_image_random: np.ndarray
    random_norm_matched: np.ndarray
    target_change: np.ndarray
    sd: np.ndarray

    @property
    def unreachable(self) -> np.ndarray:
        """(S,) fraction of images whose target effect the source cannot reach within eps_max."""
        return np.isnan(self.eps).mean(1)

    @property
    def eps_mean(self) -> np.ndarray:
        """(S,) mean eps over reachable images (NaN when none is)."""
        return np.array([_nanmean(e) for e in self.eps])


def _nanmean(a) -> float:
    """Mean of the finite entries (NaN when there are none, without numpy's warning)."""
    a = np.asarray(a, dtype=float)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def _image_mean(a: np.ndarray) -> np.ndarray:
    """(S, T, N) -> (S, T): the mean over the reachable (finite) images."""
    return np.array([[_nanmean(a[i, j]) for j in range(a.shape[1])] for i in range(a.shape[0])])


def effect_transfer_matrix(models: Mapping[str, nn.Module], images: torch.Tensor, *, target: float = 1.0,
                           target_units: str = "sd", direction: str = "up", eps_max: float | str = "auto",
                           bisection_steps: int = 12, norm: str = "l2", steps: int = 10,
                           step_size: float | None = None, random_start: bool = False, restarts: int = 1,
                           layer: str | None = "region", units: Sequence[int] | None = None,
                           sigma_images: torch.Tensor | None = None, batch_size: int = 128,
                           input_sizes: Mapping[str, int] | None = None,
                           generator: torch.Generator | None = None, progress: bool = True) -> EffectTransferResult:
    """Effect-matched transfer between ``models`` (name -> model): see the module docstring.

    Args:
        images: (N, 3, H, W) clean images in [0, 1], the images perturbed.
        target: the effect each source must reach on itself; ``target_units`` "sd" (its natural sd) or "raw".
        direction: "up" or "down" (the region's mean response).
        eps_max, bisection_steps: the bracket ``[0, eps_max]`` and its number of halvings; ``eps_max="auto"``:
            10.0 for L2, 32/255 for Linf (:data:`EPS_MAX_AUTO`).
        norm, steps, step_size, random_start, restarts: the attack (one engine, plain PGD).
        layer, units: the response (:func:`neuroguide.evaluation.responses.response_function`).
        sigma_images: (M, 3, H, W) natural images the sd of each model's mean response is taken over
            (default ``images``).
    """
    if not models:
        raise ValueError("models is empty: give a dict name -> model with at least one model")
    if images.ndim != 4:
        raise ValueError(f"images: expected (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    if target_units not in TARGET_UNITS:
        raise ValueError(f"{KEY}.target_units: expected one of {TARGET_UNITS}, got {target_units!r}")
    target = float(target)
    norm = get_step_class(norm).norm
    eps_max = resolve_eps_max(eps_max, norm)
    direction_sign(direction)
    check_input_sizes(models, images, input_sizes)
    images = images.detach().float().cpu()
    sigma_images = images if sigma_images is None else sigma_images.detach().float().cpu()
    names = list(models)
    fwd = {n: response_function(m, layer, units, key=f"{KEY}.layer")[0] for n, m in models.items()}
    clean = {n: region_mean(f, images, batch_size) for n, f in fwd.items()}
    sd = {n: natural_sd(region_mean(f, sigma_images, batch_size), n) for n, f in fwd.items()}
    sign = float(direction_sign(direction))
    S, N = len(names), len(images)
    eff, rnd = np.full((S, S, N), np.nan), np.full((S, S, N), np.nan)
    eps_found, matched, changes = np.full((S, N), np.nan), np.zeros(S), np.zeros(S)
    resolution = float("nan")
    for i, src in enumerate(tqdm(names, desc="effect-matched transfer", disable=not progress, leave=False)):
        changes[i] = target * sd[src] if target_units == "sd" else target
        bis = bisect_eps(fwd[src], images, changes[i], direction=direction, eps_max=eps_max,
                         bisection_steps=bisection_steps, norm=norm, steps=steps, step_size=step_size,
                         random_start=random_start, restarts=restarts, batch_size=batch_size, generator=generator,
                         name=src, progress=progress)
        resolution = bis.resolution
        ok = bis.reachable
        eps_found[i] = bis.eps.numpy()
        if not ok.all():
            log.warning("effect-matched transfer: source %r cannot reach %g %s %s within eps_max=%g (%s) on %d of %d "
                        "images: they are left out of the means (eps NaN in the per-image CSV). Fix: raise %s.eps_max",
                        src, target, target_units, direction, eps_max, norm, int((~ok).sum()), N, KEY)
        if not ok.any():
            continue
        x_adv = bis.x_adv[ok]
        x_rnd = random_control(images[ok], x_adv - images[ok], norm, generator)
        d_norm, r_norm = perturbation_norms(x_adv, images[ok], norm), perturbation_norms(x_rnd, images[ok], norm)
        matched[i] = float((r_norm >= (1 - NORM_RTOL) * d_norm).float().mean())
        if matched[i] < 1:
            log.warning("effect-matched transfer: the random control of source %r reaches the attack's %s norm (within "
                        "%g%%) on only %.1f%% of the images: too few pixels are free to move", src, norm,
                        100 * NORM_RTOL, 100 * matched[i])
        for j, tgt in enumerate(names):
            m0 = clean[tgt][ok]
            eff[i, j, ok.numpy()] = (sign * (region_mean(fwd[tgt], x_adv, batch_size) - m0) / sd[tgt]).numpy()
            rnd[i, j, ok.numpy()] = (sign * (region_mean(fwd[tgt], x_rnd, batch_size) - m0) / sd[tgt]).numpy()
    return EffectTransferResult(names=names, norm=norm, direction=str(direction), target=target,
                                target_units=target_units, resolution=resolution, effect=_image_mean(eff),
                                random=_image_mean(rnd),
                                eps=eps_found, per_image_effect=eff, per_image_random=rnd, random_norm_matched=matched,
                                target_change=changes, sd=np.array([sd[n] for n in names]))


def effect_tag(target: float, target_units: str = "sd", direction: str = "up", norm: str = "l2") -> str:
    """Metric-key name: ``effect_1.0sd`` (L2, up), ``effect_0.5raw_down``, ``effect_1.0sd_linf``."""
    t = float(target)
    tag = f"effect_{t!r}{target_units}" if len(repr(t)) < 10 else f"effect_{t:g}{target_units}"
    if direction_sign(direction) < 0:
        tag += "_down"
    return tag + ("_linf" if norm.lower() == "linf" else "")


def enabled_for(models: Mapping[str, nn.Module], enabled, layer) -> bool:
    """``enabled``: True / False, or "auto": on when every model has a region response (or ``layer`` names one);
    off, with a warning naming the models and the key, when some model (a plain classifier) has none."""
    if str(enabled).lower() in ("true", "1", "yes"):
        return True
    if str(enabled).lower() in ("false", "0", "no", "none"):
        return False
    if str(enabled).lower() != "auto":
        raise ValueError(f"{KEY}.enabled: expected true, false or auto, got {enabled!r}")
    if layer != "region":
        return True
    missing = []
    for name, m in models.items():
        try:
            region_layer(m, f"{KEY}.layer")
        except ValueError:
            missing.append(name)
    if missing:
        log.warning("effect-matched transfer skipped: %s have no region response (plain classifiers). Fix: set "
                    "%s.layer=penultimate (or another layer) to use a layer's units, or %s.enabled=false to silence this",
                    missing, KEY, KEY)
    return not missing


def evaluate(models: Mapping[str, nn.Module], images: torch.Tensor, out_dir: str | os.PathLike, *,
             target: float | Sequence[float] = 1.0, key_prefix: str = "eval/transfer", seed: int | None = 0,
             **kwargs) -> dict:
    """Effect-matched transfer for each ``target``; writes ``transfer_<tag>.csv`` (the matrix),
    ``transfer_<tag>_images.csv`` (per source, target and image: eps, effect, random effect) and
    ``transfer_<tag>.png`` (heatmaps of the attack and the control, each source labelled with its mean eps)
    into ``out_dir``. ``kwargs`` go to :func:`effect_transfer_matrix`.

    Returns flat metrics, ``tag`` as in :func:`effect_tag`: ``{key_prefix}/{tag}/{src}/{tgt}/effect`` and
    ``/random_effect`` (target's own sd units, mean over reachable images), ``{key_prefix}/{tag}/{src}/eps_mean``,
    ``/unreachable`` (fraction), ``/random_norm_matched``, and ``{key_prefix}/{tag}/eps_resolution``,
    ``/offdiag_mean``, ``/random_mean``.
    """
    unknown = sorted(set(kwargs) - set(inspect.signature(effect_transfer_matrix).parameters) - {"models", "images"})
    if unknown:
        known = [k for k in inspect.signature(effect_transfer_matrix).parameters if k not in ("models", "images")]
        raise ValueError(f"{KEY}: unknown parameters {unknown}; expected some of {known} (and enabled, n_images, "
                         "n_sigma_images). Fix the names in conf/eval/transfer.yaml or on the command line")
    targets = [target] if isinstance(target, (int, float, str)) else list(target)
    out_dir = Path(out_dir)
    metrics: dict = {}
    for t in targets:
        res = effect_transfer_matrix(models, images, target=float(t), **kwargs,
                                     generator=torch.Generator().manual_seed(seed) if seed is not None else None)
        tag = effect_tag(res.target, res.target_units, res.direction, res.norm)
        _write(res, out_dir, tag)
        for i, s in enumerate(res.names):
            base = f"{key_prefix}/{tag}/{safe_name(s)}"
            metrics[f"{base}/eps_mean"] = float(res.eps_mean[i])
            metrics[f"{base}/unreachable"] = float(res.unreachable[i])
            metrics[f"{base}/random_norm_matched"] = float(res.random_norm_matched[i])
            for j, g in enumerate(res.names):
                metrics[f"{base}/{safe_name(g)}/effect"] = float(res.effect[i, j])
                metrics[f"{base}/{safe_name(g)}/random_effect"] = float(res.random[i, j])
        off = ~np.eye(len(res.names), dtype=bool)
        metrics[f"{key_prefix}/{tag}/eps_resolution"] = res.resolution
        metrics[f"{key_prefix}/{tag}/offdiag_mean"] = _nanmean(res.effect[off])
        metrics[f"{key_prefix}/{tag}/random_mean"] = _nanmean(res.random)
    return metrics


def evaluate_stimuli(models: Mapping[str, nn.Module], stim, out_dir: str | os.PathLike, params: Mapping | None) -> dict:
    """:func:`evaluate` configured by ``params`` (``eval.transfer.effect``) on evaluation stimuli ``stim``
    (:class:`neuroguide.evaluation.stimuli.Stimuli`): ``enabled`` (:func:`enabled_for`), ``n_images`` (the first
    of ``stim``; null: all), ``n_sigma_images`` (natural images spread over the held-out split for the sd; null:
    all of it); the rest goes to :func:`evaluate`. ``{}`` when disabled."""
    p = dict(params or {})
    enabled = p.pop("enabled", "auto")
    n, n_sigma = p.pop("n_images", None), p.pop("n_sigma_images", None)
    if not enabled_for(models, enabled, p.get("layer", "region")):
        return {}
    images = stim.images[:n] if n else stim.images
    sigma = natural_images(stim, n_sigma)  # the held-out split read again: the sd over more than the perturbed images
    log.info("effect-matched transfer: %d images, sd over %d natural images (%s)", len(images), len(sigma),
             stim.source)
    return evaluate(models, images, out_dir, sigma_images=sigma, **p)


def _write(res: EffectTransferResult, out_dir: Path, tag: str) -> None:
    rows, per_image = [], []
    for i, s in enumerate(res.names):
        for j, t in enumerate(res.names):
            rows.append({"source": s, "target": t, "norm": res.norm, "direction": res.direction,
                         "target_effect": res.target, "target_units": res.target_units,
                         "effect": float(res.effect[i, j]), "random_effect": float(res.random[i, j]),
                         "eps_mean": float(res.eps_mean[i]), "unreachable": float(res.unreachable[i]),
                         "random_norm_matched": float(res.random_norm_matched[i]),
                         "source_target_change": float(res.target_change[i]), "target_sd": float(res.sd[j])})
            for n in range(res.eps.shape[1]):
                per_image.append({"source": s, "target": t, "image": n, "eps": float(res.eps[i, n]),
                                  "effect": float(res.per_image_effect[i, j, n]),
                                  "random_effect": float(res.per_image_random[i, j, n])})
    write_csv(out_dir / f"transfer_{tag}.csv", rows)
    write_csv(out_dir / f"transfer_{tag}_images.csv", per_image)
    labels = [f"{s} (eps {e:.3g})" for s, e in zip(res.names, res.eps_mean)]
    heatmap_figure([("attack made on source", res.effect), ("random, same norm", res.random)], labels, res.names,
                   out_dir / f"transfer_{tag}.png", cbar_label="effect on target / its sd",
                   title=f"effect-matched transfer: {res.target:g} {res.target_units} {res.direction} on the source "
                         f"({res.norm}, eps resolution {res.resolution:.2g})")


__all__ = ["bisect_eps", "effect_transfer_matrix", "evaluate", "evaluate_stimuli", "effect_tag", "enabled_for", "region_mean",
           "EffectBisection", "EffectTransferResult", "resolve_eps_max", "EPS_MAX_AUTO"]

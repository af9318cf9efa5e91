"""Guo et al.'s third model-selection criterion (appendix 6.1, C): transfer of layer-targeted perturbations to IT.

For each candidate base network (AT eps) and layer, perturbations that maximally change that layer's
representation, ``d = argmax_{||d|| <= eps} ||h_L(x + d) - h_L(x)||_2`` (the project's one attack engine on
``objectives.ResponseChange``, no mapping to the sites involved), are shown to the brain, and the candidate is
scored by how much the sites' responses move, in units of each site's std over clean images::

    brain_change(eps_AT, L) = mean_{x, sites i} |b_i(x + d_L(x)) - b_i(x)| / sigma_i

The candidate whose perturbations move the brain most is the one whose representation the brain shares. The
brain is any callable ``images (N, 3, S, S) in [0, 1] -> (N, sites)`` responses (repeat means), e.g. a simulated
brain's noise-free ``forward``; ``(N, sites, repeats)`` responses (NaN = missing) are averaged over repeats. A lab
records the stimuli instead (:mod:`neuroguide.evaluation.analyses.selection.lab`). With noisy repeat means ``|delta b_i|`` is
biased upwards by the trial noise, by the same amount for every candidate: the ranking holds, the values are not
comparable between recordings with different noise or numbers of repeats. The resolution needs many sites: a few
random readouts see only a few directions of the layer (README, "Choosing the base network").
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from neuroguide.attacks import objectives, pgd_attack
from neuroguide.data.hdf5_images import as_8bit, quantize_within_ball
from neuroguide.evaluation.metrics.statistics import sd
from neuroguide.models.features import LayerOutput, device_of, evaluation_mode

log = logging.getLogger("neuroguide")
Brain = Callable[[torch.Tensor], torch.Tensor]
KEY = "eval.selection.brain"


def make_brain(spec, repeats: int | None = None, key: str = KEY) -> Brain:
    """The brain of a config: a callable as it is, or a mapping with ``_target_`` instantiated by Hydra (e.g.
    ``{_target_: neuroguide.closed_loop.brain.SimulatedBrain, seed: 0}``); modules are put in eval mode. With
    ``repeats``, the brain's ``record(images, repeats) -> (N, sites, repeats)`` (noisy trials, as a lab records)
    is used instead of its noise-free call."""
    if callable(spec):
        brain = spec
    elif isinstance(spec, Mapping) and "_target_" in spec:
        from hydra.utils import instantiate

        brain = instantiate(dict(spec))
    else:
        raise ValueError(f"{key}: expected null, a callable images -> (N, sites), or a mapping with _target_ naming "
                         f"its class (e.g. {key}._target_=neuroguide.closed_loop.brain.SimulatedBrain); found "
                         f"{type(spec).__name__} {spec!r}")
    if isinstance(brain, nn.Module):
        brain.eval()
    elif not callable(brain):
        raise ValueError(f"{key}: {spec!r} made a {type(brain).__name__}, which is not callable")
    if repeats is None:
        return brain
    if int(repeats) < 1 or not callable(getattr(brain, "record", None)):
        raise ValueError(f"{key}_repeats={repeats}: recording repeats needs a brain with record(images, repeats) and "
                         f"repeats >= 1; {type(brain).__name__} has {'a' if hasattr(brain, 'record') else 'no'} record. "
                         f"Fix: {key}_repeats=null (its noise-free responses)")
    return lambda images: brain.record(images, int(repeats))


def brain_responses(brain: Brain, images, batch_size: int = 64, key: str = KEY) -> torch.Tensor:
    """(N, sites) float32 CPU responses of ``brain`` to ``images`` ((N, 3, S, S) tensor or a dataset of images),
    batch by batch under ``no_grad``; repeats (a third axis) are averaged (NaN-aware). A ValueError naming ``key``
    for a brain whose output is not (B, sites) or (B, sites, repeats), or has a different number of sites per batch."""
    out, sites = [], None
    n = len(images)
    device = device_of(brain) if isinstance(brain, nn.Module) else None
    for i in range(0, n, batch_size):
        xb = images[i:i + batch_size] if isinstance(images, torch.Tensor) else \
            torch.stack([images[j] for j in range(i, min(n, i + batch_size))])
        with torch.no_grad():
            r = brain(xb.to(device) if device is not None else xb)
        r = torch.as_tensor(r).detach().float().cpu()
        if r.ndim == 3:
            r = r.nanmean(dim=2)
        if r.ndim != 2 or r.shape[0] != len(xb) or (sites is not None and r.shape[1] != sites):
            raise ValueError(f"{key}: the brain must map images ({len(xb)}, 3, S, S) to responses ({len(xb)}, sites) "
                             f"(or ({len(xb)}, sites, repeats)); it returned {tuple(r.shape)}"
                             + (f" after {sites} sites before" if sites is not None else "")
                             + ". Fix: give a callable returning one row per image, e.g. a SimulatedBrain's forward")
        sites = r.shape[1]
        out.append(r)
    if not out:
        raise ValueError(f"{key}: no images to show the brain")
    return torch.cat(out)


def site_sigma(clean: torch.Tensor, key: str = KEY) -> torch.Tensor:
    """(sites,) std over clean images of each site's (N, sites) responses (:func:`~neuroguide.evaluation.metrics.statistics.
    sd`: ddof 1 over the finite values, NaN with fewer than 2); a ValueError when no site has a positive std."""
    sigma = sd(torch.as_tensor(clean).float(), dim=0)
    if not bool((sigma > 0).any()):
        raise ValueError(f"{key}: no site's response varies over the {len(clean)} clean images (std {sigma.tolist()[:8]}"
                         "...): the brain gives constant (or NaN) responses; check its output")
    return sigma


def layer_forward(network: nn.Module, root: nn.Module, layer: str) -> LayerOutput:
    """``network``'s (B, 3, S, S) -> (B, D) flattened output of ``layer`` (a name in ``root``)."""
    prefix = {m: n for n, m in network.named_modules()}.get(root)
    if prefix is None:
        raise ValueError(f"selection: root ({type(root).__name__}) is not a submodule of the network")
    return LayerOutput(network, f"{prefix}.{layer}" if prefix else layer)


def layer_perturbations(networks: Mapping[float, tuple[nn.Module, nn.Module]], images: torch.Tensor,
                        layers: Sequence[str], *, eps: float = 1.0, norm: str = "l2", steps: int = 32,
                        schedule: str = "guo", restarts: int = 1, batch_size: int = 32, seed: int = 0,
                        progress: bool = True) -> dict[tuple[float, str], tuple[torch.Tensor, torch.Tensor]]:
    """``{(at_eps, layer): (x_adv (N, 3, S, S), layer_change (N,))}``: for each candidate, the stimuli to show.

    The clean images are those an 8-bit display shows, ``x = as_8bit(images)`` (``images`` (N, 3, S, S) in [0, 1]);
    ``d`` maximises ``||h_L(x + d) - h_L(x)||_2`` within ``eps`` (PGD on ``objectives.ResponseChange``) and is
    rounded to whole grey levels inside the ball (:func:`neuroguide.data.hdf5_images.quantize_within_ball`), so
    ``x_adv`` is exactly 8-bit and within ``eps`` (``norm``) of ``x``: the very images a lab's file holds and a brain
    callable is shown. ``layer_change`` is ``||h_L(x_adv) - h_L(x)||_2`` of those shown images."""
    if not layers:
        raise ValueError("selection.layers is empty: name the candidate layers")
    if not float(eps) > 0:
        raise ValueError(f"eval.selection.brain_eps={eps!r}: the perturbation budget must be > 0")
    images = as_8bit(images)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for at_eps, (network, root) in networks.items():
        device = device_of(network)
        for layer in layers:
            forward = layer_forward(network, root, layer)
            x_adv, change = [], []
            for i in tqdm(range(0, len(images), batch_size), desc=f"criterion C eps={at_eps} {layer}",
                          disable=not progress, leave=False):
                x = images[i:i + batch_size].to(device)
                with torch.no_grad(), evaluation_mode(network):
                    h0 = forward(x)
                res = pgd_attack(forward, x, objectives.ResponseChange(h0), eps=float(eps), norm=norm, steps=steps,
                                 schedule=schedule, restarts=restarts, victim=network, generator=gen)
                shown = quantize_within_ball(x.cpu(), res.x_adv, float(eps), norm=norm)
                with torch.no_grad(), evaluation_mode(network):
                    change.append((forward(shown.to(device)) - h0).flatten(1).norm(dim=1).cpu())
                x_adv.append(shown)
            out[(float(at_eps), layer)] = (torch.cat(x_adv), torch.cat(change))
    return out


def brain_change_rows(clean: torch.Tensor, perturbed: Mapping[tuple[float, str], torch.Tensor], sigma: torch.Tensor,
                      layer_change: Mapping[tuple[float, str], torch.Tensor] | None = None) -> list[dict]:
    """Criterion C's score per candidate from the brain's responses: ``clean`` (N, sites) to the clean images,
    ``perturbed[(at_eps, layer)]`` (N, sites) to their perturbations (same image order), ``sigma`` (sites,).
    Rows ``{at_eps, layer, brain_change, brain_change_sd, layer_change}``: the mean over images and sites of
    ``|delta b_i| / sigma_i`` (sites without a positive finite sigma left out, with a warning), its sd across sites
    (:func:`~neuroguide.evaluation.metrics.statistics.sd`: NaN with fewer than 2 sites),
    and the mean ``||delta h_L||_2`` (NaN when not given)."""
    sig = torch.as_tensor(sigma).float().cpu()
    if sig.shape != (clean.shape[1],):
        raise ValueError(f"{KEY}: sigma has shape {tuple(sig.shape)}, the brain has {clean.shape[1]} sites")
    ok = torch.isfinite(sig) & (sig > 0)
    if not bool(ok.all()):
        log.warning("selection criterion C: %d of %d sites have no clean std and are left out", int((~ok).sum()),
                    len(ok))
    rows = []
    for (at_eps, layer), adv in perturbed.items():
        per_site = ((adv - clean).abs() / sig)[:, ok].nanmean(0)  # (sites,)
        fin = per_site[torch.isfinite(per_site)]
        lc = (layer_change or {}).get((at_eps, layer))
        row = {"at_eps": float(at_eps), "layer": layer, "brain_change": float(fin.mean()) if len(fin) else math.nan,
               "brain_change_sd": sd(fin),
               "layer_change": float(lc.mean()) if lc is not None else math.nan}
        rows.append(row)
        log.info("selection C eps=%s %s: brain change %.3f sigma", at_eps, layer, row["brain_change"])
    return rows


def layer_transfer_scores(networks: Mapping[float, tuple[nn.Module, nn.Module]], images: torch.Tensor,
                          layers: Sequence[str], brain: Brain, *, eps: float = 1.0, norm: str = "l2", steps: int = 32,
                          schedule: str = "guo", restarts: int = 1, batch_size: int = 32,
                          sigma: torch.Tensor | None = None, seed: int = 0, progress: bool = True) -> list[dict]:
    """Criterion C for every (AT eps, layer) with a brain callable: :func:`layer_perturbations` shown to ``brain``
    (the 8-bit clean images and their 8-bit perturbations, as a lab's stimuli file holds them) and scored by
    :func:`brain_change_rows`.

    Args:
        networks: AT eps -> (network taking [0, 1] images, the module the layer names refer to).
        images: (N, 3, S, S) clean images in [0, 1] to perturb.
        layers: layer names in each root.
        brain: ``images -> (N, sites)`` (see :func:`brain_responses`).
        eps, norm, steps, schedule, restarts: the perturbation budget (the same for every candidate).
        sigma: (sites,) each site's std over clean images (default: over ``images``; more images are better).
    Returns:
        rows ``{at_eps, layer, brain_change, brain_change_sd, layer_change}`` (see :func:`brain_change_rows`).
    """
    perturbed = layer_perturbations(networks, images, layers, eps=eps, norm=norm, steps=steps, schedule=schedule,
                                    restarts=restarts, batch_size=batch_size, seed=seed, progress=progress)
    clean_b = brain_responses(brain, as_8bit(images), batch_size)  # the clean images as shown
    sig = site_sigma(clean_b) if sigma is None else sigma
    adv_b = {k: brain_responses(brain, x, batch_size) for k, (x, _) in perturbed.items()}
    return brain_change_rows(clean_b, adv_b, sig, {k: c for k, (_, c) in perturbed.items()})


def rank(rows: Sequence[dict], metric: str) -> dict[tuple[float, str], int]:
    """(at_eps, layer) -> rank by ``metric`` (1 = highest)."""
    order = sorted(rows, key=lambda r: -r[metric])
    return {(r["at_eps"], r["layer"]): i + 1 for i, r in enumerate(order)}

"""Population and behavioural adversarial measures (Lonngqvist et al., a comment on Guo et al. 2022).

Guo et al. measure single units: ``s~_i(eps) = E_x max_{||d|| <= eps} |h_i(x + d) - h_i(x)| / sigma_i``.
Lonngqvist et al. answer that a sensitive unit says little about the population or about behaviour. Here, on
any model's unit layer (IT sites, voxels, penultimate units; :func:`neuroguide.evaluation.responses.response_function`),
with ``r(x)`` (K,) the population response and ``sigma`` (K,) each unit's std over the clean held-out images:

- **population sensitivity** ``S(eps) = E_x max_{||d|| <= eps} ||(r(x + d) - r(x)) / sigma||_2``: the largest
  change of the whole normalized response vector (PGD on ``objectives.ResponseChange(r(x), scale=sigma)``),
  beside the **mean unit sensitivity** ``mean_i s~_i(eps)`` (:func:`neuroguide.evaluation.analyses.sensitivity.core.unit_sensitivity`
  on ``n_units`` of the K units). For a linear population ``r = W x`` (away from the pixel bounds)
  ``S = eps * sigma_max(diag(1/sigma) W)`` and ``s~_i = eps * ||row_i(diag(1/sigma) W)||``. Per image, the
  population change lies between the largest unit change ``max_i s_i(x, eps) / sigma_i`` and ``sqrt(K)`` times it.
- **behaviour**: a linear category decoder (:mod:`neuroguide.evaluation.metrics.decoder`) fitted on the clean responses
  of labelled images that are not attacked; its accuracy on the attacked images clean, under **unit-targeted**
  perturbations (each image's perturbation maximises the change of one unit: for each image and eps, the unit
  and direction with the largest normalized change ``s_i(x, eps) / sigma_i`` among the measured units, i.e. the
  most sensitive unit for that image) and under **decoder-targeted** perturbations (maximising the decoder's
  cross-entropy through the model, an attack on ``decoder(r(x))``), all at the same eps. With the
  unit-targeted perturbation the population change ``||(r(x + d) - r(x)) / sigma||`` is reported too.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from neuroguide.attacks import objectives, pgd_attack
from neuroguide.evaluation.metrics import statistics
from neuroguide.evaluation.metrics.decoder import LinearDecoder, fit_decoder
from neuroguide.evaluation.plots import check_eps_list, curve_figure, eps_tag, write_csv
from neuroguide.evaluation.responses import response_function
from neuroguide.evaluation.analyses.sensitivity import SensitivityResult, unit_sensitivity
from neuroguide.models.features import OUTPUT, activations, device_of, evaluation_mode

log = logging.getLogger("neuroguide")
KEY = "eval.population.layer"


@dataclass
class PopulationResult:
    """E eps values, N attacked images, K population units.

    Attributes:
        units: (K,) the population's columns of the layer's response; sigma: (K,) their std over clean images.
        population_change: (E, N) ``max_d ||(r(x + d) - r(x)) / sigma||_2`` per image.
        unit: the unit sensitivities of ``n_units`` of the K units (``unit.units`` index the layer's columns).
        unit_attack_unit: (E, N) the layer column each image's unit-targeted perturbation was made for.
        unit_attack_change: (E, N) ``||(r(x + d_unit) - r(x)) / sigma||_2`` under that perturbation.
        attacked: (N,) indices of the attacked images among the clean images given.
        decoder: the fitted :class:`~neuroguide.evaluation.metrics.decoder.LinearDecoder` (None without labels).
        decoder_correct_*: (N,) clean and (E, N) attacked, whether the decoder's choice is the image's label.
    """

    layer: str
    norm: str
    eps: list[float]
    units: torch.Tensor
    sigma: torch.Tensor
    population_change: torch.Tensor
    unit: SensitivityResult
    unit_attack_unit: torch.Tensor
    unit_attack_change: torch.Tensor
    attacked: torch.Tensor
    decoder: LinearDecoder | None = None
    decoder_correct_clean: torch.Tensor | None = None
    decoder_correct_unit_attack: torch.Tensor | None = None
    decoder_correct_decoder_attack: torch.Tensor | None = None
    n_decoder_images: int = 0

    @property
    def decoder_acc_clean(self) -> float | None:
        return None if self.decoder is None else float(self.decoder_correct_clean.float().mean())

    def summary(self) -> list[dict]:
        """One row per eps: population and mean unit sensitivity (normalized), and the decoder accuracies."""
        rows = []
        for e, eps in enumerate(self.eps):
            s_norm = self.unit.s_norm[e]
            row = {"eps": eps, "population_sensitivity": float(self.population_change[e].mean()),
                   "mean_unit_sensitivity": float(s_norm.nanmean()), "max_unit_sensitivity": float(s_norm.max()),
                   "population_change_unit_attack": float(self.unit_attack_change[e].mean())}
            if self.decoder is not None:
                row.update(decoder_acc_clean=self.decoder_acc_clean,
                           decoder_acc_unit_attack=float(self.decoder_correct_unit_attack[e].float().mean()),
                           decoder_acc_decoder_attack=float(self.decoder_correct_decoder_attack[e].float().mean()))
            rows.append(row)
        return rows


@torch.no_grad()
def _responses(forward: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, K) float32 CPU responses (the one activation extractor)."""
    return activations(forward, images, [OUTPUT], batch_size=batch_size)[OUTPUT]


def attacked_responses(forward: nn.Module, victim: nn.Module, images: torch.Tensor, eps_vals: Sequence[float],
                       make_objective: Callable[[torch.Tensor, torch.Tensor], objectives.Objective], *,
                       norm: str = "l2", steps: int = 128, schedule: str = "guo", restarts: int = 1,
                       batch_size: int = 128, generator: torch.Generator | None = None, desc: str = "attack",
                       progress: bool = True, measure: nn.Module | None = None) -> torch.Tensor:
    """``measure(x_adv)`` (E, N, K) (default ``forward(x_adv)``) for every (eps, image), ``x_adv`` the perturbation
    maximising an objective of ``forward``'s output.

    Every (eps, image) is one row of the attack engine (eps per row); ``make_objective(e, n)`` builds the
    objective of a chunk of rows from their eps indices ``e`` and image indices ``n`` (both (B,)).
    """
    E, N = len(eps_vals), len(images)
    device = device_of(victim)
    grid = torch.stack(torch.meshgrid(torch.arange(E), torch.arange(N), indexing="ij"), -1).reshape(-1, 2)
    eps_t = torch.tensor(list(eps_vals), dtype=torch.float32)
    out = []
    per_call = max(1, batch_size // restarts)
    for start in tqdm(range(0, len(grid), per_call), desc=desc, disable=not progress, leave=False):
        e, n = grid[start:start + per_call].unbind(1)
        res = pgd_attack(forward, images[n].to(device).float(), make_objective(e, n), eps=eps_t[e].to(device),
                         norm=norm, steps=steps, schedule=schedule, restarts=restarts, victim=victim,
                         generator=generator)
        with torch.no_grad(), evaluation_mode(victim):
            out.append((measure or forward)(res.x_adv).float().cpu())
    return torch.cat(out).reshape(E, N, -1)


def _normalized_change(r_adv: torch.Tensor, clean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(E, N, K), (N, K), (K,) -> (E, N) ``||(r_adv - clean) / sigma||_2``."""
    return ((r_adv - clean[None]) / sigma).norm(dim=-1)


def _split_images(labels: torch.Tensor | None, n_total: int, n_attack: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(attacked, decoder-training) image indices: ``n_attack`` drawn with a fixed seed, each of a class that keeps
    at least one image for the decoder; the rest train the decoder."""
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    if labels is None:
        return perm[:n_attack].sort().values, perm[n_attack:]
    left = {int(c): int(k) for c, k in zip(*torch.unique(labels, return_counts=True))}
    attack = []
    for i in perm.tolist():
        c = int(labels[i])
        if len(attack) < n_attack and left[c] > 1:
            attack.append(i)
            left[c] -= 1
    if not attack:
        raise ValueError(f"population: no image can be attacked: each of the {n_total} labelled images is the only one "
                         "of its class, which the decoder needs for training; give more labelled images "
                         "(eval.population.n_pool_images)")
    chosen = torch.tensor(sorted(attack), dtype=torch.long)
    rest = torch.tensor([i for i in perm.tolist() if i not in set(attack)], dtype=torch.long)
    return chosen, rest


def population_measures(model: nn.Module, images: torch.Tensor, eps_list: Sequence[float], *,
                        labels: torch.Tensor | None = None, layer: str | None = "region",
                        units: Sequence[int] | None = None, n_images: int = 8, n_units: int | None = 16,
                        norm: str = "l2", steps: int = 128, schedule: str = "guo", restarts: int = 1,
                        batch_size: int = 128, decoder_c: float = 1.0, seed: int = 0,
                        progress: bool = True) -> PopulationResult:
    """Population sensitivity, mean unit sensitivity and (with ``labels``) the decoder accuracies.

    Args:
        model: takes (B, 3, S, S) images in [0, 1].
        images: (M, 3, S, S) clean held-out images: ``sigma`` is the std over all M; ``n_images`` of them are
            attacked, the others (with ``labels``) train the decoder.
        eps_list: radii > 0 (L2 in [0, 1] pixel units, Linf as k/255).
        labels: (M,) class labels, or None (the decoder part is skipped).
        layer: "region" (the model's region response), "penultimate", None / "output", or a layer name; units: its columns
            (None: all). Units with zero std over the clean images are left out (logged).
        n_units: units whose unit sensitivity is measured (drawn with ``seed``; None: all K); the
            unit-targeted perturbations are made for the most sensitive of them.
        norm, steps, schedule, restarts, batch_size: the attack budget (:func:`neuroguide.attacks.pgd_attack`).
        decoder_c: the decoder's inverse L2 penalty.
    """
    eps_vals = check_eps_list(eps_list, "eval.population.eps_list", norm)
    if images.ndim != 4 or len(images) < 3:
        raise ValueError(f"population: expected clean images (M, 3, S, S) with M >= 3, got {tuple(images.shape)}")
    if labels is not None:
        labels = torch.as_tensor(labels).long().cpu()
        if labels.shape != (len(images),):
            raise ValueError(f"population: labels must be ({len(images)},), one per image; got {tuple(labels.shape)}")
    if int(n_images) < 1 or int(n_images) >= len(images):
        raise ValueError(f"eval.population.n_images={n_images}: attack at least 1 and fewer than the {len(images)} "
                         "clean images (the rest estimate sigma and train the decoder)")
    device = device_of(model)
    gen = torch.Generator().manual_seed(seed)
    if units is not None:  # a population is a set of units: sorted, each once
        units = torch.unique(torch.as_tensor(list(units)).long()).tolist()
    full, name = response_function(model, layer, units, key=KEY)
    layer_name = None if name == "output" else name
    with evaluation_mode(model):
        clean_all = _responses(full, images, batch_size)  # (M, K0)
    cols = torch.as_tensor(units if units is not None else range(clean_all.shape[1])).long()
    sigma_all = clean_all.double().std(0).float()
    finite = torch.isfinite(clean_all).all(0)
    if not bool(finite.all()):
        bad = cols[~finite].tolist()
        raise ValueError(f"population: units {bad[:10]}{'...' if len(bad) > 10 else ''} of {name} give NaN or inf "
                         f"responses on the clean images ({len(bad)} of {len(cols)} units): the model's output is broken "
                         f"for them; pick other columns with eval.population.units or check the checkpoint")
    keep = sigma_all > 0
    if not bool(keep.any()):
        raise ValueError(f"population: every unit of {name} has zero std over the {len(images)} clean images")
    if not bool(keep.all()):
        log.warning("population: %d of %d units of %s have zero std over the clean images and are left out",
                    int((~keep).sum()), len(keep), name)
    cols, sigma, clean_all = cols[keep], sigma_all[keep], clean_all[:, keep]
    forward, _ = response_function(model, layer, cols.tolist(), key=KEY)

    attack_idx, fit_idx = _split_images(labels, len(images), int(n_images), seed)
    x = images[attack_idx].detach().float().cpu()
    clean = clean_all[attack_idx]
    budget = dict(norm=norm, steps=steps, schedule=schedule, restarts=restarts, batch_size=batch_size,
                  generator=gen, progress=progress)
    log.info("population: %d units of %s, %d attacked images, eps %s", len(cols), name, len(x), eps_vals)

    # population sensitivity: the largest normalized change of the whole response vector
    r_pop = attacked_responses(forward, model, x, eps_vals,
                               lambda e, n: objectives.ResponseChange(clean[n], scale=sigma), desc="population", **budget)
    pop_change = _normalized_change(r_pop, clean, sigma)

    # unit sensitivities of n_units of the units (the project's one implementation)
    pick = torch.arange(len(cols))
    if n_units is not None and int(n_units) < len(cols):
        pick = torch.randperm(len(cols), generator=torch.Generator().manual_seed(seed))[:int(n_units)].sort().values
    unit = unit_sensitivity(model, x, layer_name, eps_vals, units=cols[pick].tolist(), sigma=sigma[pick],
                            directions=("up", "down"), norm=norm, steps=steps, schedule=schedule, restarts=restarts,
                            batch_size=batch_size, generator=gen, progress=progress)
    # each image's most sensitive unit (and direction) at each eps, attacked alone
    norm_change = unit.change / sigma[pick][None, :, None, None]  # (E, U, D, N)
    best = norm_change.flatten(1, 2).argmax(1)  # (E, N) over U * D
    best_u, best_d = pick[best // 2], best % 2
    signs = torch.tensor([1.0, -1.0])[best_d]  # directions ("up", "down")
    r_unit = attacked_responses(forward, model, x, eps_vals,
                                lambda e, n: objectives.Unit(best_u[e, n], signs[e, n]), desc="unit-targeted", **budget)
    res = PopulationResult(layer=name, norm=norm, eps=eps_vals, units=cols, sigma=sigma, population_change=pop_change,
                           unit=unit, unit_attack_unit=cols[best_u],
                           unit_attack_change=_normalized_change(r_unit, clean, sigma), attacked=attack_idx)
    if labels is None:
        log.info("population: the stimuli have no class labels: the decoder (behavioural) part is skipped")
        return res

    # the decoder's z-scoring from its own fit images only: nothing of the attacked images reaches the decoder
    fit = clean_all[fit_idx]
    fit_sd = statistics.sd(fit.double(), dim=0).float()  # NaN with one fit image: sigma used instead
    fit_sd = torch.where(fit_sd > 0, fit_sd, sigma)
    decoder = fit_decoder(fit, labels[fit_idx], fit.mean(0), fit_sd, c=decoder_c).to(device)
    y = labels[attack_idx]
    readout = nn.Sequential(forward, decoder)
    targets = decoder.targets(y)
    r_dec = attacked_responses(readout, model, x, eps_vals, lambda e, n: objectives.CrossEntropy(targets[n]),
                               measure=forward, desc="decoder-targeted", **budget)
    res.decoder = decoder.cpu()
    res.decoder_correct_clean = decoder.correct(clean, y)
    res.decoder_correct_unit_attack = torch.stack([decoder.correct(r_unit[e], y) for e in range(len(eps_vals))])
    res.decoder_correct_decoder_attack = torch.stack([decoder.correct(r_dec[e], y) for e in range(len(eps_vals))])
    res.n_decoder_images = len(fit_idx)
    return res


def evaluate(model: nn.Module, images: torch.Tensor, out_dir: str | os.PathLike, *, labels: torch.Tensor | None = None,
             layer: str | None = "region", units: Sequence[int] | None = None,
             eps_list: Sequence[float] = (0.1, 0.25, 0.5, 1.0), norm: str = "l2", n_images: int = 8,
             n_units: int | None = 16, steps: int = 128, schedule: str = "guo", restarts: int = 1,
             batch_size: int = 128, decoder_c: float = 1.0, key_prefix: str = "eval/population", seed: int = 0,
             progress: bool = True) -> dict:
    """Run :func:`population_measures`; write ``population.csv`` (one row per eps) and ``population.png``
    (sensitivities and decoder accuracies against eps) into ``out_dir``.

    Returns flat metrics ``{key_prefix}/{norm}_{eps}/population_sensitivity``, ``.../mean_unit_sensitivity``,
    ``.../max_unit_sensitivity``, ``.../population_change_unit_attack`` and, with labels,
    ``.../decoder_acc_clean`` (the same at every eps), ``.../decoder_acc_unit_attack``,
    ``.../decoder_acc_decoder_attack``; ``{key_prefix}/n_units``, ``/n_images``, ``/n_unit_sensitivity_units``,
    ``/n_decoder_images``.
    """
    res = population_measures(model, images, eps_list, labels=labels, layer=layer, units=units, n_images=n_images,
                              n_units=n_units, norm=norm, steps=steps, schedule=schedule, restarts=restarts,
                              batch_size=batch_size, decoder_c=decoder_c, seed=seed, progress=progress)
    out = Path(out_dir)
    rows = res.summary()
    write_csv(out / "population.csv", rows)
    eps = [r["eps"] for r in rows]
    panels = [{"title": f"{res.layer}: sensitivity ({len(res.units)} units)", "xlabel": f"{norm} eps",
               "ylabel": "normalized change (units of sigma)",
               "curves": [{"x": eps, "y": [r["population_sensitivity"] for r in rows],
                           "label": "population ||dr / sigma||"},
                          {"x": eps, "y": [r["population_change_unit_attack"] for r in rows], "style": "s--",
                           "label": "population, unit-targeted d"},
                          {"x": eps, "y": [r["max_unit_sensitivity"] for r in rows], "style": "^:",
                           "label": f"max unit s/sigma ({len(res.unit.units)} units)"},
                          {"x": eps, "y": [r["mean_unit_sensitivity"] for r in rows], "style": "v-",
                           "label": "mean unit s/sigma"}]}]
    if res.decoder_acc_clean is not None:
        panels.append({"title": f"linear category decoder ({len(res.population_change[0])} images)",
                       "xlabel": f"{norm} eps", "ylabel": "accuracy",
                       "curves": [{"x": eps, "y": [r["decoder_acc_unit_attack"] for r in rows],
                                   "label": "unit-targeted"},
                                  {"x": eps, "y": [r["decoder_acc_decoder_attack"] for r in rows], "style": "s--",
                                   "label": "decoder-targeted"}],
                       "hlines": [{"y": res.decoder_acc_clean, "label": "clean"}]})
    curve_figure(panels, out / "population.png")
    metrics = {f"{key_prefix}/n_units": len(res.units), f"{key_prefix}/n_images": int(res.population_change.shape[1]),
               f"{key_prefix}/n_unit_sensitivity_units": len(res.unit.units)}
    if res.decoder_acc_clean is not None:
        metrics[f"{key_prefix}/n_decoder_images"] = res.n_decoder_images
    for r in rows:
        tag = eps_tag(norm, r["eps"])
        metrics.update({f"{key_prefix}/{tag}/{k}": v for k, v in r.items() if k != "eps"})
    return metrics

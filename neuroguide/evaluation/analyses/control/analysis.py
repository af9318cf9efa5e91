"""``evaluate.py ... eval=[control]``: region control, the category flip and super-stimuli on one model or several.

Reads the stimuli each part needs from the model's held-out split (:class:`neuroguide.evaluation.stimuli.Stimuli`):

- control (:mod:`neuroguide.evaluation.analyses.control.region_control`): the first ``n_images`` evaluation images are perturbed; the sd that
  normalizes the change is over ``n_sigma_images`` natural images spread over the held-out split (null: all of it);
- category flip (:mod:`neuroguide.evaluation.analyses.control.category_flip`): ``category_flip.n_category_images`` labelled images of
  the split (null: all); skipped with a log line when the stimuli have no class labels;
- super-stimuli (:mod:`neuroguide.evaluation.analyses.control.superstimuli`), off by default: compared with the best of the same
  natural images as the sd.

Several models (``models=[...]``): all on the stimuli of the first, one curve per model in ``control_curve.png``,
keys ``<model>/eval/control/...``, the flip and super-stimuli figures in ``<out>/<model>/``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from neuroguide.evaluation.analyses.control import category_flip
from neuroguide.evaluation.analyses.control import region_control as control
from neuroguide.evaluation.analyses.control import superstimuli
from neuroguide.evaluation.responses import response_function
from neuroguide.evaluation.stimuli import Stimuli
from neuroguide.evaluation.checks import check_input_sizes

log = logging.getLogger("neuroguide")

CONTROL_KEYS = ("eps_l2", "eps_linf", "directions", "target", "steps", "step_size", "random_start", "restarts",
                "schedule", "batch_size", "n_show", "seed", "progress")


def natural_images(stim: Stimuli, n: int | None) -> torch.Tensor:
    """``n`` held-out images spread over the model's split (None: all of it), on the stimuli's device."""
    if stim.split is not None:
        return stim.split(int(n) if n else None).images.to(stim.images.device)
    return stim.images if not n else stim.images[:int(n)]


def labelled_images(stim: Stimuli, n: int | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``n`` labelled held-out images and their labels (None: all), or None when the stimuli have no labels."""
    if stim.labels is None:
        return None
    if stim.split is not None:
        s = stim.split(int(n) if n else None)
        if s.labels is not None:
            return s.images.to(stim.images.device), s.labels
    return (stim.images, stim.labels) if not n else (stim.images[:int(n)], stim.labels[:int(n)])


def _section(p: dict, name: str) -> dict:
    sec = p.pop(name, None)
    if sec is None:
        return {"enabled": False}
    if not isinstance(sec, Mapping):
        raise ValueError(f"eval.control.{name} must be a mapping (e.g. {{enabled: true, ...}}), got {sec!r}")
    return dict(sec)


def evaluate(models: Mapping[str, nn.Module], stim: Stimuli, out: str | Path, params: Mapping) -> dict:
    """The control analysis (module docstring) on each of ``models`` (name -> model; one model: keys
    ``eval/control/...``, several: ``<name>/eval/control/...``), with the parameters of ``conf/eval/control.yaml``."""
    p = dict(params)
    flip_p, super_p = _section(p, "category_flip"), _section(p, "superstimulus")
    flip_on, super_on = bool(flip_p.pop("enabled", True)), bool(super_p.pop("enabled", False))
    layer, units = p.pop("layer", "region"), p.pop("units", None)
    n, n_sigma = p.pop("n_images", None), p.pop("n_sigma_images", None)
    unknown = sorted(set(p) - set(CONTROL_KEYS))
    if unknown:
        known = sorted(CONTROL_KEYS + ("layer", "units", "n_images", "n_sigma_images", "category_flip", "superstimulus"))
        raise KeyError(f"eval.control has unknown keys {unknown}; known: {known}")
    control.eps_lists(p.get("eps_l2"), p.get("eps_linf"))  # bad lists fail before any model is attacked
    control.check_directions(p.get("directions", ("up", "down")), p.get("target"))
    out = Path(out)
    images = stim.images if not n else stim.images[:int(n)]
    sd_images = natural_images(stim, n_sigma)
    log.info("control: %d perturbed images, sd over %d held-out natural images (%s)", len(images), len(sd_images),
             stim.source)
    single = len(models) == 1
    if not single:  # every model is attacked on the first one's images: L2 eps means the same only at one size
        check_input_sizes(models, images, analysis="control")
    results, metrics = {}, {}
    for name, model in models.items():
        prefix = "eval/control" if single else f"{name}/eval/control"
        model_out = out if single else out / str(name).replace("/", "_")
        results[name] = control.run_control(model, images, sd_images, layer=layer, units=units, **p)
        metrics.update(control.metrics_of(results[name], prefix))
        forward, _ = response_function(model, layer, units, key="eval.control.layer")
        if flip_on:
            metrics.update(_flip(forward, model, stim, model_out, flip_p, units, prefix))
        if super_on:
            metrics.update(superstimuli.evaluate(forward, sd_images, model_out, victim=model,
                                                 prefix=f"{prefix}/superstimulus", **super_p))
    control.write_outputs(results, out)
    return metrics


def _flip(forward, model, stim: Stimuli, out: Path, flip_p: dict, units, prefix: str) -> dict:
    fp = dict(flip_p)
    n_cat = fp.pop("n_category_images", None)
    labelled = labelled_images(stim, n_cat)
    if labelled is None:
        log.info("control: category flip skipped: %s has no class labels (a classifier's test images have them; "
                 "NSD and IT stimuli do not)", stim.source)
        return {}
    images, labels = labelled
    return category_flip.evaluate(forward, images, labels, out, unit_names=units, victim=model,
                                  prefix=f"{prefix}/category_flip", **fp)


__all__ = ["evaluate", "natural_images", "labelled_images"]

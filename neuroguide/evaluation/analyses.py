"""The analyses of ``evaluate.py`` (``eval=[...]``), registered by name: each wrapper reads its part of the
stimuli and parameters (``cfg.eval.<name>``) and calls the analysis module, imported when it runs."""
from __future__ import annotations

import dataclasses
import logging

import torch

from neuroguide.evaluation.registry import _images, _recorded, multi_model, per_model
from neuroguide.models.features import device_of

log = logging.getLogger("neuroguide")


@per_model("sensitivity")
def _sensitivity(model, stim, out, p):
    """``n_images`` attacked images (the first of the evaluation stimuli); ``sigma_i`` over
    ``n_sigma_images`` clean images spread over the same held-out split (null: all of it)."""
    from neuroguide.evaluation import sensitivity

    p = dict(p)
    n = p.pop("n_images", None)
    n_sigma = p.pop("n_sigma_images", None)
    if stim.split is not None:  # stimuli of model_stimuli: read the held-out split again, not only the first N
        sigma_images = stim.split(n_sigma).images
    else:
        sigma_images = _images(stim, n_sigma)
    log.info("sensitivity: %d attacked images, sigma_i over %d held-out clean images (%s)", len(_images(stim, n)),
             len(sigma_images), stim.source)
    return sensitivity.evaluate(model, _images(stim, n), out, sigma_images=sigma_images, **p)


@per_model("robustness", needs_labels=True)
def _robustness(model, stim, out, p):
    """``n_images`` (default 1000; null: all) labelled images spread over the model's held-out split, read
    again for this analysis (not only the top-level ``n_images``): accuracies are binomial, so 64 images
    give a standard error of ~0.06, 200 images ~0.03, 1000 ~0.015."""
    from neuroguide.evaluation import robustness

    p = dict(p)
    n = p.pop("n_images", None)
    if str(n).strip().lower() in ("all", "none", "null"):
        n = None
    if stim.split is not None:
        stim = stim.split(int(n) if n else None)
    elif n:
        stim = dataclasses.replace(stim, images=stim.images[:int(n)], labels=stim.labels[:int(n)], responses=None)
    log.info("robustness: %d labelled images (%s)", len(stim.labels), stim.source)
    return robustness.evaluate(model, stim.images, stim.labels, out, **p)


@multi_model("transfer")
def _transfer(models, stim, out, p):
    """The fixed-eps matrix, then effect-matched transfer (``effect:``), whose failure is recorded as
    ``eval/transfer/effect/failed`` and keeps the fixed-eps results."""
    from neuroguide.evaluation import transfer, transfer_effect

    p = dict(p)
    effect = p.pop("effect", None)
    n_sigma = p.pop("n_sigma_images", None)  # neural outputs: the sd of region_change_sd over the held-out split
    sigma = transfer.natural_images(stim, n_sigma) if stim.labels is None else None
    metrics = transfer.evaluate(models, stim.images, stim.labels, out, sigma_images=sigma, **p)
    with _recorded(metrics, "transfer/effect", f"the models {list(models)}"):
        metrics.update(transfer_effect.evaluate_stimuli(models, stim, out, effect))
    return metrics


def neural_reference(model, params: dict, cfg_n: int | None) -> tuple[torch.Tensor, dict]:
    """Images and measured responses to compare a model with: NSD test images with the voxels of
    ``params['regions']`` (default: the model's own region), or an IT model's test sites."""
    from neuroguide.evaluation.stimuli import STIMULI, nsd_stimuli

    info = model.neuroguide_info
    regions = params.pop("regions", None)
    n = params.pop("n_images", None) or cfg_n
    device = device_of(model)
    if info["task_name"] == "it_encoding" and not regions:
        st = STIMULI["it_encoding"](info["run_config"], info["facts"], n, {})
        return st.images.to(device), {"IT": st.responses}
    st = nsd_stimuli(info["run_config"], info["facts"], n, params.pop("stimuli", {}) or {}, regions)
    return st.images.to(device), st.region_responses


@per_model("rsa")
def _rsa(model, stim, out, p):
    from neuroguide.evaluation import rsa

    p.pop("layer", None)  # the model-vs-model layer
    images, responses = neural_reference(model, p, len(stim))
    return rsa.evaluate(model, images, out, responses=responses, **p)


@per_model("cka")
def _cka(model, stim, out, p):
    from neuroguide.evaluation import cka

    p.pop("layer", None)
    images, responses = neural_reference(model, p, len(stim))
    return cka.evaluate(model, images, out, responses=responses, **p)


@per_model("shape_bias", needs_labels=True)
def _shape_bias(model, stim, out, p):
    from neuroguide.evaluation import shape_bias

    return shape_bias.evaluate(model, out, images=stim.images, labels=stim.labels, **p)


@per_model("smoothness", needs_labels=True)
def _smoothness(model, stim, out, p):
    from neuroguide.evaluation import smoothness

    return smoothness.evaluate(model, stim.images, stim.labels, out, **p)


@multi_model("rsa")
def _rsa_models(models, stim, out, p):
    from neuroguide.evaluation import rsa

    p = dict(p)
    p.pop("regions", None), p.pop("n_images", None), p.pop("layers", None)
    return rsa.evaluate_models(models, stim.images, out, **p)


@multi_model("cka")
def _cka_models(models, stim, out, p):
    from neuroguide.evaluation import cka

    p = dict(p)
    p.pop("regions", None), p.pop("n_images", None), p.pop("layers", None)
    return cka.evaluate_models(models, stim.images, out, **p)


@per_model("control")
def _control(model, stim, out, p):
    """Region control, category flip, super-stimuli (:mod:`neuroguide.evaluation.control_analysis`)."""
    from neuroguide.evaluation import control_analysis

    return control_analysis.evaluate({"model": model}, stim, out, p)


@multi_model("control", in_sweeps=False)
def _control_models(models, stim, out, p):
    from neuroguide.evaluation import control_analysis

    return control_analysis.evaluate(models, stim, out, p)


@per_model("population")
def _population(model, stim, out, p):
    """Clean images: ``n_pool_images`` spread over the model's held-out split (null: all of it); ``n_images`` of
    them attacked, the others train the decoder (when the stimuli have labels)."""
    from neuroguide.evaluation import population

    p = dict(p)
    pool = stim.split(p.pop("n_pool_images", None)) if stim.split is not None else stim
    if pool.labels is None:
        log.info("population: %s has no class labels: population sensitivity only, the decoder part is skipped",
                 stim.source)
    return population.evaluate(model, pool.images, out, labels=pool.labels, **p)


@per_model("subspace")
def _subspace(model, stim, out, p):
    """The spectrum of J^T J at the first ``n_images`` stimuli (McNeal & Murty's perturbation subspaces)."""
    from neuroguide.evaluation import subspace

    return subspace.evaluate(model, stim.images, out, **p)


@multi_model("subspace")
def _subspace_models(models, stim, out, p):
    """Model x model similarity of perturbation subspaces on the stimuli of the first model."""
    from neuroguide.evaluation import subspace

    return subspace.evaluate_models(models, stim.images, out, **p)

"""Unit adversarial sensitivity (Guo et al. 2022): ``eval=[sensitivity]``.

Modules: :mod:`.core` (the search, the estimators' use, the result, ``evaluate``).
"""
from __future__ import annotations

import logging

from neuroguide.evaluation.analyses.sensitivity.core import SensitivityResult, unit_sensitivity
from neuroguide.evaluation.registry import _images, per_model

__all__ = ["SensitivityResult", "unit_sensitivity"]  # the search other analyses (population, the closed loop) use

log = logging.getLogger("neuroguide")


@per_model("sensitivity")
def _sensitivity(model, stim, out, p):
    """``n_images`` attacked images (the first of the evaluation stimuli); ``sigma_i`` over
    ``n_sigma_images`` clean images spread over the same held-out split (null: all of it)."""
    from neuroguide.evaluation.analyses.sensitivity import core as sensitivity

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

"""Population sensitivity and behaviour (Lonngqvist et al.): ``eval=[population]``.

Modules: :mod:`.core`; the decoder is :mod:`neuroguide.evaluation.metrics.decoder`.
"""
from __future__ import annotations

import logging

from neuroguide.evaluation.registry import per_model

log = logging.getLogger("neuroguide")


@per_model("population")
def _population(model, stim, out, p):
    """Clean images: ``n_pool_images`` spread over the model's held-out split (null: all of it); ``n_images`` of
    them attacked, the others train the decoder (when the stimuli have labels)."""
    from neuroguide.evaluation.analyses.population import core as population

    p = dict(p)
    pool = stim.split(p.pop("n_pool_images", None)) if stim.split is not None else stim
    if pool.labels is None:
        log.info("population: %s has no class labels: population sensitivity only, the decoder part is skipped",
                 stim.source)
    return population.evaluate(model, pool.images, out, labels=pool.labels, **p)

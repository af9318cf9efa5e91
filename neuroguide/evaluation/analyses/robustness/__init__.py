"""Classification robustness (PGD and AutoAttack): ``eval=[robustness]``.

Modules: :mod:`.core`.
"""
from __future__ import annotations

import dataclasses
import logging

from neuroguide.evaluation.registry import per_model

log = logging.getLogger("neuroguide")


@per_model("robustness", needs_labels=True)
def _robustness(model, stim, out, p):
    """``n_images`` (default 1000; null: all) labelled images spread over the model's held-out split, read
    again for this analysis (not only the top-level ``n_images``): accuracies are binomial, so 64 images
    give a standard error of ~0.06, 200 images ~0.03, 1000 ~0.015."""
    from neuroguide.evaluation.analyses.robustness import core as robustness

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

"""Linear CKA of layers against regions and between models: ``eval=[cka]``.

Modules: :mod:`.core`; the measure is :mod:`neuroguide.evaluation.metrics.cka`.
"""
from __future__ import annotations

from neuroguide.evaluation.registry import multi_model, per_model
from neuroguide.evaluation.stimuli import neural_reference


@per_model("cka")
def _cka(model, stim, out, p):
    from neuroguide.evaluation.analyses.cka import core as cka

    p.pop("layer", None)
    images, responses = neural_reference(model, p, len(stim))
    return cka.evaluate(model, images, out, responses=responses, **p)


@multi_model("cka")
def _cka_models(models, stim, out, p):
    from neuroguide.evaluation.analyses.cka import core as cka

    p = dict(p)
    p.pop("regions", None), p.pop("n_images", None), p.pop("layers", None)
    return cka.evaluate_models(models, stim.images, out, **p)

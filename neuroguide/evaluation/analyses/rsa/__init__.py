"""Representational similarity analysis: ``eval=[rsa]`` (model vs regions; model vs model with ``models=``).

Modules: :mod:`.core` (``evaluate``, ``evaluate_models``), :mod:`.figures` (RDM panels, MDS); the RDM math is
:mod:`neuroguide.evaluation.metrics.rdm`.
"""
from __future__ import annotations

from neuroguide.evaluation.registry import multi_model, per_model
from neuroguide.evaluation.stimuli import neural_reference


@per_model("rsa")
def _rsa(model, stim, out, p):
    from neuroguide.evaluation.analyses.rsa import core as rsa

    p.pop("layer", None)  # the model-vs-model layer
    images, responses = neural_reference(model, p, len(stim))
    return rsa.evaluate(model, images, out, responses=responses, **p)


@multi_model("rsa")
def _rsa_models(models, stim, out, p):
    from neuroguide.evaluation.analyses.rsa import core as rsa

    p = dict(p)
    p.pop("regions", None), p.pop("n_images", None), p.pop("layers", None)
    return rsa.evaluate_models(models, stim.images, out, **p)

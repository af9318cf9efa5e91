"""Targeted control (region or units up / down), the category flip and super-stimuli: ``eval=[control]``.

Modules: :mod:`.analysis` (what ``eval=[control]`` runs), :mod:`.region_control`, :mod:`.category_flip`,
:mod:`.superstimuli`.
"""
from __future__ import annotations

from neuroguide.evaluation.registry import multi_model, per_model


@per_model("control")
def _control(model, stim, out, p):
    """Region control, category flip, super-stimuli (:mod:`neuroguide.evaluation.analyses.control.analysis`)."""
    from neuroguide.evaluation.analyses.control import analysis as control_analysis

    return control_analysis.evaluate({"model": model}, stim, out, p)


@multi_model("control", in_sweeps=False)
def _control_models(models, stim, out, p):
    from neuroguide.evaluation.analyses.control import analysis as control_analysis

    return control_analysis.evaluate(models, stim, out, p)

"""Perturbation subspaces (McNeal & Murty): ``eval=[subspace]``.

Modules: :mod:`.core`.
"""
from __future__ import annotations

from neuroguide.evaluation.registry import multi_model, per_model


@per_model("subspace")
def _subspace(model, stim, out, p):
    """The spectrum of J^T J at the first ``n_images`` stimuli (McNeal & Murty's perturbation subspaces)."""
    from neuroguide.evaluation.analyses.subspace import core as subspace

    return subspace.evaluate(model, stim.images, out, **p)


@multi_model("subspace")
def _subspace_models(models, stim, out, p):
    """Model x model similarity of perturbation subspaces on the stimuli of the first model."""
    from neuroguide.evaluation.analyses.subspace import core as subspace

    return subspace.evaluate_models(models, stim.images, out, **p)

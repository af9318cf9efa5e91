"""Smoothness (NeuralGuidance): mean squared input-gradient norm of the loss, ``eval=[smoothness]``.

Modules: :mod:`.core`.
"""
from __future__ import annotations

from neuroguide.evaluation.registry import per_model


@per_model("smoothness", needs_labels=True)
def _smoothness(model, stim, out, p):
    from neuroguide.evaluation.analyses.smoothness import core as smoothness

    return smoothness.evaluate(model, stim.images, stim.labels, out, **p)

"""Transfer of perturbations between models: ``eval=[transfer]`` with ``models=[...]`` or ``sweep_dir=``.

Modules: :mod:`.fixed_eps` (the source x target matrix at fixed eps), :mod:`.effect_matched` (McNeal & Murty's
effect-matched transfer).
"""
from __future__ import annotations

from neuroguide.evaluation.registry import _recorded, multi_model


@multi_model("transfer")
def _transfer(models, stim, out, p):
    """The fixed-eps matrix, then effect-matched transfer (``effect:``), whose failure is recorded as
    ``eval/transfer/effect/failed`` and keeps the fixed-eps results."""
    from neuroguide.evaluation.analyses.transfer import fixed_eps as transfer
    from neuroguide.evaluation.analyses.transfer import effect_matched as transfer_effect

    p = dict(p)
    effect = p.pop("effect", None)
    n_sigma = p.pop("n_sigma_images", None)  # neural outputs: the sd of region_change_sd over the held-out split
    sigma = transfer.natural_images(stim, n_sigma) if stim.labels is None else None
    metrics = transfer.evaluate(models, stim.images, stim.labels, out, sigma_images=sigma, **p)
    with _recorded(metrics, "transfer/effect", f"the models {list(models)}"):
        metrics.update(transfer_effect.evaluate_stimuli(models, stim, out, effect))
    return metrics

"""The one table of model kinds: what the evaluation, the run names and the report need to know about each.

A *kind* is one concept with three uses: the task that trains it (``task=<kind>``, ``task.name``), the checkpoint's
``model_kind`` (which builder of :mod:`neuroguide.models.registry` rebuilds it) and this entry. The task declares it,
``@register_task("<kind>", kind=ModelKind(...))``, so adding a kind touches its model builder, its task and its
config, nothing else. (Checkpoints keep both ``task_name`` and ``model_kind``, always equal since they were written,
so that files of any age load.)

Layer names every analysis understands (``eval.<analysis>.layer``; :func:`neuroguide.evaluation.responses.resolve_layer`):

- ``region``: the kind's region response (``region_layer``: the output of a predictor, encoding or IT model, the
  neural head of a guided classifier);
- ``penultimate``: the kind's penultimate features (``penultimate_layer``, ``avgpool`` of the ResNets);
- ``output``: the model output; or any layer name of the model.
"""
from __future__ import annotations

from dataclasses import dataclass

REGION, PENULTIMATE, OUTPUT = "region", "penultimate", "output"


@dataclass(frozen=True)
class ModelKind:
    """One kind of model.

    Attributes:
        region_layer: the module holding the region response (None: the model output is the region response).
        penultimate_layer: the module of the penultimate features (None: the kind has none to name).
        sensitivity_units: which units ``eval.sensitivity.layer=auto`` means, ``"penultimate"`` (classifiers, as in
            Guo et al. sec. 3.2) or ``"region"``.
        stimuli: the held-out evaluation stimuli, by source: ``"nsd"`` (the subject's shared test images with the
            region's voxels), ``"classification"`` (the classifier's test folder with labels) or ``"it"`` (the IT
            recordings' test images with the sites); :mod:`neuroguide.evaluation.stimuli` reads each.
        name_factors: config keys always named in the run folder (:mod:`neuroguide.run_names`).
        report_factors: sweep factors of :mod:`neuroguide.report` that mean something for this kind (task, shuffle,
            seed and subject are always read).
    """

    region_layer: str | None = None
    penultimate_layer: str | None = "avgpool"
    sensitivity_units: str = REGION
    stimuli: str = "nsd"
    name_factors: tuple[str, ...] = ()
    report_factors: tuple[str, ...] = ("region",)

    def __post_init__(self):
        if self.sensitivity_units not in (REGION, PENULTIMATE):
            raise ValueError(f"sensitivity_units={self.sensitivity_units!r}: expected 'region' or 'penultimate'")
        if self.stimuli not in ("nsd", "classification", "it"):
            raise ValueError(f"stimuli={self.stimuli!r}: expected 'nsd', 'classification' or 'it'")


PLAIN = ModelKind()  # a module without neuroguide_info (tests, user models): its output is the response

"""The response a region or unit analysis works on, for any model kind.

Targeted control, perturbation subspaces, population measures and the closed loop all ask the same question
of a model: "what is its response vector to an image?" :func:`response_function` answers it once:

- ``layer="region"``: the model's region response: the output of a predictor or encoding model (voxels), of
  an IT model (sites), and the neural head of a guided classifier (its prediction of the region). A classifier
  without a neural head has no region response: name a layer (e.g. ``penultimate``).
- ``layer="penultimate"``: the kind's penultimate features (``avgpool`` of the ResNets).
- ``layer="output"`` (or None): the model output; ``layer=<name>``: that layer's flattened output
  (``neuroguide.models.features.LayerOutput``).

What each kind's region and penultimate layers are is declared once, by its task (:mod:`neuroguide.tasks.kinds`).
- ``units``: keep only these columns of the response.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from neuroguide.evaluation.metrics.statistics import sd
from neuroguide.models.features import LayerOutput, layer_names
from neuroguide.tasks.kinds import OUTPUT, PENULTIMATE, PLAIN, REGION, ModelKind


class Columns(nn.Module):
    """``forward(x) -> inner(x)[:, units]``: (B, K) -> (B, len(units))."""

    def __init__(self, inner: nn.Module, units: Sequence[int]):
        super().__init__()
        self.inner = inner
        self.register_buffer("units", torch.as_tensor(list(units), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if int(self.units.max()) >= y.shape[1]:
            raise IndexError(f"units {self.units.tolist()} out of range: the response has {y.shape[1]} columns")
        return y[:, self.units.to(y.device)]


def spread(m: torch.Tensor) -> float:
    """The std (N - 1) of a response ``m`` (N,) over natural images (:func:`neuroguide.evaluation.metrics.statistics.sd`):
    the unit in which control, effect-matched transfer, the category flip and super-stimuli report changes. NaN when
    undefined (fewer than 2 images, or any non-finite value: a response that is NaN on a natural image is broken,
    not missing) or 0 (a constant response), so that a change divided by it is NaN, never inf or silently 0."""
    m = torch.as_tensor(m).double().flatten()
    if not bool(torch.isfinite(m).all()):
        return float("nan")
    s = sd(m)
    return s if s > 0 else float("nan")


def kind_of(model: nn.Module) -> tuple[str | None, ModelKind]:
    """``(name, ModelKind)`` of a model returned by ``neuroguide.load_model`` (``PLAIN`` for a module without
    ``neuroguide_info``: tests, user models, whose output is their response)."""
    info = getattr(model, "neuroguide_info", None) or {}
    name = info.get("model_kind") or info.get("task_name")
    if name is None:
        return None, PLAIN
    from neuroguide.tasks import model_kind

    return name, model_kind(name)


def region_layer(model: nn.Module, key: str = "eval.<analysis>.layer") -> str | None:
    """The layer holding ``model``'s region response (None: its output); a ``ValueError`` naming ``key`` when it
    has none (a classifier without a neural head)."""
    name, kind = kind_of(model)
    layer = kind.region_layer
    if layer is not None and getattr(model, layer, None) is None:
        raise ValueError(f"this {name} model has no region response ({layer} is absent: it was trained with region=none, "
                         f"a plain classifier). Fix: set {key}=penultimate (or another layer) to use a layer's units "
                         f"instead; layers: {layer_names(model)[:12]}...")
    return layer


def resolve_layer(model: nn.Module, layer: str | None, key: str = "eval.<analysis>.layer") -> str | None:
    """The module name ``layer`` stands for on ``model`` (None: the model output): ``"region"``, ``"penultimate"``,
    ``"output"`` / None, or a layer name (returned as it is). A ValueError naming ``key`` for a name the kind does not
    have, and for ``"auto"``, which these analyses no longer take (it meant ``region``)."""
    if layer is None or layer == OUTPUT:
        return None
    if layer == REGION:
        return region_layer(model, key)
    if layer == PENULTIMATE:
        name, kind = kind_of(model)
        if kind.penultimate_layer is None:
            raise ValueError(f"{key}=penultimate: a {name or 'plain'} model declares no penultimate layer; name one "
                             f"of its layers instead, e.g. {key}=<layer>; layers: {layer_names(model)[:12]}...")
        return kind.penultimate_layer
    if layer == "auto":
        raise ValueError(f"{key}=auto: this analysis names its layer as region (the region response, what auto meant "
                         f"here), penultimate, output or a layer name. Fix: {key}=region")
    return layer


def response_function(model: nn.Module, layer: str | None = REGION, units: Sequence[int] | None = None,
                      key: str = "eval.<analysis>.layer") -> tuple[nn.Module, str]:
    """``(forward, name)``: ``forward`` maps (B, 3, S, S) images in [0, 1] to the (B, K) response of ``layer``
    (see :func:`resolve_layer` and the module docstring), restricted to ``units`` when given; ``name`` is the layer's
    name in results ("output" for the model output)."""
    name = resolve_layer(model, layer, key)
    forward: nn.Module = LayerOutput(model, name)
    if units is not None:
        units = [int(u) for u in units]
        if not units or min(units) < 0:
            raise ValueError(f"units: expected a non-empty list of column indices >= 0, got {units}")
        forward = Columns(forward, units)
    return forward, name or "output"

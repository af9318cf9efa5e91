"""The response a region or unit analysis works on, for any model kind.

Targeted control, perturbation subspaces, population measures and the closed loop all ask the same question
of a model: "what is its response vector to an image?" :func:`response_function` answers it once:

- ``layer="auto"``: the model's region response: the output of a predictor or encoding model (voxels), of
  an IT model (sites), and the neural head of a guided classifier (its prediction of the region). A classifier
  without a neural head has no region response: name a layer (e.g. ``avgpool``).
- ``layer=<name>``: that layer's flattened output (``neuroguide.models.features.LayerOutput``).
- ``units``: keep only these columns of the response.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from neuroguide.evaluation.statistics import sd
from neuroguide.models.features import LayerOutput, layer_names

# model kind -> the layer holding its region response (None: the model output)
REGION_LAYER = {"predictor": None, "encoding": None, "it_encoding": None, "guidance": "neural_head"}


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
    """The std (N - 1) of a response ``m`` (N,) over natural images (:func:`neuroguide.evaluation.statistics.sd`):
    the unit in which control, effect-matched transfer, the category flip and super-stimuli report changes. NaN when
    undefined (fewer than 2 images, or any non-finite value: a response that is NaN on a natural image is broken,
    not missing) or 0 (a constant response), so that a change divided by it is NaN, never inf or silently 0."""
    m = torch.as_tensor(m).double().flatten()
    if not bool(torch.isfinite(m).all()):
        return float("nan")
    s = sd(m)
    return s if s > 0 else float("nan")


def region_layer(model: nn.Module, key: str = "eval.<analysis>.layer") -> str | None:
    """The layer holding ``model``'s region response (None: its output); a ``ValueError`` naming ``key`` when it
    has none (a classifier without a neural head)."""
    info = getattr(model, "neuroguide_info", None) or {}
    kind = info.get("model_kind") or info.get("task_name")
    if kind not in REGION_LAYER:  # a plain module (tests, user models): its output is the response
        return None
    name = REGION_LAYER[kind]
    if name is not None and getattr(model, name, None) is None:
        raise ValueError(f"this {kind} model has no region response ({name} is absent: it was trained with region=none, "
                         f"a plain classifier). Fix: set {key}=<layer> to use a layer's units instead, e.g. "
                         f"{key}=avgpool; layers: {layer_names(model)[:12]}...")
    return name


def response_function(model: nn.Module, layer: str | None = "auto", units: Sequence[int] | None = None,
                      key: str = "eval.<analysis>.layer") -> tuple[nn.Module, str]:
    """``(forward, name)``: ``forward`` maps (B, 3, S, S) images in [0, 1] to the (B, K) response of ``layer``
    (``"auto"``: the region response, see the module docstring; None / "output": the model output), restricted to
    ``units`` when given; ``name`` is the layer's name in results ("output" for the model output)."""
    name = region_layer(model, key) if layer == "auto" else layer
    forward: nn.Module = LayerOutput(model, name)
    if units is not None:
        units = [int(u) for u in units]
        if not units or min(units) < 0:
            raise ValueError(f"units: expected a non-empty list of column indices >= 0, got {units}")
        forward = Columns(forward, units)
    return forward, name or "output"

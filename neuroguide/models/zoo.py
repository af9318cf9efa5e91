"""Where a backbone's weights come from: a local file, the local torch cache, or nowhere (random).

``backbone.weights`` (``conf/backbone/*.yaml``):

- a path: that file (MadryLab ``robustness`` format or a plain state dict; read weights-only);
- ``pretrained``: the torchvision ImageNet weights of the architecture, **only** when the file already sits
  in the local torch cache (``torch.hub.get_dir()/checkpoints``): nothing is ever downloaded;
- ``random``: a randomly initialised backbone (for tests and controls), announced loudly;
- null: ``backbone.at_eps`` picks a robust ResNet-50 from ``paths.robust_weights`` (the MadryLab loader,
  :mod:`neuroguide.models.robust_weights`).

A missing file is an error that names it and where such weights are published.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from neuroguide.models.robust_weights import robust_weights_path

RANDOM = "random"
PRETRAINED = "pretrained"
ROBUST_SOURCE = ("robust ImageNet ResNet-50s (L2 eps 0.1 .. 5, Salman et al. 2020) at "
                 "https://github.com/microsoft/robust-models-transfer and MadryLab's at https://github.com/MadryLab/robustness")


def published_at(name: str, source: str = "auto") -> str:
    """Where the ImageNet weights of architecture ``name`` are published (for error messages)."""
    url = torchvision_url(name) if source != "timm" else None
    if url:
        return f"torchvision publishes {name}'s ImageNet weights at {url}"
    return f"timm publishes its weights on the Hugging Face hub (https://huggingface.co/timm); {ROBUST_SOURCE}"


def torchvision_url(name: str) -> str | None:
    """The download URL of torchvision's default ImageNet weights of ``name`` (None: not a torchvision model)."""
    import torchvision

    try:
        return torchvision.models.get_model_weights(name).DEFAULT.url
    except (ValueError, KeyError, AttributeError):
        return None


def torch_cache_file(name: str) -> Path:
    """Where ``torch.hub`` keeps torchvision's weights of ``name`` once downloaded (not checked, not fetched)."""
    url = torchvision_url(name)
    if url is None:
        raise KeyError(f"backbone.weights={PRETRAINED}: {name!r} has no torchvision ImageNet weights; give a file path "
                       f"(backbone.weights=/path/to/weights.pt). {published_at(name, 'timm')}")
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def backbone_weights(backbone: Mapping, robust_weights: Mapping | None = None) -> Path | None:
    """The local weights file of a backbone config (``name``, ``source``, ``weights``, ``at_eps``); None for
    ``weights=random``. Raises FileNotFoundError naming the file and where such weights are published."""
    name, source = str(backbone["name"]), str(backbone.get("source") or "auto")
    weights, at_eps = backbone.get("weights"), backbone.get("at_eps")
    if weights == RANDOM:
        return None
    if weights == PRETRAINED:
        path = torch_cache_file(name)
        if not path.is_file():
            raise FileNotFoundError(f"backbone.weights={PRETRAINED}: {path} is not in the local torch cache "
                                    f"(torch.hub.get_dir()) and nothing is downloaded. {published_at(name, source)}: "
                                    f"put the file there, or set backbone.weights=/path/to/file")
        return path
    if weights is None and at_eps is None:
        raise FileNotFoundError(f"backbone {name}: no weights. Set backbone.weights=/path/to/file (or "
                                f"{PRETRAINED}: the torchvision file in the local torch cache), backbone.at_eps with "
                                f"paths.robust_weights, or backbone.weights={RANDOM} for a random control. "
                                f"{published_at(name, source)}")
    try:
        return robust_weights_path(at_eps, robust_weights, None if weights is None else str(weights))
    except FileNotFoundError as e:
        where = ROBUST_SOURCE if weights is None else published_at(name, source)
        raise FileNotFoundError(f"{e}. Such weights are published: {where}") from None

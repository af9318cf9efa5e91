"""Backbones that take [0, 1] images and are cut at a named layer.

``build_network(name, source)`` gives the whole network with normalization as its first module:
torchvision ResNets (``resnet18``, ``resnet34``, ``resnet50``) as
:class:`neuroguide.models.resnet.NormalizedResNet` (layer names and state-dict keys are
torchvision's: ``conv1``, ``layer4.0``, ``fc``); with ``source="torchvision"`` any torchvision
architecture (``alexnet``, ``vgg16``, ``vit_b_16``, ...) behind ImageNet normalization; otherwise
(``source="auto"`` or ``"timm"``) ``timm.create_model(name, pretrained=False)`` behind the model's own mean/std. Weights never come
from the internet: load them from a local file (:mod:`neuroguide.models.robust_weights`).

``Backbone(name, layer)`` returns the (B, C, h, w) feature map of ``layer`` (Guo et al. cut the
adversarially trained ResNet50 at ``layer4.0``). The forward pass stops at that layer.
"""
from __future__ import annotations

import difflib

import torch
from torch import nn

from neuroguide.models.features import layer_names
from neuroguide.models.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize
from neuroguide.models.resnet import ARCHS, NormalizedResNet


class NormalizedTimm(nn.Module):
    """A timm model behind its own Normalize: (B, 3, H, W) in [0, 1] -> the model's output.

    Layer names are given relative to ``self.model`` (timm's own names, e.g. ``stages.2``).
    """

    def __init__(self, name: str):
        super().__init__()
        import timm

        try:
            model = timm.create_model(name, pretrained=False)
        except RuntimeError as e:  # timm: "Unknown model (...)"
            raise KeyError(f"backbone {name!r} is neither a torchvision ResNet ({sorted(ARCHS)}) nor a timm "
                           f"model: {e}. List timm's names with timm.list_models()") from None
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.normalize = Normalize(cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


class NormalizedTorchvision(nn.Module):
    """A torchvision classification model behind ImageNet normalization; layer names are torchvision's
    (relative to ``self.model``, e.g. ``features.28`` of vgg16, ``encoder.layers.encoder_layer_11`` of vit_b_16)."""

    def __init__(self, name: str):
        super().__init__()
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5)
            raise KeyError(f"backbone {name!r} is not a torchvision classification model (backbone.source=torchvision)"
                           f"; nearest: {close}. All: torchvision.models.list_models()")
        self.normalize = Normalize()
        self.model = torchvision.models.get_model(name, weights=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


SOURCES = ("auto", "torchvision", "timm")


def build_network(name: str, source: str = "auto") -> nn.Module:
    """The whole network ``name`` (random init, no download), taking [0, 1] images. ``source``: ``auto``
    (the torchvision ResNets, else timm), ``torchvision`` or ``timm``."""
    if source not in SOURCES:
        raise ValueError(f"backbone.source={source!r}: expected one of {SOURCES}")
    if name in ARCHS and source != "timm":
        return NormalizedResNet(name, num_outputs=1000)
    if source == "torchvision":
        return NormalizedTorchvision(name)
    return NormalizedTimm(name)


def layer_root(network: nn.Module) -> nn.Module:
    """The module whose ``named_modules`` names are the layer names of ``network`` (and whose
    state dict has the library's own keys, the keys of a robust checkpoint)."""
    return network.model if isinstance(network, (NormalizedTimm, NormalizedTorchvision)) else network


def check_layer(root: nn.Module, layer: str, name: str) -> nn.Module:
    """The module ``layer`` of ``root`` (the network ``name``); a KeyError naming the nearest valid layer
    names (``difflib``) and the stages and blocks otherwise."""
    modules = dict(root.named_modules())
    if layer and layer in modules:
        return modules[layer]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(str(layer), names, n=5, cutoff=0.5)
    blocks = [n for n in names if n.count(".") <= 1]  # stages and blocks; their submodules are valid too
    deep = next((n for n in names if n.count(".") > 1), None)
    more = f" and their submodules ({len(names)} names in all, e.g. {deep})" if deep else ""
    shown = ", ".join(blocks[:80]) + (", ..." if len(blocks) > 80 else "")
    raise KeyError(f"backbone.layer={layer!r} is not a layer of {name}. Nearest valid names: {close or 'none'}. "
                   f"Valid layer names: {shown}{more}")


class _Stop(Exception):
    """Raised by the cut hook once the layer's output is known: the rest of the net is skipped."""


class Backbone(nn.Module):
    """(B, 3, H, W) in [0, 1] -> (B, C, h, w) feature map of ``layer`` of network ``name``.

    Args:
        name: ``resnet18`` / ``resnet34`` / ``resnet50`` (torchvision) or any timm model name, or with
            ``source="torchvision"`` any torchvision classification model.
        layer: a layer name of the network (``layer4.0``); an unknown name raises a KeyError
            listing the nearest valid ones.
    ``self.network`` is the whole network (weights load into ``self.root``, see
    :func:`neuroguide.models.robust_weights.load_robust_weights`).
    """

    def __init__(self, name: str = "resnet50", layer: str = "layer4.0", source: str = "auto"):
        super().__init__()
        self.name, self.layer = name, layer
        self.network = build_network(name, source)
        cut = check_layer(self.root, layer, name)
        object.__setattr__(self, "_cut", cut)  # a plain reference: the layer is registered in the network

    @property
    def root(self) -> nn.Module:
        return layer_root(self.network)

    def layer_names(self) -> list[str]:
        return layer_names(self.root)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: list[torch.Tensor] = []

        def hook(_m, _i, o):
            out.append(o[0] if isinstance(o, (tuple, list)) else o)
            raise _Stop

        handle = self._cut.register_forward_hook(hook)
        try:
            self.network(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not out:  # pragma: no cover - the layer is not on the forward path
            raise RuntimeError(f"layer {self.layer!r} of {self.name} was not called in the forward pass")
        return out[0]

    @torch.no_grad()
    def output_shape(self, image_size: int) -> tuple[int, ...]:
        """(C, h, w) of the feature map for (image_size x image_size) inputs (the module's mode is kept)."""
        mode = self.training
        self.eval()
        try:
            p = next(self.parameters())
            shape = tuple(self(torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)).shape[1:])
        finally:
            self.train(mode)
        return shape

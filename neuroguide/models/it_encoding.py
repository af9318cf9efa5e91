"""IT encoding model (Guo et al.): a (robust) backbone cut at a layer + a factorized readout to IT sites."""
from __future__ import annotations

import torch
from torch import nn

from neuroguide.models.backbones import Backbone
from neuroguide.models.readouts import FactorizedReadout
from neuroguide.models.registry import register_model


class ITEncodingModel(nn.Module):
    """(B, 3, S, S) in [0, 1] -> (B, n_sites) predicted IT responses.

    ``backbone``: :class:`Backbone` giving (B, C, h, w); ``readout``: :class:`FactorizedReadout`.
    ``freeze``: the backbone is kept in eval mode with ``requires_grad=False`` (input gradients still
    flow through it, so attacks on the model work).
    """

    def __init__(self, backbone: Backbone, readout: FactorizedReadout, freeze: bool = True):
        super().__init__()
        self.backbone, self.readout, self.freeze = backbone, readout, bool(freeze)
        if self.freeze:
            self.backbone.eval()
            for p in self.backbone.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ITEncodingModel":
        super().train(mode)
        if self.freeze:
            self.backbone.eval()  # frozen: never in train mode, whatever Lightning asks
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.backbone(x))


@register_model("it_encoding")
def it_encoding_model(backbone: str = "resnet50", layer: str = "layer4.0", n_sites: int = 1, image_size: int = 224,
                      freeze: bool = True, positive: bool = False) -> ITEncodingModel:
    """Backbone ``backbone`` cut at ``layer`` + a factorized readout sized for ``image_size`` inputs.

    Weights are not loaded here (a checkpoint's state dict, or the task's backbone weights, hold them).
    """
    bb = Backbone(backbone, layer)
    readout = FactorizedReadout(bb.output_shape(int(image_size)), int(n_sites), positive=bool(positive))
    return ITEncodingModel(bb, readout, freeze=bool(freeze))

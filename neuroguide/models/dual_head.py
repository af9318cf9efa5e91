"""Dual-head ResNet18 of Shao et al.: a classification head and a neural head on one trunk.

The neural head branches after ``layer1`` .. ``layer4`` (default ``layer4``, after the average
pool) and maps to the frozen predictor's output size. The frozen predictor lives inside the model
(so one checkpoint holds everything) and stays in eval mode with ``requires_grad=False`` whatever
``.train()`` is called on the parent.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neuroguide.models.resnet import NormalizedResNet

STAGES = ("layer1", "layer2", "layer3", "layer4")


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients for every parameter of ``module``."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class NeuralHead(nn.Module):
    """(B, C, h, w) feature map -> global average pool -> linear -> (B, n_outputs)."""

    def __init__(self, in_channels: int, n_outputs: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_channels, n_outputs)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.pool(fmap), 1))


class DualHeadResNet(NormalizedResNet):
    """(B, 3, H, W) in [0, 1] -> logits (B, num_classes); ``forward_heads`` also gives the neural head.

    Layer names: torchvision's (``layer4``, ``avgpool``, ``fc``) plus ``neural_head`` and ``predictor``.

    Args:
        num_classes: classes of the classification head.
        n_neural: outputs of the neural head (= the predictor's outputs); 0 for no neural head.
        branch: trunk stage the neural head reads (layer1..layer4).
        predictor: the frozen predictor (any module mapping images in [0, 1] to (B, n_neural)).
        predictor_image_size: inputs are resized to this size before the predictor, when they differ.
    """

    def __init__(self, num_classes: int, n_neural: int = 0, branch: str = "layer4", arch: str = "resnet18",
                 predictor: nn.Module | None = None, predictor_image_size: int | None = None):
        super().__init__(arch, num_classes)
        if branch not in STAGES:
            raise KeyError(f"neural head branch must be one of {STAGES}; got {branch!r} (config key task.branch)")
        self.branch = branch
        channels = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": self.feature_dim}
        if arch == "resnet50":
            channels = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
        self.neural_head = NeuralHead(channels[branch], n_neural) if n_neural > 0 else None
        self.predictor = freeze(predictor) if predictor is not None else None
        self.predictor_image_size = predictor_image_size

    def train(self, mode: bool = True) -> "DualHeadResNet":
        super().train(mode)
        if self.predictor is not None:
            self.predictor.eval()  # frozen: never in train mode, whatever Lightning asks
        return self

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (B, num_classes), neural-head output (B, n_neural) or None)."""
        h = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
        neural = None
        for name in STAGES:
            h = getattr(self, name)(h)
            if name == self.branch and self.neural_head is not None:
                neural = self.neural_head(h)
        logits = self.fc(torch.flatten(self.avgpool(h), 1))
        return logits, neural

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_heads(x)[0]

    @torch.no_grad()
    def predictor_target(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen predictor's response to ``x`` (no gradients): (B, n_neural)."""
        if self.predictor is None:
            raise RuntimeError("this model has no predictor (region=none)")
        if self.predictor_image_size and x.shape[-1] != self.predictor_image_size:
            s = self.predictor_image_size
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return self.predictor(x)

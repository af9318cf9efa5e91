"""torchvision ResNets that take [0, 1] images: normalization is the first module.

Layer names are torchvision's (``conv1``, ``layer1`` .. ``layer4``, ``avgpool``, ``fc``), so every
analysis can address them by name.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from neuroguide.models.normalize import Normalize
from neuroguide.models.registry import register_model

ARCHS = {"resnet18": torchvision.models.resnet18, "resnet34": torchvision.models.resnet34,
         "resnet50": torchvision.models.resnet50}


class NormalizedResNet(nn.Module):
    """(B, 3, H, W) in [0, 1] -> (B, num_outputs); ``features(x)`` gives the (B, D) pooled features."""

    def __init__(self, arch: str = "resnet18", num_outputs: int = 1000):
        super().__init__()
        if arch not in ARCHS:
            raise KeyError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
        net = ARCHS[arch](weights=None, num_classes=num_outputs)
        self.normalize = Normalize()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"):
            setattr(self, name, getattr(net, name))
        self.feature_dim = net.fc.in_features

    def trunk(self, x: torch.Tensor, until: str = "layer4") -> torch.Tensor:
        """Feature map after ``until`` (layer1..layer4): (B, C, h, w)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            if name == until:
                return x
        raise KeyError(f"unknown trunk stage {until!r}; choose layer1..layer4")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.trunk(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@register_model("predictor")
def neural_predictor(arch: str = "resnet18", n_outputs: int = 1) -> NormalizedResNet:
    """Neural predictor (Shao et al.): (B, 3, H, W) in [0, 1] -> (B, n_outputs) voxels or PCA components."""
    return NormalizedResNet(arch, int(n_outputs))

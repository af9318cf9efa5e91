"""Dual-head ResNet18 of Shao et al.: a classification head and a neural head on one trunk.

The neural head branches after ``layer1`` .. ``layer4`` (default ``layer4``) and maps to the frozen
predictor's output size: the stage's feature map is average-pooled to ``p x p`` and flattened, then a
linear map. As in NeuralGuidance, ``head_pool="auto"`` keeps some spatial layout at the early stages:
p = 4 after ``layer1``, 2 after ``layer2`` and ``layer3``, 1 (the global average pool) after ``layer4``.

The frozen predictor lives inside the model (exported files keep it by reference to its file, see
neuroguide.models.checkpoints) and stays in eval
mode with ``requires_grad=False`` whatever ``.train()`` is called on the parent.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neuroguide.models.registry import build_model, register_model, split_model_config
from neuroguide.models.resnet import NormalizedResNet

STAGES = ("layer1", "layer2", "layer3", "layer4")
AUTO_HEAD_POOL = {"layer1": 4, "layer2": 2, "layer3": 2, "layer4": 1}  # NeuralGuidance's pooled sizes


def head_pool_size(branch: str, head_pool: int | str = "auto") -> int:
    """Side p of the ``p x p`` pool before the neural head's linear map: ``auto`` (4 after layer1, 2
    after layer2/layer3, 1 after layer4) or a positive int (1 = global average pool)."""
    if branch not in STAGES:
        raise KeyError(f"neural head branch must be one of {STAGES}; got {branch!r} (config key task.branch)")
    if isinstance(head_pool, str):
        key = head_pool.strip().lower()
        if key == "auto":
            return AUTO_HEAD_POOL[branch]
        head_pool = int(key) if key.isdigit() else head_pool
    if isinstance(head_pool, int) and not isinstance(head_pool, bool) and head_pool >= 1:
        return head_pool
    raise ValueError(f"task.head_pool must be 'auto' or a positive int (the side of the p x p pool before the "
                     f"neural head's linear map; 1 = global average pool); got {head_pool!r}")


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients for every parameter of ``module``."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class NeuralHead(nn.Module):
    """(B, C, h, w) feature map -> adaptive average pool to (p, p) -> flatten -> linear -> (B, n_outputs).

    The linear map has ``C * p * p`` inputs (flattened channel-major, as ``torch.flatten`` does);
    ``pool=1`` is the global average pool.
    """

    def __init__(self, in_channels: int, n_outputs: int, pool: int = 1):
        super().__init__()
        self.pool_size = int(pool)
        self.pool = nn.AdaptiveAvgPool2d(self.pool_size)
        self.linear = nn.Linear(in_channels * self.pool_size ** 2, n_outputs)

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
        head_pool: side p of the (p, p) average pool before the neural head's linear map, or ``auto``
            (see :func:`head_pool_size`). The default 1 is the global pool that models made before
            this option had, so their checkpoints rebuild unchanged.
    """

    def __init__(self, num_classes: int, n_neural: int = 0, branch: str = "layer4", arch: str = "resnet18",
                 predictor: nn.Module | None = None, predictor_image_size: int | None = None,
                 head_pool: int | str = 1):
        super().__init__(arch, num_classes)
        self.head_pool = head_pool_size(branch, head_pool)  # also checks the branch
        self.branch = branch
        channels = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": self.feature_dim}
        if arch == "resnet50":
            channels = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
        self.neural_head = NeuralHead(channels[branch], n_neural, self.head_pool) if n_neural > 0 else None
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


def _upgrade(old: dict) -> tuple[dict, dict]:
    """A guided model_config written before builders and run facts were split: the predictor's
    ``image_size`` was the size its inputs are resized to; region, alpha, at_eps, ... are facts."""
    args = {"num_classes", "n_neural", "branch", "arch", "head_pool", "predictor", "predictor_image_size"}
    config = {k: v for k, v in old.items() if k in args}
    facts = {k: v for k, v in old.items() if k not in args}
    pred = old.get("predictor")
    if pred:
        config["predictor"], pred_facts = split_model_config("predictor", pred)
        if config.get("predictor_image_size") is None and pred_facts.get("image_size"):
            config["predictor_image_size"] = int(pred_facts["image_size"])
        if pred_facts:
            facts["predictor"] = pred_facts
    return config, facts


@register_model("guidance", upgrade=_upgrade)
def guided_classifier(num_classes: int, n_neural: int = 0, branch: str = "layer4", arch: str = "resnet18",
                      predictor: dict | None = None, predictor_image_size: int | None = None,
                      head_pool: int = 1) -> DualHeadResNet:
    """The dual-head classifier (Shao et al.) with a frozen predictor built from ``predictor`` (the
    predictor's own model_config; its weights come from the state dict) or none (``region=none``).

    ``head_pool``: side of the pool before the neural head's linear map, as resolved from
    ``task.head_pool`` at training time; a model_config without it (made before the option) had the
    global pool, 1. Returns (B, 3, H, W) in [0, 1] -> logits (B, num_classes).
    """
    pred = build_model("predictor", **predictor) if predictor else None
    return DualHeadResNet(int(num_classes), int(n_neural) if pred is not None else 0, branch, arch, pred,
                          predictor_image_size, head_pool=head_pool)

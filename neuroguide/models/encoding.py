"""Encoding model (McNeal & Murty; Brain-Score): a frozen backbone cut at one layer, pooled, and a linear
(ridge-fitted) readout to a region's voxels, as one torch module.

``r(x) = W pool(f_layer(x)) + b``: ``f_layer`` the (B, C, h, w) map (or (B, N, D) tokens) of ``layer`` of the
frozen backbone (normalization inside, images in [0, 1]); ``pool`` the project's one pooling
(:func:`neuroguide.models.features.pool_map`: ``pool`` x ``pool`` adaptive average, 1 = global average;
tokens averaged), the same function the feature cache is extracted with; ``W, b`` from the voxelwise ridge
(:mod:`neuroguide.models.ridge`), with the feature standardization folded in.
"""
from __future__ import annotations

import torch
from torch import nn

from neuroguide.models.backbones import Backbone
from neuroguide.models.features import pool_map
from neuroguide.models.registry import register_model


class EncodingModel(nn.Module):
    """(B, 3, S, S) in [0, 1] -> (B, n_outputs) predicted voxel responses. The backbone stays in eval mode
    with ``requires_grad=False`` (input gradients still flow, so attacks work)."""

    def __init__(self, backbone: Backbone, pool: int | None, n_features: int, n_outputs: int):
        super().__init__()
        self.backbone, self.pool = backbone, pool
        self.readout = nn.Linear(int(n_features), int(n_outputs))
        self.backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "EncodingModel":
        super().train(mode)
        self.backbone.eval()  # frozen, whatever Lightning asks
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled, flattened features of the layer: what the readout reads."""
        return pool_map(self.backbone(x), self.pool).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.features(x))


def parse_pool(pool) -> int | None:
    """``task.pool``: ``avg``/``global``/1 -> 1 (global average), an int k -> k x k, ``none``/null -> None."""
    if pool is None or str(pool).lower() == "none":
        return None
    if str(pool).lower() in ("avg", "global"):
        return 1
    try:
        k = int(pool)
    except (TypeError, ValueError):
        k = 0
    if k < 1:
        raise ValueError(f"task.pool={pool!r}: expected avg (global average), an integer k >= 1 (adaptive average "
                         "pooling to k x k) or none")
    return k


@register_model("encoding")
def encoding_model(backbone: str = "resnet50", layer: str = "layer4", source: str = "auto", pool: int | None = 1,
                   n_outputs: int = 1, image_size: int = 224) -> EncodingModel:
    """Backbone ``backbone`` (``source``: auto | torchvision | timm) cut at ``layer``, ``pool``, and a linear
    readout to ``n_outputs`` voxels sized for ``image_size`` inputs. Weights come from a checkpoint."""
    bb = Backbone(backbone, layer, source)
    with torch.no_grad():
        bb.eval()
        n_features = pool_map(bb(torch.zeros(1, 3, int(image_size), int(image_size))), pool).flatten(1).shape[1]
    return EncodingModel(bb, pool, n_features, int(n_outputs))

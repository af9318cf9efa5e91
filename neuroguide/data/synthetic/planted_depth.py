"""The planted-depth option of the synthetic NSD (``data.synthetic_nsd.planted=depth``): each area reads a
different depth of one fixed, seeded random network, so an encoding model built on that same network has a
known best layer.

The network is a randomly initialised torchvision ResNet-18 (seeded; saved beside the tree as
``planted_network.pt``, a plain state dict that ``backbone.weights`` loads). An area of depth ``layerK`` reads
a random mix of the globally averaged (B, C) features of ``layerK`` on the stimuli (through tanh, as the
default recipe reads pixel statistics). Early areas are shallow, category areas deep (:data:`DEPTH`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

NETWORK_FILE = "planted_network.pt"
ARCH = "resnet18"
LAYERS = ("layer1", "layer2", "layer3", "layer4")
# Kastner2015 label -> planted layer: V1, V2, V3 shallow; hV4, VO, PHC, V3A/B layer2; LO layer3; TO deep.
KASTNER_DEPTH = {1: "layer1", 2: "layer1", 3: "layer1", 4: "layer1", 5: "layer1", 6: "layer1", 7: "layer2",
                 8: "layer2", 9: "layer2", 10: "layer2", 11: "layer2", 12: "layer4", 13: "layer4", 14: "layer3",
                 15: "layer3", 16: "layer2", 17: "layer2"}


def depth_of(atlas: str, label: int) -> str:
    """The planted layer of an area: Kastner2015 by :data:`KASTNER_DEPTH`; the floc (category) areas layer4."""
    return KASTNER_DEPTH[int(label)] if atlas == "Kastner2015" else "layer4"


def planted_network(seed: int) -> torch.nn.Module:
    """The fixed random network of the tree (the same for the same seed), in eval mode."""
    from neuroguide.models.backbones import build_network

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = build_network(ARCH)
    return net.eval()


@torch.no_grad()
def depth_features(images: np.ndarray, seed: int, root: Path, batch_size: int = 100) -> dict[str, np.ndarray]:
    """``{layer: (n, C) z-scored global-average features}`` of the (n, S, S, 3) uint8 stimuli; writes the
    network's weights to ``root/planted_network.pt``."""
    from neuroguide.models.features import activations

    net = planted_network(seed)
    torch.save(net.state_dict(), Path(root) / NETWORK_FILE)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    acts = activations(net, x, list(LAYERS), batch_size=batch_size, pool=1)
    out = {}
    for layer in LAYERS:
        a = acts[layer].double().numpy()
        out[layer] = (a - a.mean(0)) / (a.std(0) + 1e-8)
    return out

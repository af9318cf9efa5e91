"""The one activation extractor (neuroguide.models.features.activations) and evaluation_mode."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from neuroguide.models.features import activations, evaluation_mode


class Wrapped(nn.Module):
    """A backbone inside a wrapper, as the IT models and classifiers hold it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


def test_activations_eval_mode_shapes_and_restore():
    model = Wrapped().train()
    model.head.weight.requires_grad_(False)  # a frozen part stays frozen, the rest trainable
    images = torch.rand(10, 3, 8, 8)
    acts = activations(model, images, ["backbone.2", None], batch_size=3)
    assert list(acts) == ["backbone.2", "output"]
    assert acts["backbone.2"].shape == (10, 4 * 6 * 6) and acts["output"].shape == (10, 3)
    assert acts["output"].dtype == torch.float32 and not acts["output"].requires_grad
    with torch.no_grad():  # eval mode: BatchNorm running stats, no dropout, so batches do not matter
        expected = model.eval()(images)
    model.train()
    torch.testing.assert_close(acts["output"], expected)
    assert model.training and model.backbone[1].training  # modes put back
    assert model.backbone[0].weight.requires_grad and not model.head.weight.requires_grad


def test_activations_root_pool_and_dataset():
    model = Wrapped()
    images = torch.rand(7, 3, 8, 8)
    by_root = activations(model, images, ["2"], root=model.backbone, pool=2)
    assert by_root["2"].shape == (7, 4 * 2 * 2)
    full = activations(model, images, ["backbone.2"])["backbone.2"].reshape(7, 4, 6, 6)
    torch.testing.assert_close(by_root["2"], nn.functional.adaptive_avg_pool2d(full, 2).flatten(1))
    from_dataset = activations(model, torch.utils.data.TensorDataset(images), ["backbone.2"], batch_size=4)
    torch.testing.assert_close(from_dataset["backbone.2"], full.flatten(1))
    with pytest.raises(KeyError, match="layer 'layer9' does not exist.*Valid layer names"):
        activations(model, images, ["layer9"])


def test_evaluation_mode_is_one_object():
    import neuroguide.attacks as attacks
    from neuroguide.attacks import pgd

    assert attacks.evaluation_mode is evaluation_mode and pgd.evaluation_mode is evaluation_mode

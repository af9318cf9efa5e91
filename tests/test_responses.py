"""The region response of each model kind (neuroguide.evaluation.responses)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from neuroguide.evaluation.responses import response_function
from neuroguide.models.dual_head import DualHeadResNet


def _guided(n_neural: int):
    torch.manual_seed(0)
    m = DualHeadResNet(5, n_neural, "layer4", "resnet18", None).eval()  # the head alone, no predictor
    m.neuroguide_info = {"model_kind": "guidance", "task_name": "guidance"}
    return m


def test_auto_is_the_neural_head_of_a_guided_classifier():
    m = _guided(7)
    x = torch.rand(2, 3, 32, 32)
    forward, name = response_function(m, "auto")
    assert name == "neural_head"
    assert torch.allclose(forward(x), m.forward_heads(x)[1], atol=1e-6)


def test_auto_is_the_output_of_a_predictor_and_units_pick_columns():
    m = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6))
    m.neuroguide_info = {"model_kind": "predictor", "task_name": "predictor"}
    x = torch.rand(3, 3, 8, 8)
    forward, name = response_function(m, "auto", units=[4, 1])
    assert name == "output"
    assert torch.equal(forward(x), m(x)[:, [4, 1]])


def test_a_classifier_without_a_neural_head_names_the_key_to_set():
    with pytest.raises(ValueError, match=r"eval.control.layer=<layer>.*avgpool"):
        response_function(_guided(0), "auto", key="eval.control.layer")
    forward, name = response_function(_guided(0), "avgpool")
    assert name == "avgpool" and forward(torch.rand(1, 3, 32, 32)).shape == (1, 512)


def test_units_out_of_range_are_named():
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    forward, _ = response_function(m, None, units=[5])
    with pytest.raises(IndexError, match="has 3 columns"):
        forward(torch.rand(1, 3, 2, 2))

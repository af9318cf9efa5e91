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


def test_region_is_the_neural_head_of_a_guided_classifier():
    m = _guided(7)
    x = torch.rand(2, 3, 32, 32)
    forward, name = response_function(m, "region")
    assert name == "neural_head"
    assert torch.allclose(forward(x), m.forward_heads(x)[1], atol=1e-6)


def test_region_is_the_output_of_a_predictor_and_units_pick_columns():
    m = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6))
    m.neuroguide_info = {"model_kind": "predictor", "task_name": "predictor"}
    x = torch.rand(3, 3, 8, 8)
    forward, name = response_function(m, "region", units=[4, 1])
    assert name == "output"
    assert torch.equal(forward(x), m(x)[:, [4, 1]])


def test_a_classifier_without_a_neural_head_names_the_key_to_set():
    with pytest.raises(ValueError, match=r"eval.control.layer=penultimate"):
        response_function(_guided(0), "region", key="eval.control.layer")
    forward, name = response_function(_guided(0), "avgpool")
    assert name == "avgpool" and forward(torch.rand(1, 3, 32, 32)).shape == (1, 512)


def test_units_out_of_range_are_named():
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    forward, _ = response_function(m, None, units=[5])
    with pytest.raises(IndexError, match="has 3 columns"):
        forward(torch.rand(1, 3, 2, 2))


def test_penultimate_is_avgpool_on_every_kind_that_declares_it_and_auto_is_refused_with_the_fix():
    m = _guided(7)
    x = torch.rand(2, 3, 32, 32)
    forward, name = response_function(m, "penultimate")
    assert name == "avgpool"
    assert torch.allclose(forward(x), response_function(m, "avgpool")[0](x))
    with pytest.raises(ValueError, match=r"eval.population.layer=auto.*Fix: eval.population.layer=region"):
        response_function(m, "auto", key="eval.population.layer")
    it = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    it.neuroguide_info = {"model_kind": "it_encoding", "task_name": "it_encoding"}
    with pytest.raises(ValueError, match=r"eval.subspace.layer=penultimate: a it_encoding model declares no"):
        response_function(it, "penultimate", key="eval.subspace.layer")


def test_sensitivity_auto_is_the_kinds_sensitivity_units():
    """Guo et al. measure a classifier's penultimate units; a predictor's units are its voxels (the region)."""
    from neuroguide.evaluation.analyses.sensitivity.core import auto_layer

    assert auto_layer(_guided(7)) == "avgpool"
    pred = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    pred.neuroguide_info = {"model_kind": "predictor", "task_name": "predictor"}
    assert auto_layer(pred) is None and auto_layer(nn.Linear(2, 2)) is None

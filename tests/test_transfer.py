"""Transfer matrices on planted linear models: a copy of the source receives the full white-box effect,
a model whose weights are orthogonal to the source's receives none; the random control is weaker."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn

from neuroguide.evaluation import transfer
from neuroguide.evaluation.transfer import random_like, transfer_matrix

SHAPE = (3, 4, 4)
D = 48


pytestmark = pytest.mark.usefixtures("one_thread")


def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    m = nn.Sequential(nn.Flatten(), nn.Linear(D, weight.shape[0]))
    with torch.no_grad():
        m[1].weight.copy_(weight)
        m[1].bias.copy_(bias if bias is not None else -0.5 * weight.sum(1))  # boundary through the grey image
    return m


def orthogonal_pair(k: int, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (k, D) weight matrices whose row spaces are orthogonal."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, 2 * k, generator=g))
    return q[:, :k].T * 3, q[:, k:].T * 3


def images(n=80, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 0.3 + 0.4 * torch.rand((n, *SHAPE), generator=g)


def classifiers():
    wa, wb = orthogonal_pair(2)
    return {"A": linear(wa), "A_copy": linear(wa.clone()), "B": linear(wb)}


def test_classification_transfer_planted():
    models = classifiers()
    x = images()
    y = models["A"](x).argmax(1).detach()  # A is right on every image; B is not
    res = transfer_matrix(models, x, y, eps=0.5, norm="l2", steps=10, progress=False)
    i = {n: k for k, n in enumerate(res.names)}
    assert res.metric == "acc_drop"
    white_box = res.adversarial[i["A"], i["A"]]
    assert white_box > 0.3
    assert res.adversarial[i["A"], i["A_copy"]] == pytest.approx(white_box)  # same model: same effect
    # orthogonal weights: only what is left of the random start reaches B (a few images near its boundary)
    assert abs(res.adversarial[i["A"], i["B"]]) <= 0.05
    assert res.random[i["A"], i["A"]] < white_box / 2  # the control of the same norm is far weaker
    np.testing.assert_allclose(res.random_norm, res.delta_norm, rtol=0.05)


def test_neural_transfer_planted_and_objectives():
    wa, wb = orthogonal_pair(5)
    models = {"A": linear(wa), "A_copy": linear(wa.clone()), "B": linear(wb)}
    x = images(20)
    res = transfer_matrix(models, x, None, eps=0.3, norm="l2", steps=8, progress=False)
    assert res.metric == "change"
    assert res.adversarial[0, 0] > 0.1
    assert res.adversarial[0, 1] == pytest.approx(res.adversarial[0, 0], rel=1e-4)
    assert res.adversarial[0, 2] < res.adversarial[0, 0] / 5
    assert res.random[0, 0] < res.adversarial[0, 0] / 2
    up = transfer_matrix(models, x, None, eps=0.3, norm="linf", steps=8, objective="up", progress=False)
    assert up.adversarial[0, 0] > 0 and up.adversarial[0, 1] == pytest.approx(up.adversarial[0, 0], rel=1e-4)
    down = transfer_matrix(models, x, None, eps=0.3, norm="linf", steps=8, objective="down", progress=False)
    assert down.adversarial[0, 0] > 0  # "down" is scored in its own direction


def test_random_control_has_the_same_norm():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(5, *SHAPE, generator=g) * torch.rand(5, 1, 1, 1, generator=g)
    r2 = random_like(delta, "l2", g)
    torch.testing.assert_close(r2.flatten(1).norm(dim=1), delta.flatten(1).norm(dim=1))
    assert (torch.nn.functional.cosine_similarity(r2.flatten(1), delta.flatten(1)).abs() < 0.6).all()
    rinf = random_like(delta, "linf", g)
    torch.testing.assert_close(rinf.flatten(1).abs().amax(1), delta.flatten(1).abs().amax(1))


def test_evaluate_outputs(tmp_path):
    models = classifiers()
    x = images(20)
    y = models["A"](x).argmax(1).detach()
    metrics = transfer.evaluate(models, x, y, tmp_path, eps=[0.25], norm="l2", steps=4, progress=False)
    assert "eval/transfer/l2_0.25/A/B/acc_drop" in metrics
    assert "eval/transfer/l2_0.25/A/B/random_acc_drop" in metrics
    assert {"eval/transfer/l2_0.25/diag_mean", "eval/transfer/l2_0.25/offdiag_mean",
            "eval/transfer/l2_0.25/random_mean"} <= set(metrics)
    rows = list(csv.DictReader(open(tmp_path / "transfer_l2_0.25.csv")))
    assert len(rows) == 9 and {"source", "target", "adversarial", "random", "delta_norm"} <= set(rows[0])
    assert (tmp_path / "transfer_l2_0.25.png").stat().st_size > 1000


def test_different_input_sizes_are_refused(tmp_path):
    models = classifiers()
    models["A"].image_size = 4
    models["B"].neuroguide_info = {"model_config": {"image_size": 8}}
    x = images(4)
    with pytest.raises(ValueError, match=r"one input size.*'A': 4 px, 'B': 8 px"):
        transfer.evaluate(models, x, None, tmp_path, eps=0.1, progress=False)
    with pytest.raises(ValueError, match="model 'A' takes 8 px images but the images are 4 px"):
        transfer_matrix({"A": models["A"]}, x, None, eps=0.1, input_sizes={"A": 8}, progress=False)


def test_bad_input(tmp_path):
    models = classifiers()
    x = images(4)
    with pytest.raises(ValueError, match="eps holds"):
        transfer.evaluate(models, x, None, tmp_path, eps=-0.1, progress=False)
    with pytest.raises(ValueError, match="eps is empty"):
        transfer.evaluate(models, x, None, tmp_path, eps=[], progress=False)
    with pytest.raises(ValueError, match="objective 'sideways' is not known"):
        transfer_matrix(models, x, None, eps=0.1, objective="sideways", progress=False)
    with pytest.raises(ValueError, match="models is empty"):
        transfer_matrix({}, x, None, eps=0.1, progress=False)

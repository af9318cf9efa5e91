"""Smoothness against the closed-form input gradient of a linear softmax classifier, batch-size
independence, adversarial points within eps, and bad input."""
from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

pytest.importorskip("neuroguide.attacks")  # the attack engine (another piece); skip only if it is missing

from neuroguide.evaluation.analyses.smoothness import core as smoothness  # noqa: E402

SHAPE = (3, 4, 4)
D = 48


def linear(k=3, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, k))
    with torch.no_grad():
        model[1].weight.mul_(4)
    return model


def data(n=12, k=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *SHAPE), generator=g), torch.randint(0, k, (n,), generator=g)


def closed_form(model, x, y):
    """grad_x CE(Wx + b, y) = W^T (softmax(Wx + b) - onehot(y))."""
    w, b = model[1].weight, model[1].bias
    with torch.no_grad():
        p = torch.softmax(x.flatten(1) @ w.T + b, dim=1)
        p[torch.arange(len(y)), y] -= 1
        return (p @ w).square().sum(1)


def test_gradient_norm_equals_closed_form_and_ignores_batch_size():
    model = linear()
    x, y = data()
    sq, loss = smoothness.input_gradient_sq_norms(model, x, y, batch_size=5)
    torch.testing.assert_close(sq, closed_form(model, x, y), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(smoothness.input_gradient_sq_norms(model, x, y, batch_size=1)[0], sq)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(model(x), y, reduction="none").detach())


def test_mode_and_grad_flags_restored():
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    model.train()
    x, y = data()
    smoothness.input_gradient_sq_norms(model, x, y)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_evaluate_adversarial_points_are_rougher(tmp_path):
    """Two classes: ||grad|| = (1 - p_y) ||w_1 - w_0||, which grows as PGD lowers p_y."""
    model = linear(k=2)
    x, y = data(k=2)
    m = smoothness.evaluate(model, x, y, tmp_path, eps=0.5, norm="l2", steps=5, progress=False)
    assert set(m) == {"eval/smoothness/clean", "eval/smoothness/adv", "eval/smoothness/loss_clean",
                      "eval/smoothness/loss_adv"}
    assert m["eval/smoothness/clean"] == pytest.approx(float(closed_form(model, x, y).mean()), rel=1e-5)
    assert m["eval/smoothness/adv"] > m["eval/smoothness/clean"]
    assert m["eval/smoothness/loss_adv"] > m["eval/smoothness/loss_clean"]
    rows = list(csv.DictReader(open(tmp_path / "smoothness.csv")))
    assert len(rows) == len(x)
    assert all(float(r["grad_sq_adv"]) > float(r["grad_sq_clean"]) for r in rows)
    assert (tmp_path / "smoothness.png").is_file()


def test_adversarial_points_within_eps():
    model = linear()
    x, y = data()
    xa = smoothness.adversarial_points(model, x, y, eps=0.3, norm="l2", steps=3)
    assert ((xa - x).flatten(1).norm(dim=1) <= 0.3 + 1e-5).all()
    assert xa.min() >= 0 and xa.max() <= 1


def test_bad_labels():
    x, _ = data()
    with pytest.raises(ValueError, match=r"labels: expected \(12,\) class indices.*got shape \(5,\)"):
        smoothness.input_gradient_sq_norms(linear(), x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class indices"):
        smoothness.input_gradient_sq_norms(linear(), x, torch.zeros(12))

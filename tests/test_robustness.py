"""Classification robustness against the closed form of a linear classifier, outputs and bad input."""
from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from neuroguide.evaluation import robustness

SHAPE = (3, 4, 4)
D = 48


pytestmark = pytest.mark.usefixtures("one_thread")


def linear_classifier(seed=0):
    """Two logits w_k.x + b_k, with the decision boundary through the grey image x = 0.5."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 2))
    with torch.no_grad():
        model[1].bias.copy_(-0.5 * model[1].weight.sum(1))
    return model


def data(n=200, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = 0.3 + 0.4 * torch.rand((n, *SHAPE), generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return x, y


def margins(model, x, y):
    """Logit margin of the true class; the attack needs ||d|| >= margin / ||w_y - w_other|| (dual norm)."""
    with torch.no_grad():
        out = model(x)
    return out[torch.arange(len(y)), y] - out[torch.arange(len(y)), 1 - y]


@pytest.mark.parametrize("attack,norm,eps", [("pgd", "l2", 0.1), ("pgd", "linf", 3 / 255), ("fgsm", "linf", 3 / 255)])
def test_linear_classifier_robust_accuracy_closed_form(attack, norm, eps):
    """A correct point survives iff margin > eps * ||w_y - w_o||_2 (L2) or ||.||_1 (Linf)."""
    model = linear_classifier()
    x, y = data()
    w = model[1].weight.detach()
    dw = (w[1] - w[0]).abs()
    threshold = eps * (dw.norm() if norm == "l2" else dw.sum())
    m = margins(model, x, y)
    survives = m > threshold
    far = (m - threshold).abs() > 0.02 * threshold  # points on the boundary are ambiguous for any solver
    assert far.float().mean() > 0.9 and survives.any() and (~survives & (m > 0)).any()
    if attack == "fgsm":
        x_adv = robustness.adversarial_examples(model, x, y, eps=eps, norm="linf", steps=1, step_size=eps,
                                                random_start=False)
    else:
        x_adv = robustness.adversarial_examples(model, x, y, eps=eps, norm=norm, steps=20)
    correct = robustness.predictions(model, x_adv) == y
    assert torch.equal(correct[far], survives[far])
    acc = robustness.fgsm_accuracy(model, x, y, eps=eps) if attack == "fgsm" else \
        robustness.adversarial_accuracy(model, x, y, eps=eps, norm=norm, steps=20)
    assert abs(acc - survives.float().mean().item()) <= (~far).float().mean().item() + 1e-6


def test_clean_accuracy_and_evaluate_outputs(tmp_path):
    model = linear_classifier()
    x, y = data(60)
    expected = (model(x).argmax(1) == y).float().mean().item()
    assert robustness.accuracy(model, x, y) == pytest.approx(expected)
    model.train()
    metrics = robustness.evaluate(model, x, y, tmp_path, eps_l2=[0.05, 0.2], eps_linf=[2 / 255], steps=5,
                                  progress=False)
    assert model.training  # the mode is restored
    assert set(metrics) == {"eval/robustness/clean/acc", "eval/robustness/l2_0.05/acc", "eval/robustness/l2_0.2/acc",
                            "eval/robustness/linf_2_255/acc", "eval/robustness/fgsm_2_255/acc"}
    assert metrics["eval/robustness/clean/acc"] == pytest.approx(expected)
    assert metrics["eval/robustness/l2_0.2/acc"] <= metrics["eval/robustness/l2_0.05/acc"] <= expected
    rows = list(csv.DictReader(open(tmp_path / "robustness.csv")))
    assert [r["attack"] for r in rows] == ["clean", "pgd", "pgd", "pgd", "fgsm"]
    assert (tmp_path / "robustness.png").stat().st_size > 1000


def test_skip_a_threat_model_and_fgsm(tmp_path):
    model = linear_classifier()
    x, y = data(10)
    metrics = robustness.evaluate(model, x, y, tmp_path, eps_l2=None, eps_linf=[1 / 255], fgsm=False, steps=2,
                                  progress=False)
    assert set(metrics) == {"eval/robustness/clean/acc", "eval/robustness/linf_1_255/acc"}


@pytest.mark.parametrize("kw,match", [(dict(eps_l2=[]), "eps_l2 is empty"),
                                      (dict(eps_linf=[-2 / 255]), "eps_linf holds .*finite number > 0")])
def test_bad_eps_lists(tmp_path, kw, match):
    x, y = data(4)
    with pytest.raises(ValueError, match=match):
        robustness.evaluate(linear_classifier(), x, y, tmp_path, progress=False, **kw)


def test_bad_labels():
    x, y = data(4)
    with pytest.raises(ValueError, match=r"labels: expected \(4,\) class indices"):
        robustness.accuracy(linear_classifier(), x, y[:3])
    with pytest.raises(ValueError, match="integer class indices"):
        robustness.accuracy(linear_classifier(), x, y.float())

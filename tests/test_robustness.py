"""Classification robustness against the closed form of a linear classifier, outputs and bad input."""
from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from neuroguide.evaluation.analyses.robustness import core as robustness

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


# ----------------------------------------------------------------------------- AutoAttack
SHAPE8 = (3, 8, 8)


def linear_k(k: int, seed=0):
    """K logits w_k.x + b_k on 8x8 images, each boundary through the mean grey image."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, k))
    with torch.no_grad():
        model[1].bias.copy_(-0.5 * model[1].weight.sum(1))
    return model


def data_k(model, k: int, n=60, seed=1):
    """Images in [0.3, 0.7] (small attacks never meet [0, 1]); labels = the model's prediction, 20% relabelled
    at random (so clean accuracy is below 1)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 + 0.4 * torch.rand((n, *SHAPE8), generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    relabel = torch.rand(n, generator=g) < 0.2
    return x, torch.where(relabel, torch.randint(0, k, (n,), generator=g), y)


def flip_radius(model, x, y, norm):
    """(N,) smallest perturbation norm that changes a correct prediction of a linear model (unbounded space):
    min_{j != y} (z_y - z_j) / ||w_y - w_j||_* (dual norm: L2 for L2, L1 for Linf); 0 where already wrong."""
    w = model[1].weight.detach()
    with torch.no_grad():
        z = model(x)
    idx = torch.arange(len(y))
    margin = z[idx, y][:, None] - z  # (N, K)
    dw = w[y][:, None, :] - w[None, :, :]  # (N, K, D)
    dual = dw.norm(dim=2) if norm == "l2" else dw.abs().sum(2)
    r = margin / dual.clamp_min(1e-12)
    r[idx, y] = float("inf")
    return r.min(1).values.clamp_min(0)


@pytest.mark.parametrize("k", [5, 3])
@pytest.mark.parametrize("norm,eps", [("l2", 0.1), ("linf", 2 / 255)])
def test_autoattack_is_exact_on_a_linear_classifier_and_at_most_pgd(k, norm, eps):
    """On a linear classifier every pairwise boundary is a hyperplane, so the targeted attacks (APGD-T at the K - 1
    other classes; FAB-T in its place for K = 3) find the exact robust accuracy, here computed in closed form from
    the logit margins and weight norms: AutoAttack matches it on every image away from the boundary and is never
    above PGD at the same eps on the same images (PGD maximizes the cross-entropy, which can aim at the wrong
    class). Deterministic: AutoAttack's seed and PGD's generator are fixed. At an eps below half the smallest flip
    radius no prediction can change: AutoAttack's accuracy is the clean accuracy."""
    model = linear_k(k)
    x, y = data_k(model, k)
    clean = robustness.predictions(model, x) == y
    x_adv, ran = robustness.autoattack_examples(model, x, y, eps=eps, norm=norm, mode="fast")
    assert ran == ("apgd-ce+apgd-t(4)" if k == 5 else "apgd-ce+fab-t(2)")
    d = (x_adv - x).flatten(1)
    assert ((d.norm(dim=1) if norm == "l2" else d.abs().amax(1)) <= eps * (1 + 1e-4)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    aa_correct = robustness.predictions(model, x_adv) == y
    radius = flip_radius(model, x, y, norm)
    survives = clean & (radius > eps)
    far = (radius - eps).abs() > 0.02 * eps
    assert far.float().mean() > 0.9 and survives.any() and (clean & ~survives).any()
    assert torch.equal(aa_correct[far], survives[far])
    aa_acc = aa_correct.float().mean().item()
    pgd_acc = robustness.adversarial_accuracy(model, x, y, eps=eps, norm=norm, steps=10,
                                              generator=torch.Generator().manual_seed(0))
    assert aa_acc <= pgd_acc
    tiny = 0.5 * float(radius[clean].min())
    assert tiny > 0
    assert robustness.autoattack_accuracy(model, x, y, eps=tiny, norm=norm, mode="fast") == clean.float().mean().item()


def test_autoattack_plan_for_few_classes():
    assert robustness.autoattack_plan("standard", 10) == (["apgd-ce", "apgd-t", "fab-t", "square"], 9)
    assert robustness.autoattack_plan("standard", 1000) == (["apgd-ce", "apgd-t", "fab-t", "square"], 9)
    assert robustness.autoattack_plan("standard", 5) == (["apgd-ce", "apgd-t", "fab-t", "square"], 4)
    assert robustness.autoattack_plan("standard", 3) == (["apgd-ce", "fab-t", "square"], 2)
    assert robustness.autoattack_plan("fast", 50) == (["apgd-ce", "apgd-t"], 9)
    assert robustness.autoattack_plan("fast", 4) == (["apgd-ce", "apgd-t"], 3)
    assert robustness.autoattack_plan("fast", 2) == (["apgd-ce", "fab-t"], 1)
    for off in (False, None, "false", "off"):
        assert robustness.check_autoattack(off) is None
    assert robustness.check_autoattack("auto", "cuda") == "fast" and robustness.check_autoattack("auto", "cpu") is None
    assert robustness.check_autoattack("fast", "cpu") == "fast"
    with pytest.raises(ValueError, match="eval.robustness.autoattack: expected auto, standard, fast or false"):
        robustness.check_autoattack("strong")


def test_autoattack_keeps_the_callers_random_state_and_model_mode():
    model = linear_k(5).train()
    x, y = data_k(model, 5, n=8)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    robustness.autoattack_examples(model, x, y, eps=0.1, norm="l2", mode="fast")
    torch.testing.assert_close(torch.rand(3), expected)  # AutoAttack reseeds the global generator: restored
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_clean_accuracy_and_evaluate_outputs(tmp_path):
    model = linear_classifier()
    x, y = data(60)
    expected = (model(x).argmax(1) == y).float().mean().item()
    assert robustness.accuracy(model, x, y) == pytest.approx(expected)
    model.train()
    metrics = robustness.evaluate(model, x, y, tmp_path, eps_l2=[0.05, 0.2], eps_linf=[2 / 255], steps=5,
                                  autoattack="fast", progress=False)
    assert model.training  # the mode is restored
    accs = {"clean", "l2_0.05", "l2_0.2", "linf_2_255", "fgsm_2_255", "autoattack/l2_0.05", "autoattack/l2_0.2",
            "autoattack/linf_2_255"}
    assert set(metrics) == ({f"eval/robustness/{a}/acc" for a in accs} | {f"eval/robustness/{a}/acc_se" for a in accs}
                            | {"eval/robustness/n_images"})
    assert metrics["eval/robustness/n_images"] == 60
    for a in accs:  # binomial standard error over the 60 images
        acc = metrics[f"eval/robustness/{a}/acc"]
        assert metrics[f"eval/robustness/{a}/acc_se"] == pytest.approx((acc * (1 - acc) / 60) ** 0.5)
    assert metrics["eval/robustness/clean/acc"] == pytest.approx(expected)
    assert metrics["eval/robustness/l2_0.2/acc"] <= metrics["eval/robustness/l2_0.05/acc"] <= expected
    for tag in ("l2_0.05", "l2_0.2", "linf_2_255"):  # AutoAttack is the stronger evaluation
        assert metrics[f"eval/robustness/autoattack/{tag}/acc"] <= metrics[f"eval/robustness/{tag}/acc"]
    rows = list(csv.DictReader(open(tmp_path / "robustness.csv")))
    assert [r["attack"] for r in rows] == ["clean", "pgd", "pgd", "pgd", "fgsm", "autoattack", "autoattack",
                                           "autoattack"]
    assert {"acc_se", "n", "attacks"} <= set(rows[0]) and {r["n"] for r in rows} == {"60"}
    assert rows[-1]["key"] == "autoattack/linf_2_255" and rows[-1]["attacks"] == "fast: apgd-ce+fab-t(1)"
    assert (tmp_path / "robustness.png").stat().st_size > 1000


def test_skip_a_threat_model_and_fgsm(tmp_path):
    model = linear_classifier()
    x, y = data(10)
    for off in (False, "auto"):  # auto: AutoAttack only when the model is on a GPU
        metrics = robustness.evaluate(model, x, y, tmp_path, eps_l2=None, eps_linf=[1 / 255], fgsm=False, steps=2,
                                      autoattack=off, progress=False)
        assert {k for k in metrics if k.endswith("/acc")} == {"eval/robustness/clean/acc",
                                                              "eval/robustness/linf_1_255/acc"}


def test_linf_only_and_l2_only(tmp_path):
    """An empty eps list skips its threat model (eval.robustness.eps_l2=[] is a Linf-only evaluation)."""
    model = linear_classifier()
    x, y = data(10)
    linf = robustness.evaluate(model, x, y, tmp_path / "linf", eps_l2=[], eps_linf=[1 / 255], steps=2,
                               autoattack=False, progress=False)
    assert {k for k in linf if k.endswith("/acc")} == {"eval/robustness/clean/acc", "eval/robustness/linf_1_255/acc",
                                                       "eval/robustness/fgsm_1_255/acc"}
    l2 = robustness.evaluate(model, x, y, tmp_path / "l2", eps_l2=[0.1], eps_linf=[], steps=2, autoattack=False,
                             progress=False)
    assert {k for k in l2 if k.endswith("/acc")} == {"eval/robustness/clean/acc", "eval/robustness/l2_0.1/acc"}


@pytest.mark.parametrize("kw,match", [
    (dict(eps_l2=[], eps_linf=[]), r"eval.robustness.eps_l2 and eval.robustness.eps_linf are both empty .*Linf-only"),
    (dict(eps_l2=None, eps_linf=[]), "eps_l2 and eval.robustness.eps_linf are both empty"),
    (dict(eps_linf=[-2 / 255]), "eval.robustness.eps_linf holds .*finite number > 0")])
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

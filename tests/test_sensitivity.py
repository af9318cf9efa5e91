"""Unit adversarial sensitivity: closed forms, the Guo schedule against plain PGD, the sign-corrected
estimator on planted noisy neurons, outputs and bad input."""
from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from neuroguide.evaluation import sensitivity
from neuroguide.evaluation.sensitivity import naive_sensitivity, sign_corrected_sensitivity, unit_sensitivity


pytestmark = pytest.mark.usefixtures("one_thread")


SHAPE = (3, 6, 6)
D = 3 * 6 * 6


def hidden_linear_model(seed=0, k=4):
    """x -> Linear (layer "1": the units under test) -> ReLU -> Linear: the named layer is linear in x."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(D, k), nn.ReLU(), nn.Linear(k, 2))


def mid_images(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 0.3 + 0.4 * torch.rand((n, *SHAPE), generator=g)


def tiny_resnet(seed=0):
    """A ResNet18-like net (BasicBlock, [2, 2, 2, 2], narrow) from timm, normalization first."""
    from timm.models.resnet import BasicBlock, ResNet

    from neuroguide.models.normalize import Normalize

    torch.manual_seed(seed)
    return nn.Sequential(Normalize(), ResNet(BasicBlock, [2, 2, 2, 2], num_classes=10, channels=(8, 16, 32, 64))).eval()


# ----------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("norm,eps_list", [("l2", [0.05, 0.1]), ("linf", [1 / 255, 3 / 255])])
def test_linear_layer_sensitivity_closed_form(norm, eps_list):
    """s_i(x, eps) = eps ||w_i||_2 (L2) or eps ||w_i||_1 (Linf) for a linear unit, every image and direction."""
    model = hidden_linear_model()
    x = mid_images(5)
    res = unit_sensitivity(model, x, "1", eps_list, norm=norm, restarts=1, steps=24, schedule="guo", progress=False)
    w = model[1].weight.detach()
    wn = w.norm(dim=1) if norm == "l2" else w.abs().sum(1)
    expected = torch.tensor(eps_list)[:, None] * wn[None]  # (E, U)
    torch.testing.assert_close(res.s, expected, rtol=0.01, atol=0)
    for d in range(2):  # both directions reach it
        torch.testing.assert_close(res.change[:, :, d].mean(-1), expected, rtol=0.01, atol=0)
    sigma = (x.flatten(1) @ w.T).std(0)
    torch.testing.assert_close(res.sigma, sigma, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.s_norm, expected / sigma, rtol=0.011, atol=0)


def test_guo_schedule_at_least_as_strong_as_pgd_at_equal_gradient_evaluations():
    model = tiny_resnet()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(units=6, restarts=2, steps=16, progress=False)
    pgd = unit_sensitivity(model, x, "1.global_pool", [0.25, 1.0], schedule="pgd",
                           generator=torch.Generator().manual_seed(1), **kw)
    guo = unit_sensitivity(model, x, "1.global_pool", [0.25, 1.0], schedule="guo",
                           generator=torch.Generator().manual_seed(1), **kw)
    print(f"\nmean s_i(eps) at eps 0.25, 1.0: plain PGD {pgd.s.mean(1).tolist()} ({pgd.grad_evals} gradient "
          f"evaluations), Guo schedule {guo.s.mean(1).tolist()} ({guo.grad_evals} gradient evaluations)")
    assert guo.grad_evals == pgd.grad_evals
    assert guo.s.mean() >= pgd.s.mean()  # over all (eps, unit, image)
    # at a small eps both reach the near-linear optimum: a tie within 1% (seeds 0-5: Guo / PGD >= 0.996)
    assert (guo.s.mean(1) >= 0.99 * pgd.s.mean(1)).all()


def test_named_layers_of_the_dual_head_model():
    """Neural-head units and penultimate features of the project's dual-head ResNet, by layer name."""
    from neuroguide.models.dual_head import DualHeadResNet

    torch.manual_seed(0)
    model = DualHeadResNet(num_classes=3, n_neural=5).train()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for layer in ("neural_head", "avgpool"):
        res = unit_sensitivity(model, x, layer, [0.5], units=[0, 4], restarts=1, steps=3, progress=False)
        assert res.clean.shape == (2, 2) and (res.s > 0).all()
        assert model.training and all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="out of range: the layer has 5 units"):
        unit_sensitivity(model, x, "neural_head", [0.5], units=[5], progress=False)


# ----------------------------------------------------------------------------- sign-corrected estimator
def test_sign_corrected_estimator_removes_the_noise_bias():
    """Planted: true change +/-1 per (image, unit), measurement noise sd 2 with 3 repeats."""
    g = torch.Generator().manual_seed(0)
    m, k, r = 4000, 3, 3
    true_clean = torch.randn(m, k, generator=g)
    true_change = torch.where(torch.rand(m, k, generator=g) < 0.5, -1.0, 1.0)
    true_adv = true_clean + true_change
    noise = lambda: 2.0 * torch.randn(m, k, r, generator=g)  # noqa: E731
    resp_clean, resp_adv = true_clean[..., None] + noise(), true_adv[..., None] + noise()
    resp_clean[0, 0, 1] = float("nan")  # a missing repeat
    sc = sign_corrected_sensitivity(true_clean, true_adv, resp_clean, resp_adv)  # a model with the right signs
    naive = naive_sensitivity(resp_clean, resp_adv)
    assert (naive > 1.3).all()  # |1 + N(0, 2 sqrt(2/3))| is biased well above the true 1
    torch.testing.assert_close(sc, torch.ones(k), atol=0.08, rtol=0)
    # a model that gets the signs wrong half the time is biased towards zero, never upwards
    flipped = torch.where(torch.rand(m, k, generator=g) < 0.5, true_adv, 2 * true_clean - true_adv)
    assert (sign_corrected_sensitivity(true_clean, flipped, resp_clean, resp_adv).abs() < 0.15).all()


def test_unit_sensitivity_with_measured_repeats():
    """Attacks made on the model, measured on a noisy copy of it: the sign-corrected estimate agrees with
    the model's own (noise-free) sensitivity within 4 standard errors; the plain mean |delta r| is far above."""
    model = hidden_linear_model()
    m, noise_sd, repeats = 600, 0.5, 4
    x = mid_images(m)
    g = torch.Generator().manual_seed(3)

    def measure(images):  # the "neurons": the model's layer-1 units + noise, 4 repeats
        h = model[1](images.flatten(1)).detach()
        return h[..., None] + noise_sd * torch.randn(*h.shape, repeats, generator=g)

    res = unit_sensitivity(model, x, "1", [0.3], units=[0, 2], restarts=1, steps=8, batch_size=4096, progress=False,
                           responses_with_repeats=measure)
    assert res.s_measured.shape == (1, 2)
    se = noise_sd * (2 / repeats) ** 0.5 / m ** 0.5
    assert ((res.s_measured - res.s).abs() < 4 * se).all(), (res.s_measured, res.s, se)
    assert (res.s_measured_naive > res.s + 0.08).all(), (res.s_measured_naive, res.s)
    row = res.rows()[0]
    assert {"s_measured", "s_measured_naive", "sigma_measured", "s_measured_norm"} <= set(row)


# ----------------------------------------------------------------------------- outputs
def test_evaluate_writes_table_and_figure(tmp_path):
    model = hidden_linear_model()
    x = mid_images(6)
    metrics = sensitivity.evaluate(model, x, tmp_path, layer="1", eps_list=[0.05, 0.1], units=3, restarts=1, steps=6,
                                   progress=False)
    assert {"eval/sensitivity/l2_0.05/mean_norm", "eval/sensitivity/l2_0.1/sd_norm", "eval/sensitivity/l2_0.1/mean",
            "eval/sensitivity/n_units"} <= set(metrics)
    assert metrics["eval/sensitivity/l2_0.1/mean_norm"] > metrics["eval/sensitivity/l2_0.05/mean_norm"] > 0
    rows = list(csv.DictReader(open(tmp_path / "sensitivity_1.csv")))
    assert len(rows) == 2 * 3 and {"eps", "unit", "sigma", "s", "s_norm", "s_up", "s_down"} <= set(rows[0])
    assert (tmp_path / "sensitivity_1.png").stat().st_size > 1000


def test_units_selection_and_dead_units():
    model = hidden_linear_model(k=6)
    with torch.no_grad():
        model[1].weight[5] = 0.0  # a unit with no dynamic range: sigma = 0
    x = mid_images(4)
    a = unit_sensitivity(model, x, "1", [0.1], units=3, restarts=1, steps=2, progress=False)
    b = unit_sensitivity(model, x, "1", [0.1], units=3, restarts=1, steps=2, progress=False)
    assert a.units.tolist() == b.units.tolist() and len(a.units) == 3  # a fixed draw
    res = unit_sensitivity(model, x, "1", [0.1], units=[4, 5], restarts=1, steps=2, progress=False)
    assert torch.isnan(res.s_norm[0, 1]) and res.summary()[0]["n_units"] == 1
    with pytest.raises(ValueError, match="out of range: the layer has 6 units"):
        unit_sensitivity(model, x, "1", [0.1], units=[7], progress=False)


# ----------------------------------------------------------------------------- bad input
def test_unknown_layer_lists_valid_names():
    with pytest.raises(KeyError, match=r"layer 'layer9' does not exist.*Valid layer names: 0, 1, 2, 3"):
        unit_sensitivity(hidden_linear_model(), mid_images(2), "layer9", [0.1], progress=False)


@pytest.mark.parametrize("eps_list,match", [([], "eps_list is empty"), (None, "eps_list is None"),
                                            ([0.5, -1.0], "every eps must be a finite number > 0")])
def test_bad_eps_list(eps_list, match):
    with pytest.raises(ValueError, match=match):
        unit_sensitivity(hidden_linear_model(), mid_images(2), "1", eps_list, progress=False)
    with pytest.raises(ValueError, match=match):
        sensitivity.evaluate(hidden_linear_model(), mid_images(2), "unused", layer="1", eps_list=eps_list,
                             progress=False)


def test_measure_with_wrong_shape_is_explained():
    with pytest.raises(ValueError, match=r"responses_with_repeats must map .*the same 4 units"):
        unit_sensitivity(hidden_linear_model(), mid_images(3), "1", [0.1], progress=False,
                         responses_with_repeats=lambda im: torch.zeros(len(im), 7, 2))

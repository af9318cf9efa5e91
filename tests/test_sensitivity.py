"""Unit adversarial sensitivity: closed forms, the Guo schedule against plain PGD, the sign-corrected
estimator on planted noisy neurons, sigma_i over a separate large clean set (also through evaluate.py),
the default layer, the Guo et al. preset, outputs and bad input."""
from __future__ import annotations

import csv
import warnings

import numpy as np

import pytest
import torch
from torch import nn

from neuroguide.evaluation.analyses.sensitivity import core as sensitivity
from neuroguide.evaluation.analyses.sensitivity.core import naive_sensitivity, sign_corrected_sensitivity, unit_sensitivity


# the older tests below take sigma_i over the attacked images (the fallback, which warns): keep their output quiet
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:unit sensitivity. sigma_i")]


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


def test_steps_per_phase_reaches_the_attack_and_doubles_its_gradient_evaluations():
    """eval.sensitivity.steps_per_phase goes through to the engine: `steps` in each of the Guo schedule's two phases,
    so E x U x D x N x restarts x 2 x steps gradient evaluations (vs x steps when split), same closed form."""
    model = hidden_linear_model()
    x = mid_images(2)
    kw = dict(units=[0, 1], restarts=1, steps=6, schedule="guo", progress=False)
    split = unit_sensitivity(model, x, "1", [0.1], **kw)
    per_phase = unit_sensitivity(model, x, "1", [0.1], steps_per_phase=True, **kw)
    assert split.grad_evals == 1 * 2 * 2 * 2 * 1 * 6
    assert per_phase.grad_evals == 2 * split.grad_evals
    wn = model[1].weight.detach()[:2].norm(dim=1)
    torch.testing.assert_close(per_phase.s, 0.1 * wn[None], rtol=0.01, atol=0)


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


# ----------------------------------------------------------------------------- sigma_i over a large clean set
class LinearUnit(nn.Module):
    """One unit ``h(x) = w . x``, linear in the pixels; records the batch size of every forward pass."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.batches: list[int] = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return (x.flatten(1) @ self.w)[:, None]


def test_sigma_from_the_large_clean_set_not_the_attacked_images():
    """s~ = s / sigma_large with sigma_large the std of w.x over 400 clean images (numpy, independently),
    not the std over the 8 attacked images; the clean responses are computed in bounded batches."""
    w = torch.randn(D, generator=torch.Generator().manual_seed(4))
    model = LinearUnit(w)
    attacked, large = mid_images(8, seed=1), mid_images(400, seed=2)
    w64 = w.double().numpy()
    sigma_large = np.std(large.double().flatten(1).numpy() @ w64, ddof=1)
    sigma_attacked = np.std(attacked.double().flatten(1).numpy() @ w64, ddof=1)
    assert abs(sigma_attacked / sigma_large - 1) > 0.05, (sigma_attacked, sigma_large)  # the test can tell them apart
    eps = [0.05, 0.1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 400 >= 10 x 8 clean images: no warning
        res = unit_sensitivity(model, attacked, None, eps, sigma_images=large, restarts=1, steps=24, batch_size=16,
                               progress=False)
    assert max(model.batches) <= 16  # clean responses of the 400 images in batches, like the attack
    assert res.n_sigma == 400 and res.n_images == 8
    torch.testing.assert_close(res.sigma.double(), torch.tensor([sigma_large], dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(res.s_norm.double(), res.s.double() / sigma_large, rtol=1e-5, atol=0)
    expected_s = torch.tensor(eps)[:, None] * w.norm()  # closed form of a linear unit: eps ||w||_2
    torch.testing.assert_close(res.s_norm, expected_s / float(sigma_large), rtol=0.01, atol=0)
    wrong = res.s.double() / sigma_attacked  # what the std over the attacked images would give
    assert ((res.s_norm.double() - wrong).abs() > 0.04 * wrong).all()
    row = res.rows()[0]
    assert row["n_sigma_images"] == 400 and row["n_images"] == 8 and row["sigma"] == pytest.approx(sigma_large, 1e-5)


def test_measured_sigma_over_the_same_large_clean_set():
    """With measured responses, their sigma is also taken over sigma_images (repeat means, NaN-aware)."""
    model = hidden_linear_model()
    attacked, large = mid_images(3, seed=1), mid_images(60, seed=2)

    def measure(images):  # noise-free "neurons" = the layer-1 units, 2 repeats, one of them missing
        h = model[1](images.flatten(1)).detach()
        return torch.stack([h, torch.full_like(h, float("nan"))], dim=-1)

    res = unit_sensitivity(model, attacked, "1", [0.1], units=[0, 3], restarts=1, steps=2, sigma_images=large,
                           responses_with_repeats=measure, progress=False)
    w, b = model[1].weight.detach().double().numpy(), model[1].bias.detach().double().numpy()
    expected = np.std(large.double().flatten(1).numpy() @ w.T + b, axis=0, ddof=1)[[0, 3]]
    torch.testing.assert_close(res.measured["sigma"].double(), torch.from_numpy(expected), rtol=1e-5, atol=0)
    torch.testing.assert_close(res.sigma.double(), torch.from_numpy(expected), rtol=1e-5, atol=0)


def test_few_sigma_images_warn_with_the_numbers(tmp_path):
    model = LinearUnit(torch.randn(D, generator=torch.Generator().manual_seed(5)))
    attacked = mid_images(4, seed=1)
    with pytest.warns(UserWarning, match=r"std over 30 clean images from sigma_images, fewer than 10 x the 4 attacked "
                                         r"images = 40"):
        res = unit_sensitivity(model, attacked, None, [0.1], sigma_images=mid_images(30, seed=2), restarts=1,
                               steps=2, progress=False)
    assert res.n_sigma == 30
    with pytest.warns(UserWarning, match=r"std over 4 clean images from the attacked images themselves"):
        res = unit_sensitivity(model, attacked, None, [0.1], restarts=1, steps=2, progress=False)
    assert res.n_sigma == 4
    with pytest.raises(ValueError, match="expected \\(M, 3, 6, 6\\) clean images"):
        unit_sensitivity(model, attacked, None, [0.1], sigma_images=torch.rand(50, 3, 8, 8), progress=False)
    # evaluate(): the numbers go into the metrics and the CSV
    m = sensitivity.evaluate(model, attacked, tmp_path, eps_list=[0.1], restarts=1, steps=2, progress=False,
                             sigma_images=mid_images(50, seed=3))
    assert m["eval/sensitivity/n_sigma_images"] == 50 and m["eval/sensitivity/n_images"] == 4
    rows = list(csv.DictReader(open(tmp_path / "sensitivity_output.csv")))
    assert rows[0]["n_sigma_images"] == "50" and rows[0]["n_images"] == "4"


def test_auto_layer_is_the_penultimate_features_of_classifiers_only():
    from neuroguide.evaluation.analyses.sensitivity.core import auto_layer

    model = hidden_linear_model()
    assert auto_layer(model) is None  # no neuroguide_info: the output
    for task, layer in (("guidance", "avgpool"), ("predictor", None), ("it_encoding", None)):
        model.neuroguide_info = {"task_name": task}
        assert auto_layer(model) == layer


# ----------------------------------------------------------------------------- evaluate.py: sigma images, preset
@pytest.fixture(scope="module")
def guided_ckpt(tmp_path_factory):
    """An untrained guided classifier (region none) saved with a run config that points at a synthetic
    ImageNet tree of 3 classes (70 training, 10 validation images each); no training needed."""
    from neuroguide.data.synthetic.imagenet import write_synthetic_imagenet
    from neuroguide.models.checkpoints import save_model_file
    from neuroguide.tasks import get_task

    tmp = tmp_path_factory.mktemp("sensitivity_runner")
    root = write_synthetic_imagenet(tmp / "imagenet", n_classes=3, n_train=70, n_val=10, image_size=32)
    mc = {"num_classes": 3, "branch": "layer4", "head_pool": 1, "arch": "resnet18", "n_neural": 0, "predictor": None}
    facts = {"region": "none", "alpha": 0.0, "at_eps": 0.0, "image_size": 32}
    torch.manual_seed(0)
    model = get_task("guidance").build_model(**mc)
    rc = {"data": {"classification": "imagenet_subset", "classification_root": str(root),
                   "classification_class_list": str(root / "classes.txt"), "image_size": 32}}
    return tmp, save_model_file(tmp / "guided.ckpt", "guidance", mc, model.state_dict(), rc, facts=facts)


def _evaluate(tmp, out, *overrides):
    from neuroguide.config import compose_config
    from neuroguide.evaluation.runner import run

    cfg = compose_config("evaluate", [f"paths.log_dir={tmp}/outputs", "device=cpu", *overrides], output_dir=tmp / out)
    return run(cfg), tmp / out, cfg


def test_evaluate_takes_sigma_over_all_held_out_images_at_avgpool(guided_ckpt):
    """evaluate.py ckpt=<classifier>: 2 attacked images of the 6 evaluation stimuli, sigma_i over all the
    model's held-out images (not only the 6), at avgpool (layer auto); sigma checked with a forward hook."""
    from neuroguide import load_model
    from neuroguide.evaluation.stimuli import model_stimuli

    tmp, ckpt = guided_ckpt
    m, out, _ = _evaluate(tmp, "e_sigma", f"ckpt={ckpt}", "eval=[sensitivity]", "n_images=6",
                          "eval.sensitivity.n_images=2", "eval.sensitivity.units=3", "eval.sensitivity.steps=2",
                          "eval.sensitivity.restarts=1", "eval.sensitivity.eps_list=[0.5]")
    model = load_model(ckpt)
    held_out = model_stimuli(model).images  # all of the held-out split
    assert len(held_out) >= 20
    assert m["eval/sensitivity/n_images"] == 2 and m["eval/sensitivity/n_sigma_images"] == len(held_out)
    rows = list(csv.DictReader(open(out / "sensitivity" / "sensitivity_avgpool.csv")))
    assert len(rows) == 3 and {r["layer"] for r in rows} == {"avgpool"}
    assert {r["n_sigma_images"] for r in rows} == {str(len(held_out))}
    # independently: the penultimate features through a hook, their std over every held-out image
    feats = {}
    model.avgpool.register_forward_hook(lambda _m, _i, o: feats.__setitem__("h", o.flatten(1)))
    with torch.no_grad():
        model(held_out)
    units = [int(r["unit"]) for r in rows]
    sigma_all = feats["h"][:, units].double().std(0)
    sigma_first6 = feats["h"][:6, units].double().std(0)
    assert ((sigma_all - sigma_first6).abs() > 1e-3 * sigma_all).all()  # the two choices are distinguishable
    sigma = torch.tensor([float(r["sigma"]) for r in rows], dtype=torch.float64)
    torch.testing.assert_close(sigma, sigma_all, rtol=1e-4, atol=1e-7)
    s_norm = torch.tensor([float(r["s_norm"]) for r in rows], dtype=torch.float64)
    s = torch.tensor([float(r["s"]) for r in rows], dtype=torch.float64)
    torch.testing.assert_close(s_norm, s / sigma_all, rtol=1e-4, atol=0)


def test_guo2022_preset_fills_eval_sensitivity(guided_ckpt):
    """experiment=guo2022_sensitivity is eval=[sensitivity] with the paper's budget; the default is
    at most 1/10 of its gradient evaluations; the preset's keys run through the runner (budget cut here)."""
    from neuroguide.config import compose_config
    from neuroguide.evaluation.runner import _analyses

    tmp, ckpt = guided_ckpt
    guo = compose_config("evaluate", ["experiment=guo2022_sensitivity"], output_dir=tmp / "c1")
    assert list(_analyses(guo)) == ["sensitivity"]
    p = guo.eval.sensitivity
    assert (p.steps, p.restarts, p.schedule, list(p.directions), p.norm) == (250, 100, "guo", ["up", "down"], "l2")
    assert p.steps_per_phase is False  # the reading stated in the preset: 250 split over the two phases
    assert list(p.eps_list) == [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0] and p.layer == "auto" and p.n_sigma_images is None
    fast = compose_config("evaluate", [], output_dir=tmp / "c2").eval.sensitivity
    assert fast.steps * fast.restarts <= 0.1 * p.steps * p.restarts and fast.schedule == "guo"
    m, out, _ = _evaluate(tmp, "e_guo", f"ckpt={ckpt}", "experiment=guo2022_sensitivity", "n_images=4",
                          "eval.sensitivity.n_images=1", "eval.sensitivity.units=2", "eval.sensitivity.steps=2",
                          "eval.sensitivity.restarts=2", "eval.sensitivity.eps_list=[0.5,2.5]")
    assert {"eval/sensitivity/l2_0.5/mean_norm", "eval/sensitivity/l2_2.5/mean_norm"} <= set(m)
    assert m["eval/sensitivity/l2_2.5/mean"] >= m["eval/sensitivity/l2_0.5/mean"] >= 0
    assert (out / "sensitivity" / "sensitivity_avgpool.csv").exists()
    assert m["eval/sensitivity/n_sigma_images"] >= 20

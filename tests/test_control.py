"""Targeted control, the category flip and super-stimuli (neuroguide.evaluation.analyses.control.region_control / category_flip /
superstimuli / control_analysis), against closed forms of linear responses and planted units."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from neuroguide.evaluation.analyses.control import category_flip
from neuroguide.evaluation.analyses.control import region_control as control
from neuroguide.evaluation.analyses.control import superstimuli
from neuroguide.evaluation.runner import MULTI_MODEL, PER_MODEL
from neuroguide.evaluation.stimuli import Stimuli


def linear_region(w: torch.Tensor, K: int = 3, seed: int = 0) -> nn.Module:
    """A region of K voxels whose mean response is ``w . x`` (+ a bias): voxel k = (w + u_k) . x + b_k with
    sum_k u_k = 0."""
    g = torch.Generator().manual_seed(seed)
    D = w.numel()
    u = torch.randn(K, D, generator=g)
    u -= u.mean(0)
    lin = nn.Linear(D, K)
    with torch.no_grad():
        lin.weight.copy_(w.flatten()[None] + u)
        lin.bias.copy_(torch.randn(K, generator=g))
    return nn.Sequential(nn.Flatten(), lin)


def mid_images(n: int, shape=(3, 8, 8), seed: int = 1) -> torch.Tensor:
    """Images in [0.3, 0.7]: every pixel has room 0.3 to either bound."""
    return 0.3 + 0.4 * torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- region control: closed form
def test_linear_region_change_is_eps_times_the_dual_norm_of_w(one_thread):
    """m(x) = w . x away from the bounds: the best change within ||d||_2 <= eps is eps ||w||_2, within
    ||d||_inf <= eps it is eps ||w||_1, up and down. Plain PGD from the image (the default, no random start) moves
    along w / ||w|| (L2) or sign(w) (Linf) and reaches the ball's surface after 0.4 * steps steps, where the
    projection keeps it: the optimum is reached exactly, so the only error is float32 rounding of sums of 192
    products (~1e-6 relative); rtol 1e-4."""
    torch.manual_seed(0)
    w = torch.randn(3, 8, 8) * 0.1
    model = linear_region(w)
    x, nat = mid_images(5), mid_images(40, seed=2)
    # the box is not reached: L2 moves each pixel by eps |w_j| / ||w||_2, Linf by eps; both stay below 0.3
    eps_l2, eps_linf = [0.1, 0.4, 1.0], ["2/255", "8/255", "30/255"]
    assert 1.0 * float(w.abs().max() / w.norm()) < 0.3
    res = control.run_control(model, x, nat, layer=None, eps_l2=eps_l2, eps_linf=eps_linf, progress=False)
    sd = float((nat.flatten(1) @ w.flatten()).std())  # sd of m over the natural images, computed independently
    norms = {"l2": float(w.norm()), "linf": float(w.abs().sum())}
    assert [r.norm for r in res] == ["l2", "linf"]
    for r in res:
        assert r.directions == ["up", "down"]
        assert r.sd == pytest.approx(sd, rel=1e-4)
        expected = torch.tensor(r.eps) * norms[r.norm]  # (E,)
        c = r.change()  # (E, D, N): per image
        for d in range(2):
            assert torch.allclose(c[:, d], expected[:, None].expand_as(c[:, d]), rtol=1e-4, atol=0), (r.norm, d)
            assert torch.allclose(r.change_sd()[:, d], expected / sd, rtol=1e-4)
    m = control.metrics_of(res)
    assert m["eval/control/l2_0.4/up/change_sd"] == pytest.approx(0.4 * norms["l2"] / sd, rel=1e-4)
    assert m["eval/control/linf_8_255/down/change_sd"] == pytest.approx(8 / 255 * norms["linf"] / sd, rel=1e-4)


def test_the_box_binds_at_large_eps_so_the_change_falls_below_the_unbounded_closed_form(one_thread):
    """A control on the closed form above: once eps is large enough for pixels to reach 0 or 1, the achieved change
    is bounded by the box optimum (each pixel at 1 where w > 0, at 0 where w < 0), far below eps ||w|| (an attack
    that ignored the box would pass the test above and fail this one)."""
    torch.manual_seed(0)
    w = torch.randn(3, 8, 8) * 0.1
    res = control.run_control(linear_region(w), mid_images(3), mid_images(20, seed=2), layer=None, eps_l2=[20.0],
                              eps_linf=[], directions=["up"], steps=40, progress=False)[0]
    # the box optimum: every pixel at 1 where w > 0, at 0 where w < 0
    x = mid_images(3)
    best = ((w.flatten() > 0).float() - x.flatten(1)) @ w.flatten()
    c = res.change()[0, 0]
    assert (c <= best + 1e-4).all()  # nothing in the box does better
    assert (c >= 0.98 * best).all()  # PGD gets close to it (the clipped L2 steps slow the last bit)
    assert (best < 20.0 * w.norm() * 0.9).all()


def test_target_direction_reaches_a_reachable_target_within_the_step_resolution(one_thread):
    """Towards a scalar target t with |t - m(x)| < eps ||w||: PGD from x moves m in steps of alpha ||w||
    (alpha = 2.5 eps / steps) along the line to t and keeps the best iterate, so |m(x + d) - t| <= alpha ||w|| / 2."""
    torch.manual_seed(0)
    w = torch.randn(3, 8, 8) * 0.1
    model, x, nat = linear_region(w), mid_images(4), mid_images(30, seed=2)
    with torch.no_grad():
        m0 = model(x).mean(1)
    t = float(m0.mean() + 0.3 * w.norm())  # within 1.0 ||w|| of every image's response
    assert float((t - m0).abs().max()) < 1.0 * float(w.norm())
    r = control.run_control(model, x, nat, layer=None, eps_l2=[1.0], eps_linf=None, directions=["up"], target=t,
                            steps=20, progress=False)[0]
    assert r.directions == ["up", "target"]
    achieved = r.perturbed[0, 1]
    alpha = 2.5 * 1.0 / 20
    assert float((achieved - t).abs().max()) <= alpha * float(w.norm()) / 2 + 1e-5
    assert float(r.error[0].mean()) < 0.2 * float(r.error_clean.mean())


# ----------------------------------------------------------------------------- category flip
def planted_categories(n_per: int = 8, a: float = 0.05, seed: int = 0):
    """Three categories of 3x16x16 images 0.5 + a t_c + noise (in [0.3, 0.7]); a linear unit whose weights are
    category 0's template (unit norm): category 0 is its preferred category by construction."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(3, 3, 16, 16, generator=g).clamp(-3, 3)
    labels = torch.arange(3).repeat_interleave(n_per)
    images = (0.5 + a * templates[labels] + 0.02 * torch.randn(len(labels), 3, 16, 16, generator=g)).clamp(0.3, 0.7)
    w = templates[0] / templates[0].norm()
    unit = nn.Sequential(nn.Flatten(), nn.Linear(w.numel(), 1, bias=False))
    with torch.no_grad():
        unit[1].weight.copy_(w.flatten()[None])
    return images, labels, unit, w


def test_category_flip_finds_the_planted_preference_and_the_closed_form_eps(one_thread):
    """r = w . x, ||w||_2 = 1: moving a category-B image up by L2 eps raises r by exactly eps (away from the box),
    so image x flips at (mean_A - r(x)) / ||w|| and the mean curve at (mean_A - mean_B) / ||w||. The piecewise-linear
    crossing of the eps grid is exact for a response linear in eps."""
    images, labels, unit, w = planted_categories()
    r = (images.flatten(1) @ w.flatten()).double()
    means = torch.stack([r[labels == c].mean() for c in range(3)])
    B = int(means.argmin())
    res = category_flip.category_flip(unit, images, labels, eps_list=[0.5, 1.0, 1.5, 2.0, 2.5, 3.0], n_images=None,
                                      progress=False)
    assert res.preferred == 0 and res.non_preferred == B
    expect_mean = float(means[0] - means[B]) / float(w.norm())
    assert 0.5 < expect_mean < 2.0  # bracketed by grid points at which the box is not yet reached
    assert res.flip_eps == pytest.approx(expect_mean, rel=1e-4)
    per_image = (means[0] - r[labels == B]).numpy() / float(w.norm())
    assert np.allclose(res.flip_eps_per_image, per_image, rtol=1e-3)
    s = res.summary()
    assert s["flip_reached"] == 1.0 and s["preferred_mean"] == pytest.approx(float(means[0]), rel=1e-5)
    assert s["best_natural"] == pytest.approx(float(r.max()), rel=1e-5)


def test_category_flip_outside_the_grid_is_nan_and_flagged(one_thread, tmp_path, caplog):
    images, labels, unit, w = planted_categories()
    with caplog.at_level(logging.WARNING, logger="neuroguide"):
        m = category_flip.evaluate(unit, images, labels, tmp_path, eps_list=[0.05, 0.1], n_images=4, progress=False)
    assert math.isnan(m["eval/control/category_flip/mean/flip_eps"]) and math.isnan(m["eval/control/category_flip/flip_eps"])
    assert m["eval/control/category_flip/flip_reached"] == 0.0
    assert "never reach the preferred category" in caplog.text
    assert (tmp_path / "category_flip.png").exists() and (tmp_path / "category_flip.csv").exists()


def test_category_flip_per_unit_sites_each_find_their_own_preference(one_thread, tmp_path):
    """Two units = templates of categories 0 and 2: each site's preferred category is its own template's."""
    images, labels, _, _ = planted_categories()
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(3, 3, 16, 16, generator=g).clamp(-3, 3)  # the same templates as planted_categories
    lin = nn.Linear(768, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([templates[0].flatten(), templates[2].flatten()]) / 27.7)
    m = category_flip.evaluate(nn.Sequential(nn.Flatten(), lin), images, labels, tmp_path, per_unit=True,
                               unit_names=[10, 12], eps_list=[1.0, 4.0], n_images=2, progress=False)
    assert m["eval/control/category_flip/10/preferred"] == 0 and m["eval/control/category_flip/12/preferred"] == 2
    assert m["eval/control/category_flip/n_sites"] == 2


# ----------------------------------------------------------------------------- super-stimuli
def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.mark.parametrize("jitter,blur", [(0, 0.0), (1, 0.7)])
def test_superstimulus_trajectory_is_best_so_far_and_ends_above_the_best_natural_image(one_thread, tmp_path, jitter,
                                                                                       blur):
    """A ReLU CNN unit driven from noise without an eps (the box only): the recorded best-so-far response never
    decreases, the saved image's response (recomputed here) is the trajectory's last value, and it beats the best
    of 64 natural images; with jitter and blur inside the attacked forward the same holds for the clean response."""
    from neuroguide.evaluation.responses import response_function

    net = small_cnn()
    forward, _ = response_function(net, None, units=[1])
    nat = mid_images(64, shape=(3, 12, 12), seed=3)
    m = superstimuli.evaluate(forward, nat, tmp_path, n_starts=2, steps=30, jitter=jitter, blur_sigma=blur,
                              progress=False)
    gen = torch.Generator().manual_seed(0)
    starts = superstimuli.start_images("noise", 2, (3, 12, 12), generator=gen)
    res = superstimuli.superstimulus(forward, starts, steps=30, jitter=jitter, blur_sigma=blur,
                                     generator=torch.Generator().manual_seed(5), progress=False)
    traj = res.trajectory
    assert traj.shape == (31, 2)
    assert (traj[1:] >= traj[:-1]).all()
    with torch.no_grad():
        again = net(res.images)[:, 1]
    assert torch.allclose(again, traj[-1], atol=1e-5) and torch.allclose(again, res.response, atol=1e-5)
    assert res.images.min() >= 0 and res.images.max() <= 1
    with torch.no_grad():
        best_natural = float(net(nat)[:, 1].max())
    assert float(res.response.min()) > best_natural
    assert m["eval/control/superstimulus/best_natural"] == pytest.approx(best_natural, rel=1e-5)
    assert m["eval/control/superstimulus/above_best_natural_sd"] > 0
    assert m["eval/control/superstimulus/eps"] == pytest.approx(math.sqrt(3 * 12 * 12))
    assert (tmp_path / "superstimuli.png").exists() and (tmp_path / "superstimulus_trajectory.csv").exists()


def test_regularized_blur_is_the_2d_gaussian_convolution_and_jitter_a_shift():
    x = torch.rand(2, 3, 9, 9)
    reg = superstimuli.Regularized(nn.Identity(), blur_sigma=1.0)
    r = 2
    g1 = torch.exp(-torch.arange(-r, r + 1.0) ** 2 / 2)
    k2 = torch.outer(g1, g1) / torch.outer(g1, g1).sum()
    ref = F.conv2d(F.pad(x, (r, r, r, r), mode="reflect"), k2.expand(3, 1, -1, -1), groups=3)
    assert torch.allclose(reg(x), ref, atol=1e-6)
    shifted = superstimuli.Regularized(nn.Identity(), jitter=2, generator=torch.Generator().manual_seed(0))(x)
    assert any(torch.equal(shifted, torch.roll(x, (dy, dx), (-2, -1))) for dy in range(-2, 3) for dx in range(-2, 3))


# ----------------------------------------------------------------------------- bad input
def _classifier_without_region():
    from neuroguide.models.dual_head import DualHeadResNet

    torch.manual_seed(0)
    m = DualHeadResNet(4, 0, "layer4", "resnet18", None).eval()
    m.neuroguide_info = {"model_kind": "guidance", "task_name": "guidance"}
    return m


def test_bad_input_is_named():
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"eval.control.layer=penultimate"):
        control.run_control(_classifier_without_region(), x, x, progress=False)
    lin = linear_region(torch.randn(3, 4, 4))
    x = mid_images(2, (3, 4, 4))
    with pytest.raises(ValueError, match=r"eval.control.eps_l2 and eval.control.eps_linf are both empty"):
        control.run_control(lin, x, x, layer=None, eps_l2=[], eps_linf=None, progress=False)
    with pytest.raises(ValueError, match=r"eval.control.eps_l2 is empty"):
        control.control_curve(lin, x, norm="l2", eps_list=[], sd_images=x, progress=False)
    with pytest.raises(ValueError, match=r"eval.control.directions holds \['sideways'\].*'up', 'down'"):
        control.run_control(lin, x, x, layer=None, directions=["up", "sideways"], progress=False)
    with pytest.raises(ValueError, match=r"eval.control.target has shape \(2,\), but the response has 3 columns"):
        control.run_control(lin, x, x, layer=None, target=[1.0, 2.0], eps_linf=[], progress=False)
    with pytest.raises(ValueError, match=r"'target' but eval.control.target is null"):
        control.check_directions(["target"])
    with pytest.raises(ValueError, match=r"at least 2 categories"):
        category_flip.category_flip(lin, x, torch.zeros(2, dtype=torch.long), eps_list=[1.0], progress=False)
    with pytest.raises(ValueError, match=r"superstimulus.start='gaussian'"):
        superstimuli.start_images("gaussian", 2, (3, 4, 4))


# ----------------------------------------------------------------------------- evaluate.py wiring
def _params(**over):
    from neuroguide.config import compose_config

    cfg = compose_config("evaluate", ["eval=[control]"], output_dir="unused")
    p = OmegaConf.to_container(cfg.eval, resolve=True)["control"]  # the yaml as evaluate.py composes it
    p.update(layer=None, n_images=3, eps_l2=[0.1, 0.3], eps_linf=["2/255"], steps=8, progress=False)
    p["category_flip"].update(eps_list=[0.5, 1.0, 2.0], n_images=3, steps=8, progress=False)
    p["superstimulus"].update(enabled=True, n_starts=1, steps=6, progress=False)
    for k, v in over.items():
        p[k] = v
    return p


def test_the_registered_analysis_runs_the_yaml_config_and_skips_the_flip_without_labels(one_thread, tmp_path, caplog):
    images, labels, unit, w = planted_categories(n_per=4)
    stim = Stimuli(images, labels, source="planted")
    m = PER_MODEL["control"](unit, stim, tmp_path / "a", _params())
    assert m["eval/control/l2_0.3/up/change_sd"] == pytest.approx(
        0.3 * float(w.norm()) / float((images.flatten(1) @ w.flatten()).std()), rel=1e-4)
    assert m["eval/control/category_flip/mean/preferred"] == 0
    assert m["eval/control/superstimulus/response"] > m["eval/control/superstimulus/start_response"]
    pngs = {p.name for p in (tmp_path / "a").glob("*.png")}
    assert {"control_curve.png", "control_images_l2.png", "control_images_linf.png", "category_flip.png",
            "superstimuli.png", "superstimulus_trajectory.png"} <= pngs
    with caplog.at_level(logging.INFO, logger="neuroguide"):
        m = PER_MODEL["control"](unit, Stimuli(images, None, source="unlabelled"), tmp_path / "b", _params())
    assert not any("category_flip" in k for k in m) and "category flip skipped" in caplog.text
    # several models: one curve per model, keys per model
    other = linear_region(torch.randn(3, 16, 16) * 0.05)
    m = MULTI_MODEL["control"]({"unit": unit, "other": other}, stim, tmp_path / "c", _params())
    assert "unit/eval/control/l2_0.1/down/change_sd" in m and "other/eval/control/linf_2_255/up/change_sd" in m
    assert (tmp_path / "c" / "control_curve.png").exists() and (tmp_path / "c" / "unit" / "category_flip.png").exists()


@pytest.mark.slow
def test_evaluate_py_on_a_trained_predictor_the_change_grows_with_eps(tmp_path):
    """`evaluate.py ckpt=<predictor> eval=[control]` on a predictor of the synthetic default (trained for one batch
    here, 32 px): for both norms and both directions the achieved change grows with eps."""
    from conftest import small_overrides
    from neuroguide.config import compose_config
    from neuroguide.evaluation.runner import run as evaluate
    from neuroguide.train import run as train

    train(compose_config("train", small_overrides(tmp_path) + ["+trainer.fast_dev_run=true", "task=predictor",
                                                               "region=TO"], output_dir=tmp_path / "pred"))
    cfg = compose_config("evaluate", [f"paths.log_dir={tmp_path}/outputs", f"ckpt={tmp_path}/pred/model.ckpt",
                                      "eval=[control]", "n_images=3", "eval.control.n_images=3",
                                      "eval.control.steps=6", "eval.control.eps_l2=[0.25,1.0,2.0]",
                                      "eval.control.eps_linf=[1/255,4/255]"], output_dir=tmp_path / "eval")
    m = evaluate(cfg)
    for norm, tags in {"l2": ["0.25", "1.0", "2.0"], "linf": ["1_255", "4_255"]}.items():
        for d in ("up", "down"):
            curve = [m[f"eval/control/{norm}_{t}/{d}/change_sd"] for t in tags]
            assert curve[0] > 0 and all(b > a for a, b in zip(curve, curve[1:])), (norm, d, curve)
    assert (tmp_path / "eval" / "control" / "control_images_l2.png").exists()


def test_category_flip_over_sites_counts_a_site_that_never_flips(one_thread, tmp_path):
    """Across sites, flip_eps is the median with a site that never flips counted as beyond every eps: with one of two
    sites flipping inside the grid it is NaN (the mean over the flipping sites alone would report the easy one)."""
    images, labels, _, _ = planted_categories()
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(3, 3, 16, 16, generator=g).clamp(-3, 3)
    lin = nn.Linear(768, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([templates[0].flatten(), templates[2].flatten()]) / 27.7)
    sites = nn.Sequential(nn.Flatten(), lin)
    wide = category_flip.evaluate(sites, images, labels, tmp_path / "wide", per_unit=True,
                                  eps_list=[0.25 * i for i in range(1, 41)], n_images=2, progress=False)
    f = sorted(wide[f"eval/control/category_flip/{s}/flip_eps"] for s in (0, 1))
    assert all(math.isfinite(x) for x in f) and f[0] < f[1]
    assert wide["eval/control/category_flip/flip_eps"] == pytest.approx(sum(f) / 2)  # median of two flipping sites
    cut = (f[0] + f[1]) / 2  # a grid that ends between the two sites' flips
    m = category_flip.evaluate(sites, images, labels, tmp_path / "cut", per_unit=True,
                               eps_list=list(np.linspace(cut / 8, cut, 8)), n_images=2, progress=False)
    assert m["eval/control/category_flip/flip_reached"] == 0.5
    assert math.isnan(m["eval/control/category_flip/flip_eps"])


def test_superstimulus_eps_can_be_written_k_over_255(one_thread):
    starts = mid_images(2, shape=(3, 8, 8))
    res = superstimuli.superstimulus(small_cnn(), starts, eps="8/255", norm="linf", steps=3, progress=False)
    assert res.eps == pytest.approx(8 / 255) and float((res.images - res.starts).abs().max()) <= 8 / 255 + 1e-6

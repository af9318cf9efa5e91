"""Effect-matched transfer (McNeal & Murty) against planted truths: the closed-form smallest eps of a linear
region, an identical copy reproducing the source's effect exactly, an unrelated model at the level of the random
control, unreachable targets (all and planted some), and evaluate.py in models= mode."""
from __future__ import annotations

import csv
import logging
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from neuroguide.evaluation.analyses.transfer import effect_matched as transfer_effect
from neuroguide.evaluation.analyses.transfer.effect_matched import bisect_eps, effect_tag, effect_transfer_matrix

SHAPE = (3, 8, 8)
D = 3 * 8 * 8
K = 5  # "voxels" of the region

pytestmark = pytest.mark.usefixtures("one_thread")


def linear(weight: torch.Tensor) -> nn.Module:
    """r = W x (no bias): (B, 3, 8, 8) -> (B, K)."""
    m = nn.Sequential(nn.Flatten(), nn.Linear(D, weight.shape[0]))
    with torch.no_grad():
        m[1].weight.copy_(weight)
        m[1].bias.zero_()
    return m


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1),
                         nn.Softplus(), nn.Flatten(), nn.Linear(6 * 4 * 4, K))


def images(n=24, seed=1) -> torch.Tensor:
    """Away from the pixel bounds: every pixel in [0.3, 0.7]."""
    g = torch.Generator().manual_seed(seed)
    return 0.3 + 0.4 * torch.rand((n, *SHAPE), generator=g)


def weights(seed: int) -> torch.Tensor:
    return torch.randn(K, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("norm,direction,target", [("l2", "up", 1.0), ("l2", "down", 0.5), ("linf", "up", 1.0),
                                                    ("linf", "down", 2.0)])
def test_bisection_finds_the_closed_form_eps_of_a_linear_region(norm, direction, target):
    """m(x) = w_bar . x with w_bar the mean row of W: within L2 eps the largest change of m is eps ||w_bar||_2,
    within Linf eps it is eps ||w_bar||_1 (away from the pixel bounds), so the smallest eps reaching ``target`` sd is
    ``target * sd / ||w_bar||`` (``/ ||w_bar||_1``). The bisection's eps lies in [exact, exact + eps_max / 2**n]."""
    W = weights(0)
    x = images()
    w_bar = W.double().mean(0)
    sd = float((x.flatten(1).double() @ w_bar).std())  # the natural sd of the mean response, computed here
    exact = target * sd / float(w_bar.norm() if norm == "l2" else w_bar.abs().sum())
    eps_max, n = 4 * exact * 1.37, 12  # not a power-of-two multiple of exact: the bracket never lands on it
    bis = bisect_eps(linear(W), x, target * sd, direction=direction, eps_max=eps_max, bisection_steps=n, norm=norm,
                     progress=False)
    assert bis.resolution == pytest.approx(eps_max / 2 ** n)
    assert bis.reachable.all()
    err = bis.eps - exact
    assert (err >= -1e-6 * exact).all() and (err <= bis.resolution * (1 + 1e-6)).all(), (exact, err)
    # the perturbation kept reaches the target and overshoots by at most the slope times the resolution
    assert (bis.change >= target * sd * (1 - 1e-6)).all()
    assert (bis.change <= target * sd * (1 + 1.01 * bis.resolution / exact)).all()
    moved = (bis.x_adv - x).flatten(1)
    norms = moved.norm(dim=1) if norm == "l2" else moved.abs().amax(1)
    torch.testing.assert_close(norms.double(), bis.eps, rtol=1e-4, atol=0)  # the perturbation has the eps reported


@pytest.mark.parametrize("norm,expected_max", [("l2", 10.0), ("linf", 32 / 255)])
def test_eps_max_auto_is_norm_specific(norm, expected_max):
    """eps_max="auto" (conf/eval/transfer.yaml's default): 10.0 for L2, 32/255 for Linf, where 10 would be the whole
    [0, 1] box (12 halvings of it: a resolution of 0.6/255). With a linear region whose target sits at a small Linf
    eps (~4/255), the eps found is the closed form within the auto bracket's resolution."""
    from neuroguide.config import compose_config

    cfg = compose_config("evaluate", ["eval=[transfer]"])
    assert cfg.eval.transfer.effect.eps_max == "auto"
    W = weights(0)
    x = images()
    w_bar = W.double().mean(0)
    scale = float(w_bar.norm() if norm == "l2" else w_bar.abs().sum())
    exact = (4 / 255 if norm == "linf" else 0.2) * 1.37
    bis = bisect_eps(linear(W), x, exact * scale, eps_max="auto", bisection_steps=12, norm=norm, progress=False)
    assert bis.resolution == pytest.approx(expected_max / 2 ** 12, rel=1e-12)
    err = bis.eps - exact
    assert bis.reachable.all() and (err >= -1e-6 * exact).all() and (err <= bis.resolution * (1 + 1e-6)).all()
    res = effect_transfer_matrix({"A": linear(W)}, x, target=1.0, norm=norm, bisection_steps=12, progress=False)
    assert res.resolution == pytest.approx(expected_max / 2 ** 12, rel=1e-12)


def test_identical_models_reproduce_the_effect_exactly():
    """Same weights, different names: the target effect equals the source's achieved effect (~ the target)."""
    models = {"A": cnn(0), "A_copy": cnn(0), "B": cnn(1)}
    x = images(16)
    res = effect_transfer_matrix(models, x, target=1.0, eps_max=3.0, bisection_steps=10, steps=10, progress=False)
    i = {n: k for k, n in enumerate(res.names)}
    a, c = i["A"], i["A_copy"]
    assert res.unreachable[a] == 0
    achieved = res.effect[a, a]
    assert 1.0 <= achieved <= 1.05  # the source reaches the target, overshooting by at most the bracket's width
    np.testing.assert_array_equal(res.per_image_effect[a, c], res.per_image_effect[a, a])
    assert res.effect[a, c] == achieved
    np.testing.assert_array_equal(res.eps[c], res.eps[a])  # as a source the copy needs the same eps per image
    assert res.random[a, a] < achieved / 3  # and a random direction of the same norm does far less
    np.testing.assert_allclose(res.random_norm_matched, 1.0)


def test_an_unrelated_model_is_at_the_random_control():
    """Independent Gaussian weights in D = 192 dimensions. For linear regions and images with i.i.d. pixels the
    source's attack is the direction w_bar_A / ||w_bar_A||, so its effect on B in B's sd units is
    cos(w_bar_A, w_bar_B) x (the source's effect) ~ N(0, 1/D) x 1 sd (the pixel spread cancels from both sd's);
    the random control's mean effect is ~ N(0, 1/(D N)). Tolerance: 4 / sqrt(D) = 0.29, four standard deviations
    of the difference, while the copy receives the full 1 sd: the test fails if the perturbation carried anything
    beyond chance to B."""
    x = images(32)
    models = {"A": linear(weights(0)), "A_copy": linear(weights(0)), "B": linear(weights(1))}
    res = effect_transfer_matrix(models, x, target=1.0, eps_max=1.0, bisection_steps=10, progress=False)
    a, c, b = 0, 1, 2
    tol = 4 / math.sqrt(D)
    assert abs(res.effect[a, b] - res.random[a, b]) < tol
    assert abs(res.effect[b, a] - res.random[b, a]) < tol
    assert res.effect[a, c] >= 1.0 and res.effect[a, c] - res.random[a, c] > 1 - tol
    # closed form per image: d = eps w_a / ||w_a||, so effect_B = (w_b . w_a / ||w_a||) eps / sd_B and
    # effect_A = ||w_a|| eps / sd_A, the sd's computed here over the same images
    wa, wb = weights(0).double().mean(0), weights(1).double().mean(0)
    sd_a, sd_b = (x.flatten(1).double() @ wa).std(), (x.flatten(1).double() @ wb).std()
    ratio = float((wb @ wa) / wa.norm() ** 2 * sd_a / sd_b)
    np.testing.assert_allclose(res.per_image_effect[a, b], ratio * res.per_image_effect[a, a], rtol=1e-3, atol=1e-5)


def test_unreachable_target_is_reported_and_finishes_promptly(tmp_path, caplog):
    models = {"A": linear(weights(0)), "B": linear(weights(1))}
    x = images(8)
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="neuroguide"):
        metrics = transfer_effect.evaluate(models, x, tmp_path, target=1.0, eps_max=1e-4, bisection_steps=50,
                                           progress=False)
    assert time.perf_counter() - t0 < 10
    tag = "eval/transfer/effect_1.0sd"
    for s in ("A", "B"):
        assert metrics[f"{tag}/{s}/unreachable"] == 1.0
        assert math.isnan(metrics[f"{tag}/{s}/eps_mean"]) and math.isnan(metrics[f"{tag}/{s}/B/effect"])
    assert "cannot reach 1 sd up within eps_max=0.0001 (l2) on 8 of 8 images" in caplog.text
    rows = list(csv.DictReader(open(tmp_path / "transfer_effect_1.0sd_images.csv")))
    assert len(rows) == 2 * 2 * 8 and all(r["eps"] == "nan" for r in rows)


class Saturating(nn.Module):
    """m(x) = min(w . x, c): the mean response can rise by at most c - w . x_n."""

    def __init__(self, w: torch.Tensor, c: float):
        super().__init__()
        self.lin = linear(w[None])
        self.c = c

    def forward(self, x):
        return self.lin(x).clamp(max=self.c)


def test_some_images_unreachable_are_counted_and_left_out(caplog):
    """Planted: the images whose headroom c - w . x_n is below the target change cannot reach it; the others
    reach it at the closed-form eps target / ||w||."""
    w = weights(0)[0]
    x = images(20)
    m0 = (x.flatten(1) @ w).double()
    c = float(m0.median())
    change = 0.5 * float(m0.std())
    planted = (c - m0) < change
    with caplog.at_level(logging.WARNING, logger="neuroguide"):
        bis = bisect_eps(Saturating(w, c), x, change, eps_max=1.0, bisection_steps=12, progress=False)
    assert 0 < int(planted.sum()) < 20
    assert torch.equal(~bis.reachable, planted)
    assert torch.isnan(bis.eps[planted]).all()
    exact = change / float(w.double().norm())
    assert (bis.eps[~planted] - exact).abs().max() <= bis.resolution
    res = effect_transfer_matrix({"S": Saturating(w, c)}, x, target=0.5, eps_max=1.0, bisection_steps=8,
                                 progress=False)
    assert res.unreachable[0] == pytest.approx(float(planted.double().mean()))
    assert np.isnan(res.per_image_effect[0, 0][planted.numpy()]).all()
    assert res.effect[0, 0] >= 0.5  # the mean is over the reachable images only
    assert f"on {int(planted.sum())} of 20 images" in caplog.text


def test_outputs_and_keys(tmp_path):
    models = {"A": cnn(0), "B": cnn(1)}
    x = images(6)
    m = transfer_effect.evaluate(models, x, tmp_path, target=[0.5, 1.0], eps_max=0.5, bisection_steps=4, steps=5,  # Linf < 1: a Linf eps >= 1 is the whole pixel box, refused
                                 direction="down", norm="linf", progress=False)
    for tag in ("effect_0.5sd_down_linf", "effect_1.0sd_down_linf"):
        base = f"eval/transfer/{tag}"
        assert {f"{base}/A/B/effect", f"{base}/A/B/random_effect", f"{base}/A/eps_mean", f"{base}/A/unreachable",
                f"{base}/eps_resolution", f"{base}/offdiag_mean", f"{base}/random_mean"} <= set(m)
        assert m[f"{base}/A/A/effect"] >= float(tag.split("_")[1][:-2])
        assert (tmp_path / f"transfer_{tag}.png").stat().st_size > 1000
        rows = list(csv.DictReader(open(tmp_path / f"transfer_{tag}_images.csv")))
        eps = [float(r["eps"]) for r in rows if r["source"] == "A" and r["target"] == "B"]
        assert len(eps) == 6 and np.nanmean(eps) == pytest.approx(m[f"{base}/A/eps_mean"])
    assert m["eval/transfer/effect_0.5sd_down_linf/A/eps_mean"] <= m["eval/transfer/effect_1.0sd_down_linf/A/eps_mean"]
    assert effect_tag(0.5, "raw") == "effect_0.5raw"


def test_bad_input(tmp_path):
    models = {"A": linear(weights(0))}
    x = images(4)
    with pytest.raises(ValueError, match="eval.transfer.effect: unknown parameters \\['eps'\\]"):
        transfer_effect.evaluate(models, x, tmp_path, eps=1.0, progress=False)
    with pytest.raises(ValueError, match="target_units: expected one of"):
        effect_transfer_matrix(models, x, target_units="percent", progress=False)
    with pytest.raises(ValueError, match="eval.transfer.effect.eps_max"):
        effect_transfer_matrix(models, x, eps_max=-1.0, progress=False)
    with pytest.raises(ValueError, match="target: the effect to reach must be a finite number > 0"):
        effect_transfer_matrix(models, x, target=0.0, progress=False)
    flat = {"A": nn.Sequential(nn.Flatten(), nn.Linear(D, K, bias=True))}
    with torch.no_grad():
        flat["A"][1].weight.zero_()
    with pytest.raises(ValueError, match="mean response has std 0"):
        effect_transfer_matrix(flat, x, progress=False)
    with pytest.raises(ValueError, match="one input size"):
        a, b = linear(weights(0)), linear(weights(1))
        a.image_size, b.image_size = 8, 16
        effect_transfer_matrix({"a": a, "b": b}, x, progress=False)


def test_auto_skips_models_without_a_region_response(caplog):
    """A plain classifier (a guidance model without a neural head) has no region response: ``auto`` skips the
    analysis and names the key; ``true`` lets response_function raise its error naming the key."""
    plain = cnn(0)
    plain.neuroguide_info = {"model_kind": "guidance"}
    plain.neural_head = None
    models = {"pred": linear(weights(0)), "plain": plain}
    with caplog.at_level(logging.WARNING, logger="neuroguide"):
        assert transfer_effect.enabled_for(models, "auto", "region") is False
    assert "['plain'] have no region response" in caplog.text and "eval.transfer.effect.layer" in caplog.text
    assert transfer_effect.enabled_for({"pred": models["pred"]}, "auto", "region") is True
    assert transfer_effect.enabled_for(models, "auto", "1") is True  # a named layer: every model has one
    assert transfer_effect.enabled_for(models, False, "region") is False
    with pytest.raises(ValueError, match="eval.transfer.effect.layer=penultimate"):
        effect_transfer_matrix(models, images(4), progress=False)
    with pytest.raises(ValueError, match="enabled: expected true, false or auto"):
        transfer_effect.enabled_for(models, "sometimes", "auto")


@pytest.fixture(scope="module")
def two_predictors(tmp_path_factory):
    """A predictor of region TO (one fast_dev_run batch) and an exact copy of its run folder under another name."""
    import shutil

    from conftest import small_overrides
    from neuroguide.config import compose_config
    from neuroguide.train import run as train

    tmp = tmp_path_factory.mktemp("effect")
    cfg = compose_config("train", small_overrides(tmp) + ["+trainer.fast_dev_run=true", "task=predictor", "region=TO"],
                         output_dir=tmp / "pred")
    train(cfg)
    shutil.copytree(tmp / "pred", tmp / "pred_copy")
    return tmp, [tmp / "pred" / "model.ckpt", tmp / "pred_copy" / "model.ckpt"]


def test_evaluate_models_mode_writes_the_effect_matched_keys(two_predictors):
    """evaluate.py (runner.run) with models=[a, a_copy] eval=[transfer]: the fixed-eps matrix as before, and the
    effect-matched one beside it; each source reaches the 1 sd target on itself and the copy receives exactly
    the same effect, far above the random control."""
    from neuroguide.config import compose_config
    from neuroguide.evaluation.runner import run as evaluate

    tmp, (a, b) = two_predictors
    cfg = compose_config("evaluate", [f"paths.log_dir={tmp}/outputs", "n_images=6", f"models=[{a},{b}]",
                                      "eval=[transfer]", "eval.transfer.steps=2", "eval.transfer.effect.steps=4",
                                      "eval.transfer.effect.bisection_steps=7", "eval.transfer.effect.eps_max=1.0"],
                         output_dir=tmp / "eval")
    m = evaluate(cfg)
    names = ["pred", "pred_copy"]
    tag = "eval/transfer/effect_1.0sd"
    assert m[f"{tag}/eps_resolution"] == 1.0 / 2 ** 7
    for s in names:
        assert m[f"{tag}/{s}/unreachable"] == 0.0  # this barely trained predictor moves 1 sd by eps ~ 0.1
        # on itself the source reaches the target, overshooting by less than the bracket's width allows
        assert 1.0 <= m[f"{tag}/{s}/{s}/effect"] < 1.2 and 0 < m[f"{tag}/{s}/eps_mean"] <= 1.0
        for t in names:
            assert m[f"{tag}/{s}/{t}/effect"] == m[f"{tag}/{s}/{s}/effect"]
            assert abs(m[f"{tag}/{s}/{t}/random_effect"]) < 0.3
    assert m[f"{tag}/pred/eps_mean"] == m[f"{tag}/pred_copy/eps_mean"]
    assert "eval/transfer/l2_1.0/pred/pred_copy/change" in m  # the fixed-eps matrix is unchanged
    assert (tmp / "eval" / "transfer" / "transfer_effect_1.0sd.png").stat().st_size > 1000
    assert (tmp / "eval" / "transfer" / "transfer_effect_1.0sd_images.csv").exists()


def test_raw_units_are_the_sd_target_times_the_natural_sd():
    """target_units="raw": a change of ``target`` in response units; equal to ``target / sd`` in sd units."""
    W = weights(0)
    x = images(12)
    models = {"A": linear(W)}
    in_sd = effect_transfer_matrix(models, x, target=0.7, eps_max=1.0, bisection_steps=10, progress=False)
    sd = float((x.flatten(1).double() @ W.double().mean(0)).std())
    assert in_sd.sd[0] == pytest.approx(sd, rel=1e-5)  # the natural sd (N - 1) of the mean response
    raw = effect_transfer_matrix(models, x, target=0.7 * in_sd.sd[0], target_units="raw", eps_max=1.0,
                                 bisection_steps=10, progress=False)
    assert raw.target_change[0] == pytest.approx(in_sd.target_change[0], rel=1e-12)
    np.testing.assert_array_equal(raw.eps, in_sd.eps)
    assert raw.effect[0, 0] == pytest.approx(in_sd.effect[0, 0]) and raw.effect[0, 0] >= 0.7


def test_runner_keeps_the_fixed_eps_matrix_when_effect_fails_and_takes_sd_over_the_split(tmp_path):
    """runner's transfer: ``effect.enabled=true`` on a plain classifier records ``eval/transfer/effect/failed``
    (naming the key) beside the fixed-eps results; with region responses, the sd is taken over the held-out split
    (``stim.split``), not the perturbed images: the eps found is the closed form with the split's sd."""
    from neuroguide.evaluation import runner
    from neuroguide.evaluation.stimuli import Stimuli

    plain = cnn(0)
    plain.neuroguide_info = {"model_kind": "guidance"}
    plain.neural_head = None
    x = images(6)
    run_transfer = runner.MULTI_MODEL["transfer"]
    m: dict = {}
    with runner._recorded(m, "transfer", "test"):  # as evaluate_models calls it
        m.update(run_transfer({"plain": plain, "other": cnn(1)}, Stimuli(x), tmp_path,
                              {"eps": 0.1, "steps": 2, "effect": {"enabled": True}}))
    assert "eval/transfer/l2_0.1/plain/other/change" in m
    assert "eval.transfer.effect.layer" in m["eval/transfer/effect/failed"]

    W = weights(0)
    split_images = images(40, seed=5) * 0.5 + 0.25  # a narrower spread than the perturbed images
    stim = Stimuli(x, split=lambda n: Stimuli(split_images[:n] if n else split_images))
    m = run_transfer({"A": linear(W)}, stim, tmp_path, {"eps": 0.1, "steps": 2, "effect": {
        "target": 1.0, "eps_max": 0.5, "bisection_steps": 12, "n_images": 4, "n_sigma_images": None}})
    w_bar = W.double().mean(0)
    exact = float((split_images.flatten(1).double() @ w_bar).std() / w_bar.norm())
    assert 0 <= m["eval/transfer/effect_1.0sd/A/eps_mean"] - exact <= 0.5 / 2 ** 12 * 1.001
    rows = list(csv.DictReader(open(tmp_path / "transfer_effect_1.0sd_images.csv")))
    assert len(rows) == 4  # n_images: the first 4 perturbed

"""Eps grids in any order give the results of the sorted grid (check_eps_list sorts, refuses duplicates), and a
site without a category preference cannot flip (issue 24, items 4 and 5)."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from neuroguide.evaluation.analyses.control import category_flip
from neuroguide.evaluation.analyses.control import region_control as control
from neuroguide.evaluation.plots import check_eps_list


def same(a: dict, b: dict) -> bool:
    """Equal dicts of floats, NaN equal to NaN."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def planted(n_per: int = 6, a: float = 0.04, seed: int = 0):
    """Three categories of images around three templates; w = category 0's template at unit norm, so category 0 has
    the highest mean of w . x by construction. Images stay in [0.3, 0.7]: an L2 step of eps <= 2 along w moves no
    pixel by more than 2 max|w_j| < 0.3, so the box is never reached."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(3, 3, 16, 16, generator=g).clamp(-3, 3)
    labels = torch.arange(3).repeat_interleave(n_per)
    images = (0.5 + a * templates[labels] + 0.02 * torch.randn(len(labels), 3, 16, 16, generator=g)).clamp(0.3, 0.7)
    w = templates[0] / templates[0].norm()
    assert 2 * float(w.abs().max()) < 0.3
    return images, labels, w


class Saturating(nn.Module):
    """``r(x) = 1 - exp(-(w . x - t0))``: increasing in ``w . x``, so the best L2 step of radius eps is along w and
    ``r(x + d*) = 1 - exp(-(w . x + eps ||w|| - t0))`` (away from the box): a curve concave in eps, on which the
    crossing of a piecewise-linear interpolation depends on which grid points bracket it."""

    def __init__(self, w: torch.Tensor, t0: float):
        super().__init__()
        self.register_buffer("w", w.flatten().clone())
        self.t0 = t0

    def forward(self, x):
        return (1 - torch.exp(-(x.flatten(1) @ self.w - self.t0)))[:, None]


# ----------------------------------------------------------------------------- the checker
def test_check_eps_list_sorts_and_refuses_duplicates_naming_the_key():
    assert check_eps_list([2, 0.5, "1"], "eval.x.eps_l2") == [0.5, 1.0, 2.0]
    assert check_eps_list(["4/255", "1/255", 0.0078431], "eval.x.eps_linf", norm="linf") == [1 / 255, 2 / 255, 4 / 255]
    with pytest.raises(ValueError, match=r"eval.x.eps_l2 holds the same eps more than once: \[1, 1.0\]"):
        check_eps_list([1, 0.5, 1.0], "eval.x.eps_l2")


# ----------------------------------------------------------------------------- the category flip
def test_first_crossing_of_one_minus_exp_is_that_of_the_sorted_grid():
    """The curve 1 - e^-eps crosses 0.5 at ln 2 = 0.693; the chord between its grid points 0.5 and 1 crosses at
    0.5 + (0.5 - f(0.5)) / (f(1) - f(0.5)) * 0.5 = 0.7232 (a chord of a concave curve: later than ln 2). Written
    [2, 0.5, 1] the grid gave 1.157 (the chord from 0 to 2)."""
    def f(e):
        return 1 - math.exp(-e)

    expect = 0.5 + (0.5 - f(0.5)) / (f(1.0) - f(0.5)) * 0.5
    assert math.log(2) < expect < 1.0 and expect == pytest.approx(0.7232, abs=1e-4)
    for grid in ([0.5, 1.0, 2.0], [2.0, 0.5, 1.0], [1.0, 2.0, 0.5]):
        got = category_flip.first_crossing(grid, np.array([f(e) for e in grid]), 0.5, 0.0)
        assert got == pytest.approx(expect, rel=1e-12), grid


def test_category_flip_on_a_shuffled_grid_equals_the_sorted_one(one_thread, tmp_path):
    """A saturating site (:class:`Saturating`): the flip eps and relative_to_best_sd (at the largest eps) of a
    shuffled grid equal those of the sorted one, and both equal the closed form computed here: the mean of
    ``1 - exp(-(t_i + eps - t0))`` over the non-preferred images at each grid point, interpolated in order of eps."""
    images, labels, w = planted()
    t = (images.flatten(1) @ w.flatten()).double()
    t0 = float(t.mean())
    site = Saturating(w, t0)
    r = 1 - torch.exp(-(t - t0))
    means = torch.stack([r[labels == c].mean() for c in range(3)])
    B = int(means.argmin())
    grid = [0.5, 1.0, 1.5, 2.0]
    curve = np.array([float((1 - torch.exp(-(t[labels == B] + e - t0))).mean()) for e in grid])
    level = float(means[0])
    i = int(np.argmax(curve >= level))  # the first grid point at or past the level (checked below)
    assert i >= 1 and curve[i] >= level > curve[i - 1]  # bracketed by two grid points
    expect = grid[i - 1] + (level - curve[i - 1]) / (curve[i] - curve[i - 1]) * (grid[i] - grid[i - 1])
    sd = float(r.std())
    out, results = {}, {}
    for name, eps in (("sorted", grid), ("shuffled", [2.0, 0.5, 1.5, 1.0])):
        results[name] = category_flip.category_flip(site, images, labels, eps_list=eps, n_images=None, steps=20,
                                                    progress=False)
        out[name] = results[name].summary()
        out[name + "_metrics"] = category_flip.evaluate(site, images, labels, tmp_path / name, eps_list=eps,
                                                        n_images=None, steps=20, progress=False)
    s = out["sorted"]
    assert s["flip_eps"] == pytest.approx(expect, rel=1e-4)
    assert s["relative_to_best_sd"] == pytest.approx((curve[-1] - float(r.max())) / sd, rel=1e-4)
    for k in ("flip_eps", "relative_to_best_sd"):
        assert out["shuffled"][k] == s[k], k
    assert same(out["shuffled"], s)
    assert same(out["shuffled_metrics"], out["sorted_metrics"])
    for res in results.values():
        assert res.eps == grid and res.preferred == 0 and res.non_preferred == B
    csv = {name: (tmp_path / name / "category_flip.csv").read_text() for name in ("sorted", "shuffled")}
    assert csv["shuffled"] == csv["sorted"]


def test_a_dead_unit_beside_a_live_one_cannot_flip(one_thread, tmp_path, caplog):
    """Two units behind a ReLU, at per_unit: unit 7 is dead (every response 0: tied category means, no spread),
    unit 9 is live, ``w . x + 10`` (positive, so linear), which flips at ``(mean_A - mean_B) / ||w||`` (the
    closed form of a linear site). The dead unit's flip quantities are NaN, not 0, and it is left out of the
    over-sites median and flip_reached: those are the live unit's (a dead unit flipping at 0 halved the median)."""
    images, labels, w = planted()
    lin = nn.Linear(w.numel(), 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[1] = w.flatten()
        lin.bias.copy_(torch.tensor([-100.0, 10.0]))
    sites = nn.Sequential(nn.Flatten(), lin, nn.ReLU())
    r = (images.flatten(1) @ w.flatten()).double()
    means = torch.stack([r[labels == c].mean() for c in range(3)])
    expect = float(means[0] - means.min()) / float(w.norm())
    with caplog.at_level(logging.WARNING, logger="neuroguide"):
        m = category_flip.evaluate(sites, images, labels, tmp_path, per_unit=True, unit_names=[7, 9],
                                   eps_list=[0.25, 0.5, 1.0, 2.0], n_images=None, steps=20, progress=False)
    p = "eval/control/category_flip"
    assert 0.25 < expect < 2.0
    assert m[f"{p}/9/flip_eps"] == pytest.approx(expect, rel=1e-4) and m[f"{p}/9/flip_reached"] == 1.0
    for k in ("flip_eps", "flip_reached", "flip_eps_median_image", "flip_fraction_images", "super_eps",
              "super_reached", "relative_to_best_sd", "super_fraction_images"):
        assert math.isnan(m[f"{p}/7/{k}"]), k
    assert m[f"{p}/flip_eps"] == m[f"{p}/9/flip_eps"]
    assert m[f"{p}/flip_reached"] == 1.0 and m[f"{p}/n_sites"] == 2 and m[f"{p}/n_sites_without_preference"] == 1
    assert m[f"{p}/relative_to_best_sd"] == m[f"{p}/9/relative_to_best_sd"]
    assert "site 7: no category preference" in caplog.text and "site 9: no category" not in caplog.text


# ----------------------------------------------------------------------------- other analyses
def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1), nn.Flatten(1),
                         nn.LazyLinear(3))


def test_control_on_a_shuffled_grid_gives_the_sorted_metrics(one_thread):
    """Random starts drawn from one generator: the grid is attacked in sorted order whatever the order written, so
    every metric is the same; the images kept for the figure are at the largest eps, as documented."""
    model = small_cnn()
    x = 0.3 + 0.4 * torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    model(x)  # materialize the lazy layer
    out, results = {}, {}
    for name, l2, linf in (("sorted", [0.25, 0.5, 1.0], ["1/255", "4/255"]),
                           ("shuffled", [1.0, 0.25, 0.5], ["4/255", "1/255"])):
        results[name] = control.run_control(model, x, x, layer=None, eps_l2=l2, eps_linf=linf, steps=4,
                                            random_start=True, seed=0, progress=False)
        out[name] = control.metrics_of(results[name])
    assert same(out["shuffled"], out["sorted"])
    for res in results.values():
        assert res[0].eps == [0.25, 0.5, 1.0] and res[1].eps == [1 / 255, 4 / 255]
        assert all(r.eps[r.x_adv["eps_index"]] == max(r.eps) for r in res)


def test_closed_loop_on_a_shuffled_grid_gives_the_sorted_report(tmp_path):
    """loop.eps=[0.5,0.25] and [0.25,0.5]: the same attacks, truth and report; truth.json lists the eps in the order
    of its sensitivities (sorted). A duplicate eps is refused before anything runs, naming loop.eps."""
    from test_closed_loop import TINY, compose

    from neuroguide.closed_loop.run import run

    tiny = [o for o in TINY if not o.startswith("loop.eps=")]
    a = run(compose(tmp_path / "a", *tiny, "loop.eps=[0.25,0.5]", "step=simulate", "days=1"))
    b = run(compose(tmp_path / "b", *tiny, "loop.eps=[0.5,0.25]", "step=simulate", "days=1"))
    assert same(b, a)
    assert json.loads((tmp_path / "b" / "truth.json").read_text())["eps"] == [0.25, 0.5]
    with pytest.raises(ValueError, match=r"loop.eps holds the same eps more than once"):
        run(compose(tmp_path / "c", *tiny, "loop.eps=[0.5,0.5]", "step=simulate", "days=1"))
    assert not (tmp_path / "c").exists()

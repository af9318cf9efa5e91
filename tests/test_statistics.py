"""The evaluation package's one sd / standard error, and the analyses that report a spread over a single value:
undefined is NaN, never 0."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from neuroguide.evaluation.metrics import statistics


def _random_with_gaps(shape, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape) * 3 + 1
    a[rng.random(shape) < 0.2] = np.nan
    a.flat[1] = np.inf  # non-finite values other than NaN are left out too
    a.flat[2] = -np.inf
    return a


def test_sd_and_standard_error_match_numpy_on_data_with_gaps():
    a = _random_with_gaps((40, 7))
    fin = a[np.isfinite(a)]
    assert statistics.sd(a) == pytest.approx(np.std(fin, ddof=1), rel=1e-12)
    assert statistics.standard_error(torch.from_numpy(a)) == pytest.approx(np.std(fin, ddof=1) / np.sqrt(fin.size),
                                                                           rel=1e-12)
    assert statistics.n_finite(a) == fin.size
    # along an axis: one value per column, in the input's dtype
    t = torch.from_numpy(a).float()
    per_col, se_col = statistics.sd(t, dim=0), statistics.standard_error(t, dim=0)
    assert per_col.shape == (7,) and per_col.dtype == torch.float32
    for j in range(7):
        c = a[:, j][np.isfinite(a[:, j])]
        assert float(per_col[j]) == pytest.approx(np.std(c, ddof=1), rel=1e-5)
        assert float(se_col[j]) == pytest.approx(np.std(c, ddof=1) / np.sqrt(c.size), rel=1e-5)
    rows = statistics.sd(a, dim=1)
    for i in range(40):
        r = a[i][np.isfinite(a[i])]
        assert (math.isnan(rows[i]) if r.size < 2 else float(rows[i]) == pytest.approx(np.std(r, ddof=1), rel=1e-12))


def test_fewer_than_two_finite_values_give_nan_not_zero():
    for t in ([], [2.5], [np.nan, 3.0, np.inf], torch.tensor([[1.0, np.nan]])):
        assert math.isnan(statistics.sd(t)) and math.isnan(statistics.standard_error(t)), t
    col = statistics.sd(torch.tensor([[1.0, 5.0], [np.nan, 7.0]]), dim=0)
    assert math.isnan(col[0]) and float(col[1]) == pytest.approx(np.std([5.0, 7.0], ddof=1))
    assert math.isnan(statistics.standard_error(torch.tensor([[1.0, 5.0], [np.nan, 7.0]]), dim=0)[0])
    assert statistics.sd([4.0, 4.0]) == 0.0  # a constant is a defined, zero spread


def test_spread_is_the_sd_and_nan_for_a_constant_or_broken_response():
    from neuroguide.evaluation.responses import spread

    m = torch.randn(30, dtype=torch.float64)
    assert spread(m) == pytest.approx(np.std(m.numpy(), ddof=1), rel=1e-12)
    assert math.isnan(spread(torch.ones(5))) and math.isnan(spread(torch.ones(1)))
    assert math.isnan(spread(torch.tensor([1.0, 2.0, float("nan")])))  # a NaN response on a natural image: broken


def _linear(k=3, size=8, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * size * size, k)).eval()


def test_control_standard_error_over_one_image_is_nan(tmp_path):
    """Targeted control on one image: its change is a number, its standard error over images undefined (NaN, was 0);
    metrics.json (null) and control.csv (nan) take it."""
    from neuroguide.evaluation.analyses.control.region_control import control_curve, metrics_of, write_outputs
    from neuroguide.utils.io import write_json

    g = torch.Generator().manual_seed(0)
    model = _linear()
    res = control_curve(model, torch.rand(1, 3, 8, 8, generator=g), norm="l2", eps_list=[0.5],
                        sd_images=torch.rand(6, 3, 8, 8, generator=g), steps=3, progress=False)
    rows = res.rows()
    assert all(math.isfinite(r["change_sd"]) and r["n_images"] == 1 for r in rows)
    assert all(math.isnan(r["change_sd_se"]) for r in rows), rows
    # with two images it is the sd of the two changes / sqrt(2), in sd units (numpy, from the per-image changes)
    two = control_curve(model, torch.rand(2, 3, 8, 8, generator=g), norm="l2", eps_list=[0.5],
                        sd_images=torch.rand(6, 3, 8, 8, generator=g), steps=3, progress=False)
    c = two.change()[0, 0].numpy()
    assert two.rows()[0]["change_sd_se"] == pytest.approx(np.std(c, ddof=1) / np.sqrt(2) / two.sd, rel=1e-5)
    m = metrics_of([res])
    se_keys = [k for k in m if k.endswith("change_sd_se")]
    assert se_keys and all(math.isnan(m[k]) for k in se_keys)
    write_json(tmp_path / "metrics.json", m)
    back = json.loads((tmp_path / "metrics.json").read_text())
    assert all(back[k] is None for k in se_keys)
    write_outputs({"m": [res]}, tmp_path)
    with open(tmp_path / "control.csv") as f:
        assert {r["change_sd_se"] for r in csv.DictReader(f)} == {"nan"}


def test_sensitivity_sd_across_one_unit_is_nan():
    """The summary's sd is across units: with one unit it is undefined (NaN, was 0); with three, numpy's ddof-1 sd."""
    from neuroguide.evaluation.analyses.sensitivity.core import unit_sensitivity

    g = torch.Generator().manual_seed(1)
    model, images, nat = _linear(k=3), torch.rand(4, 3, 8, 8, generator=g), torch.rand(40, 3, 8, 8, generator=g)
    one = unit_sensitivity(model, images, None, [0.5], units=[0], steps=3, sigma_images=nat, progress=False).summary()[0]
    assert one["n_units"] == 1 and math.isfinite(one["mean"])
    assert math.isnan(one["sd"]) and math.isnan(one["sd_norm"]), one
    res = unit_sensitivity(model, images, None, [0.5], steps=3, sigma_images=nat, progress=False)
    assert res.summary()[0]["sd"] == pytest.approx(np.std(res.s[0].numpy(), ddof=1), rel=1e-5)


def test_criterion_c_sd_across_one_site_is_nan():
    """brain_change_sd is the sd across sites of the per-site |delta b| / sigma: NaN with one site (was 0), numpy's
    ddof-1 sd with several."""
    from neuroguide.evaluation.analyses.selection.brain_transfer import brain_change_rows

    g = torch.Generator().manual_seed(2)
    clean, adv, sigma = torch.rand(5, 4, generator=g), torch.rand(5, 4, generator=g), torch.rand(4, generator=g) + .5
    one = brain_change_rows(clean[:, :1], {(0.0, "c1"): adv[:, :1]}, sigma[:1])[0]
    assert math.isfinite(one["brain_change"]) and math.isnan(one["brain_change_sd"]), one
    four = brain_change_rows(clean, {(0.0, "c1"): adv}, sigma)[0]
    per_site = ((adv - clean).abs() / sigma).mean(0).numpy()
    assert four["brain_change"] == pytest.approx(per_site.mean(), rel=1e-5)
    assert four["brain_change_sd"] == pytest.approx(np.std(per_site, ddof=1), rel=1e-5)

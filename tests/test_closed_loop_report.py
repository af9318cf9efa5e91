"""The closed loop report's noise-corrected control RMS (Gaussian / interpolation), on days simulated here with
numpy: a known noise-free change between each clean image and its control, known per-site trial noise, and
chosen repeat counts (NaN for a repeat not shown)."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from neuroguide.closed_loop.report import CONTROLS, control_mean_squares, day_rows, summarize, write_report

EPS = 0.5


def simulated_day(rng, n_sites: int, n_pairs: int, noise_sd: np.ndarray, clean_repeats: np.ndarray,
                  control_repeats: np.ndarray, change: float):
    """Stimuli and responses (M, sites, R) of one day: ``n_pairs`` clean images, one Gaussian and one
    interpolation control of each whose noise-free response differs from the clean one by ``+-change`` (a
    random sign per image and site), one attack (site 0, to give the report its eps). Repeat ``r`` of image
    ``m`` exists for ``r < repeats[m]``; trial noise N(0, noise_sd[site]^2)."""
    ids = [f"c{j}" for j in range(n_pairs)] + [f"{c[0]}{j}" for c in CONTROLS for j in range(n_pairs)] + ["a0"]
    kind = np.array(["clean"] * n_pairs + [c for c in CONTROLS for _ in range(n_pairs)] + ["attack"])
    source = ids[:n_pairs] * 3 + ["c0"]
    clean = rng.normal(10, 3, (n_pairs, n_sites))
    ctl = [clean + change * rng.choice([-1.0, 1.0], clean.shape) for _ in CONTROLS]
    rates = np.concatenate([clean, *ctl, clean[:1] + 1.0])
    repeats = np.concatenate([clean_repeats, control_repeats, control_repeats, [clean_repeats[0]]])
    r_max = int(repeats.max())
    resp = rates[..., None] + noise_sd[None, :, None] * rng.standard_normal((*rates.shape, r_max))
    shown = np.arange(r_max)[None, :] < repeats[:, None]  # (M, R), the same for every site
    resp = np.where(shown[:, None, :], resp, np.nan)
    m = len(ids)
    stimuli = {"image_ids": ids, "source": source, "kind": kind, "site": np.where(kind == "attack", 0, -1),
               "eps": np.where(kind == "clean", 0.0, EPS), "predicted": rng.normal(size=(m, n_sites)),
               "norm": np.full(m, EPS)}
    return stimuli, resp, rates


def report(stimuli, resp, sigma, rates=None):
    rows = day_rows(0, stimuli, resp, sigma, [f"s{k}" for k in range(resp.shape[1])], rates)
    return rows, summarize(rows, None)[0]


def column(rows, key):
    return np.array([r[key] for r in rows], float)


@pytest.mark.parametrize("change", [0.0, 0.5])
def test_half_the_controls_shown_once_corrected_rms_recovers_the_planted_change(change):
    """4 repeats of every clean image, half the controls shown once: the corrected mean square is the planted
    ``change^2`` (the old per-image noise variance left the shown-once images' noise in: 0.4 instead of 0.25,
    0.31 instead of 0 for this day's normalized RMS)."""
    rng = np.random.default_rng(0)
    n_sites, n_pairs, sigma = 200, 400, 2.0
    noise_sd = rng.uniform(0.5, 1.5, n_sites)
    control_repeats = np.where(np.arange(n_pairs) < n_pairs // 2, 4, 1)
    stimuli, resp, rates = simulated_day(rng, n_sites, n_pairs, noise_sd, np.full(n_pairs, 4), control_repeats, change)
    rows, summary = report(stimuli, resp, np.full(n_sites, sigma), rates)
    truth_ms, truth_rms = change ** 2 / sigma ** 2, change / sigma  # normalized
    for c in CONTROLS:
        print(f"{c}, change {change}: mean rms {summary[f'{c}_rms_norm']:.4f} (truth {truth_rms}), "
              f"raw {summary[f'{c}_rms_raw_norm']:.4f}")
        # per site the estimate is within a few of its own standard errors (sqrt(2 v^2 + 4 change^2 v) / sqrt(C)),
        # so the mean of the per-site RMS is close to the truth: 0.25 for change 0.5 (minus a Jensen bias of
        # ~0.006); for change 0 the clipping lifts it to about 0.5 * 0.82 * sqrt(per-site se) ~ 0.05
        assert abs(summary[f"{c}_rms_norm"] - truth_rms) < (0.02 if change else 0.1)
        ms = column(rows, f"{c}_ms_corrected_norm")
        se = ms.std(ddof=1) / math.sqrt(n_sites)
        print(f"    site-mean corrected ms {ms.mean():.5f} +- {se:.5f} (truth {truth_ms})")
        assert summary[f"{c}_ms_corrected_norm"] == pytest.approx(ms.mean())
        assert abs(ms.mean() - truth_ms) < 4 * se
        assert abs(summary[f"{c}_rms_from_mean_ms_norm"] - truth_rms) < (
            4 * se / (2 * truth_rms) if change else math.sqrt(4 * se))
        assert summary[f"{c}_true_rms_norm"] == pytest.approx(truth_rms)  # the planted change, noise-free
    # the pooled trial variance is the planted noise variance (chi-square with sum(n - 1) dof, ~1200 per site)
    s2 = control_mean_squares(resp, np.arange(n_pairs), n_pairs + np.arange(n_pairs))["trial_var"]
    np.testing.assert_allclose(s2 / noise_sd ** 2, 1.0, atol=5 * math.sqrt(2 / (n_pairs * 3 + n_pairs // 2 * 3)))


def test_clipping_each_site_at_zero_inflates_the_mean_rms_the_unclipped_mean_square_does_not():
    """Truth 0, 10 controls a site, 2 repeats, noise sd = sigma: each site's corrected mean square is noise
    around 0, about half the sites clip to RMS 0 and the mean clipped RMS is ~0.3; the mean over sites of the
    unclipped mean square is ~0, and so is the RMS computed from it."""
    rng = np.random.default_rng(1)
    n_sites, n_pairs = 4000, 10
    stimuli, resp, _ = simulated_day(rng, n_sites, n_pairs, np.ones(n_sites), np.full(n_pairs, 2),
                                     np.full(n_pairs, 2), 0.0)
    rows, summary = report(stimuli, resp, np.ones(n_sites))
    for c in CONTROLS:
        ms = column(rows, f"{c}_ms_corrected_norm")
        se = ms.std(ddof=1) / math.sqrt(n_sites)
        clipped_zero = np.mean(column(rows, f"{c}_rms_norm") == 0)
        print(f"{c}: {clipped_zero:.0%} of sites at 0, mean clipped rms {summary[f'{c}_rms_norm']:.3f}, mean "
              f"unclipped ms {summary[f'{c}_ms_corrected_norm']:.4f} +- {se:.4f}, rms from it "
              f"{summary[f'{c}_rms_from_mean_ms_norm']:.3f}")
        assert abs(summary[f"{c}_ms_corrected_norm"]) < 4 * se
        assert summary[f"{c}_rms_from_mean_ms_norm"] < math.sqrt(4 * se)
        assert np.mean(ms < 0) > 0.4 and summary[f"{c}_rms_norm"] > 0.2  # the bias the unclipped keys avoid


def test_without_two_repeats_anywhere_the_corrected_values_are_nan_with_a_warning(tmp_path):
    rng = np.random.default_rng(2)
    n_sites, n_pairs = 3, 20
    stimuli, resp, _ = simulated_day(rng, n_sites, n_pairs, np.ones(n_sites), np.ones(n_pairs, int),
                                     np.ones(n_pairs, int), 0.5)
    with pytest.warns(UserWarning) as caught:
        rows, summary = report(stimuli, resp, np.ones(n_sites))
    for c in CONTROLS:  # one warning per control, naming the day, eps, sites and the fix
        assert any(re.search(rf"day 0, {c} control at eps 0.5: no clean or {c} image has 2 finite repeats at "
                             rf"site\(s\) s0, s1, s2.*{c}_rms_norm / {c}_ms_corrected_norm are NaN.*Record >= 2 "
                             "repeats", str(w.message)) for w in caught)
    for c in CONTROLS:
        assert np.isnan(column(rows, f"{c}_rms_norm")).all() and np.isnan(column(rows, f"{c}_ms_corrected_norm")).all()
        d = resp[:n_pairs, :, 0] - resp[n_pairs * (1 + CONTROLS.index(c)):n_pairs * (2 + CONTROLS.index(c)), :, 0]
        np.testing.assert_allclose(column(rows, f"{c}_rms_raw_norm"), np.sqrt(np.mean(d ** 2, 0)), rtol=1e-6)
        assert math.isnan(summary[f"{c}_rms_norm"]) and math.isnan(summary[f"{c}_rms_from_mean_ms_norm"])
    write_report(tmp_path, rows, [summary], None)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["closed_loop/day_0/l2_0.5/gaussian_rms_norm"] is None  # NaN, as JSON writes it
    assert metrics["closed_loop/day_0/l2_0.5/gaussian_rms_raw_norm"] > 0


def test_a_site_without_a_finite_control_response_is_nan_and_left_out_of_the_summary(tmp_path):
    rng = np.random.default_rng(3)
    n_sites, n_pairs = 5, 40
    stimuli, resp, _ = simulated_day(rng, n_sites, n_pairs, np.ones(n_sites), np.full(n_pairs, 3),
                                     np.full(n_pairs, 3), 0.5)
    resp[:, 2] = np.nan  # site 2 recorded nothing
    rows, summary = report(stimuli, resp, np.ones(n_sites))
    others = [0, 1, 3, 4]
    for c in CONTROLS:
        for key in ("rms_norm", "rms_raw_norm", "ms_corrected_norm"):
            v = column(rows, f"{c}_{key}")
            assert np.isnan(v[2]) and np.isfinite(v[others]).all()
            assert summary[f"{c}_{key}"] == pytest.approx(v[others].mean())  # the mean of the 4, not of 5 with a 0
    # no site with a finite control response: every control key is NaN (null in metrics.json), not 0
    resp[np.isin(stimuli["kind"], CONTROLS)] = np.nan
    rows, summary = report(stimuli, resp, np.ones(n_sites))
    metrics = write_report(tmp_path, rows, [summary], None)
    stored = json.loads((tmp_path / "metrics.json").read_text())
    for c in CONTROLS:
        for key in ("rms_norm", "rms_raw_norm", "ms_corrected_norm", "rms_from_mean_ms_norm"):
            name = f"closed_loop/day_0/l2_0.5/{c}_{key}"
            assert math.isnan(metrics[name]) and stored[name] is None
    assert math.isfinite(metrics["closed_loop/day_0/l2_0.5/lower_bound_norm"])

"""The closed loop's report (Guo et al. sec. 3.1, Fig. 5): per day, site and eps, the lower bound on the site's
adversarial sensitivity, beside the model-free controls and (in simulation) the brain's true sensitivity.

Lower bound (the sign-corrected estimator, :func:`neuroguide.evaluation.metrics.estimators.sign_corrected_sensitivity`)
for site ``i`` over its M attacked images ``x_j + d_ij`` of the day::

    LB_i = 1/M sum_j sign(f_i(x_j) - f_i(x_j + d_ij)) (r_i(x_j) - r_i(x_j + d_ij))

with ``f`` the model that made the day's attacks and ``r`` the repeat means. It is a lower bound twice over:
noise in ``r`` enters with a sign that does not depend on it, so it averages out instead of inflating the
estimate (the plain mean of ``|r(x) - r(x + d)|`` grows with the noise), and every term is at most
``|r_i(x_j) - r_i(x_j + d_ij)|``, itself at most the site's worst case ``max_{||d|| <= eps}`` that a
white-box attack on the brain would find: a model's attack is not the brain's worst case.

Normalized: divided by ``sigma_i``, the std of the site's repeat-mean response over all recorded clean
images (noise makes it larger than the noise-free std, so the normalized bound only gets smaller).

Controls (Gaussian noise, interpolation towards another image, of the same L2 norm; :func:`control_mean_squares`):
the normalized RMS of the change ``d_j = r_i(x_j) - r_i(x'_j)`` over the site's C (clean, control) pairs with
a finite ``d_j``, an upper bound on the mean absolute change, as in the paper. Noise adds its variance to every
``d_j^2``, so per site the corrected mean square is::

    ms_i = 1/C sum_j (d_j^2 - s2_i (1/n_j + 1/n'_j))

with ``n_j, n'_j`` the finite repeats of the clean image and of its control, and ``s2_i`` the site's pooled
trial variance (sum of squared deviations from each image's repeat mean over sum of ``(n - 1)``, over the
clean images and controls entering the differences that have >= 2 repeats; an image shown once adds its noise
through ``1/n`` but nothing to ``s2``). ``ms_i`` is unbiased for the noise-free mean square when the
site's trial variance is the same for all those images, or when they all have the same number of repeats (each
clean image is in one pair per control and eps);
otherwise the correction uses their repeat-weighted mean variance. ``ms_i`` can be negative (its noise), and
the report keeps it as ``*_ms_corrected_norm`` (``ms_i / sigma_i^2``). ``*_rms_norm`` is
``sqrt(max(0, ms_i)) / sigma_i``: clipped per site, so its mean over sites is biased upwards (with truth 0, 10
controls a site, 2 repeats and noise sd = sigma_i, half the sites read 0 and the mean is ~0.3); the summary's
``*_rms_from_mean_ms_norm`` is ``sqrt(max(0, mean over sites of *_ms_corrected_norm))``, clipped once after
averaging. ``*_rms_raw_norm`` keeps ``sqrt(1/C sum_j d_j^2) / sigma_i``, which noise alone lifts to about
``noise sd * sqrt(1/n + 1/n')``. Without a finite ``d_j`` every control value of the site is NaN; without a
noise estimate (no image with 2 repeats) the corrected ones are NaN, with a warning. The summary's means over
sites leave NaN sites out and are NaN when every site is.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from neuroguide.data.it import nanmean
from neuroguide.evaluation.metrics.estimators import nanstd, sign_corrected_sensitivity
from neuroguide.evaluation.plots import curve_figure, eps_tag, write_csv
from neuroguide.utils.io import write_json

CONTROLS = ("gaussian", "interpolation")


def _repeat_stats(resp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(M, sites, R) -> each (M, sites) float64: the repeat mean (NaN without a finite repeat), the number of
    finite repeats and the sum of squared deviations from the repeat mean."""
    r = np.asarray(resp, np.float64)
    n = np.sum(~np.isnan(r), axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, np.nansum(r, axis=2) / np.maximum(n, 1), np.nan)
        ss = np.nansum((r - mean[..., None]) ** 2, axis=2)
    return mean, n, ss


def control_mean_squares(resp: np.ndarray, src: np.ndarray, ctl: np.ndarray) -> dict[str, np.ndarray]:
    """Per site, the mean square of ``d_j = r(src_j) - r(ctl_j)`` (repeat means) over the pairs with a finite
    ``d_j``, raw and noise-corrected with the pooled trial variance (the module docstring has the estimator).

    Args:
        resp: (M, sites, R) responses, NaN for a missing repeat.
        src, ctl: (C,) rows of ``resp``: the clean image and the control of each pair.
    Returns:
        ``raw`` (sites,) ``mean_j d_j^2``; ``corrected`` (sites,) ``mean_j (d_j^2 - s2 (1/n_src_j + 1/n_ctl_j))``,
        unbiased for the noise-free mean square when the site's trial variance is the same for the images of
        the pairs (can be negative); ``trial_var`` (sites,) ``s2``. NaN where no pair has a finite ``d_j``
        (``corrected`` also where no image of the pairs has 2 repeats).
    """
    mean, n, ss = _repeat_stats(resp)
    d = mean[src] - mean[ctl]  # (C, sites)
    ok = np.isfinite(d)
    count = ok.sum(0)
    images = np.union1d(src, ctl)
    dof = np.where(n[images] > 1, n[images] - 1, 0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        trial_var = np.where(dof > 0, np.where(n[images] > 1, ss[images], 0.0).sum(0) / np.maximum(dof, 1), np.nan)
        raw = np.where(count > 0, np.where(ok, d ** 2, 0.0).sum(0) / np.maximum(count, 1), np.nan)
        weight = np.where(ok, 1 / np.maximum(n[src], 1) + 1 / np.maximum(n[ctl], 1), 0.0).sum(0) / np.maximum(count, 1)
    return {"raw": raw, "corrected": raw - trial_var * weight, "trial_var": trial_var}


def _mean(v: np.ndarray) -> float:
    """NaN-ignoring mean; NaN (no warning) when nothing is finite."""
    v = np.asarray(v, float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else math.nan


def day_rows(day: int, stimuli: dict, resp: np.ndarray, sigma: np.ndarray, site_ids: list[str],
             rates: np.ndarray | None = None) -> list[dict]:
    """One row per (site, eps) of day ``day``: the lower bound and the controls (see the module docstring).

    ``resp`` (M, sites, R) aligned with ``stimuli``; ``rates`` (M, sites) the noise-free responses (simulation).
    """
    ids = list(stimuli["image_ids"])
    row_of = {i: r for r, i in enumerate(ids)}
    src = np.array([row_of[s] for s in stimuli["source"]])
    mean = nanmean(resp, 2)
    kind, site, eps = stimuli["kind"], stimuli["site"], stimuli["eps"]
    pred = stimuli["predicted"]
    out = []
    for e in sorted(set(eps[kind == "attack"].tolist())):
        controls = {}
        for control in CONTROLS:
            c = np.flatnonzero((kind == control) & np.isclose(eps, e))
            controls[control] = c, control_mean_squares(resp, src[c], c)
            _warn_without_noise(day, control, e, site_ids, controls[control][1])
        for k, sid in enumerate(site_ids):
            a = np.flatnonzero((kind == "attack") & (site == k) & np.isclose(eps, e))
            row = {"day": day, "site": sid, "eps": e, "n_attacks": len(a), "sigma": float(sigma[k])}
            lb = float(sign_corrected_sensitivity(torch.from_numpy(pred[src[a], k:k + 1]),
                                                  torch.from_numpy(pred[a, k:k + 1]),
                                                  torch.from_numpy(mean[src[a], k:k + 1]),
                                                  torch.from_numpy(mean[a, k:k + 1]))[0]) if len(a) else math.nan
            dr = mean[src[a], k] - mean[a, k]
            row.update(lower_bound=lb, lower_bound_norm=lb / sigma[k],
                       naive_norm=_mean(np.abs(dr)) / sigma[k],
                       predicted_change=float(np.mean(np.abs(pred[a, k] - pred[src[a], k]))) if len(a) else math.nan,
                       norm_shown=float(np.mean(stimuli["norm"][a])) if len(a) else math.nan)
            if rates is not None and len(a):  # what the attacks did to the noise-free brain
                row["true_change_norm"] = float(np.mean(np.abs(rates[src[a], k] - rates[a, k]))) / sigma[k]
            for control, (c, ms) in controls.items():
                var = float(sigma[k]) ** 2
                corrected = float(ms["corrected"][k]) / var
                row[f"{control}_rms_norm"] = math.sqrt(max(0.0, corrected)) if math.isfinite(corrected) else math.nan
                row[f"{control}_rms_raw_norm"] = math.sqrt(float(ms["raw"][k]) / var)
                row[f"{control}_ms_corrected_norm"] = corrected
                if rates is not None and len(c):
                    row[f"{control}_true_rms_norm"] = float(np.sqrt(np.mean((rates[src[c], k] - rates[c, k]) ** 2))) \
                        / sigma[k]
            out.append(row)
    return out


def _warn_without_noise(day: int, control: str, eps: float, site_ids: list[str], ms: dict) -> None:
    """Warn that the corrected control values of the sites with a finite change but no noise estimate are NaN."""
    bad = [sid for sid, raw, v in zip(site_ids, ms["raw"], ms["trial_var"]) if math.isfinite(raw) and
           not math.isfinite(v)]
    if bad:
        warnings.warn(f"closed loop report, day {day}, {control} control at eps {eps:g}: no clean or {control} "
                      f"image has 2 finite repeats at site(s) {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}, "
                      f"so the noise variance is unknown and {control}_rms_norm / {control}_ms_corrected_norm are NaN "
                      f"there ({control}_rms_raw_norm, inflated by the noise, is kept). Record >= 2 repeats of some "
                      "images to correct for the noise", stacklevel=3)


def clean_sigma(days: list[tuple[dict, np.ndarray]]) -> np.ndarray:
    """(sites,) std of the repeat-mean responses over every recorded clean image of ``days`` [(stimuli, resp)]."""
    clean = np.concatenate([nanmean(r[s["kind"] == "clean"], 2) for s, r in days])
    return nanstd(torch.from_numpy(clean).double(), 0).numpy()


def summarize(rows: list[dict], truth: dict | None) -> list[dict]:
    """One row per (day, eps): the mean and sd over the sites where it is finite of every normalized column
    (NaN where no site's is), ``<control>_rms_from_mean_ms_norm`` (the module docstring) and the truth."""
    keys = ["lower_bound_norm", "naive_norm", *[f"{c}_{k}" for k in ("rms_norm", "rms_raw_norm", "ms_corrected_norm")
                                                for c in CONTROLS],
            "true_change_norm", *[f"{c}_true_rms_norm" for c in CONTROLS]]
    out = []
    for day in sorted({r["day"] for r in rows}):
        for e in sorted({r["eps"] for r in rows if r["day"] == day}):
            sel = [r for r in rows if r["day"] == day and r["eps"] == e]
            row = {"day": day, "eps": e, "n_sites": len(sel)}
            for k in keys:
                v = np.array([r.get(k, math.nan) for r in sel], float)
                if any(k in r for r in sel):
                    row[k], row[f"{k}_sd"] = _mean(v), float(np.nanstd(v)) if np.isfinite(v).any() else math.nan
            for c in CONTROLS:
                if f"{c}_ms_corrected_norm" in row:
                    m = row[f"{c}_ms_corrected_norm"]
                    row[f"{c}_rms_from_mean_ms_norm"] = math.sqrt(max(0.0, m)) if math.isfinite(m) else math.nan
            if truth is not None:
                row["truth_norm"] = truth_at(truth, e)
            out.append(row)
    return out


def truth_at(truth: dict, eps: float) -> float:
    """The brain's mean white-box sensitivity at ``eps``, normalized by the report's sigma."""
    e = int(np.argmin(np.abs(np.asarray(truth["eps"]) - eps)))
    return float(np.nanmean(np.asarray(truth["s"][e]) / np.asarray(truth["sigma_report"])))


def write_report(out: Path, rows: list[dict], summary: list[dict], truth: dict | None) -> dict:
    """report.csv, summary.csv, fig5.png and metrics.json in ``out``; returns the flat metrics."""
    write_csv(out / "report.csv", rows, list(dict.fromkeys(k for r in rows for k in r)))
    write_csv(out / "summary.csv", summary, list(dict.fromkeys(k for r in summary for k in r)))
    metrics = {}
    for r in summary:
        for k, v in r.items():
            if k not in ("day", "eps", "n_sites") and not k.endswith("_sd"):
                metrics[f"closed_loop/day_{r['day']}/{eps_tag('l2', r['eps'])}/{k}"] = v
    write_json(out / "metrics.json", metrics)
    figure(out / "fig5.png", summary)
    return metrics


def figure(path: Path, summary: list[dict]) -> Path:
    """Fig. 5: normalized lower bound against eps per day, the controls (normalized RMS from the site-mean
    corrected mean square), the brain's truth;
    and the lower bound against the day at each eps."""
    days = sorted({r["day"] for r in summary})
    shown = [d for d in days if d > 0] or days  # the paper leaves out day 0 (no mapping yet)
    eps = sorted({r["eps"] for r in summary})
    last = days[-1]

    def col(day, key):
        return [next((r.get(key, math.nan) for r in summary if r["day"] == day and r["eps"] == e), math.nan)
                for e in eps]

    curves = [{"x": eps, "y": col(d, "lower_bound_norm"), "label": f"day {d}: model attacks (lower bound)"}
              for d in shown]
    curves += [{"x": eps, "y": col(last, "gaussian_rms_from_mean_ms_norm"),
                "label": f"Gaussian noise (RMS, day {last})", "style": "s--"},
               {"x": eps, "y": col(last, "interpolation_rms_from_mean_ms_norm"),
                "label": f"interpolation (RMS, day {last})", "style": "^--"}]
    if "truth_norm" in summary[0]:
        curves.append({"x": eps, "y": col(last, "truth_norm"), "label": "brain, white-box (truth)", "style": "k*-"})
    growth = [{"x": days, "y": [col(d, "lower_bound_norm")[i] for d in days], "label": f"eps {e:g}"}
              for i, e in enumerate(eps)]
    return curve_figure([{"title": "closed loop: lower bound vs controls", "xlabel": "L2 eps",
                          "ylabel": "normalized sensitivity (/ sigma)", "curves": curves},
                         {"title": "lower bound by day", "xlabel": "day", "ylabel": "normalized lower bound",
                          "curves": growth, "integer_x": True}], path)

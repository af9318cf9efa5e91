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
images (noise makes it larger than the noise-free std, so the normalized bound only gets smaller). Controls
(Gaussian noise, interpolation towards another image, of the same L2 norm): the normalized RMS of the
change, ``sqrt(mean_j dr_j^2 - mean_j v_j) / sigma_i`` with ``v_j`` the noise variance of ``dr_j`` estimated
from the repeats (``rms_raw`` keeps the uncorrected value, which noise alone lifts to about
``noise sd * sqrt(2 / repeats)``): an upper bound on the mean absolute change, as in the paper.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from neuroguide.data.it import nanmean
from neuroguide.evaluation.metrics.estimators import nanstd, sign_corrected_sensitivity
from neuroguide.evaluation.plots import curve_figure, eps_tag, write_csv
from neuroguide.utils.io import write_json


def _noise_var_of_mean(resp: np.ndarray) -> np.ndarray:
    """(M, sites, R) -> (M, sites) variance of the repeat mean (sample variance / n), NaN with < 2 repeats."""
    n = np.sum(~np.isnan(resp), axis=2)
    mean = nanmean(resp, 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        ss = np.nansum((resp - mean[..., None]) ** 2, axis=2)
        return np.where(n > 1, ss / np.maximum(n - 1, 1) / np.maximum(n, 1), np.nan)


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
    mean, var = nanmean(resp, 2), _noise_var_of_mean(resp)
    kind, site, eps = stimuli["kind"], stimuli["site"], stimuli["eps"]
    pred = stimuli["predicted"]
    out = []
    for e in sorted(set(eps[kind == "attack"].tolist())):
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
            for control in ("gaussian", "interpolation"):
                c = np.flatnonzero((kind == control) & np.isclose(eps, e))
                d = mean[src[c], k] - mean[c, k]
                v = var[src[c], k] + var[c, k]
                ok = np.isfinite(d)
                ms, noise = float(np.mean(d[ok] ** 2)) if ok.any() else math.nan, float(np.nanmean(v[ok])) \
                    if ok.any() else math.nan
                row[f"{control}_rms_norm"] = math.sqrt(max(0.0, ms - (noise if math.isfinite(noise) else 0.0))) \
                    / sigma[k]
                row[f"{control}_rms_raw_norm"] = math.sqrt(ms) / sigma[k]
                if rates is not None and len(c):
                    row[f"{control}_true_rms_norm"] = float(np.sqrt(np.mean((rates[src[c], k] - rates[c, k]) ** 2))) \
                        / sigma[k]
            out.append(row)
    return out


def clean_sigma(days: list[tuple[dict, np.ndarray]]) -> np.ndarray:
    """(sites,) std of the repeat-mean responses over every recorded clean image of ``days`` [(stimuli, resp)]."""
    clean = np.concatenate([nanmean(r[s["kind"] == "clean"], 2) for s, r in days])
    return nanstd(torch.from_numpy(clean).double(), 0).numpy()


def summarize(rows: list[dict], truth: dict | None) -> list[dict]:
    """One row per (day, eps): the mean and sd over sites of every normalized column (and the truth)."""
    keys = ["lower_bound_norm", "naive_norm", "gaussian_rms_norm", "interpolation_rms_norm", "gaussian_rms_raw_norm",
            "interpolation_rms_raw_norm", "true_change_norm", "gaussian_true_rms_norm", "interpolation_true_rms_norm"]
    out = []
    for day in sorted({r["day"] for r in rows}):
        for e in sorted({r["eps"] for r in rows if r["day"] == day}):
            sel = [r for r in rows if r["day"] == day and r["eps"] == e]
            row = {"day": day, "eps": e, "n_sites": len(sel)}
            for k in keys:
                v = np.array([r.get(k, math.nan) for r in sel], float)
                if np.isfinite(v).any():
                    row[k], row[f"{k}_sd"] = float(np.nanmean(v)), float(np.nanstd(v))
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
    """Fig. 5: normalized lower bound against eps per day, the controls (normalized RMS), the brain's truth;
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
    curves += [{"x": eps, "y": col(last, "gaussian_rms_norm"), "label": f"Gaussian noise (RMS, day {last})",
                "style": "s--"},
               {"x": eps, "y": col(last, "interpolation_rms_norm"), "label": f"interpolation (RMS, day {last})",
                "style": "^--"}]
    if "truth_norm" in summary[0]:
        curves.append({"x": eps, "y": col(last, "truth_norm"), "label": "brain, white-box (truth)", "style": "k*-"})
    growth = [{"x": days, "y": [col(d, "lower_bound_norm")[i] for d in days], "label": f"eps {e:g}"}
              for i, e in enumerate(eps)]
    return curve_figure([{"title": "closed loop: lower bound vs controls", "xlabel": "L2 eps",
                          "ylabel": "normalized sensitivity (/ sigma)", "curves": curves},
                         {"title": "lower bound by day", "xlabel": "day", "ylabel": "normalized lower bound",
                          "curves": growth, "integer_x": True}], path)

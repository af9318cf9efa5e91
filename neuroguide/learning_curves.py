"""Learning curves of a training run: train/val loss and the task's monitored score against epoch, read
from the run's CSV logger file (``<run>/csv/metrics.csv``) and written as ``learning_curves.png``.

Only the epochs of fitting are plotted (those with ``train/*`` values), each metric's first value of each
epoch: the validation of the selected checkpoint and the test that follow fitting are logged at the epoch
after the last one and are left out.
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

from neuroguide.evaluation.plots import curve_figure

log = logging.getLogger(__name__)


def read_epochs(metrics_csv: str | Path) -> dict[str, dict[int, float]]:
    """``{metric: {epoch: value}}`` of the fitted epochs (the first value logged in each)."""
    first: dict[str, dict[int, float]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            for k, v in row.items():
                if k in ("epoch", "step") or v in (None, ""):
                    continue
                first.setdefault(k, {}).setdefault(epoch, float(v))
    fitted = {e for k, vals in first.items() if k.startswith("train/") for e in vals}
    return {k: {e: v for e, v in sorted(vals.items()) if e in fitted} for k, vals in first.items()}


def _curve(series: dict[str, dict[int, float]], key: str) -> dict | None:
    vals = series.get(key, {})
    if not vals or all(not math.isfinite(v) for v in vals.values()):
        return None
    xs = sorted(vals)
    return {"label": key, "x": xs, "y": [vals[e] for e in xs], "style": "o-" if len(xs) < 30 else "-"}


def learning_curves(metrics_csv: str | Path, path: str | Path, monitor: str = "val/loss",
                    title: str | None = None) -> dict:
    """Write the learning curves of ``metrics_csv`` to ``path`` (PNG, two panels: loss; ``monitor``).

    Returns ``{"path", "panels"}``: the panels as drawn (each curve's label, x = epochs, y = values), or
    ``{"path": None, "reason": ...}`` when the file holds no fitted epoch.
    """
    series = read_epochs(metrics_csv)
    if not any(k.startswith("train/") for k in series):
        return {"path": None, "reason": f"{metrics_csv} holds no train/* values (no epoch was fitted)"}
    panels = [{"title": "loss", "xlabel": "epoch", "ylabel": "loss",
               "curves": [c for c in (_curve(series, "train/loss"), _curve(series, "val/loss")) if c]}]
    if monitor and monitor.split("/", 1)[-1] != "loss":
        name = monitor.split("/", 1)[-1]
        curves = [c for c in (_curve(series, f"train/{name}"), _curve(series, monitor)) if c]
        panels.append({"title": f"{monitor} (task.monitor)", "xlabel": "epoch", "ylabel": name, "curves": curves})
    panels = [p for p in panels if p["curves"]]
    for p in panels:
        p["integer_x"] = True  # whole epochs on the x axis
    path = curve_figure(panels, path, title=title)
    return {"path": Path(path), "panels": panels}


def write_learning_curves(trainer, cfg, out: Path) -> Path | None:
    """``<out>/learning_curves.png`` of a finished run from its CSV logger's metrics.csv (the monitored score is
    ``cfg.task.monitor``); None, and a line saying why, when there is none."""
    from lightning.pytorch.loggers import CSVLogger

    csv_loggers = [lg for lg in trainer.loggers if isinstance(lg, CSVLogger)]
    if not csv_loggers:
        why = ("trainer.fast_dev_run replaces the loggers" if trainer.fast_dev_run else
               "the run has no CSV logger (logger=default or logger=csv add it)")
        log.info("no learning curves: %s", why)
        return None
    metrics_csv = Path(csv_loggers[0].log_dir) / "metrics.csv"
    if not metrics_csv.exists():
        log.info("no learning curves: %s does not exist", metrics_csv)
        return None
    try:
        res = learning_curves(metrics_csv, out / "learning_curves.png", monitor=str(cfg.task.get("monitor", "")),
                              title=f"{cfg.task.name}: {out.name}")
    except Exception as e:  # the model and metrics are written: a figure must not fail the run
        log.warning("learning curves not written (%s: %s)", type(e).__name__, e)
        return None
    if res["path"] is None:
        log.info("no learning curves: %s", res["reason"])
    return res["path"]

"""learning_curves.png: written at the end of training from the CSV logger's metrics.csv, plotting exactly its
values of the fitted epochs; no CSV logger: no figure, a line saying why."""
from __future__ import annotations

import csv
import logging
from types import SimpleNamespace

import pytest
from PIL import Image

from neuroguide.learning_curves import learning_curves, write_learning_curves
from neuroguide.train import run


@pytest.mark.slow  # trains for more than ~20 s: in the full suite, not the quick one
def test_learning_curves_of_a_run_plot_its_metrics_csv(compose_train, tmp_path):
    cfg = compose_train("task=predictor", "region=V1", "task.max_epochs=3", "+trainer.limit_train_batches=2")
    metrics = run(cfg)
    out = tmp_path / "run"
    png = out / "learning_curves.png"
    w, h = Image.open(png).size
    assert 600 <= w <= 1600 and 250 <= h <= 800  # two panels side by side, readable

    # what metrics.csv says, read independently: the first value of each metric in each fitted epoch (0, 1, 2);
    # the selected checkpoint's validation and the test are logged later, at epoch 3
    with open(out / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected: dict[str, dict[int, float]] = {}
    for r in rows:
        for k in ("train/loss", "val/loss", "val/r_median"):
            if r.get(k) and int(r["epoch"]) < 3:
                expected.setdefault(k, {}).setdefault(int(r["epoch"]), float(r[k]))
    assert any(r.get("val/r_median") and int(r["epoch"]) == 3 for r in rows)  # the re-validation row exists

    res = learning_curves(out / "csv" / "metrics.csv", tmp_path / "again.png", monitor=cfg.task.monitor,
                          title="predictor: run")  # as train.py draws it
    drawn = {c["label"]: dict(zip(c["x"], c["y"])) for p in res["panels"] for c in p["curves"]}
    assert set(drawn) == {"train/loss", "val/loss", "val/r_median"}
    for k, vals in expected.items():
        assert drawn[k] == pytest.approx(vals) and sorted(vals) == [0, 1, 2], k
    assert drawn["val/r_median"][int(metrics["selected_epoch"])] == pytest.approx(metrics["val/r_median"])
    assert [(p["xlabel"], p["ylabel"]) for p in res["panels"]] == [("epoch", "loss"), ("epoch", "r_median")]
    assert Image.open(tmp_path / "again.png").size == (w, h)


def test_no_csv_logger_no_figure_and_a_reason(tmp_path, caplog):
    cfg = SimpleNamespace(task={"monitor": "val/acc", "name": "guidance"})
    with caplog.at_level(logging.INFO):
        assert write_learning_curves(SimpleNamespace(loggers=[], fast_dev_run=False), cfg, tmp_path) is None
        assert write_learning_curves(SimpleNamespace(loggers=[], fast_dev_run=1), cfg, tmp_path) is None
    assert "no learning curves: the run has no CSV logger" in caplog.text
    assert "no learning curves: trainer.fast_dev_run replaces the loggers" in caplog.text
    assert not list(tmp_path.iterdir())

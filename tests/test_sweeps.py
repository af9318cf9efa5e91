"""Sweeps: a 2-job sweep through submitit's local executor; every experiment config composes and runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import small_overrides
from neuroguide.config import CONF_DIR, compose_config
from neuroguide.train import run

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_job_sweep_through_submitit_local(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=submitit_local", "task=predictor",
           "region=V1,V4", "+trainer.fast_dev_run=true", f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10",
           *small_overrides(tmp_path)]
    out = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, WANDB_MODE="disabled"), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    # each job's folder names its overrides, the sweep factors first
    assert [r.name.split("_")[:2] for r in runs] == [["task-predictor", "region-V1"], ["task-predictor", "region-V4"]]
    for r in runs:
        assert "test/r_median" in json.loads((r / "metrics.json").read_text())
    assert (sweep / ".submitit").is_dir()  # the jobs really went through submitit


# the sweeps of train.py (evaluate.py's presets, e.g. guo2022_sensitivity, compose in tests/test_house.py)
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")
                     if "python train.py" in p.read_text() or "python evaluate.py" not in p.read_text())


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_configs_compose_and_run(experiment, tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = base.hydra.sweeper.params or {}
    assert params, f"experiment {experiment} declares no sweep"
    # the first job of the grid, small and fast
    first = [f"{k}={str(v).split(',')[0]}" for k, v in params.items()]
    cfg = compose_config("train", small_overrides(tmp_path) + [f"experiment={experiment}", *first,
                                                              "+trainer.fast_dev_run=true",
                                                              *_no_downloads(str(base.task.name))],
                         output_dir=tmp_path / "run")
    metrics = run(cfg)
    # one run folder, or one per region of a multi-region run (task.regions: <run>/regions/<region>/)
    regions = sorted({k.split("/")[0] for k in metrics}) if cfg.task.get("regions") else []
    folders = [tmp_path / "run" / "regions" / r for r in regions] or [tmp_path / "run"]
    assert metrics and all((f / "metrics.json").exists() for f in folders), folders


def _no_downloads(task: str) -> list[str]:
    """Overrides that keep an experiment's first job local: a predictor trained fast on the way, or random
    backbone weights where the experiment names published ones (nothing is downloaded here)."""
    if task == "it_encoding":
        return ["backbone.at_eps=null"]
    if task == "encoding":
        return ["backbone.weights=random", "data.image_size=64"]  # alexnet needs more than 32 px
    return ['predictor.train_overrides=["+trainer.fast_dev_run=true"]']

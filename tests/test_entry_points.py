"""train.py: an error inside the run reaches the run's own train.log with its traceback (Hydra itself only
prints it on the console), and the exit status is 1."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # spawns processes: outside the quick loop (pytest -m "not slow")

REPO = Path(__file__).resolve().parents[1]


def test_train_error_in_train_log(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), "task=predictor", "data=nsd", f"paths.nsd_root={tmp_path}/no_nsd",
           f"paths.data_dir={tmp_path}/data", "trainer.accelerator=cpu", "logger=csv", f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    log_text = (run_dir / "train.log").read_text()
    assert "Traceback (most recent call last)" in log_text
    assert f"FileNotFoundError: paths.nsd_root={tmp_path}/no_nsd does not exist" in log_text

"""Fault test: a run killed with SIGKILL mid-training and rerun with the same command resumes from
its last.ckpt and ends with the same metrics as an uninterrupted run (deterministic CPU settings;
tolerance 1e-4 on every metric)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import small_overrides

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4


def command(tmp, run_dir):
    return [sys.executable, str(REPO / "train.py"), "task=predictor", "region=V1", "task.max_epochs=3",
            "task.batch_size=16", "trainer.deterministic=true", f"hydra.run.dir={run_dir}",
            *small_overrides(tmp), "data.synthetic_nsd.n_stimuli=120", "data.synthetic_nsd.n_subject_images=100",
            "data.synthetic_nsd.n_shared=20"]


def env():
    e = dict(os.environ, WANDB_MODE="disabled", PYTHONHASHSEED="0", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    return e


def test_sigkill_then_rerun_matches_uninterrupted(tmp_path):
    ref_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(command(tmp_path, ref_dir), check=True, env=env(), capture_output=True, cwd=REPO)
    reference = json.loads((ref_dir / "metrics.json").read_text())

    proc = subprocess.Popen(command(tmp_path, killed_dir), env=env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed_dir / "checkpoints" / "last.ckpt"
    t0 = time.time()
    while not last.exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "metrics.json").exists()

    out = subprocess.run(command(tmp_path, killed_dir), check=True, env=env(), capture_output=True, text=True,
                         cwd=REPO)
    assert "resuming from" in out.stdout + out.stderr
    resumed = json.loads((killed_dir / "metrics.json").read_text())
    for k in ("test/r_median", "test/r_mean", "val/r_median", "test/loss"):
        assert resumed[k] == pytest.approx(reference[k], abs=TOL), k

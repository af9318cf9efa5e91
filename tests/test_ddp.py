"""DDP: a 2-process CPU (gloo) run of the guidance task is consistent with a 1-process run.

Without training steps (max_epochs=0) the seeded network is the same in both runs, so the test metrics
of the 2-process run (each rank sees half the images; Lightning/torchmetrics synchronise them) must
equal the 1-process numbers: this checks metric synchronisation and rank-zero-only writing. A trained
2-process run checks that DDP training steps run and rank zero writes the outputs.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import small_overrides

pytestmark = pytest.mark.slow  # spawns processes: outside the quick loop (pytest -m "not slow")

REPO = Path(__file__).resolve().parents[1]


def _train(tmp, name, *extra):
    out = tmp / name
    cmd = [sys.executable, str(REPO / "train.py"), "region=TO", "task.max_epochs=1", "task.batch_size=8",
           f"hydra.run.dir={out}", *small_overrides(tmp), *extra]
    res = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, WANDB_MODE="disabled"), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def predictor_ready(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    subprocess.run([sys.executable, str(REPO / "train.py"), "task=predictor", "region=TO", "task.max_epochs=1",
                    f"hydra.run.dir={tmp}/pred", *small_overrides(tmp)], cwd=REPO, check=True, capture_output=True,
                   env=dict(os.environ, WANDB_MODE="disabled"), timeout=900)
    return tmp


def test_ddp_two_cpu_processes_match_one_process(predictor_ready):
    tmp = predictor_ready
    one = _train(tmp, "one", "task.max_epochs=0", "trainer.devices=1")
    two = _train(tmp, "two", "task.max_epochs=0", "trainer.devices=2", "+trainer.strategy=ddp")
    for k in ("test/acc", "test/neural_r", "test/ce", "test/align"):
        assert two[k] == pytest.approx(one[k], abs=1e-5), (k, one[k], two[k])
    assert (tmp / "two" / "model.ckpt").exists()
    # DDP training steps run (gradients all-reduced over gloo) and rank zero writes the outputs
    trained = _train(tmp, "two_t", "trainer.devices=2", "+trainer.strategy=ddp", "task.batch_size=4")
    assert all(math.isfinite(trained[k]) for k in ("train/loss", "val/acc", "val/neural_r"))
    assert trained["val/acc"] != two["test/acc"] or trained["val/align"] != two["test/align"]  # the weights moved

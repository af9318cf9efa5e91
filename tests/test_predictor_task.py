"""The predictor task through the real configs: fast_dev_run, outputs, export, load_model, shuffle."""
from __future__ import annotations

import json

import pytest
import torch

import neuroguide
from neuroguide.train import run


def test_predictor_fast_dev_run_writes_outputs_and_exports(compose_train, tmp_path):
    cfg = compose_train("task=predictor", "region=V1", "+trainer.fast_dev_run=true")
    metrics = run(cfg)
    out = tmp_path / "run"
    written = json.loads((out / "metrics.json").read_text())
    assert {"test/r_median", "test/r_mean", "test/r_nc_median"} <= set(written)
    assert written == pytest.approx(metrics, nan_ok=True)
    assert "region:" in (out / "config.yaml").read_text()
    exported = tmp_path / "predictors" / "subj01" / "V1.ckpt"
    assert exported.exists()
    model = neuroguide.load_model(exported)
    info = model.neuroguide_info["model_config"]
    assert info["region"] == "V1" and info["subject"] == 1
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, info["n_outputs"])
    # the Lightning checkpoint and the exported file rebuild the same network
    same = neuroguide.load_model(out / "model.ckpt")
    torch.testing.assert_close(model(x), same(x))


def test_predictor_beats_shuffled_control(compose_train):
    """A few epochs on the planted synthetic data: real pairing >> shuffled pairing (median test r)."""
    common = ["task=predictor", "region=TO", "task.max_epochs=4", "task.batch_size=32", "callbacks=none"]
    r = run(compose_train(*common, out="real"))["test/r_median"]
    r_shuffle = run(compose_train(*common, "predictor.shuffle=true", out="shuffled"))["test/r_median"]
    print(f"TO predictor median test r: {r:.3f}, shuffled control: {r_shuffle:.3f}")
    assert r > 0.3 and r > r_shuffle + 0.25


def test_shuffle_control_exported_under_its_own_name(compose_train, tmp_path):
    run(compose_train("task=predictor", "region=V4", "predictor.shuffle=true", "+trainer.fast_dev_run=true"))
    assert (tmp_path / "predictors" / "subj01" / "V4_shuffle.ckpt").exists()
    assert not (tmp_path / "predictors" / "subj01" / "V4.ckpt").exists()


def test_bad_config_values(compose_train):
    with pytest.raises(ValueError, match="alpha must lie in"):
        run(compose_train("alpha=1.5"))
    with pytest.raises(ValueError, match="subject must be an integer 1..8"):
        run(compose_train("task=predictor", "subject=11"))

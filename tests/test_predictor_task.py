"""The predictor task through the real configs: fast_dev_run, outputs, export, load_model, shuffle."""
from __future__ import annotations

import json

import pytest
import torch

import neuroguide
from neuroguide.train import run


def test_predictor_fast_dev_run_writes_outputs_and_exports_nowhere_else(compose_train, tmp_path):
    """A smoke run (one batch) writes its run folder; it never exports into paths.predictors_dir (it once replaced
    the trained predictor there)."""
    cfg = compose_train("task=predictor", "region=V1", "+trainer.fast_dev_run=true")
    metrics = run(cfg)
    out = tmp_path / "run"
    written = json.loads((out / "metrics.json").read_text())
    assert {"test/r_median", "test/r_mean", "test/r_nc_median"} <= set(written)
    assert written == pytest.approx(metrics, nan_ok=True)
    assert "region:" in (out / "config.yaml").read_text()
    assert not (tmp_path / "predictors").exists()
    model = neuroguide.load_model(out / "model.ckpt")
    info, facts = model.neuroguide_info["model_config"], model.neuroguide_info["facts"]
    assert facts["region"] == "V1" and facts["subject"] == 1
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, info["n_outputs"])


@pytest.mark.slow  # trains for more than ~20 s: in the full suite, not the quick one
def test_predictor_beats_shuffled_control(compose_train):
    """A few epochs on the planted synthetic data: real pairing >> shuffled pairing (median test r)."""
    common = ["task=predictor", "region=TO", "task.max_epochs=4", "task.batch_size=32", "callbacks=none"]
    r = run(compose_train(*common, out="real"))["test/r_median"]
    r_shuffle = run(compose_train(*common, "predictor.shuffle=true", out="shuffled"))["test/r_median"]
    print(f"TO predictor median test r: {r:.3f}, shuffled control: {r_shuffle:.3f}")
    assert r > 0.3 and r > r_shuffle + 0.25


def test_shuffle_control_exported_under_its_own_name(compose_train, tmp_path):
    """task.max_epochs=0 (no smoke run, no training either): the run's model exported as V4_shuffle.ckpt."""
    run(compose_train("task=predictor", "region=V4", "predictor.shuffle=true", "task.max_epochs=0"))
    exported = tmp_path / "predictors" / "subj01" / "V4_shuffle.ckpt"
    assert exported.exists()
    assert not (tmp_path / "predictors" / "subj01" / "V4.ckpt").exists()
    # the run folder's file and the exported one rebuild the same network
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(neuroguide.load_model(exported)(x), neuroguide.load_model(tmp_path / "run" / "model.ckpt")(x))


def test_bad_config_values(compose_train):
    with pytest.raises(ValueError, match="alpha must lie in"):
        run(compose_train("alpha=1.5"))
    with pytest.raises(ValueError, match="subject must be an integer 1..8"):
        run(compose_train("task=predictor", "subject=11"))


@pytest.mark.slow  # trains for more than ~20 s: in the full suite, not the quick one
def test_pca_predictor_scored_against_measured_voxels_with_best_checkpoint(compose_train, tmp_path):
    """data.pca=true: test/r_median is the per-voxel r between the exported model's back-projected
    predictions and the measured test voxels (not a PCA reconstruction), and the exported model is the
    best-validation epoch's."""
    import csv

    import numpy as np
    from hydra.utils import instantiate

    from neuroguide.metrics import pearson_r

    cfg = compose_train("task=predictor", "region=V1", "data.pca=true", "task.max_epochs=3", "task.batch_size=32")
    metrics = run(cfg)
    dm = instantiate(cfg.task.datamodule, _recursive_=False)
    dm.setup("test")
    rd = dm.region_data
    assert rd.pca_components.shape[0] < rd.n_voxels
    model = neuroguide.load_model(tmp_path / "predictors" / "subj01" / "V1.ckpt")
    images = torch.stack([dm.test_set.stimuli[i] for i in range(len(dm.test_set))])
    with torch.no_grad():
        scores = model(images).numpy()
    voxels_hat = scores @ np.asarray(rd.pca_components) + np.asarray(rd.pca_mean)  # back-projection, by hand
    r = pearson_r(torch.tensor(voxels_hat), torch.tensor(np.asarray(rd.test)))
    assert metrics["test/r_median"] == pytest.approx(float(np.nanmedian(r.numpy())), abs=1e-4)
    # the component-space score is its own key, not the voxel score
    measured_scores = (np.asarray(rd.test) - np.asarray(rd.pca_mean)) @ np.asarray(rd.pca_components).T
    r_pc = pearson_r(torch.tensor(scores), torch.tensor(measured_scores))
    assert metrics["test/r_pc_median"] == pytest.approx(float(np.nanmedian(r_pc.numpy())), abs=1e-4)
    # r / sqrt(NC) over the voxels above data.nc_threshold only, and their count reported
    keep = np.asarray(rd.nc) >= cfg.data.nc_threshold
    assert metrics["test/n_voxels_nc"] == keep.sum()
    r_nc = r.numpy()[keep] / np.sqrt(np.asarray(rd.nc)[keep] / 100)
    assert metrics["test/r_nc_median"] == pytest.approx(float(np.nanmedian(r_nc)), abs=1e-4)
    # the selected epoch is the one with the best val/r_median of the epochs logged
    rows = [r for r in csv.DictReader(open(next((tmp_path / "run").rglob("metrics.csv")))) if r.get("val/r_median")]
    per_epoch = {int(r["epoch"]): float(r["val/r_median"]) for r in rows[:3]}
    assert len(per_epoch) == 3
    best_epoch = max(per_epoch, key=per_epoch.get)
    assert metrics["selected_epoch"] == best_epoch
    assert metrics["val/r_median"] == pytest.approx(per_epoch[best_epoch], abs=1e-5)


def test_reruns_find_finished_runs_and_refuse_to_mix_configs(compose_train, tmp_path, caplog):
    """keep_checkpoints=true: the rerun of a finished config returns its metrics; a run of another config in
    the same folder neither returns them nor resumes the other config's weights."""
    from neuroguide.train import science_diff

    common = ["task=predictor", "region=V1", "task.max_epochs=1", "keep_checkpoints=true"]
    first = run(compose_train(*common))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    with caplog.at_level("INFO", logger="neuroguide"):
        assert run(compose_train(*common, "data.num_workers=0")) == first  # machine settings are not science
    assert "nothing to do" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="neuroguide"), \
            pytest.raises(ValueError, match=r"last.ckpt was written by a run of another config \(task.lr, "
                                            r"task.optimizer.lr differ\).*resume=false"):
        run(compose_train(*common, "task.lr=0.01"))
    assert "holds a finished run of another config (task.lr, task.optimizer.lr differ)" in caplog.text
    assert science_diff({"a": {"b": 1}, "paths": {"x": 1}}, {"a": {"b": 2}, "paths": {"x": 2}, "c": 3}) == ["a.b", "c"]


def test_gathered_split_is_unpadded_in_order():
    """3 ranks, 7 samples: DistributedSampler(shuffle=False) pads to 9 with samples 0, 1."""
    from torch.utils.data.distributed import DistributedSampler

    from neuroguide.tasks.regression import unpad_gathered

    data = torch.arange(7.0)[:, None] * torch.tensor([[1.0, 10.0]])  # (7, 2)
    per_rank = [data[list(DistributedSampler(range(7), num_replicas=3, rank=r, shuffle=False))] for r in range(3)]
    gathered = torch.stack(per_rank)  # what all_gather returns: (W, n_local, 2)
    assert gathered.shape == (3, 3, 2)
    torch.testing.assert_close(unpad_gathered(gathered, 7), data)
    assert not torch.equal(gathered.flatten(0, 1)[:7], data)  # the plain flatten is neither in order nor unique

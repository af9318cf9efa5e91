"""The IT encoding task: Lightning runs on the synthetic IT file, frozen/end-to-end backbones, export, errors."""
from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

import neuroguide
from neuroguide.data import prepare_synthetic
from neuroguide.models.robust_weights import read_robust_state_dict
from neuroguide.tasks import get_task
from neuroguide.tasks.it_encoding import ITEncodingTask
from neuroguide.train import run

IT = ["task=it_encoding", "backbone=resnet18", "backbone.layer=layer2.1", "data.synthetic_it.n_images=48",
      "data.synthetic_it.n_sites=4", "data.synthetic_it.n_repeats=3", "task.batch_size=8", "callbacks=none"]


def _teacher(tmp_path):
    return tmp_path / "data" / "synthetic" / "it" / "teacher_resnet18.pt"


def _setup(cfg):
    ITEncodingTask.check_config(cfg)
    prepare_synthetic(cfg.data, cfg.task.needs)
    dm = instantiate(cfg.task.datamodule, _recursive_=False)
    dm.setup("fit")
    return cfg, dm, ITEncodingTask.from_config(cfg, dm)


def test_fast_dev_run_keeps_the_frozen_backbone_frozen(compose_train):
    cfg, dm, task = _setup(compose_train(*IT))
    assert get_task("it_encoding") is ITEncodingTask
    before = {k: v.clone() for k, v in task.model.backbone.state_dict().items()}
    readout_before = task.model.readout.features.detach().clone()
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=dm)
    task.train()  # what Lightning does at the start of every epoch
    bb = task.model.backbone
    assert not bb.training and not any(m.training for m in bb.modules())
    assert not any(p.requires_grad for p in bb.parameters())
    after = bb.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics untouched
    assert not torch.equal(readout_before, task.model.readout.features)  # the readout learned
    trainer.test(task, datamodule=dm, verbose=False)
    m = trainer.callback_metrics
    assert {"test/r_median", "test/r_mean", "test/ev_mean", "test/r_corrected_median"} <= set(m)
    assert -1 <= float(m["test/r_median"]) <= 1
    assert task.scores_by_split["test"]["r"].shape == (4,)


def test_train_run_with_the_teacher_trunk_exports_a_loadable_model(compose_train, tmp_path):
    cfg = compose_train(*IT, f"backbone.weights={_teacher(tmp_path)}", "+trainer.fast_dev_run=true")
    metrics = run(cfg)
    out = tmp_path / "run"
    written = json.loads((out / "metrics.json").read_text())
    assert {"val/r_median", "test/r_median", "test/r_mean", "test/ev_mean", "test/r_corrected_median"} <= set(written)
    model = neuroguide.load_model(out / "model.ckpt")
    info, facts = model.neuroguide_info["model_config"], model.neuroguide_info["facts"]
    assert info["n_sites"] == 4 and info["layer"] == "layer2.1" and facts["weights"].endswith("teacher_resnet18.pt")
    assert len(facts["site_ids"]) == 4
    teacher, _ = read_robust_state_dict(_teacher(tmp_path))
    assert torch.equal(model.backbone.root.layer2[1].conv2.weight, teacher["layer2.1.conv2.weight"])
    x = torch.rand(3, 3, 32, 32)
    y = model(x)
    assert y.shape == (3, 4) and not model.training
    assert metrics["test/r_median"] == pytest.approx(written["test/r_median"])
    # input gradients flow through the frozen backbone (attacks on the IT model need them)
    x.requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_at_eps_looks_up_paths_robust_weights(compose_train, tmp_path):
    cfg = compose_train(*IT, "backbone.at_eps=2", f"+paths.robust_weights={{2: {_teacher(tmp_path)}}}")
    prepare_synthetic(cfg.data, cfg.task.needs)  # writes the synthetic file and the teacher
    cfg, dm, task = _setup(cfg)
    teacher, _ = read_robust_state_dict(_teacher(tmp_path))
    assert torch.equal(task.model.backbone.root.conv1.weight, teacher["conv1.weight"])
    assert task.hparams["facts"]["at_eps"] == 2.0
    with pytest.raises(FileNotFoundError, match=r"backbone.at_eps=4 needs a robust ImageNet checkpoint.*"
                                                r"\+paths.robust_weights.4=/path"):
        _setup(compose_train(*IT, "backbone.at_eps=4"))


def test_end_to_end_training_updates_the_backbone(compose_train):
    cfg, dm, task = _setup(compose_train(*IT, "backbone.freeze=false", "task.backbone_lr=0.01"))
    w = task.model.backbone.root.conv1.weight.detach().clone()
    task.train()
    assert task.model.backbone.training
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=dm)
    assert not torch.equal(w, task.model.backbone.root.conv1.weight)


def test_init_from_checks_the_site_count(compose_train, tmp_path):
    cfg, dm, task = _setup(compose_train(*IT))
    ckpt = task.export(tmp_path / "day0.ckpt")
    # continuing on the same sites starts from the checkpoint's weights
    _, _, again = _setup(compose_train(*IT, f"task.init_from={ckpt}"))
    torch.testing.assert_close(again.model.readout.features, task.model.readout.features)
    # data with other sites: a clear error
    with pytest.raises(ValueError, match=r"has a readout for 4 IT sites but the data has 6 sites.*task.init_from=null"):
        _setup(compose_train(*IT, "data.synthetic_it.n_sites=6", f"task.init_from={ckpt}", out="other"))


def test_bad_layer_and_missing_data(compose_train):
    with pytest.raises(KeyError, match=r"backbone.layer='layer5.0' is not a layer of resnet18.*Valid layer names:.*"
                                       r"layer4.1"):
        _setup(compose_train(*IT[:2], "backbone.layer=layer5.0", *IT[3:]))
    with pytest.raises(FileNotFoundError, match="set paths.it_file"):
        _setup(compose_train(*[o for o in IT if not o.startswith("data.")], "data=nsd", "data.image_size=32"))

"""Model files: the builder registry, old files, damaged files, and the [0, 1] input contract."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

import neuroguide
from neuroguide.models.checkpoints import read_checkpoint, safe_torch_load, save_model_file
from neuroguide.models.registry import build_model, model_kinds, split_model_config


def test_every_kind_rebuilds_from_its_model_config(tmp_path):
    configs = {"predictor": {"arch": "resnet18", "n_outputs": 5},
               "guidance": {"num_classes": 3, "n_neural": 5, "branch": "layer3", "head_pool": 2,
                            "predictor": {"arch": "resnet18", "n_outputs": 5}, "predictor_image_size": 16},
               "it_encoding": {"backbone": "resnet18", "layer": "layer2.1", "n_sites": 4, "image_size": 16}}
    assert set(configs) <= set(model_kinds())
    x = torch.rand(2, 3, 16, 16)
    for kind, mc in configs.items():
        torch.manual_seed(0)
        model = build_model(kind, **mc).eval()
        path = save_model_file(tmp_path / f"{kind}.ckpt", kind, mc, model.state_dict(), facts={"region": "TO"})
        loaded = neuroguide.load_model(path)
        torch.testing.assert_close(loaded(x), model(x))
        assert loaded.neuroguide_info["model_config"] == mc and loaded.neuroguide_info["facts"] == {"region": "TO"}


def test_unknown_kind_and_run_facts_in_model_config_are_named():
    with pytest.raises(KeyError, match=r"unknown model kind 'transformer'; known kinds: \[.*'predictor'"):
        build_model("transformer")
    with pytest.raises(TypeError, match=r"got unknown model_config keys \['region'\].*belong in 'facts'"):
        build_model("predictor", arch="resnet18", n_outputs=2, region="TO")


def test_old_files_mixing_facts_into_model_config_still_load(tmp_path):
    """Files written before the split kept region, subject, alpha, at_eps, image_size in model_config."""
    old_pred = {"arch": "resnet18", "n_outputs": 4, "region": "V1", "subject": 2, "n_voxels": 4, "pca": False,
                "shuffle": False, "image_size": 16}
    assert split_model_config("predictor", old_pred) == (
        {"arch": "resnet18", "n_outputs": 4},
        {"region": "V1", "subject": 2, "n_voxels": 4, "pca": False, "shuffle": False, "image_size": 16})
    old = {"num_classes": 3, "n_neural": 4, "branch": "layer4", "arch": "resnet18", "head_pool": 1,
           "predictor": old_pred, "region": "V1", "alpha": 0.5, "at_eps": 1.0, "image_size": 32}
    config, facts = split_model_config("guidance", old)
    assert config["predictor"] == {"arch": "resnet18", "n_outputs": 4}
    assert config["predictor_image_size"] == 16  # the predictor's image size was where inputs were resized to
    assert facts["alpha"] == 0.5 and facts["at_eps"] == 1.0 and facts["predictor"]["region"] == "V1"
    model = build_model("guidance", **config)
    torch.save({"format": "neuroguide-model-v1", "state_dict": model.state_dict(),
                "hyper_parameters": {"task_name": "guidance", "model_config": old, "run_config": {}}},
               tmp_path / "v1.ckpt")
    loaded = neuroguide.load_model(tmp_path / "v1.ckpt")
    assert loaded.predictor_image_size == 16 and loaded.neuroguide_info["facts"]["region"] == "V1"


def test_a_checkpoint_of_another_kind_is_refused(tmp_path):
    mc = {"arch": "resnet18", "n_outputs": 2}
    path = save_model_file(tmp_path / "p.ckpt", "predictor", mc, build_model("predictor", **mc).state_dict())
    with pytest.raises(ValueError, match=r"p.ckpt holds a 'predictor' model, not a 'it_encoding' model"):
        read_checkpoint(path, kind="it_encoding")


@pytest.mark.parametrize("content,reason", [
    (b"", r"the file is empty \(0 bytes\)"),
    (os.urandom(4096), r"not a readable checkpoint \(4096 bytes"),
    (b"hello, I am a text file that someone renamed to .ckpt", r"not a readable checkpoint"),
    ("truncated", r"not a readable checkpoint \(\d+ bytes, (a zip archive|not a torch zip archive)"),
])
def test_garbage_files_are_called_unreadable_not_unsafe(tmp_path, content, reason):
    path = tmp_path / "model.ckpt"
    if content == "truncated":
        mc = {"arch": "resnet18", "n_outputs": 2}
        save_model_file(path, "predictor", mc, build_model("predictor", **mc).state_dict())
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    for load in (safe_torch_load, read_checkpoint, neuroguide.load_model):
        with pytest.raises(ValueError, match=reason) as e:
            load(path)
        msg = str(e.value)
        assert str(path) in msg and "copy it again" in msg
        assert "weights_only" not in msg and "Python objects" not in msg  # never suggest disabling the safety


def test_inputs_outside_0_1_are_warned_about_once(tmp_path, caplog):
    mc = {"arch": "resnet18", "n_outputs": 2}
    path = save_model_file(tmp_path / "p.ckpt", "predictor", mc, build_model("predictor", **mc).state_dict())
    model = neuroguide.load_model(path)
    with caplog.at_level(logging.WARNING, logger="neuroguide"):
        model(torch.rand(2, 3, 16, 16))
        assert "takes images in [0, 1]" not in caplog.text
        model(torch.rand(2, 3, 16, 16) * 255)
        model(torch.rand(2, 3, 16, 16) * 255)
    warnings = [r for r in caplog.records if "takes images in [0, 1]" in r.message]
    assert len(warnings) == 1 and "divide [0, 255] pixels by 255" in warnings[0].message
    assert str(path) in warnings[0].message


def test_truncated_nifti_names_the_file(tmp_path):
    import nibabel as nib

    from neuroguide.data.nsd import read_session, read_volume

    path = tmp_path / "betas_session01.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(2 * 2 * 1 * 5, dtype=np.int16).reshape(2, 2, 1, 5), np.eye(4)), str(path))
    assert read_session(path, np.arange(4), (2, 2, 1)).shape == (5, 4)  # intact
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    for read in (lambda: read_session(path, np.arange(4), (2, 2, 1)), lambda: read_volume(path)):
        with pytest.raises(ValueError, match=r"betas_session01.nii.gz could not be read \(.*truncated or damaged.*"
                                             r"Copy it again"):
            read()

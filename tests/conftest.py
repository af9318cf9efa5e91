"""Shared fixtures: W&B off, small synthetic NSD and ImageNet trees written by the real writers."""
from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402

SMALL_NSD = dict(n_stimuli=240, n_subject_images=200, n_shared=40, n_repeats=3, trials_per_session=150,
                 image_size=32, seed=0)


@pytest.fixture(scope="session")
def synthetic_nsd(tmp_path_factory):
    from neuroguide.data.synthetic.nsd import write_synthetic_nsd

    return write_synthetic_nsd(tmp_path_factory.mktemp("nsd") / "nsd", **SMALL_NSD)


def small_overrides(tmp) -> list[str]:
    """Overrides that make any train/evaluate config small and local to a temp folder."""
    o = [f"paths.data_dir={tmp}/data", f"paths.log_dir={tmp}/outputs", f"paths.predictors_dir={tmp}/predictors",
         "data.image_size=32", "trainer.accelerator=cpu", "logger=csv", "data.synthetic_imagenet.n_train=16",
         "data.synthetic_imagenet.n_val=6", "data.synthetic_imagenet.image_size=32", "data.synthetic_imagenet.n_classes=4"]
    o += [f"data.synthetic_nsd.{k}={v}" for k, v in SMALL_NSD.items()]
    return o


@pytest.fixture
def compose_train(tmp_path):
    """compose_train(*overrides, out="run") -> the composed train config, small, writing under tmp_path."""
    from neuroguide.config import compose_config

    def _compose(*overrides, out="run", config_name="train"):
        small = small_overrides(tmp_path)
        if any(o.startswith("data=") and o != "data=synthetic" for o in overrides):  # real-data layouts
            small = [o for o in small if not o.startswith("data.synthetic_")]
        return compose_config(config_name, small + list(overrides), output_dir=tmp_path / out)

    return _compose


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (restored after): on a shared 2-core CPU two contending
    threads are several times slower for the small tensors of the attack tests."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- evaluate.py on saved models
@pytest.fixture(scope="session")
def guided_ckpts(tmp_path_factory):
    """Two untrained guided classifiers with a neural head of 8 outputs (16 px), and a third with another input
    size, saved with a run config pointing at a small synthetic ImageNet tree; no training needed."""
    import torch

    from neuroguide.data.synthetic.imagenet import write_synthetic_imagenet
    from neuroguide.models.checkpoints import save_model_file
    from neuroguide.models.registry import build_model

    tmp = tmp_path_factory.mktemp("guided_ckpts")
    paths = []
    for name, seed, size in (("a", 0, 16), ("b", 1, 16), ("c", 2, 24)):
        root = write_synthetic_imagenet(tmp / f"imagenet{size}", n_classes=2, n_train=4, n_val=4, image_size=size)
        mc = {"num_classes": 2, "n_neural": 8, "branch": "layer4", "head_pool": 1, "arch": "resnet18",
              "predictor": {"arch": "resnet18", "n_outputs": 8}, "predictor_image_size": size}
        torch.manual_seed(seed)
        model = build_model("guidance", **mc)
        rc = {"data": {"classification": "imagenet_subset", "classification_root": str(root),
                       "classification_class_list": str(root / "classes.txt"), "image_size": size}}
        facts = {"region": "TO", "alpha": 0.5, "at_eps": 0.0, "image_size": size}
        paths.append(save_model_file(tmp / name / "model.ckpt", "guidance", mc, model.state_dict(), rc, facts=facts))
    return tmp, paths


def evaluate_in(tmp, out, *overrides):
    """``evaluate.py`` with these overrides, its output folder ``tmp/out``: (metrics, output folder)."""
    from neuroguide.config import compose_config
    from neuroguide.evaluation.runner import run

    cfg = compose_config("evaluate", [f"paths.log_dir={tmp}/outputs", "device=cpu", *overrides], output_dir=tmp / out)
    return run(cfg), tmp / out

"""Run folder names: scientific factors, readable; every other override in a short hash; stable per command."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from neuroguide.config import CONF_DIR
from neuroguide.run_names import run_name


@pytest.fixture(scope="module")
def folder():
    """folder(config_name, *overrides) -> the last part of hydra.run.dir as train.py / evaluate.py resolve it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        def _folder(config_name, *overrides):
            cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
            run_dir = OmegaConf.select(cfg, "hydra.run.dir")
            assert OmegaConf.select(cfg, "hydra.sweep.subdir") == run_dir.rsplit("/", 1)[-1]  # one scheme for both
            return run_dir.rsplit("/", 1)[-1]
        yield _folder


def test_factors_are_named_from_the_composed_config(folder):
    assert folder("train", "region=TO", "alpha=0.5") == "region-TO_alpha-0.5_eps-0"
    assert folder("train") == "region-TO_alpha-0.5_eps-0"  # the defaults, named: the same run
    assert folder("train", "alpha=.5", "region=TO", "at.norm=l2") == "region-TO_alpha-0.5_eps-0"
    assert folder("train", "at.norm=linf", "at.eps=0.0078431373") == "region-TO_alpha-0.5_eps-0.0078431373_norm-linf"
    assert folder("train", "task=predictor", "region=V1", "seed=1", "predictor.shuffle=true") == \
        "task-predictor_region-V1_shuffle-true_seed-1"
    assert folder("train", "task=it_encoding", "backbone.at_eps=2") == \
        "task-it_encoding_backbone-resnet50_bb.eps-2_layer-layer4.0"


def test_same_command_same_folder_other_overrides_other_folders(folder):
    a = folder("train", "region=TO", "task.optimizer.lr=0.01", "data.image_size=32")
    assert a == folder("train", "data.image_size=32", "region=TO", "task.optimizer.lr=0.01")  # order does not matter
    b = folder("train", "region=TO", "task.optimizer.lr=0.02", "data.image_size=32")
    assert a != b and a.startswith("region-TO_alpha-0.5_eps-0_cfg-") and len(a.rsplit("-", 1)[1]) == 8
    # overrides that never change the science name no new folder
    assert folder("train", "region=TO", "logger=csv", "resume=false",
                  "paths.log_dir=/somewhere/else") == "region-TO_alpha-0.5_eps-0"


def test_where_how_and_how_long_a_run_runs_are_not_its_identity(folder):
    """The keys the docs say may change on resume name no new folder (so the rerun finds last.ckpt): task.max_epochs
    (5 and 6 once named cfg-32fb9d07 and cfg-2059ad37), the machine's trainer settings, worker counts."""
    base = folder("train", "region=TO", "task.optimizer.lr=0.01")
    assert base.startswith("region-TO_alpha-0.5_eps-0_cfg-")
    for more in (["task.max_epochs=5"], ["task.max_epochs=6"], ["trainer.max_epochs=7"], ["trainer=gpu"],
                 ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=16-mixed"],
                 ["data.num_workers=3", "data.read_workers=1"], ["keep_checkpoints=true", "paths.cache_dir=/c"]):
        assert folder("train", "region=TO", "task.optimizer.lr=0.01", *more) == base, more
    # trainer keys that change what is trained or selected stay in the hash
    assert folder("train", "region=TO", "task.optimizer.lr=0.01", "+trainer.gradient_clip_val=1.0") != base
    assert folder("train", "region=TO", "task.optimizer.lr=0.01", "test_ckpt=last") != base


def test_every_setting_of_the_trainer_options_may_change_on_resume(folder):
    """trainer=gpu / cpu / ddp name no new folder, so every key those files set must be one that may change on
    resume (else the rerun on another machine would find its folder and refuse its last.ckpt)."""
    import yaml

    from neuroguide.run_names import NOT_IDENTITY, listed

    for f in sorted((CONF_DIR / "trainer").glob("*.yaml")):
        keys = set(yaml.safe_load(f.read_text())) - {"defaults", "_target_"}
        assert keys and all(listed(f"trainer.{k}", NOT_IDENTITY) for k in keys), (f.name, keys)
    assert folder("train", "region=TO", "trainer=ddp") == folder("train", "region=TO") == "region-TO_alpha-0.5_eps-0"


def test_a_smoke_run_has_its_own_folder_named_by_its_smoke_settings(folder):
    """fast_dev_run once named no new folder: its 1-batch run then passed for the command's finished real run."""
    real = folder("train", "region=random")
    assert folder("train", "region=random", "+trainer.fast_dev_run=true") == real + "_smoke-fast_dev_run"
    assert folder("train", "region=random", "+trainer.fast_dev_run=3") == real + "_smoke-fast_dev_run-3"
    assert folder("train", "task=predictor", "+trainer.limit_train_batches=2", "+trainer.max_steps=5") == \
        "task-predictor_region-TO_smoke-limit_train_batches-2+max_steps-5"
    # the values that cut nothing short are no smoke run: the real run's folder (1.0 = all batches, 1 = one batch)
    assert folder("train", "region=random", "+trainer.limit_val_batches=1.0", "+trainer.fast_dev_run=false") == real
    assert folder("train", "region=random", "+trainer.limit_val_batches=1").endswith("_smoke-limit_val_batches-1")


def test_paths_stay_out_of_names(folder):
    name = folder("train", "paths.data_dir=/very/long/data/path", "region=V4")
    assert "very" not in name and "path" not in name and name.startswith("region-V4_alpha-0.5_eps-0_cfg-")
    assert name != folder("train", "paths.data_dir=/another/data/path", "region=V4")
    ckpt = "/scratch/me/outputs/guidance/region-TO_alpha-0.5_eps-0/model.ckpt"
    name = folder("evaluate", f"ckpt={ckpt}")
    assert name.startswith("ckpt-region-TO_alpha-0.5_eps-0_eval-sensitivity+robustness_cfg-")
    assert "scratch" not in name and "model.ckpt" not in name
    # the same run folder name under another parent: another evaluation folder
    assert name != folder("evaluate", f"ckpt={ckpt.replace('/me/', '/you/')}")


def test_list_valued_eval_overrides_give_short_readable_names(folder):
    name = folder("evaluate", "ckpt=/o/guidance/region-TO_alpha-0.5_eps-0/checkpoints/last.ckpt",
                  "eval=[rsa,cka,smoothness]", "eval.rsa.regions=[V2,V4,VO,LO,PHC,TO]")
    assert name.startswith("ckpt-region-TO_alpha-0.5_eps-0_eval-rsa+cka+smoothness_cfg-") and len(name) < 80
    assert folder("evaluate", "eval=[transfer]", "models=[/a/x.ckpt,/b/y.ckpt,/c/z.ckpt]").startswith(
        "models-3_eval-transfer_cfg-")


def test_run_name_without_a_config_uses_the_override_values():
    assert run_name(["region=TO", "alpha=0.5", "hydra.run.dir=/x"]) == "region-TO_alpha-0.5"
    assert run_name([]) == "default"


def test_every_job_of_the_encoding_sweep_has_its_own_folder(folder):
    """The zoo's robust ResNet-50s share backbone.name resnet50: the option chosen names them apart. Each job fits
    the experiment's regions together (task.regions), and its folder is named by them, not by the default region."""
    base = compose("train", overrides=["experiment=mcneal2024_encoding"], return_hydra_config=True)  # inside folder's
    params = base.hydra.sweeper.params
    assert list(base.task.regions) == ["FFA", "EBA", "PPA"]
    names = {folder("train", "experiment=mcneal2024_encoding", f"backbone={b}", f"subject={s}")
             for b in str(params.backbone).split(",") for s in str(params.subject).split(",")}
    assert len(names) == len(str(params.backbone).split(",")) * len(str(params.subject).split(","))
    assert any("backbone-resnet50_l2_eps1_" in n or n.endswith("backbone-resnet50_l2_eps1") for n in names)
    assert all("regions-FFA+EBA+PPA" in n and "region-" not in n for n in names)


def test_regions_fitted_together_name_the_run_in_place_of_region(folder):
    assert folder("train", "task=encoding", "task.regions=[FFA,EBA]").startswith(
        "task-encoding_regions-FFA+EBA_backbone-resnet50_layer-")
    assert folder("train", "task=encoding", "region=FFA").startswith("task-encoding_region-FFA_backbone-resnet50")

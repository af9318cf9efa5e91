"""Guidance task: frozen predictor, loss formula, adversarial batches, baselines, bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning as L
import neuroguide
from neuroguide.models.checkpoints import save_model_file
from neuroguide.models.dual_head import DualHeadResNet, head_pool_size
from neuroguide.tasks.guidance import GuidanceTask
from neuroguide.tasks.predictor import PredictorTask
from neuroguide.train import run

N_CLASSES, N_VOX, SIZE = 3, 7, 32


def tiny_task(alpha=0.5, at=None, branch="layer4", head_pool=1, scheduler=None):
    pred_cfg = {"arch": "resnet18", "n_outputs": N_VOX}
    predictor = PredictorTask.build_model(**pred_cfg)
    # give the predictor non-trivial BN statistics so that a train-mode forward would change them
    predictor.train()
    with torch.no_grad():
        predictor(torch.rand(8, 3, SIZE, SIZE))
    mc = {"num_classes": N_CLASSES, "n_neural": N_VOX, "branch": branch, "arch": "resnet18", "predictor": pred_cfg,
          "head_pool": head_pool, "predictor_image_size": SIZE}
    return GuidanceTask(mc, {}, alpha=alpha, at=at or {"eps": 0.0}, scheduler=scheduler,
                        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), predictor=predictor)


def loader(n=16):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, SIZE, SIZE, generator=g) * 0.8 + 0.1
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def fit(task, steps=3):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, train_dataloaders=loader(), val_dataloaders=loader(8))
    return trainer


def test_predictor_frozen_through_training():
    task = tiny_task()
    pred = task.model.predictor
    before = {k: v.clone() for k, v in pred.state_dict().items()}
    trunk_before = task.model.layer1[0].conv1.weight.clone()
    fit(task)
    after = pred.state_dict()
    for k, v in before.items():  # weights and batch-norm running statistics unchanged
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=f"predictor {k} changed")
    assert not pred.training and all(not m.training for m in pred.modules())
    assert all(not p.requires_grad for p in pred.parameters())
    assert not torch.equal(trunk_before, task.model.layer1[0].conv1.weight)  # the trunk did train
    task.model.train()
    assert not pred.training  # .train() on the parent leaves the predictor in eval


def test_loss_is_weighted_sum_of_ce_and_alignment():
    task = tiny_task(alpha=0.3)
    task.model.eval()
    x, y = next(iter(loader()))
    out = task.losses(x, y)
    logits, neural = task.model.forward_heads(x)
    target = task.model.predictor(x)
    want = 0.7 * F.cross_entropy(logits, y) + 0.3 * F.mse_loss(neural, target)
    torch.testing.assert_close(out["loss"], want)
    out["loss"].backward()
    assert all(p.grad is None for p in task.model.predictor.parameters())


@pytest.mark.parametrize("branch", ["layer1", "layer2", "layer3", "layer4"])
def test_neural_head_branches(branch):
    task = tiny_task(branch=branch)
    logits, neural = task.model.forward_heads(torch.rand(2, 3, SIZE, SIZE))
    assert logits.shape == (2, N_CLASSES) and neural.shape == (2, N_VOX)
    # the neural head reads the chosen stage: changing a later stage does not change it
    if branch != "layer4":
        with torch.no_grad():
            task.model.layer4[0].conv1.weight.mul_(3)
        _, neural2 = task.model.forward_heads(torch.rand(2, 3, SIZE, SIZE).fill_(0.5))
        _, neural3 = task.model.forward_heads(torch.rand(2, 3, SIZE, SIZE).fill_(0.5))
        torch.testing.assert_close(neural2, neural3)


@pytest.mark.parametrize("norm,eps", [("l2", 0.5), ("linf", 4 / 255)])
def test_adversarial_training_uses_perturbed_batches(norm, eps, monkeypatch):
    pytest.importorskip("neuroguide.attacks")
    task = tiny_task(at={"eps": eps, "norm": norm, "steps": 2, "step_size": None, "random_start": True})
    seen = []
    orig = task.losses

    def spy(x, y, **kw):
        seen.append(x.detach().clone())
        return orig(x, y, **kw)

    monkeypatch.setattr(task, "losses", spy)
    fit(task, steps=2)
    clean = [x for x, _ in loader()]  # unshuffled: the two training batches, in order
    for x, x_adv in zip(clean, seen[:2]):  # the training losses come before validation
        d = (x_adv - x).flatten(1)
        norms = d.norm(dim=1) if norm == "l2" else d.abs().amax(dim=1)
        assert (norms <= eps * (1 + 1e-4) + 1e-6).all()
        assert (norms > 0.1 * eps).all()  # actually perturbed
        assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # training_step called without a Trainer
@pytest.mark.parametrize("target", ["clean", "adv"])
def test_at_alignment_target_is_the_predictor_on_the_chosen_image(target, monkeypatch):
    """Heads and CE on x_adv; the MSE target is P(x) for at.target=clean, P(x_adv) for adv."""
    pytest.importorskip("neuroguide.attacks")
    task = tiny_task(alpha=0.4, at={"eps": 1.0, "norm": "l2", "steps": 2, "step_size": None, "random_start": True,
                                    "target": target})
    seen = {}
    orig = task.losses

    def spy(x, y, **kw):
        seen["x_adv"] = x.detach().clone()
        seen["out"] = out = orig(x, y, **kw)
        return out

    monkeypatch.setattr(task, "losses", spy)
    x, y = next(iter(loader()))
    task.model.train()
    loss = task.training_step((x, y), 0)  # no optimizer step: the weights stay as they were
    x_adv, out = seen["x_adv"], seen["out"]
    assert (x_adv - x).flatten(1).norm(dim=1).min() > 0.1  # the heads saw the perturbed batch
    logits, neural = task.model.forward_heads(x_adv)  # train mode, same batch: same batch-norm statistics
    with torch.no_grad():
        p_clean, p_adv = task.model.predictor(x), task.model.predictor(x_adv)
    want, other = (p_clean, p_adv) if target == "clean" else (p_adv, p_clean)
    align = F.mse_loss(neural, want)
    torch.testing.assert_close(out["align"], align)
    a, b = float(align.detach()), float(F.mse_loss(neural, other).detach())
    assert abs(a - b) > 1e-4 * a  # the two targets differ, so the check above tells them apart
    torch.testing.assert_close(loss, 0.6 * F.cross_entropy(logits, y) + 0.4 * align)


def test_at_target_and_head_pool_are_checked_before_any_training(compose_train, tmp_path):
    with pytest.raises(ValueError, match=r"at.target must be one of \('clean', 'adv'\).*got 'both'"):
        tiny_task(at={"eps": 1.0, "norm": "l2", "steps": 1, "target": "both"})
    with pytest.raises(ValueError, match=r"at.target must be one of .*got 'both'"):
        run(compose_train("region=TO", "at.eps=1.0", "at.target=both"))
    with pytest.raises(ValueError, match=r"task.head_pool must be 'auto' or a positive int.*got 0"):
        run(compose_train("region=TO", "task.head_pool=0"))
    assert not (tmp_path / "predictors").exists()  # no predictor was trained on the way


@pytest.mark.parametrize("branch,channels,p", [("layer1", 64, 4), ("layer2", 128, 2), ("layer3", 256, 2),
                                               ("layer4", 512, 1)])
def test_neural_head_pools_to_p_by_p_before_the_linear_map(branch, channels, p):
    """head_pool=auto (NeuralGuidance): 4 x 4 after layer1, 2 x 2 after layer2/3, global after layer4."""
    torch.manual_seed(0)
    model = GuidanceTask.build_model(N_CLASSES, N_VOX, branch, predictor={"arch": "resnet18", "n_outputs": N_VOX},
                                     head_pool=head_pool_size(branch, "auto"))
    head = model.neural_head
    assert model.head_pool == p and head.linear.in_features == channels * p * p
    fmap = torch.randn(2, channels, 8, 8)
    blocks = fmap.reshape(2, channels, p, 8 // p, p, 8 // p).mean(dim=(3, 5))  # mean over each (8/p)^2 block
    want = blocks.flatten(1) @ head.linear.weight.T + head.linear.bias
    torch.testing.assert_close(head(fmap), want)
    # in the model: the head reads the branch's feature map (captured by a hook)
    captured = {}
    getattr(model, branch).register_forward_hook(lambda m, i, o: captured.update(fmap=o))
    model.eval()
    _, neural = model.forward_heads(torch.rand(2, 3, 64, 64))
    f = captured["fmap"]
    want = F.adaptive_avg_pool2d(f, p).flatten(1) @ head.linear.weight.T + head.linear.bias
    torch.testing.assert_close(neural, want)


def test_head_pool_config_values():
    assert [head_pool_size(b, 3) for b in ("layer1", "layer4")] == [3, 3]
    assert head_pool_size("layer2", "1") == 1
    for bad in (0, -2, "big", 1.5, True):
        with pytest.raises(ValueError, match=r"task.head_pool must be 'auto' or a positive int"):
            head_pool_size("layer1", bad)


def test_head_pool_is_stored_and_old_checkpoints_keep_the_global_pool(compose_train, tmp_path):
    run(compose_train("region=random", "region.like=V1", "task.branch=layer2", "+trainer.fast_dev_run=true", out="l2"))
    model = neuroguide.load_model(tmp_path / "l2" / "model.ckpt")
    assert model.neuroguide_info["model_config"]["head_pool"] == 2
    assert model.neural_head.linear.in_features == 128 * 2 * 2
    # a model file written before task.head_pool existed: no key, a global-pool head (128 inputs)
    mc = {"num_classes": N_CLASSES, "n_neural": N_VOX, "branch": "layer2", "arch": "resnet18",
          "predictor": {"arch": "resnet18", "n_outputs": N_VOX, "image_size": SIZE}}
    old = DualHeadResNet(N_CLASSES, N_VOX, "layer2", predictor=PredictorTask.build_model(arch="resnet18", n_outputs=N_VOX))
    assert old.neural_head.linear.in_features == 128
    save_model_file(tmp_path / "old.ckpt", "guidance", mc, old.state_dict())
    loaded = neuroguide.load_model(tmp_path / "old.ckpt")
    assert loaded.neural_head.linear.in_features == 128
    x = torch.rand(2, 3, SIZE, SIZE)
    torch.testing.assert_close(loaded.forward_heads(x)[1], old.eval().forward_heads(x)[1])


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_lr_warms_up_linearly_then_follows_the_cosine():
    """2 batches per epoch, 3 epochs, warm-up 1 epoch: lr = base * (k + 1) / 2 for k < 2, then
    base * 0.5 * (1 + cos(pi * (k - 2) / 4))."""
    task = tiny_task(scheduler={"name": "cosine", "warmup_epochs": 1})
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Record()])
    trainer.fit(task, train_dataloaders=loader())
    want = [0.05 * 0.5, 0.05] + [0.05 * 0.5 * (1 + math.cos(math.pi * j / 4)) for j in range(4)]
    assert lrs == pytest.approx(want)


def _write_predictor(path, n_outputs, region="TO", subject=1, image_size=32):
    mc = {"arch": "resnet18", "n_outputs": n_outputs, "region": region, "subject": subject, "image_size": image_size}
    save_model_file(path, "predictor", mc, PredictorTask.build_model(arch="resnet18", n_outputs=n_outputs).state_dict())


def test_predictor_output_size_mismatch_is_an_error(compose_train, tmp_path):
    _write_predictor(tmp_path / "predictors" / "subj01" / "TO.ckpt", n_outputs=3)
    with pytest.raises(ValueError, match=r"TO.ckpt has 3 outputs but region TO.*retrain it with: python train.py task=predictor"):
        run(compose_train("region=TO", "+trainer.fast_dev_run=true"))


def test_predictor_of_another_region_is_an_error(compose_train, tmp_path):
    _write_predictor(tmp_path / "predictors" / "subj01" / "TO.ckpt", n_outputs=3, region="V1")
    with pytest.raises(ValueError, match="predictor of region V1.*region=TO"):
        run(compose_train("region=TO", "+trainer.fast_dev_run=true"))


def test_real_data_missing_predictor_prints_the_command(compose_train, tmp_path):
    (tmp_path / "nsd").mkdir()
    with pytest.raises(FileNotFoundError, match=r"Train it first with:\s+python train.py task=predictor region=V2 subject=1 data=nsd"):
        run(compose_train("data=nsd", f"paths.nsd_root={tmp_path}/nsd", f"paths.imagenet_root={tmp_path}/in",
                          "region=V2"))


def test_real_data_missing_nsd_root_says_so(compose_train, tmp_path):
    """A wrong paths.nsd_root is named as such, not reported as a missing predictor with a command that would fail."""
    with pytest.raises(FileNotFoundError, match=r"paths.nsd_root=\S*/nonexistent does not exist") as e:
        run(compose_train("data=nsd", f"paths.nsd_root={tmp_path}/nonexistent", f"paths.imagenet_root={tmp_path}/in",
                          "region=V2"))
    assert "Train it first" not in str(e.value)


@pytest.mark.parametrize("key,value", [("alpha", "abc"), ("at.eps", "big")])
def test_non_numeric_guidance_values_name_the_key(compose_train, key, value):
    with pytest.raises(ValueError, match=rf"{key} must be a number; got {key}='{value}'"):
        run(compose_train(f"{key}={value}"))


def test_main_command_trains_missing_predictor_then_guides(compose_train, tmp_path):
    """The main command on a fresh folder: synthetic data written, predictor trained first, outputs."""
    cfg = compose_train("region=TO", "alpha=0.5", "task.max_epochs=1", 'predictor.train_overrides=["task.max_epochs=1"]')
    metrics = run(cfg)
    assert (tmp_path / "predictors" / "subj01" / "TO.ckpt").exists()
    assert (tmp_path / "data" / "synthetic" / "imagenet" / "classes.txt").exists()
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"val/acc", "val/neural_r", "val/ce", "val/align"} <= set(written)
    assert 0 <= metrics["val/acc"] <= 1
    model = neuroguide.load_model(tmp_path / "run" / "model.ckpt")
    assert model.predictor is not None and not model.predictor.training
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape[0] == 2


@pytest.mark.slow  # trains a predictor and a guided model (~11 s): the full suite runs it
def test_disk_one_copy_of_the_predictor_and_no_checkpoints_after_a_finished_run(compose_train, tmp_path, caplog):
    """The frozen predictor is stored by reference (path + content hash) in the guided model; the finished
    run keeps model.ckpt and metrics, not the Lightning checkpoints; the nested predictor run keeps no copy."""
    cfg = compose_train("region=TO", "alpha=0.5", "task.max_epochs=1", 'predictor.train_overrides=["task.max_epochs=1"]')
    metrics = run(cfg)
    run_dir, pred_file = tmp_path / "run", tmp_path / "predictors" / "subj01" / "TO.ckpt"
    assert not (run_dir / "checkpoints").exists() and (run_dir / "model.ckpt").exists()
    nested = run_dir / "predictor_TO"
    assert (nested / "metrics.json").exists() and not (nested / "checkpoints").exists()
    assert not (nested / "model.ckpt").exists()
    ckpt = torch.load(run_dir / "model.ckpt", weights_only=True)
    assert not [k for k in ckpt["state_dict"] if k.startswith("predictor.")]
    ref = ckpt["hyper_parameters"]["references"]["predictor."]
    pinned = Path(ref["path"])  # the predictor by content: predictors/.../.by-sha256/<sha256>.ckpt
    assert pinned.parent == pred_file.parent / ".by-sha256" and pinned.stem == ref["sha256"]
    assert pinned.read_bytes() == pred_file.read_bytes()
    assert (run_dir / "model.ckpt").stat().st_size < 0.7 * (pred_file.stat().st_size * 2)  # trunk only, not both
    model = neuroguide.load_model(run_dir / "model.ckpt")
    predictor = neuroguide.load_model(pred_file)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model.predictor_target(x), predictor(x))
    # the same command again: the finished run is found, not trained again
    caplog.clear()
    with caplog.at_level("INFO", logger="neuroguide"):
        again = run(compose_train("region=TO", "alpha=0.5", "task.max_epochs=1",
                                  'predictor.train_overrides=["task.max_epochs=1"]'))
    assert again == pytest.approx(metrics, nan_ok=True) and "nothing to do" in caplog.text
    # the region's predictor retrained (replaced as the project writes files): the guided model keeps its own
    mc = {"arch": "resnet18", "n_outputs": predictor.fc.out_features}
    save_model_file(pred_file, "predictor", mc, PredictorTask.build_model(**mc).state_dict(),
                    facts=predictor.neuroguide_info["facts"])
    torch.testing.assert_close(neuroguide.load_model(run_dir / "model.ckpt").predictor_target(x), predictor(x))
    # the referenced content changed in place or gone: a clear error, never other weights silently
    data = pinned.read_bytes()
    sd = torch.load(pinned, weights_only=True)
    sd["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in sd["state_dict"].items()}
    torch.save(sd, pinned)
    with pytest.raises(ValueError, match=r"by reference to .*\.by-sha256.*, but that file has changed since"):
        neuroguide.load_model(run_dir / "model.ckpt")
    pinned.unlink()
    with pytest.raises(FileNotFoundError, match=r"by reference to .*, which does not exist. Copy that file there"):
        neuroguide.load_model(run_dir / "model.ckpt")
    pinned.write_bytes(data)
    assert neuroguide.load_model(run_dir / "model.ckpt") is not None
    # the same command is a new run (its predictor changed), not the finished one
    caplog.clear()
    with caplog.at_level("INFO", logger="neuroguide"):
        run(compose_train("region=TO", "alpha=0.5", "task.max_epochs=1",
                          'predictor.train_overrides=["task.max_epochs=1"]'))
    assert "nothing to do" not in caplog.text


def test_baselines_none_and_random(compose_train, tmp_path, caplog):
    m = run(compose_train("region=none", "alpha=0.5", "+trainer.fast_dev_run=true", out="none"))
    assert "val/neural_r" not in m and "alpha forced" in caplog.text
    assert neuroguide.load_model(tmp_path / "none" / "model.ckpt").predictor is None
    run(compose_train("region=random", "region.like=V4", "+trainer.fast_dev_run=true", out="random"))
    model = neuroguide.load_model(tmp_path / "random" / "model.ckpt")
    pred = {**model.neuroguide_info["model_config"]["predictor"], **model.neuroguide_info["facts"]["predictor"]}
    from neuroguide.data.nsd_regions import RegionSpec, extract_regions

    n_v4 = extract_regions(tmp_path / "data" / "synthetic" / "nsd", 1, [RegionSpec("V4", "Kastner2015", (7,), "nsdgeneral")],
                           progress=False)["V4"].n_voxels
    assert pred["region"] == "random_V4" and pred["n_outputs"] == n_v4  # sized like V4


def test_predictor_size_check_is_never_skipped_silently(compose_train, tmp_path, caplog):
    """Real-data layout without an extraction in the cache (or without NSD at all): the output-count check
    cannot run, and the log says so; with the extraction cached, a wrong count is an error."""
    from neuroguide.data import prepare_synthetic
    from neuroguide.requirements import check_predictor
    from neuroguide.tasks.predictor import PredictorRequirement

    synthetic = compose_train()
    prepare_synthetic(synthetic.data, ["nsd"])
    pred = tmp_path / "pred" / "TO.ckpt"
    _write_predictor(pred, n_outputs=3)
    need = PredictorRequirement("TO", 1)
    real = compose_train("data=nsd", f"paths.nsd_root={synthetic.data.nsd_root}", f"paths.cache_dir={tmp_path}/cache")
    with caplog.at_level("WARNING", logger="neuroguide"):
        check_predictor(pred, real, need)
    assert "output count not checked" in caplog.text and "is not extracted" in caplog.text
    caplog.clear()
    gone = compose_train("data=nsd", f"paths.nsd_root={tmp_path}/elsewhere")
    with caplog.at_level("WARNING", logger="neuroguide"):
        check_predictor(pred, gone, need)
    assert "output count not checked, the NSD data are not here" in caplog.text
    with pytest.raises(ValueError, match=r"has 3 outputs but region TO of subject 1 has \d+"):
        check_predictor(pred, synthetic, need)  # synthetic data: extracted on the spot, then compared

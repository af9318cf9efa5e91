"""A run's identity and its command line: smoke runs have their own folder and export nothing, a finished run is
extended rather than renamed, every '+' key is read by something, bad values name their key, an error's traceback
shows once, the printed predictor command is the one that matches."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import evaluate_in, small_overrides
from neuroguide.config import CONF_DIR, compose_config
from neuroguide.train import check_resumable, completed_metrics, run

REPO = Path(__file__).resolve().parents[1]


def _hydra_folder(tmp: Path, *overrides: str) -> Path:
    """The run folder train.py would use for this command (hydra.run.dir, named by neuroguide.run_names)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=small_overrides(tmp) + list(overrides), return_hydra_config=True)
        return Path(OmegaConf.select(cfg, "hydra.run.dir"))


def _run_as_train_py(tmp: Path, *overrides: str) -> tuple[dict, Path]:
    out = _hydra_folder(tmp, *overrides)
    return run(compose_config("train", small_overrides(tmp) + list(overrides), output_dir=out)), out


# ------------------------------------------------------------------------------------------------ smoke runs
def test_a_smoke_run_never_passes_for_the_real_run_of_its_command(tmp_path, caplog):
    """The issue's pair: the command with +trainer.fast_dev_run=true, then without. The second once found the
    first's folder 'finished' and returned its 1-batch metrics; now it trains (its own folder, a selected epoch)."""
    cmd = ["region=none", "task.max_epochs=1"]
    with caplog.at_level("INFO", logger="neuroguide"):
        smoke, smoke_dir = _run_as_train_py(tmp_path, *cmd, "+trainer.fast_dev_run=true")
        real, real_dir = _run_as_train_py(tmp_path, *cmd)
    assert smoke_dir.name == real_dir.name + "_smoke-fast_dev_run" and smoke_dir.parent == real_dir.parent
    assert "already holds" not in caplog.text
    assert "selected_epoch" in real and "selected_epoch" not in smoke  # fitted with checkpoints vs 1 batch
    assert json.loads((real_dir / "metrics.json").read_text()) == pytest.approx(real)
    caplog.clear()
    with caplog.at_level("INFO", logger="neuroguide"):  # a smoke run checks the code: rerun, it runs again
        _run_as_train_py(tmp_path, *cmd, "+trainer.fast_dev_run=true")
        again, _ = _run_as_train_py(tmp_path, *cmd)
    assert "never taken as finished" in caplog.text and again == real
    assert caplog.text.count("already holds the finished run") == 1  # the real one, rerun


def test_a_finished_smoke_run_kept_with_its_checkpoints_runs_again_from_the_start(compose_train, tmp_path, caplog):
    """keep_checkpoints=true leaves the smoke run's last.ckpt of its final epoch: a rerun trains again (not a resume
    that has nothing left to train)."""
    smoke = ("task=predictor", "region=V1", "task.max_epochs=1", "keep_checkpoints=true",
             "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1")
    run(compose_train(*smoke))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    with caplog.at_level("INFO", logger="neuroguide"):
        run(compose_train(*smoke))
    assert "holds a finished smoke run: running it again from the start" in caplog.text
    assert "resuming from" not in caplog.text


def test_a_smoke_predictor_never_replaces_the_trained_one(compose_train, tmp_path, caplog):
    good = tmp_path / "predictors" / "subj01" / "TO.ckpt"
    good.parent.mkdir(parents=True)
    good.write_bytes(b"the trained TO predictor")
    with caplog.at_level("INFO", logger="neuroguide"):
        run(compose_train("task=predictor", "region=TO", "+trainer.fast_dev_run=true"))
    assert good.read_bytes() == b"the trained TO predictor"
    assert f"not exported to {good}, only to {tmp_path / 'run' / 'model.ckpt'}" in caplog.text
    assert (tmp_path / "run" / "model.ckpt").is_file()


def test_a_smoke_predictor_trained_on_the_way_is_used_from_its_folder(compose_train, tmp_path):
    cfg = compose_train("region=TO", "+trainer.fast_dev_run=true", 'predictor.train_overrides=["+trainer.fast_dev_run=true"]')
    run(cfg)
    assert not (tmp_path / "predictors" / "subj01" / "TO.ckpt").exists()
    used = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["predictor_path_source"]
    assert Path(used) == tmp_path / "run" / "predictor_TO" / "model.ckpt" and Path(used).is_file()


def test_a_predictor_of_fewer_epochs_than_asked_is_named_when_used(compose_train, tmp_path, caplog):
    """The quick try's 1-epoch predictor (predictor.train_overrides=["task.max_epochs=1"]) exported into
    paths.predictors_dir, then met by a run whose predictor config trains longer: used, with a warning naming its
    epochs and how to replace it; a run asking for the same epochs is not warned."""
    from neuroguide.requirements import ensure_predictor
    from neuroguide.tasks.predictor import PredictorRequirement

    run(compose_train("task=predictor", "region=TO", "task.max_epochs=1", out="predictor"))
    path = tmp_path / "predictors" / "subj01" / "TO.ckpt"
    assert path.is_file()
    need = PredictorRequirement("TO", 1)

    def no_training(cfg):
        raise AssertionError("the predictor exists: nothing is trained")

    with caplog.at_level("WARNING", logger="neuroguide"):
        assert ensure_predictor(compose_train("region=TO"), need, no_training) == path
    assert f"the TO predictor {path} was trained for 1 epochs" in caplog.text and "fewer than the" in caplog.text
    assert "python train.py task=predictor region=TO" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="neuroguide"):
        ensure_predictor(compose_train("region=TO", 'predictor.train_overrides=["task.max_epochs=1"]'), need,
                         no_training)
    assert "was trained for" not in caplog.text


# ------------------------------------------------------------------------------------------------ resume, extend
def _finished(out: Path, cfg, last: bool) -> dict:
    """A planted finished run of ``cfg`` in ``out`` (config.yaml, metrics.json, model.ckpt; last.ckpt before them)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if last:
        (out / "checkpoints").mkdir(parents=True)
        torch.save({"epoch": int(cfg.trainer.max_epochs) - 1, "hyper_parameters": {"run_config": resolved}},
                   out / "checkpoints" / "last.ckpt")
        os.utime(out / "checkpoints" / "last.ckpt", (1, 1))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(resolved))
    (out / "model.ckpt").write_bytes(b"model")
    metrics = {"test/acc": 0.5}
    (out / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def test_a_finished_run_is_extended_to_more_epochs_or_says_why_not(compose_train, tmp_path, caplog):
    out = tmp_path / "run"
    five = compose_train("region=none", "task.max_epochs=5")
    metrics = _finished(out, five, last=True)
    assert completed_metrics(out, five) == metrics
    assert completed_metrics(out, compose_train("region=none", "task.max_epochs=5", "data.num_workers=1",
                                                "trainer.precision=16-mixed")) == metrics
    with caplog.at_level("INFO", logger="neuroguide"):
        assert completed_metrics(out, compose_train("region=none", "task.max_epochs=6")) is None  # resumed: extended
    assert "finished at 5 epochs: extending it to task.max_epochs=6" in caplog.text
    with pytest.raises(ValueError, match=r"finished at 5 epochs .*more than task.max_epochs=4 asks for.*"
                                         r"task.max_epochs=5 returns it.*resume=false"):
        completed_metrics(out, compose_train("region=none", "task.max_epochs=4"))
    (out / "checkpoints" / "last.ckpt").unlink()
    caplog.clear()
    with caplog.at_level("INFO", logger="neuroguide"):  # a shorter run without its checkpoints: trained afresh
        assert completed_metrics(out, compose_train("region=none", "task.max_epochs=6")) is None
    assert "finished at 5 epochs without its checkpoints" in caplog.text
    assert "training task.max_epochs=6 from the start in this folder, replacing it" in caplog.text


def test_resuming_a_checkpoint_of_more_epochs_is_refused_with_the_fix(compose_train, tmp_path, caplog):
    out = tmp_path / "run"
    _finished(out, compose_train("region=none", "task.max_epochs=5"), last=True)
    last = out / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"has trained 5 epochs, more than task.max_epochs=3. Fix: task.max_epochs=5"):
        check_resumable(last, compose_train("region=none", "task.max_epochs=3"))
    with caplog.at_level("INFO", logger="neuroguide"):
        check_resumable(last, compose_train("region=none", "task.max_epochs=6"))
    assert "configured for 5 epochs with task.max_epochs=6" in caplog.text
    assert "task.scheduler.name=cosine spans the run's epochs" in caplog.text  # guidance's default schedule


@pytest.mark.slow  # three short trainings (1, 1 and 2 epochs): 15-40 s on the shared CPU
def test_a_finished_run_of_one_epoch_is_extended_to_two_in_its_folder(tmp_path, caplog):
    """The issue's case: task.max_epochs=1, then the same command with task.max_epochs=2. The two once named two
    folders (cfg-<hash> of max_epochs), so the second never saw the first's last.ckpt and trained from scratch.
    Now: the same folder, resumed from last.ckpt of epoch 1 (keep_checkpoints=true keeps it; Lightning's save_last
    left it at the best epoch, hence callbacks.last_checkpoint), one more epoch trained, and the metrics of a
    2-epoch run from the start (a schedule that does not depend on the length)."""
    cmd = ["region=none", "keep_checkpoints=true", "trainer.deterministic=true", "task.scheduler.name=none",
           "task.scheduler.warmup_epochs=0"]
    _, one = _run_as_train_py(tmp_path, *cmd, "task.max_epochs=1")
    assert torch.load(one / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0  # the last epoch, 0-based
    with caplog.at_level("INFO", logger="neuroguide"):
        extended, two = _run_as_train_py(tmp_path, *cmd, "task.max_epochs=2")
    assert one == two and "extending it to task.max_epochs=2" in caplog.text
    assert f"resuming from {one / 'checkpoints' / 'last.ckpt'}" in caplog.text
    epochs = [r.split(",")[0] for r in (one / "csv" / "metrics.csv").read_text().splitlines()[1:]]
    assert "1" in epochs, "no row of the second epoch"
    assert torch.load(one / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    reference = run(compose_config("train", small_overrides(tmp_path) + cmd + ["task.max_epochs=2"],
                                   output_dir=tmp_path / "reference"))
    assert extended == pytest.approx(reference, abs=1e-6)


# ------------------------------------------------------------------------------------------------ the command line
def test_seed_must_be_an_integer_naming_the_key(compose_train, tmp_path):
    """seed=abc once stopped train.py with "invalid literal for int()" (and seed=true ran as seed 1)."""
    from neuroguide.evaluation.runner import run as evaluate

    for bad in ("seed=abc", "seed=1.5", "seed=true"):
        with pytest.raises(ValueError, match=r"seed must be an integer .*got .*Fix: seed=<integer>"):
            run(compose_train(bad))
        with pytest.raises(ValueError, match=r"seed must be an integer .*got .*Fix: seed=<integer>"):
            evaluate(compose_config("evaluate", [bad, f"ckpt={tmp_path}/none.ckpt", "eval=[sensitivity]"],
                                    output_dir=tmp_path / "eval"))


@pytest.mark.parametrize("overrides", [
    ["+trainer.fast_dev_run=true"], ["+trainer.limit_train_batches=2", "+trainer.gradient_clip_val=1.0"],
    ["+paths.robust_weights.2=/w/eps2.pt"], ["+paths.robust_weights={3: /w/eps3.ckpt}"],
    ["task=encoding", "+backbone.source=timm"], ["+task.datamodule.unreadable=error"],
    ["+callbacks.model_checkpoint.every_n_epochs=2"], ["++trainer.max_epochs=3"]])
def test_plus_keys_that_something_reads_are_accepted(overrides, compose_train):
    from neuroguide.command_line import check_added_keys

    check_added_keys(overrides, compose_train(*overrides))


@pytest.mark.parametrize("overrides, nearest", [
    (["+task.max_epoch=1"], "task.max_epochs=1"), (["+trainer.fast_dev_runs=true"], "+trainer.fast_dev_run=true"),
    (["task=encoding", "+backbone.sorce=timm"], "+backbone.source=timm"),
    (["task=predictor", "+task.datamodule.unreadable=error"], None), (["+attempt=2"], None)])
def test_plus_keys_that_nothing_reads_are_refused_naming_the_nearest(overrides, nearest, compose_train):
    """Hydra suggests '+task.max_epoch=1' after the typo task.max_epoch=1, and then accepts and ignores it. The
    NSD datamodule of task=predictor has no 'unreadable' (the classification datamodule's)."""
    from neuroguide.command_line import check_added_keys

    key = overrides[-1].split("=")[0].lstrip("+")
    with pytest.raises(ValueError, match=r"nothing reads the key " + key.replace(".", r"\.")) as e:
        check_added_keys(overrides, compose_train(*overrides))
    if nearest:
        assert f"Fix: {nearest}" in str(e.value)


@pytest.mark.parametrize("app, overrides, nearest", [
    ("evaluate", ["ckpt=/m.ckpt", "eval=[robustness]", "+eval.robustness.n_image=5"], "eval.robustness.n_images=5"),
    ("evaluate", ["ckpt=/m.ckpt", "+n_image=5"], "n_images=5"),
    ("closed_loop", ["step=simulate", "+loop.site=[a1]"], "loop.sites=[a1]"),
    ("closed_loop", ["step=simulate", "+loops.eps=1"], "loop.eps=1"), ("closed_loop", ["+zzz.qqq=1"], None)])
def test_evaluate_and_closed_loop_refuse_plus_keys_that_nothing_reads(app, overrides, nearest, tmp_path):
    """The same check on the other entry points: ``evaluate.py ... +eval.robustness.n_image=5`` was accepted and
    ignored (the 1000-image default ran)."""
    from neuroguide.command_line import check_added_keys
    from neuroguide.config import compose_config

    cfg = compose_config(app, overrides, output_dir=tmp_path / "out")
    key = overrides[-1].split("=")[0].lstrip("+")
    with pytest.raises(ValueError, match=r"nothing reads the key " + key.replace(".", r"\.")) as e:
        check_added_keys(overrides, cfg, app)
    if nearest:
        assert f"Fix: {nearest}" in str(e.value)
    else:
        assert f"python {app}.py --cfg job" in str(e.value)


@pytest.mark.parametrize("app, overrides", [
    ("evaluate", ["ckpt=/m.ckpt", "+stimuli.root=/imgs"]),  # an open map
    ("evaluate", ["ckpt=/m.ckpt", "eval=[robustness]", "+eval.subspace.k=3"]),  # a key of another option
    ("closed_loop", ["step=simulate", "+paths.robust_weights.2=/w/eps2.pt"])])
def test_evaluate_and_closed_loop_accept_plus_keys_that_something_reads(app, overrides, tmp_path):
    from neuroguide.command_line import check_added_keys
    from neuroguide.config import compose_config

    check_added_keys(overrides, compose_config(app, overrides, output_dir=tmp_path / "out"), app)


@pytest.mark.slow  # a CLI run in a subprocess, or a training of ~15 s: the full suite runs it
def test_evaluate_py_refuses_a_plus_key_before_loading_a_model(tmp_path):
    """Through Hydra, as typed: exit status 1 naming the key, and no evaluation folder written."""
    out = tmp_path / "eval"
    cmd = [sys.executable, str(REPO / "evaluate.py"), f"ckpt={tmp_path}/absent.ckpt", "eval=[robustness]",
           "+eval.robustness.n_image=5", f"hydra.run.dir={out}"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                       env=dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO)))
    console = p.stdout + p.stderr
    assert p.returncode == 1, console[-3000:]
    assert "nothing reads the key eval.robustness.n_image" in console and "Fix: eval.robustness.n_images=5" in console
    assert "FileNotFoundError" not in console  # refused before the model was looked for
    assert not (out / "metrics.json").exists()


@pytest.mark.slow  # a CLI run in a subprocess, or a training of ~15 s: the full suite runs it
def test_train_py_refuses_a_plus_key_nothing_reads(tmp_path):
    """The command as a user types it, through Hydra: the run stops before training, naming the key to use."""
    rc, console = _train_py("region=none", "+trainer.fast_dev_run=true", "+task.max_epoch=1", *small_overrides(tmp_path))
    assert rc == 1, console[-3000:]
    assert "+task.max_epoch=1: nothing reads the key task.max_epoch" in console
    assert "Did you mean task.max_epochs" in console and "Fix: task.max_epochs=1" in console
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("model.ckpt"))


def test_ckpt_of_a_run_folder_and_relative_paths(guided_ckpts, tmp_path, monkeypatch):
    """ckpt=<run folder> evaluates its model.ckpt (it once said 'does not exist'); a relative ckpt is the caller's
    folder's and config.yaml holds it absolute; a folder without model.ckpt names what to give."""
    tmp, (a, _, _) = guided_ckpts
    small = ["eval=[sensitivity]", "n_images=4", "eval.sensitivity.n_images=2", "eval.sensitivity.units=3",
             "eval.sensitivity.steps=2", "eval.sensitivity.restarts=1", "eval.sensitivity.eps_list=[0.5]",
             "eval.sensitivity.layer=region"]
    by_file, _ = evaluate_in(tmp_path, "file", *small, f"ckpt={a}")
    monkeypatch.chdir(a.parents[1])
    by_folder, out = evaluate_in(tmp_path, "folder", *small, f"ckpt={a.parent.name}")
    assert by_folder == pytest.approx(by_file, nan_ok=True)
    assert yaml.safe_load((out / "config.yaml").read_text())["ckpt"] == str(a)
    from neuroguide.evaluation.runner import model_file

    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    (tmp_path / "unfinished" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"ckpt=.*unfinished is a folder .* without a model.ckpt.*has not "
                                                r"finished.*ckpt=.*last.ckpt"):
        model_file(str(tmp_path / "unfinished"))


def _train_py(*overrides: str) -> tuple[int, str]:
    """``python train.py *overrides`` in a subprocess: (exit status, console: stdout and stderr)."""
    p = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO)), timeout=300)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.slow  # a CLI run in a subprocess, or a training of ~15 s: the full suite runs it
def test_train_py_prints_an_error_traceback_once(tmp_path):
    """A bad key (subject=9): the traceback once on the console (Hydra's 'Error executing job') and once in
    train.log; the project's log printed it on the console too, before Hydra did."""
    rc, console = _train_py("subject=9", f"paths.log_dir={tmp_path}/outputs", "logger=csv")
    assert rc == 1 and "subject must be an integer 1..8; got 9" in console, console[-3000:]
    assert console.count("Traceback (most recent call last)") == 1, console[-3000:]
    log_file = next((tmp_path / "outputs").rglob("train.log"))
    assert log_file.read_text().count("Traceback (most recent call last)") == 1
    assert "subject must be an integer 1..8" in log_file.read_text()


@pytest.mark.slow  # a CLI run in a subprocess, or a training of ~15 s: the full suite runs it
def test_train_py_prints_the_predictor_command_that_matches_the_run(synthetic_nsd, tmp_path):
    """data=nsd without a predictor: the printed command keeps the user's data, paths, seed and trainer overrides
    (it dropped data.image_size and paths.data_dir; a path with a space is shell-quoted), leaves out the guided
    run's own keys and the smoke setting, and composes to the predictor file the run looks for."""
    data_dir = tmp_path / "my data"
    rc, console = _train_py("data=nsd", f"paths.nsd_root={synthetic_nsd}", "data.image_size=48",
                            f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path}/outputs", "seed=3",
                            "trainer.accelerator=cpu", "logger=csv", "alpha=0.25", "+trainer.fast_dev_run=true")
    assert rc == 1, console[-3000:]
    line = next(ln.strip() for ln in console.splitlines() if ln.strip().startswith("python train.py task=predictor"))
    words = shlex.split(line)[2:]
    assert f"paths.data_dir={data_dir}" in words and "data.image_size=48" in words and "seed=3" in words
    assert "trainer.accelerator=cpu" in words
    assert not any(w.startswith(("alpha=", "logger=", "+trainer.fast_dev_run")) for w in words)
    pcfg = compose_config("train", words, output_dir=tmp_path / "p")
    assert pcfg.task.name == "predictor" and pcfg.data.image_size == 48 and pcfg.paths.data_dir == str(data_dir)
    assert f"at {Path(pcfg.paths.predictors_dir) / 'subj01' / 'TO.ckpt'}" in console
    assert console.count("Traceback (most recent call last)") == 1

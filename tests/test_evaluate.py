"""evaluate.py through the real configs: one checkpoint, several models (transfer), a sweep folder."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from neuroguide.config import compose_config
from neuroguide.evaluation import runner
from neuroguide.evaluation.runner import EvaluationFailed
from neuroguide.evaluation.runner import run as evaluate
from neuroguide.train import run as train

REPO = Path(__file__).resolve().parents[1]

SMALL_EVAL = ["n_images=6", "eval.sensitivity.units=3", "eval.sensitivity.n_images=2", "eval.sensitivity.steps=4",
              "eval.sensitivity.restarts=1", "eval.sensitivity.eps_list=[0.5]", "eval.robustness.eps_l2=[0.5]",
              "eval.robustness.eps_linf=[0.0078431373]", "eval.robustness.steps=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A predictor and two guided models (regions TO and none) in one sweep-like folder."""
    from conftest import small_overrides
    tmp = tmp_path_factory.mktemp("eval")

    def t(out, *o):
        cfg = compose_config("train", small_overrides(tmp) + ["+trainer.fast_dev_run=true", *o], output_dir=tmp / out)
        train(cfg)
        return tmp / out / "model.ckpt"

    pred = t("sweep/predictor_TO_run", "task=predictor", "region=TO")
    (tmp / "predictors" / "subj01").mkdir(parents=True, exist_ok=True)
    shutil.copy(pred, tmp / "predictors" / "subj01" / "TO.ckpt")  # a smoke run exports nowhere: the guided runs' predictor
    guided = t("sweep/region-TO", "region=TO")
    none = t("sweep/region-none", "region=none")
    return tmp, pred, guided, none


def _eval(tmp, out, *o):
    chosen = next((x.split("=", 1)[1] for x in o if x.startswith("eval=")), "[sensitivity,robustness]")
    small = [x for x in SMALL_EVAL if not x.startswith("eval.") or x.split(".")[1] in chosen]
    cfg = compose_config("evaluate", [f"paths.log_dir={tmp}/outputs", *small, *o], output_dir=tmp / out)
    return evaluate(cfg), tmp / out


def test_one_checkpoint_sensitivity_and_robustness(trained):
    tmp, pred, guided, _ = trained
    m, out = _eval(tmp, "e1", f"ckpt={guided}", "eval=[sensitivity,robustness]")
    assert "eval/robustness/clean/acc" in m and "eval/robustness/l2_0.5/acc" in m
    assert m["eval/robustness/l2_0.5/acc"] <= m["eval/robustness/clean/acc"] + 1e-9
    assert "eval/sensitivity/l2_0.5/mean_norm" in m
    assert json.loads((out / "metrics.json").read_text()).keys() == m.keys()
    assert list(out.rglob("*.png"))
    # a predictor has no labels: robustness is skipped, sensitivity measures its voxels
    m, _ = _eval(tmp, "e2", f"ckpt={pred}", "eval=[sensitivity,robustness]")
    assert "eval/sensitivity/l2_0.5/mean_norm" in m and not any(k.startswith("eval/robustness") for k in m)


def test_rsa_cka_smoothness_against_regions(trained):
    tmp, pred, guided, _ = trained
    m, out = _eval(tmp, "e8", f"ckpt={guided}", "eval=[rsa,cka,smoothness]", "eval.rsa.regions=[V1,TO]",
                   "eval.cka.regions=[TO]", "eval.cka.layers=[avgpool]", "eval.smoothness.steps=2")
    assert {"eval/rsa/V1/spearman", "eval/rsa/TO/tau-a", "eval/cka/TO/avgpool"} <= set(m)
    assert -1 <= m["eval/rsa/TO/spearman"] <= 1 and 0 <= m["eval/cka/TO/avgpool"] <= 1 + 1e-6
    assert m["eval/smoothness/adv"] >= 0 and m["eval/smoothness/clean"] >= 0
    # a predictor's own output (its region's voxels) against that region, on the NSD test images
    m, _ = _eval(tmp, "e9", f"ckpt={pred}", "eval=[rsa]", "eval.rsa.layers=[output]")
    assert "eval/rsa/TO/spearman" in m


def test_transfer_between_models(trained):
    tmp, _, guided, none = trained
    m, out = _eval(tmp, "e3", f"models=[{guided},{none}]", "eval=[transfer,rsa]", "eval.transfer.steps=2")
    assert any(k.endswith("offdiag_mean") for k in m)
    assert any(k.startswith("eval/rsa/model_vs_model/") for k in m)
    assert list((out / "transfer").glob("*.png"))


def test_sweep_dir_writes_table_and_per_run_metrics(trained):
    tmp, _, guided, none = trained
    m, out = _eval(tmp, "e4", f"sweep_dir={tmp}/sweep", "eval=[robustness]")
    assert (guided.parent / "eval_metrics.json").exists() and (none.parent / "eval_metrics.json").exists()
    assert (out / "report.csv").exists() and (out / "robust_accuracy_by_region.png").exists()
    table = (out / "report.md").read_text()
    assert "eval/robustness/clean/acc" in table and "| guidance | TO |" in table and "| guidance | none |" in table


def test_bad_modes_and_names(trained):
    tmp, _, guided, _ = trained
    with pytest.raises(ValueError, match="exactly one of ckpt"):
        _eval(tmp, "e5", "eval=[robustness]")
    with pytest.raises(KeyError, match=r"unknown analyses \['nonsense'\].*'shape_bias'.*experiment=guo2022_sensitivity"):
        _eval(tmp, "e6", f"ckpt={guided}", "+eval.nonsense={}")
    assert not (tmp / "e6").exists()  # refused before anything ran
    with pytest.raises(EvaluationFailed, match="eval/sensitivity/failed: KeyError: .*Valid layer names"):
        _eval(tmp, "e7", f"ckpt={guided}", "eval=[sensitivity]", "eval.sensitivity.layer=layer9")


def _planted_failure(*args):
    raise RuntimeError("planted failure")


def test_failed_analysis_keeps_the_others(trained, monkeypatch, caplog):
    """An analysis that raises is recorded in metrics.json beside the ones that completed (also those after
    it), logged with its traceback, and run() raises EvaluationFailed naming it after writing."""
    tmp, _, guided, _ = trained
    monkeypatch.setitem(runner.PER_MODEL, "sensitivity", _planted_failure)  # the first of eval=[...]
    with caplog.at_level(logging.ERROR, logger="neuroguide"), pytest.raises(EvaluationFailed) as err:
        _eval(tmp, "e12", f"ckpt={guided}", "eval=[sensitivity,robustness]")
    failure = "RuntimeError: planted failure"
    assert err.value.failures == {"eval/sensitivity/failed": failure}
    assert f"eval/sensitivity/failed: {failure}" in str(err.value) and "e12/metrics.json" in str(err.value)
    m = json.loads((tmp / "e12" / "metrics.json").read_text())
    assert m["eval/sensitivity/failed"] == failure
    assert 0 <= m["eval/robustness/l2_0.5/acc"] <= m["eval/robustness/clean/acc"] + 1e-9  # ran after the failure
    assert (tmp / "e12" / "config.yaml").exists()
    logged = [r for r in caplog.records if r.exc_info and "eval/sensitivity/failed" in r.getMessage()]
    assert logged and "planted failure" in str(logged[0].exc_info[1])


def test_failures_in_multi_model_and_sweep_modes_keep_the_others(trained, monkeypatch):
    """models=[...]: a model that does not load and a multi-model analysis that raises are recorded, the
    other models' analyses run. sweep_dir=...: a broken run is recorded, the good one evaluated and reported."""
    tmp, _, guided, none = trained
    monkeypatch.setitem(runner.MULTI_MODEL, "transfer", _planted_failure)
    missing = tmp / "gone" / "model.ckpt"
    with pytest.raises(EvaluationFailed, match="gone/eval/model/failed: FileNotFoundError") as err:
        _eval(tmp, "e13", f"models=[{guided},{none},{missing}]", "eval=[transfer,robustness]")
    assert set(err.value.failures) == {"gone/eval/model/failed", "eval/transfer/failed"}
    m = json.loads((tmp / "e13" / "metrics.json").read_text())
    assert m["eval/transfer/failed"] == "RuntimeError: planted failure" and str(missing) in m["gone/eval/model/failed"]
    assert "region-TO/eval/robustness/clean/acc" in m and "region-none/eval/robustness/clean/acc" in m

    sweep = tmp / "sweep_broken"
    (sweep / "good").mkdir(parents=True)
    (sweep / "broken").mkdir()
    os.symlink(guided, sweep / "good" / "model.ckpt")
    for f in ("metrics.json", "config.yaml"):
        (sweep / "good" / f).write_bytes((guided.parent / f).read_bytes())
    (sweep / "broken" / "model.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(EvaluationFailed, match="broken/eval/model/failed") as err:
        _eval(tmp, "e14", f"sweep_dir={sweep}", "eval=[robustness]")
    assert list(err.value.failures) == ["broken/eval/model/failed"]
    m = json.loads((tmp / "e14" / "metrics.json").read_text())
    assert "good/eval/robustness/clean/acc" in m
    assert "eval/model/failed" in json.loads((sweep / "broken" / "eval_metrics.json").read_text())
    assert "eval/robustness/clean/acc" in json.loads((sweep / "good" / "eval_metrics.json").read_text())
    assert "eval/robustness/clean/acc" in (tmp / "e14" / "report.md").read_text()


def test_linf_only_robustness(trained):
    tmp, _, guided, _ = trained
    m, _ = _eval(tmp, "e15", f"ckpt={guided}", "eval=[robustness]", "eval.robustness.eps_l2=[]")
    assert "eval/robustness/linf_2_255/acc" in m and "eval/robustness/fgsm_2_255/acc" in m
    assert not any("l2_" in k for k in m)
    with pytest.raises(EvaluationFailed, match="eval.robustness.eps_l2 and eval.robustness.eps_linf are both empty"):
        _eval(tmp, "e16", f"ckpt={guided}", "eval=[robustness]", "eval.robustness.eps_l2=[]",
              "eval.robustness.eps_linf=[]")


def _cli(script, *args):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO), HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_cli_failed_analysis_exit_status_and_log_file(trained):
    """evaluate.py: robustness fails as it runs (an unknown AutoAttack mode; a bad eps is refused before any model
    is loaded), smoothness after it completes; metrics.json holds both, the traceback is in the run's evaluate.log
    (not only on the console), and the exit status is 1."""
    tmp, _, guided, _ = trained
    run_dir = tmp / "e17"
    p = _cli("evaluate.py", f"ckpt={guided}", "eval=[robustness,smoothness]", "n_images=6",
             "eval.robustness.autoattack=sometimes", "eval.smoothness.steps=2", f"hydra.run.dir={run_dir}",
             f"paths.log_dir={tmp}/outputs")
    assert p.returncode == 1, p.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["eval/robustness/failed"].startswith("ValueError: eval.robustness.autoattack: expected auto")
    assert m["eval/smoothness/clean"] >= 0
    log_text = (run_dir / "evaluate.log").read_text()
    assert "Traceback (most recent call last)" in log_text
    assert "ValueError: eval.robustness.autoattack: expected auto" in log_text
    assert "1 evaluation step(s) failed" in log_text


@pytest.mark.slow
def test_cli_unknown_analysis_fails_before_loading(tmp_path):
    p = _cli("evaluate.py", f"ckpt={tmp_path}/no_model.ckpt", "eval=[robustness,nonexistent]",
             f"hydra.run.dir={tmp_path}/run")
    assert p.returncode == 1
    assert "unknown analyses ['nonexistent'] in eval=[robustness,nonexistent]" in p.stderr
    for name in ("'sensitivity'", "'shape_bias'", "'transfer'", "experiment=guo2022_sensitivity", "conf/eval"):
        assert name in p.stderr
    assert "no_model.ckpt" not in p.stderr and not (tmp_path / "run").exists()  # nothing loaded, no run folder


def test_it_model_sensitivity_and_selection(tmp_path):
    """`evaluate.py ckpt=<it model> eval=sensitivity` measures the fitted IT sites; eval=[selection]
    scores (eps, layer) pairs of backbones without a trained model."""
    from conftest import small_overrides

    cfg = compose_config("train", small_overrides(tmp_path) + [
        "task=it_encoding", "backbone=resnet18", "backbone.layer=layer2.1", "backbone.at_eps=null",
        "data.synthetic_it.n_images=60", "+trainer.fast_dev_run=true"], output_dir=tmp_path / "it")
    train(cfg)
    m, out = _eval(tmp_path, "e10", f"ckpt={tmp_path}/it/model.ckpt", "eval=[sensitivity]")
    assert 0 < m["eval/sensitivity/n_units"] <= 3 and m["eval/sensitivity/l2_0.5/mean_norm"] > 0  # 3 of the sites
    it_file = next((tmp_path / "data" / "synthetic" / "it").glob("*.h5"))
    teacher = next((tmp_path / "data" / "synthetic" / "it").glob("teacher_*.pt"))
    m, out = _eval(tmp_path, "e11", "eval=[selection]", f"eval.selection.it_file={it_file}",
                   "eval.selection.backbone=resnet18", "eval.selection.layers=[layer1.1,layer2.1]",
                   f"+paths.robust_weights.2={teacher}", "eval.selection.image_size=32", "eval.selection.n_folds=2")
    assert (out / "selection.png").exists() and any(k.startswith("eval/selection/2.0/layer2.1/") for k in m)

"""Fault tests: a run killed with SIGKILL and rerun with the same command resumes from its
last.ckpt and ends with the same metrics as an uninterrupted run, for every task (deterministic CPU
settings; 1e-6 on every metric the run writes); the same guidance command gives the same result
whether or not its predictor existed; ``csv/metrics.csv`` keeps the epochs logged before the kill.

Each run is launched as ``python train.py`` in a subprocess (the way users and SLURM run it). Runs
are tiny and shared between the tests of this module (module-scoped fixtures); all are ``slow``.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import small_overrides

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-6
SMALL_NSD = ["data.synthetic_nsd.n_stimuli=120", "data.synthetic_nsd.n_subject_images=100",
             "data.synthetic_nsd.n_shared=20"]
# the predictor a guidance run trains on the way (when its predictors_dir holds none)
NESTED = 'predictor.train_overrides=["task.max_epochs=2","task.batch_size=16"]'
GUIDANCE = ["task=guidance", "region=TO", "alpha=0.5", "task.max_epochs=3", "task.batch_size=8", NESTED]
TASKS = {
    "predictor": ["task=predictor", "region=V1", "task.max_epochs=3", "task.batch_size=16"],
    "guidance": GUIDANCE,
    "guidance_at": GUIDANCE + ["at.eps=0.5", "at.steps=1"],
    "it_encoding": ["task=it_encoding", "backbone=resnet18", "backbone.layer=layer2.1", "backbone.at_eps=null",
                    "data.synthetic_it.n_images=48", "data.synthetic_it.n_sites=4", "data.synthetic_it.n_repeats=3",
                    "task.max_epochs=3", "task.batch_size=8"],
}


def command(tmp: Path, run_dir: Path, task: str, predictors: Path | None = None) -> list[str]:
    """The train.py command of ``task``; data (and, by default, predictors) shared under ``tmp``."""
    o = small_overrides(tmp)
    if predictors is not None:
        o = [x for x in o if not x.startswith("paths.predictors_dir=")] + [f"paths.predictors_dir={predictors}"]
    return [sys.executable, str(REPO / "train.py"), *TASKS[task], "trainer.deterministic=true",
            f"hydra.run.dir={run_dir}", *o, *SMALL_NSD]


def env() -> dict:
    return dict(os.environ, WANDB_MODE="disabled", PYTHONHASHSEED="0", CUBLAS_WORKSPACE_CONFIG=":4096:8")


def train(cmd: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=env(), capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def kill_when(cmd: list[str], path: Path) -> None:
    """Start ``cmd`` and SIGKILL it as soon as ``path`` (a checkpoint) appears."""
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not path.exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run finished before {path} appeared; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "metrics.json").read_text())


def assert_same_metrics(got: dict, ref: dict) -> None:
    assert set(got) == set(ref)
    bad = {k: (got[k], ref[k]) for k in ref if got[k] != pytest.approx(ref[k], abs=TOL, nan_ok=True)}
    assert not bad, f"metrics differ (resumed/other, reference): {bad}"


def killed_and_rerun(tmp: Path, task: str, watch: str, predictors: Path | None = None) -> tuple[Path, str]:
    """Run ``task`` in a new folder, kill it when ``<run>/<watch>`` appears, rerun the same command:
    (run folder, the rerun's log)."""
    run_dir = tmp / f"{task}_killed_{watch.split('/')[0]}"
    cmd = command(tmp, run_dir, task, predictors)
    kill_when(cmd, run_dir / watch)
    assert not (run_dir / "metrics.json").exists()
    (run_dir / "csv_before_rerun.csv").write_text((run_dir / "csv" / "metrics.csv").read_text()) \
        if (run_dir / "csv" / "metrics.csv").exists() else None
    out = train(cmd)
    return run_dir, out.stdout + out.stderr


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def guidance_fresh(tmp):
    """Guidance with no predictor yet: it trains its predictor first (into <run>/predictor_TO)."""
    run_dir = tmp / "guidance_fresh"
    train(command(tmp, run_dir, "guidance", predictors=tmp / "predictors_fresh"))
    assert (run_dir / "predictor_TO" / "metrics.json").exists()
    return run_dir


@pytest.fixture(scope="module")
def guidance_reference(tmp, guidance_fresh):
    """The same guidance command in a new folder, the predictor now present (not trained again)."""
    run_dir = tmp / "guidance_reference"
    train(command(tmp, run_dir, "guidance", predictors=tmp / "predictors_fresh"))
    assert not (run_dir / "predictor_TO").exists()
    return run_dir


@pytest.fixture(scope="module")
def guidance_killed(tmp, guidance_reference):
    """Killed after guidance epoch 0 (its predictor present), rerun."""
    return killed_and_rerun(tmp, "guidance", "checkpoints/last.ckpt", predictors=tmp / "predictors_fresh")


def test_guidance_same_result_with_or_without_its_predictor(guidance_fresh, guidance_reference):
    assert_same_metrics(metrics(guidance_reference), metrics(guidance_fresh))


@pytest.mark.parametrize("task", ["predictor", "guidance_at", "it_encoding"])
def test_sigkill_then_rerun_matches_uninterrupted(tmp, task):
    ref_dir = tmp / f"{task}_reference"
    train(command(tmp, ref_dir, task))
    run_dir, log = killed_and_rerun(tmp, task, "checkpoints/last.ckpt")
    assert "resuming from" in log
    assert_same_metrics(metrics(run_dir), metrics(ref_dir))


def test_guidance_sigkill_then_rerun_matches_uninterrupted(guidance_killed, guidance_reference):
    run_dir, log = guidance_killed
    assert "resuming from" in log
    assert_same_metrics(metrics(run_dir), metrics(guidance_reference))


def test_guidance_killed_while_training_its_predictor_matches_uninterrupted(tmp, guidance_fresh):
    """Killed during the nested predictor's training (after its epoch 0), rerun: the predictor
    resumes from <run>/predictor_TO/checkpoints/last.ckpt, then guidance trains as if never killed."""
    run_dir, log = killed_and_rerun(tmp, "guidance", "predictor_TO/checkpoints/last.ckpt",
                                    predictors=tmp / "predictors_nested_killed")
    assert "resuming from" in log
    assert_same_metrics(metrics(run_dir / "predictor_TO"), metrics(guidance_fresh / "predictor_TO"))
    assert_same_metrics(metrics(run_dir), metrics(guidance_fresh))


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_csv_keeps_the_epochs_before_the_kill(guidance_killed, guidance_reference):
    """The rerun appends to csv/metrics.csv: the rows written before the kill (epoch 0) are kept with
    their values, none is written twice, and the epochs after the checkpoint are those of the
    uninterrupted run. (A row logged after the checkpoint was written but before the kill, Lightning's
    train-epoch row, which comes after the checkpoint, is lost when the kill falls in between.)"""
    run_dir, _ = guidance_killed
    before = _rows(run_dir / "csv_before_rerun.csv")
    assert {r["epoch"] for r in before} == {"0"} and any(r.get("val/acc") for r in before)
    after, ref = _rows(run_dir / "csv" / "metrics.csv"), _rows(guidance_reference / "csv" / "metrics.csv")
    key = lambda r: (r["epoch"], r["step"], tuple(sorted(k for k, v in r.items() if v)))  # noqa: E731
    assert len(set(map(key, after))) == len(after), "a row written twice"
    assert set(map(key, before)) <= set(map(key, after))
    assert {key(r) for r in ref if r["epoch"] != "0"} | set(map(key, before)) == set(map(key, after))
    by_key = {key(r): r for r in ref}
    for r in after:
        for k, v in by_key[key(r)].items():
            if v and k not in ("epoch", "step"):
                assert float(r[k]) == pytest.approx(float(v), abs=TOL), (k, r["epoch"])

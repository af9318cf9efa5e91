"""A real one-node SLURM cluster (slurm/local_cluster.sh, Debian's slurm-wlm + munge): sweeps through the
submitit launcher, requeue on timeout with exact resume, the sbatch templates, and a quiet console.

Skipped, with the reason shown, when not root or when the packages are missing (.ci/run installs them
when it runs as root)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import small_overrides

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "local_cluster.sh"
TINY_NSD = ["data.synthetic_nsd.n_stimuli=120", "data.synthetic_nsd.n_subject_images=100",
            "data.synthetic_nsd.n_shared=20", "data.synthetic_nsd.trials_per_session=100"]
JOB = ["hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
       "hydra.launcher.timeout_min=5", "trainer.accelerator=cpu"]


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start the local SLURM cluster (slurm/local_cluster.sh)"
    absent = [b for b in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(b) is None]
    return f"{', '.join(absent)} missing: apt-get install -y slurm-wlm munge" if absent else None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    before = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True).stdout
    out = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "local SLURM cluster up" in out.stdout
    data = tmp_path_factory.mktemp("slurm_data")
    # the synthetic data once, before jobs share it
    subprocess.run([sys.executable, "-c", "from neuroguide.config import compose_config; from neuroguide.data import "
                    "prepare_synthetic; import sys; c = compose_config('train', sys.argv[1:], output_dir='/tmp/x'); "
                    "prepare_synthetic(c.data, ['nsd'])", *small_overrides(data), *TINY_NSD],
                   check=True, cwd=REPO, timeout=300)
    yield data
    if "slurmctld: running" not in before:  # started here: stopped here
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=60)


def _env(**extra):
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **extra}


def _multirun(tmp, data, *overrides, env=None, background=False):
    cmd = [sys.executable, str(REPO / "train.py"), "-m", *JOB, f"hydra.sweep.dir={tmp}/sweep",
           *small_overrides(data), f"paths.log_dir={tmp}/outputs", f"paths.predictors_dir={tmp}/predictors",
           *TINY_NSD, *overrides]
    if background:
        return subprocess.Popen(cmd, cwd=REPO, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    return subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=600)


def test_two_job_sweep_and_report_through_the_scheduler(cluster, tmp_path):
    out = _multirun(tmp_path, cluster, "task=predictor", "region=V1,V4", "task.max_epochs=1")
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-3000:]
    runs = sorted(p.parent for p in (tmp_path / "sweep").rglob("metrics.json"))
    assert len(runs) == 2 and all("test/r_median" in json.loads((r / "metrics.json").read_text()) for r in runs)
    tasks = [p.name for p in (tmp_path / "sweep" / ".submitit").iterdir() if p.name.split("_")[0].isdigit() and "_" in p.name]
    assert len(tasks) == 2 and all(t.split("_")[0].isdigit() for t in tasks)  # a real SLURM job array
    assert "Bypassing sacct error" not in console and "accounting storage is disabled" not in console
    rep = subprocess.run([sys.executable, "-m", "neuroguide.report", str(tmp_path / "sweep")], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-2000:]
    lines = (tmp_path / "sweep" / "report.csv").read_text().strip().splitlines()
    assert len(lines) == 3 and {"V1", "V4"} <= set(",".join(lines[1:]).split(","))


def test_requeue_on_timeout_resumes_and_matches_the_uninterrupted_run(cluster, tmp_path):
    """Two jobs of one sweep, the same run in two folders (name=reference,timeout: the W&B group, a config key that
    names the folder; a made-up +key is refused). The second gets
    SLURM's timeout signal (USR2, as --signal=USR2@signal_delay_s sends it before the time limit) once its
    first epoch is checkpointed: submitit requeues it (max_num_timeout=1), the requeued job finds its folder,
    resumes from last.ckpt and ends with the reference's metrics; the W&B run id is kept."""
    env = _env(WANDB_MODE="offline", NETRC=str(tmp_path / "no_netrc"))
    proc = _multirun(tmp_path, cluster, "task=predictor", "region=V1", "task.max_epochs=4", "task.batch_size=16",
                     "trainer.deterministic=true", "logger=default", "name=reference,timeout", env=env,
                     background=True)
    sweep = tmp_path / "sweep"
    t0 = time.time()
    timeline = {}
    last = None
    while time.time() - t0 < 400 and proc.poll() is None:
        run_dir = _run_with(sweep, "name=timeout")
        last = run_dir / "checkpoints" / "last.ckpt" if run_dir is not None else None
        if last is not None and last.exists():
            break
        last = None
        time.sleep(0.2)
    assert last is not None, "the job never wrote a checkpoint"
    timeline["checkpoint"] = time.time() - t0
    run_dir = last.parents[1]
    job_id = _array_task(sweep, 1)  # the sweep's jobs are a SLURM array in override order: 1 = name=timeout
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    timeline["signal"] = time.time() - t0
    console, _ = proc.communicate(timeout=500)
    timeline["done"] = time.time() - t0
    assert proc.returncode == 0, console[-3000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit" / job_id).glob("*_log.*"))
    assert "Caught signal SIGUSR2" in logs and "Requeued job" in logs
    train_log = (run_dir / "train.log").read_text()
    assert "resuming from" in train_log and str(last) in train_log
    ref_dir = _run_with(sweep, "name=reference")
    ref = json.loads((ref_dir / "metrics.json").read_text())
    got = json.loads((run_dir / "metrics.json").read_text())
    assert set(got) == set(ref)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-6, nan_ok=True), k
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(p.name.endswith(run_id) for p in attempts)  # one W&B run, continued
    print("requeue timeline (s):", {k: round(v, 1) for k, v in timeline.items()})


def _run_with(sweep: Path, override: str) -> Path | None:
    """The sweep's run folder whose job was given ``override`` (Hydra's record in ``.hydra/overrides.yaml``;
    run folder names hash such overrides)."""
    for d in (sweep.iterdir() if sweep.is_dir() else ()):
        f = d / ".hydra" / "overrides.yaml"
        if f.is_file() and override in f.read_text():
            return d
    return None


def _array_task(sweep: Path, index: int) -> str:
    """The SLURM id (``<array>_<index>``) of the sweep's job number ``index``."""
    for _ in range(100):
        found = [d.name for d in (sweep / ".submitit").glob(f"*_{index}") if d.name.split("_")[0].isdigit()]
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no SLURM array task {index} under {sweep / '.submitit'}")


def test_sbatch_templates_run_on_the_cluster(cluster, tmp_path):
    """The array sweep template (regions of the grid, one per task) and the DDP template (2 CPU tasks, gloo)."""
    common = ["task=predictor", "task.max_epochs=1", "trainer.accelerator=cpu", *small_overrides(cluster),
              f"paths.log_dir={tmp_path}/outputs", f"paths.predictors_dir={tmp_path}/predictors", *TINY_NSD]
    venv = Path(sys.executable).parents[1]
    link = REPO / ".venv"
    if not link.exists():  # the templates `source .venv/bin/activate`
        pytest.skip(f"the sbatch templates activate {link}; this interpreter is {sys.executable}")
    array = subprocess.run(["sbatch", "--parsable", "--wait", "--array=0-1", "--gres=none", "--mem=2G",
                            "--cpus-per-task=1", f"--output={tmp_path}/array-%A_%a.out", "slurm/sweep_1gpu.sbatch",
                            *common], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert array.returncode == 0, array.stderr + "".join(p.read_text() for p in tmp_path.glob("array-*.out"))[-3000:]
    runs = sorted(p.parent.name for p in (tmp_path / "outputs").rglob("metrics.json"))
    assert len(runs) == 2 and any("V1" in r for r in runs) and any("V2" in r for r in runs)  # tasks 0, 1 of the grid
    ddp = subprocess.run(["sbatch", "--parsable", "--wait", "--gres=none", "--ntasks-per-node=2", "--cpus-per-task=1",
                          "--mem=4G", f"--output={tmp_path}/ddp-%j.out", "slurm/train_4gpu.sbatch", *common,
                          "region=TO", "trainer.precision=32-true", "trainer.sync_batchnorm=false",
                          f"hydra.run.dir={tmp_path}/ddp"], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=600)
    log = "".join(p.read_text() for p in tmp_path.glob("ddp-*.out"))
    assert ddp.returncode == 0, (ddp.stderr + log)[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert "test/r_median" in metrics
    assert "world_size=2" in log.replace(" ", "") or "distributed_backend=gloo" in log  # two ranks over gloo
    assert venv.exists()

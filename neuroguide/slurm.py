"""SLURM preflight: fail early when the allocation and ``trainer.devices`` disagree.

Lightning's DDP under SLURM needs one task per GPU: ``tasks_per_node = gpus_per_node =
trainer.devices``. A mismatch otherwise shows up as a hang or a cryptic NCCL error minutes later.
"""
from __future__ import annotations

import os
import re


def _first_int(value: str | None) -> int | None:
    """'4', '4(x2)', 'gpu:4', 'a100:4' -> 4; None/'' -> None."""
    if not value:
        return None
    m = re.findall(r"(\d+)", value.split(",")[0].split("(")[0])
    return int(m[-1]) if m else None


def slurm_allocation(env: dict | None = None) -> dict | None:
    """Tasks and GPUs per node of the current SLURM job, or None outside SLURM (or interactive)."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    tasks = _first_int(env.get("SLURM_NTASKS_PER_NODE")) or _first_int(env.get("SLURM_TASKS_PER_NODE"))
    gpus = (_first_int(env.get("SLURM_GPUS_ON_NODE")) or _first_int(env.get("SLURM_GPUS_PER_NODE"))
            or _first_int(env.get("SLURM_JOB_GPUS") and str(len(env["SLURM_JOB_GPUS"].split(",")))))
    return {"tasks_per_node": tasks, "gpus_per_node": gpus, "job_id": env.get("SLURM_JOB_ID")}


def preflight(devices, accelerator: str = "auto", env: dict | None = None) -> None:
    """Raise a RuntimeError naming both sides when the SLURM allocation does not fit ``trainer.devices``."""
    alloc = slurm_allocation(env)
    if alloc is None or accelerator == "cpu":
        return
    n = devices if isinstance(devices, int) else (len(devices) if isinstance(devices, (list, tuple)) else None)
    if n is None:  # "auto" / -1: Lightning takes what it sees
        return
    tasks, gpus = alloc["tasks_per_node"], alloc["gpus_per_node"]
    problems = []
    if gpus is not None and gpus != n:
        problems.append(f"{gpus} GPU(s) per node")
    if tasks is not None and tasks != n:
        problems.append(f"{tasks} task(s) per node")
    if problems:
        raise RuntimeError(
            f"SLURM job {alloc['job_id']} has {' and '.join(problems)} but trainer.devices={n}. DDP needs "
            f"tasks_per_node = gpus_per_node = trainer.devices: use hydra/launcher=slurm_1gpu with the default "
            f"trainer, or hydra/launcher=slurm_4gpu with trainer=ddp (or sbatch --ntasks-per-node=N --gres=gpu:N "
            f"with trainer.devices=N).")


SQUEUE_AS_SACCT = "echo 'JobID|State|NodeList'; squeue --noheader --states=all -o '%i|%T|%N' --jobs={ids}"


def sacct_disabled() -> bool:
    """True when ``sacct`` exists but this cluster keeps no accounting (no slurmdbd), as on a one-node
    cluster made by ``slurm/local_cluster.sh``: every call then fails with "accounting storage is disabled"."""
    import shutil
    import subprocess

    if shutil.which("sacct") is None or shutil.which("squeue") is None:
        return False
    p = subprocess.run(["sacct", "--noheader", "-j", "1"], capture_output=True, text=True)
    return p.returncode != 0 and "accounting storage is disabled" in (p.stderr + p.stdout).lower()


def follow_jobs_with_squeue() -> None:
    """Make submitit follow job states with ``squeue`` (same ``JobID|State|NodeList`` table) instead of
    ``sacct``, whose failures submitit would otherwise print on every poll ("Bypassing sacct error")."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    def _make_command(self):
        to_check = sorted({x.split("_")[0] for x in self._registered - self._finished})
        return None if not to_check else ["sh", "-c", SQUEUE_AS_SACCT.format(ids=",".join(to_check))]

    SlurmInfoWatcher._make_command = _make_command


try:  # a Hydra callback (conf/hydra/default.yaml): runs in the process that submits a multirun
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - Hydra is a dependency
    _HydraCallback = object


class SacctFallback(_HydraCallback):
    """On a SLURM multirun, follow the jobs with squeue when the cluster has no accounting (see above)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        launcher = str((config.get("hydra") or {}).get("launcher", {}).get("_target_", ""))
        if "SlurmLauncher" in launcher and sacct_disabled():
            import logging

            logging.getLogger("neuroguide").info("sacct is unavailable (this cluster keeps no accounting): "
                                                 "following the jobs with squeue")
            follow_jobs_with_squeue()

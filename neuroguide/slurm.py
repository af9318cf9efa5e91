"""SLURM preflight: fail early when the allocation and ``trainer.devices`` disagree, and refuse a sweep whose
request no node of the partition can hold.

Lightning's DDP under SLURM needs one task per GPU: ``tasks_per_node = gpus_per_node =
trainer.devices``. A mismatch otherwise shows up as a hang or a cryptic NCCL error minutes later.

Before the submitit launcher submits (:class:`PartitionCheck`, a Hydra callback), its request (``cpus_per_task x
tasks_per_node`` CPUs, ``mem_gb`` and ``gpus_per_node`` per node) is compared with the nodes of
``hydra.launcher.partition`` as ``sinfo`` lists them (and the partition's ``MaxCPUsPerNode`` / ``MaxMemPerNode``
from ``scontrol show partition``): a request no node can hold would stay pending for ever (squeue reason
``PartitionConfig``), so it is refused with both numbers and the overrides that fit. Without ``sinfo`` (or when it
fails or hangs) nothing is checked.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess

log = logging.getLogger("neuroguide")


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


# ----------------------------------------------------------------------------- the partition's nodes
SINFO_FORMAT = "%N|%P|%c|%m|%G"  # node | partition (default marked *) | CPUs | RealMemory (MB) | generic resources
QUERY_TIMEOUT_S = 15  # sinfo waits for a controller that is down: give up (and check nothing) after this


def gres_gpus(gres: str | None) -> int:
    """GPUs in a node's generic resources: ``(null)`` -> 0, ``gpu:4`` -> 4, ``gpu:a100:2(S:0-1),gpu:v100:1`` -> 3."""
    total = 0
    for item in re.split(r",(?![^(]*\))", str(gres or "")):
        m = re.match(r"\s*gpu(?::[^:(,]+)?:(\d+)", item)
        if m:
            total += int(m.group(1))
    return total


def parse_sinfo(text: str) -> list[dict]:
    """Rows of ``sinfo -h -N -o '%N|%P|%c|%m|%G'``: ``[{"node", "partition", "default", "cpus", "mem_mb",
    "gpus"}]`` (a line that does not parse is left out; ``mem_mb`` None when SLURM shows none)."""
    rows = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 5 or not parts[2].rstrip("+").isdigit():
            continue
        node, part, cpus, mem, gres = parts
        m = re.match(r"(\d+)", mem)
        rows.append({"node": node, "partition": part.rstrip("*"), "default": part.endswith("*"),
                     "cpus": int(cpus.rstrip("+")), "mem_mb": int(m.group(1)) if m else None, "gpus": gres_gpus(gres)})
    return rows


def parse_partition(text: str) -> dict:
    """``scontrol show partition <p>`` (one or many lines) -> ``{"max_cpus_per_node", "max_mem_per_node_mb"}``,
    None where UNLIMITED or absent."""
    fields = dict(re.findall(r"(\w+)=(\S+)", text))

    def num(key):
        v = fields.get(key, "UNLIMITED")
        m = re.match(r"(\d+)", v)
        return int(m.group(1)) if m else None

    return {"max_cpus_per_node": num("MaxCPUsPerNode"), "max_mem_per_node_mb": num("MaxMemPerNode")}


def _query(cmd: list[str]) -> str | None:
    """stdout of ``cmd``, or None when it is absent, fails or hangs (no controller): then nothing is checked."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.info("SLURM request not checked against the partition: %s did not answer (%s)", cmd[0], e)
        return None
    return p.stdout if p.returncode == 0 else None


def partition_resources(partition: str | None, query=None) -> tuple[str, list[dict], dict] | None:
    """``(partition, nodes, limits)`` of ``partition`` (None: the default one), from ``sinfo`` and ``scontrol``;
    None when SLURM cannot be asked or lists no node for it (then SLURM's own error is the one to read). ``query``:
    ``cmd -> stdout or None`` (default: run it, :func:`_query`)."""
    query = query or _query
    text = query(["sinfo", "-h", "-N", "-o", SINFO_FORMAT] + (["-p", str(partition)] if partition else []))
    if text is None:
        return None
    rows = parse_sinfo(text)
    if not partition:
        defaults = [r for r in rows if r["default"]]
        partition = defaults[0]["partition"] if defaults else None
    nodes = [r for r in rows if r["partition"] == partition]
    if not nodes:
        return None
    limits = parse_partition(query(["scontrol", "show", "partition", str(partition), "-o"]) or "")
    return partition, nodes, limits


def check_request_fits(params: dict, query=None) -> None:
    """Refuse (ValueError) a submitit SLURM request (the launcher's ``params``: ``partition``, ``cpus_per_task``,
    ``tasks_per_node``, ``mem_gb``, ``gpus_per_node``) that no node of its partition can hold, naming both numbers and
    the overrides that fit. SLURM's ``--mem=<mem_gb>GB`` counts 1024 MB per GB, as ``sinfo`` reports memory."""
    found = partition_resources(params.get("partition"), query)
    if found is None:
        return
    partition, nodes, limits = found
    tasks = int(params.get("tasks_per_node") or 1)
    cpt = int(params.get("cpus_per_task") or 1)
    mem_gb = params.get("mem_gb")
    gpus = int(params.get("gpus_per_node") or 0)
    for n in nodes:  # what one job may use on the node: the node, capped by the partition's limits
        n["use_cpus"] = min(n["cpus"], limits["max_cpus_per_node"] or n["cpus"])
        mem = n["mem_mb"]
        n["use_mem_mb"] = min(mem, limits["max_mem_per_node_mb"]) if mem and limits["max_mem_per_node_mb"] else mem

    def fits(n):
        return (n["use_cpus"] >= cpt * tasks and n["gpus"] >= gpus
                and (mem_gb is None or n["use_mem_mb"] is None or n["use_mem_mb"] >= float(mem_gb) * 1024))

    if any(fits(n) for n in nodes):
        return
    best = max(nodes, key=lambda n: (n["gpus"] >= gpus, n["use_cpus"], n["use_mem_mb"] or 0))
    have = f"{best['use_cpus']} CPUs, {_gb(best['use_mem_mb'])} GB memory and {best['gpus']} GPUs"
    fix = []
    if best["use_cpus"] < cpt * tasks:
        fix.append(f"hydra.launcher.cpus_per_task={max(best['use_cpus'] // tasks, 1)}")
    if mem_gb is not None and best["use_mem_mb"] is not None and best["use_mem_mb"] < float(mem_gb) * 1024:
        fix.append(f"hydra.launcher.mem_gb={best['use_mem_mb'] // 1024}")
    if best["gpus"] < gpus:
        fix.append(f"hydra.launcher.gpus_per_node={best['gpus']} (with trainer.devices={best['gpus']}), or a partition "
                   "with GPUs: hydra.launcher.partition=<name> (or NEUROGUIDE_SLURM_PARTITION)")
    raise ValueError(
        f"hydra.launcher asks each job for {cpt * tasks} CPUs (cpus_per_task={cpt} x tasks_per_node={tasks}), "
        f"{mem_gb if mem_gb is not None else 'any'} GB memory (mem_gb) and {gpus} GPUs (gpus_per_node) on one node, but "
        f"the largest node of partition {partition!r} ({best['node']}, {len(nodes)} node(s) in all, from sinfo) has "
        f"{have}: SLURM would keep the jobs pending for ever (squeue reason PartitionConfig). Fix: "
        + " ".join(fix))


def _gb(mb) -> str:
    return "unknown" if mb is None else f"{mb / 1024:.1f}"


def check_partition_before_submitting() -> None:
    """Make submitit's SlurmLauncher run :func:`check_request_fits` on its parameters before it submits (Hydra
    swallows exceptions of callbacks, not of the launcher); a refusal ends the command with its message (exit
    status 1, no traceback of Hydra's internals). Idempotent."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    if getattr(SlurmLauncher.launch, "_checks_partition", False):
        return
    submit = SlurmLauncher.launch

    def launch(self, job_overrides, initial_job_idx):
        try:
            check_request_fits(dict(self.params))
        except ValueError as e:
            raise SystemExit(f"nothing submitted: {e}") from None
        return submit(self, job_overrides, initial_job_idx)

    launch._checks_partition = True
    SlurmLauncher.launch = launch


class PartitionCheck(_HydraCallback):
    """On a SLURM multirun, refuse a request no node of the partition can hold, before anything is submitted."""

    def on_multirun_start(self, config, **kwargs) -> None:
        launcher = str((config.get("hydra") or {}).get("launcher", {}).get("_target_", ""))
        if "SlurmLauncher" in launcher:
            check_partition_before_submitting()

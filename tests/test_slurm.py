"""The SLURM preflight check on the environment of mismatched and matching allocations."""
import pytest

from neuroguide.slurm import preflight, slurm_allocation

FOUR_GPU_JOB = {"SLURM_JOB_ID": "123", "SLURM_JOB_NAME": "train", "SLURM_NTASKS_PER_NODE": "4",
                "SLURM_TASKS_PER_NODE": "4", "SLURM_GPUS_ON_NODE": "4"}


def test_mismatch_fails_early_with_both_numbers():
    with pytest.raises(RuntimeError, match=r"4 GPU\(s\) per node and 4 task\(s\) per node but trainer.devices=1.*trainer=ddp"):
        preflight(1, "gpu", FOUR_GPU_JOB)


def test_one_task_for_four_gpus_is_caught():
    env = dict(FOUR_GPU_JOB, SLURM_NTASKS_PER_NODE="1", SLURM_TASKS_PER_NODE="1")
    with pytest.raises(RuntimeError, match=r"1 task\(s\) per node but trainer.devices=4"):
        preflight(4, "gpu", env)


def test_matching_allocation_and_no_slurm_pass():
    preflight(4, "gpu", FOUR_GPU_JOB)
    preflight(1, "gpu", {})  # not under SLURM
    preflight(1, "cpu", FOUR_GPU_JOB)  # CPU runs ignore the GPU count
    env = {"SLURM_JOB_ID": "9", "SLURM_TASKS_PER_NODE": "2(x3)", "SLURM_JOB_GPUS": "0,1"}
    assert slurm_allocation(env) == {"tasks_per_node": 2, "gpus_per_node": 2, "job_id": "9"}


# ----------------------------------------------------------------------------- the request against the partition
# captured on the one-node cluster of slurm/local_cluster.sh on a 2-core machine (sinfo -h -N -o '%N|%P|%c|%m|%G';
# scontrol show partition cpu -o)
LOCAL_SINFO = "vm|cpu*|2|19284|(null)\n"
LOCAL_PARTITION = ("PartitionName=cpu AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=YES QoS=N/A "
                   "DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=UNLIMITED "
                   "MaxTime=UNLIMITED MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=vm PriorityJobFactor=1 "
                   "PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE PreemptMode=OFF State=UP "
                   "TotalCPUs=2 TotalNodes=1 SelectTypeParameters=NONE JobDefaults=(null) DefMemPerNode=UNLIMITED "
                   "MaxMemPerNode=UNLIMITED TRES=cpu=2,mem=19284M,node=1,billing=2\n")
# a cluster with a CPU partition and a GPU partition whose nodes differ (a node listed in two partitions)
CLUSTER_SINFO = ("c001|cpu*|64|257000|(null)\nc002|cpu*|32|128000|(null)\ng001|gpu|48|500000|gpu:a100:4(S:0-1)\n"
                 "g002|gpu|48|500000|gpu:a100:2(S:0),gpu:v100:0\nc001|long|64|257000|(null)\n")
GPU_PARTITION = "PartitionName=gpu Default=NO MaxCPUsPerNode=16 MaxMemPerNode=64000 Nodes=g00[1-2] State=UP\n"
SLURM_CPU = {"partition": "cpu", "cpus_per_task": 4, "tasks_per_node": 1, "mem_gb": 16, "gpus_per_node": 0}


def _answers(sinfo: str, scontrol: str):
    def query(cmd):
        return sinfo if cmd[0] == "sinfo" else scontrol
    return query


def test_sinfo_and_scontrol_text_are_parsed():
    from neuroguide.slurm import gres_gpus, parse_partition, parse_sinfo

    assert parse_sinfo(LOCAL_SINFO) == [{"node": "vm", "partition": "cpu", "default": True, "cpus": 2,
                                         "mem_mb": 19284, "gpus": 0}]
    rows = parse_sinfo(CLUSTER_SINFO + "garbage line\n")
    assert [(r["node"], r["partition"], r["cpus"], r["gpus"]) for r in rows] == [
        ("c001", "cpu", 64, 0), ("c002", "cpu", 32, 0), ("g001", "gpu", 48, 4), ("g002", "gpu", 48, 2),
        ("c001", "long", 64, 0)]
    assert parse_partition(LOCAL_PARTITION) == {"max_cpus_per_node": None, "max_mem_per_node_mb": None}
    assert parse_partition(GPU_PARTITION) == {"max_cpus_per_node": 16, "max_mem_per_node_mb": 64000}
    assert gres_gpus("gpu:4") == 4 and gres_gpus("(null)") == 0 and gres_gpus("gpu:a100:2(S:0-1),gpu:v100:1") == 3


def test_the_documented_local_request_is_refused_on_a_2_core_node_with_both_numbers_and_the_fix():
    from neuroguide.slurm import check_request_fits

    q = _answers(LOCAL_SINFO, LOCAL_PARTITION)
    with pytest.raises(ValueError, match=r"asks each job for 4 CPUs \(cpus_per_task=4 x tasks_per_node=1\), 16 GB "
                                         r".*partition 'cpu' \(vm, 1 node\(s\).*has 2 CPUs, 18\.8 GB memory.*"
                                         r"PartitionConfig\)\. Fix: hydra\.launcher\.cpus_per_task=2$"):
        check_request_fits(SLURM_CPU, q)
    with pytest.raises(ValueError, match=r"Fix: hydra\.launcher\.cpus_per_task=2 hydra\.launcher\.mem_gb=18$"):
        check_request_fits({**SLURM_CPU, "mem_gb": 32}, q)
    check_request_fits({**SLURM_CPU, "cpus_per_task": 1, "mem_gb": 2}, q)  # what slurm/README.md runs: fits
    check_request_fits({**SLURM_CPU, "cpus_per_task": 2, "mem_gb": 18}, q)  # the suggested overrides fit
    check_request_fits({**SLURM_CPU, "partition": None, "cpus_per_task": 2}, q)  # the default partition (cpu*)


def test_partition_limits_and_gpus_are_compared_too():
    from neuroguide.slurm import check_request_fits

    q = _answers(CLUSTER_SINFO, GPU_PARTITION)
    gpu4 = {"partition": "gpu", "cpus_per_task": 8, "tasks_per_node": 4, "mem_gb": 32, "gpus_per_node": 4}
    with pytest.raises(ValueError, match=r"asks each job for 32 CPUs .*has 16 CPUs, 62\.5 GB memory and 4 GPUs.*"
                                         r"Fix: hydra\.launcher\.cpus_per_task=4$"):
        check_request_fits(gpu4, q)  # the node has 48 CPUs, the partition lets a job use 16
    check_request_fits({**gpu4, "cpus_per_task": 4}, q)
    with pytest.raises(ValueError, match=r"hydra\.launcher\.gpus_per_node=4 \(with trainer\.devices=4\)"):
        check_request_fits({**gpu4, "cpus_per_task": 4, "tasks_per_node": 1, "gpus_per_node": 8}, q)
    check_request_fits({**SLURM_CPU, "cpus_per_task": 64, "mem_gb": 250}, _answers(CLUSTER_SINFO, ""))  # c001 holds it


def test_nothing_is_checked_without_an_answer_from_slurm():
    from neuroguide.slurm import _query, check_request_fits

    check_request_fits(SLURM_CPU, lambda cmd: None)  # sinfo absent, failing or hanging
    check_request_fits({**SLURM_CPU, "partition": "nope"}, _answers(LOCAL_SINFO, ""))  # no node listed: SLURM says
    assert _query(["neuroguide-no-such-command", "-h"]) is None


def test_the_launcher_refuses_before_submitting(monkeypatch):
    """The Hydra callback makes submitit's SlurmLauncher check first: a refusal ends the command, nothing submitted."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    import neuroguide.slurm as slurm

    submitted = []
    monkeypatch.setattr(SlurmLauncher, "launch", lambda self, jobs, idx: submitted.append(jobs) or ["done"])
    monkeypatch.setattr(slurm, "_query", _answers(LOCAL_SINFO, LOCAL_PARTITION))
    slurm.PartitionCheck().on_multirun_start({"hydra": {"launcher": {"_target_": "x.SlurmLauncher"}}})
    slurm.check_partition_before_submitting()  # idempotent: one check, not two
    launcher = SlurmLauncher(**SLURM_CPU)
    with pytest.raises(SystemExit, match=r"nothing submitted: .*Fix: hydra\.launcher\.cpus_per_task=2"):
        launcher.launch([["region=V1"], ["region=V4"]], 0)
    assert submitted == []
    assert SlurmLauncher(**{**SLURM_CPU, "cpus_per_task": 1, "mem_gb": 2}).launch([["region=V1"]], 0) == ["done"]
    assert submitted == [[["region=V1"]]]

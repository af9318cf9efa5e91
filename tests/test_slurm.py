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

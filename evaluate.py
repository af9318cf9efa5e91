"""Evaluate trained models: ``python evaluate.py ckpt=<path> eval=[sensitivity,robustness]`` (see README.md).

A failed analysis is logged (with its traceback, also into the run's ``evaluate.log``) and named in
metrics.json beside the results of the others; the process then exits with status 1.
"""
import logging
import sys

import hydra
from omegaconf import DictConfig

import neuroguide.config  # noqa: F401  (registers the config resolvers)
from neuroguide.logging_setup import log_failure, setup_console

log = logging.getLogger("neuroguide")


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    setup_console()  # each line once (console and evaluate.log), no advertisement, no known-harmless warnings
    from neuroguide.loggers import forget_inherited_wandb_service

    forget_inherited_wandb_service()  # a parent's W&B service is not this job's (a requeued attempt)
    from neuroguide.command_line import check_added_keys, command_overrides
    from neuroguide.evaluation.runner import EvaluationFailed, run

    try:
        check_added_keys(command_overrides(), cfg, "evaluate")  # +key=... that nothing reads: refused, before loading
        run(cfg)
    except EvaluationFailed as e:  # each failure's traceback is already in the log; Hydra prints the summary
        log_failure(f"evaluate.py: {e}")
        raise
    except Exception:  # Hydra prints the error with its traceback on the console: put it into evaluate.log, once
        log_failure("evaluate.py failed")
        raise


if __name__ == "__main__":
    from neuroguide.evaluation.runner import check_eval_overrides

    try:  # an unknown eval=[name]: say what exists before Hydra composes and before any model is loaded
        check_eval_overrides(sys.argv[1:])
    except KeyError as e:
        sys.exit(f"evaluate.py: {e.args[0]}")
    main()

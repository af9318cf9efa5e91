"""Train a neuroguide model: ``python train.py region=TO alpha=0.5`` (see README.md)."""
import logging

import hydra
from omegaconf import DictConfig

import neuroguide.config  # noqa: F401  (registers the config resolvers)
from neuroguide.logging_setup import log_failure, setup_console

log = logging.getLogger("neuroguide")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    setup_console()  # each line once (console and train.log), no advertisement, no known-harmless warnings
    from neuroguide.loggers import forget_inherited_wandb_service

    forget_inherited_wandb_service()  # a parent's W&B service is not this job's (a requeued attempt)
    from neuroguide.command_line import check_added_keys, command_overrides
    from neuroguide.train import run
    from neuroguide.utils.io import DiskFull
    from neuroguide.utils.run_lock import RunFolderBusy

    try:
        check_added_keys(command_overrides(), cfg)  # +key=... that nothing reads: refused, naming the nearest key
        metrics = run(cfg)
    except (RunFolderBusy, DiskFull) as e:  # the message says it all: into train.log without a traceback
        log.error("train.py stopped: %s", e)
        raise
    except Exception:  # Hydra prints the error with its traceback on the console: put it into train.log, once
        log_failure("train.py failed")
        raise
    return metrics.get(cfg.task.get("monitor", ""), None)


if __name__ == "__main__":
    main()

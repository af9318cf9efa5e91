"""Guo et al.'s closed loop: ``python closed_loop.py step=propose|record|refit|report|simulate`` (see README.md)."""
import logging

import hydra
from omegaconf import DictConfig

import neuroguide.config  # noqa: F401  (registers the config resolvers)
from neuroguide.logging_setup import setup_console

log = logging.getLogger("neuroguide")


@hydra.main(version_base="1.3", config_path="conf", config_name="closed_loop")
def main(cfg: DictConfig) -> None:
    setup_console()
    from neuroguide.loggers import forget_inherited_wandb_service

    forget_inherited_wandb_service()  # a parent's W&B service is not this job's (a requeued attempt)
    from neuroguide.closed_loop.run import run
    from neuroguide.command_line import check_added_keys, command_overrides

    try:
        check_added_keys(command_overrides(), cfg, "closed_loop")  # +key=... that nothing reads: refused
        run(cfg)
    except Exception:  # Hydra prints the error on the console only: put it, with its traceback, into the log
        log.exception("closed_loop.py failed")
        raise


if __name__ == "__main__":
    main()

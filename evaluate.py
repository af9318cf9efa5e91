"""Evaluate trained models: ``python evaluate.py ckpt=<path> eval=[sensitivity,robustness]`` (see README.md)."""
import hydra
from omegaconf import DictConfig

import neuroguide.config  # noqa: F401  (registers the config resolvers)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from neuroguide.evaluation.runner import run

    run(cfg)


if __name__ == "__main__":
    main()

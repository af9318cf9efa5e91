"""Hydra/OmegaConf glue: resolvers, composing the project's configs from Python, checks."""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"


def _run_name(*_, _root_=None) -> str:
    """The ``ng_run_name`` resolver: the run folder name of the command being run (see
    :mod:`neuroguide.run_names`), from Hydra's record of the overrides and the composed config."""
    from neuroguide.run_names import run_name

    hydra = OmegaConf.select(_root_, "hydra") if _root_ is not None else None
    if hydra is None:
        raise ValueError("${ng_run_name:} names a run folder inside Hydra's config (hydra.run.dir, hydra.sweep.subdir)")
    exclude = OmegaConf.select(hydra, "job.config.override_dirname.exclude_keys") or []
    return run_name(list(hydra.overrides.task or []), _root_, exclude=list(exclude))


def available_cpus(cap: int | None = 8) -> int:
    """The CPU cores this process may use (its affinity: a SLURM allocation, taskset, a container), at most
    ``cap``: the ``${ng_cpus:}`` resolver (data loader workers)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform (macOS)
        n = os.cpu_count() or 1
    return max(1, min(int(cap), n) if cap not in (None, "") else n)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ng_root"):
        OmegaConf.register_new_resolver("ng_root", lambda: str(REPO_ROOT))
    if not OmegaConf.has_resolver("ng_first"):  # the first argument that is not null
        OmegaConf.register_new_resolver("ng_first", lambda *xs: next((x for x in xs if x is not None), None))
    if not OmegaConf.has_resolver("ng_cpus"):  # ${ng_cpus:} = min(8, cores available); ${ng_cpus:4} caps at 4
        OmegaConf.register_new_resolver("ng_cpus", lambda cap=8: available_cpus(cap))
    if not OmegaConf.has_resolver("ng_run_name"):
        OmegaConf.register_new_resolver("ng_run_name", _run_name)


register_resolvers()


def compose_config(config_name: str = "train", overrides: list[str] | None = None,
                   output_dir: str | Path | None = None) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``overrides`` (usable inside or outside a Hydra app).

    ``output_dir`` sets ``paths.output_dir`` (otherwise it comes from Hydra's runtime).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides or [])
    if GlobalHydra.instance().is_initialized():
        cfg = compose(config_name=config_name, overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
    if output_dir is not None:
        OmegaConf.set_struct(cfg, False)
        cfg.paths.output_dir = str(output_dir)
    return cfg


def output_dir(cfg: DictConfig) -> Path:
    """The run's output folder: ``paths.output_dir`` (Hydra's runtime folder by default)."""
    try:
        return Path(cfg.paths.output_dir)
    except Exception:  # no Hydra runtime: not run through @hydra.main and no explicit output_dir
        raise ValueError("paths.output_dir is not set: run through train.py / evaluate.py, or pass "
                         "output_dir to neuroguide.config.compose_config") from None

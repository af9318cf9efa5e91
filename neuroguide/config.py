"""Hydra/OmegaConf glue: resolvers, composing the project's configs from Python, checks."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"


def _run_name(override_dirname: str = "") -> str:
    """A folder name from the overrides (``key-value`` joined by ``_``); 'default' when none; hashed when long."""
    if not override_dirname:
        return "default"
    # "alpha=0.5,region=TO" -> "region-TO_alpha-0.5" (sweep factors first): no '=' or ',' so the path can be passed back as
    # an unquoted Hydra override (ckpt=outputs/.../region-TO_alpha-0.5/model.ckpt)
    items = str(override_dirname).split(",")
    first = ("task", "region", "alpha", "at.eps", "at.norm", "predictor.shuffle", "seed", "subject", "experiment")
    items.sort(key=lambda it: (first.index(it.split("=")[0]) if it.split("=")[0] in first else len(first), it))
    name = "_".join(items).replace("=", "-")
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name)
    if len(name) > 120:
        name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ng_root"):
        OmegaConf.register_new_resolver("ng_root", lambda: str(REPO_ROOT))
    if not OmegaConf.has_resolver("ng_first"):  # the first argument that is not null
        OmegaConf.register_new_resolver("ng_first", lambda *xs: next((x for x in xs if x is not None), None))
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

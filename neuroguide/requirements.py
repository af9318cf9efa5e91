"""What a task needs before it is built, and how the pipeline provides it.

A task declares its needs (:meth:`neuroguide.tasks.base.Task.requirements`, e.g.
:class:`neuroguide.tasks.predictor.PredictorRequirement`); :func:`provide`
resolves each before the task is built: a trained predictor of region R for subject S is found at
``${paths.predictors_dir}/subjSS/R.ckpt``, checked against the data (the output count stored in
its checkpoint against the region's cached voxel count), and on the synthetic data trained first
when missing (by the same pipeline, into a sub-folder of the run; a smoke predictor, e.g.
``predictor.train_overrides=["+trainer.fast_dev_run=true"]``, is used from there and never exported). On real
data a missing predictor is an error that prints the exact command that trains it (the command line's data,
paths, seed and trainer overrides included).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from neuroguide.config import compose_config, output_dir
from neuroguide.run_names import SMOKE_KEYS, smoke_settings
from neuroguide.tasks.predictor import PredictorRequirement, predictor_path
from neuroguide.utils.io import pin_by_content

log = logging.getLogger("neuroguide")


def provide(need, cfg: DictConfig, train: Callable[[DictConfig], dict]) -> DictConfig:
    """The run config with ``need`` resolved; ``train(cfg)`` trains a missing model (``neuroguide.train.run``)."""
    if isinstance(need, PredictorRequirement):
        path = ensure_predictor(cfg, need, train)
        cfg = cfg.copy()
        OmegaConf.set_struct(cfg, False)
        # the run refers to the predictor by content (predictors/.../.by-sha256/<sha>.ckpt): retraining the
        # region's predictor later replaces R.ckpt but neither this run's model nor its config.yaml's identity
        OmegaConf.update(cfg, need.config_key, str(pin_by_content(path).resolve()), force_add=True)
        OmegaConf.update(cfg, f"{need.config_key}_source", str(path), force_add=True)
        return cfg
    raise TypeError(f"no provider for requirement {need!r}")


# the command line's overrides that a predictor trained for this run shares with it (as predictor_config does)
PREDICTOR_SHARES = ("data", "paths", "seed", "trainer")


def predictor_train_command(cfg: DictConfig, need: PredictorRequirement, overrides: list[str] | None = None) -> str:
    """The exact command that trains the predictor the run looks for: ``task=predictor``, its region, subject and
    shuffle, the run's data, paths, seed and trainer overrides (``overrides``: the command line's, Hydra's record by
    default; a smoke setting and ``max_epochs`` left out), ``predictor.train_overrides``, and the data and paths
    the run's config holds but no override gave; shell-quoted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from neuroguide.command_line import command_overrides, shell_command

    overrides = command_overrides() if overrides is None else overrides
    kept = []
    for o in OverridesParser.create().parse_overrides(list(overrides or [])):
        key = o.key_or_group
        if key.split(".")[0] in PREDICTOR_SHARES and key.split(".")[-1] not in (*SMOKE_KEYS, "max_epochs") \
                and key != "paths.output_dir":
            kept.append(o.input_line)
    given = {line.lstrip("+~").split("=", 1)[0] for line in kept}
    parts = ["python train.py", "task=predictor", f"region={need.region}", f"subject={need.subject}"]
    if "data" not in given:
        parts.append(f"data={cfg.data.name}")
    if not cfg.data.synthetic and "paths.nsd_root" not in given:
        parts.append(f"paths.nsd_root={cfg.paths.nsd_root}")
    if need.shuffle:
        parts.append("predictor.shuffle=true")
    default_dir = Path(cfg.paths.root_dir) / "predictors" / cfg.data.name
    if Path(cfg.paths.predictors_dir) != default_dir and "paths.predictors_dir" not in given:
        parts.append(f"paths.predictors_dir={cfg.paths.predictors_dir}")
    return shell_command(parts + kept + [str(o) for o in cfg.predictor.get("train_overrides", [])])


def predictor_config(cfg: DictConfig, need: PredictorRequirement, out: Path) -> DictConfig:
    """The config that trains the predictor with this run's data, paths, subject and seed
    (``predictor.train_overrides`` adjust its task and trainer)."""
    pcfg = compose_config("train", ["task=predictor", f"region={need.region}", "logger=csv",
                                    *cfg.predictor.get("train_overrides", [])])
    OmegaConf.set_struct(pcfg, False)
    for key in ("data", "paths", "seed", "predictor"):
        v = cfg[key]
        pcfg[key] = OmegaConf.to_container(v, resolve=False) if OmegaConf.is_config(v) else v
    pcfg.subject = need.subject
    pcfg.predictor.shuffle = need.shuffle
    pcfg.trainer.accelerator = cfg.trainer.accelerator
    pcfg.paths.output_dir = str(out)
    return pcfg


def _check_nsd_root(cfg: DictConfig) -> None:
    root = cfg.data.get("nsd_root")
    if not cfg.data.synthetic and (not root or not Path(str(root)).expanduser().is_dir()):
        raise FileNotFoundError(f"paths.nsd_root={root} does not exist: point it at the NSD folder (holding nsddata/, "
                                "nsddata_betas/, nsddata_stimuli/), e.g. paths.nsd_root=/data/nsd")


def ensure_predictor(cfg: DictConfig, need: PredictorRequirement, train: Callable[[DictConfig], dict]) -> Path:
    """Path of the needed predictor, checked; on synthetic data it is trained first when missing."""
    path = predictor_path(cfg.paths.predictors_dir, need.subject, need.region, need.shuffle)
    if path.exists():
        check_predictor_training(path, cfg, need)
    else:
        _check_nsd_root(cfg)
        if not cfg.data.synthetic:
            raise FileNotFoundError(f"no {need.region} predictor for subject {need.subject} at {path}. Train it first "
                                    f"with:\n  {predictor_train_command(cfg, need)}")
        out = output_dir(cfg) / f"predictor_{path.stem}"
        log.warning("no %s predictor at %s: training it first on the synthetic data (%s)", need.region, path, out)
        pcfg = predictor_config(cfg, need, out)
        train(pcfg)
        if smoke_settings(pcfg.trainer):  # a smoke predictor (predictor.train_overrides) is never exported: this
            log.warning("the %s predictor trained on the way is a smoke run (predictor.train_overrides): this run "
                        "uses it from %s; %s stays as it was", need.region, out / "model.ckpt", path)
            path = out / "model.ckpt"
        elif not path.exists():  # pragma: no cover - the predictor task exports it there
            raise RuntimeError(f"training the {need.region} predictor did not write {path}")
        else:
            (out / "model.ckpt").unlink(missing_ok=True)  # the same weights as the exported predictor: one copy
    check_predictor(path, cfg, need)
    return path


def check_predictor_training(path: Path, cfg: DictConfig, need: PredictorRequirement) -> None:
    """Warn when the predictor found at ``path`` was trained for fewer epochs than this run's predictor config
    (:func:`predictor_config`: the predictor task's default and ``predictor.train_overrides``) asks for, e.g. the
    1-epoch predictor of a quick try (``predictor.train_overrides=["task.max_epochs=1"]``) met by the main command:
    it is used, but the warning says so, with its test r and how to replace it."""
    from neuroguide.models.checkpoints import read_checkpoint

    try:
        ck = read_checkpoint(path, kind="predictor")
        had = (ck.run_config.get("trainer") or {}).get("max_epochs", (ck.run_config.get("task") or {}).get("max_epochs"))
        want = predictor_config(cfg, need, Path("unused")).trainer.max_epochs
    except Exception:  # an unreadable or foreign file: check_predictor says what is wrong with it
        return
    if had is not None and int(had) < int(want):
        r = ck.metrics.get("test/r_median")
        log.warning("the %s predictor %s was trained for %d epochs%s, fewer than the %d this run's predictor config "
                    "trains (the predictor task's default and predictor.train_overrides): this run uses it. To "
                    "replace it, delete it (it is trained again on the way on synthetic data) or run: %s",
                    need.region, path, int(had), "" if r is None else f" (test r_median {float(r):.3f})", int(want),
                    predictor_train_command(cfg, need))


def check_predictor(path: Path, cfg: DictConfig, need: PredictorRequirement) -> None:
    """The checkpoint is a predictor of the needed region and subject with as many outputs as the
    region's cached extraction of this run's data has (skipped, with a warning, when there is none)."""
    from neuroguide.data.nsd_regions import cached_region, extract_regions, load_region
    from neuroguide.models.checkpoints import read_checkpoint

    ck = read_checkpoint(path, kind="predictor")
    facts, n_out = ck.facts, int(ck.model_config["n_outputs"])
    if (facts.get("region") != need.region or int(facts.get("subject", need.subject)) != need.subject
            or bool(facts.get("shuffle", need.shuffle)) != need.shuffle):
        raise ValueError(f"{path} is the predictor of region {facts.get('region')} subject {facts.get('subject')} "
                         f"(shuffle={bool(facts.get('shuffle', False))}), but this run asks for region={need.region} "
                         f"subject={need.subject} (shuffle={need.shuffle}). Retrain with: "
                         f"{predictor_train_command(cfg, need)}")
    d = cfg.data
    kw = dict(cache_dir=cfg.paths.cache_dir, betas_format=d.betas_format, max_sessions=d.max_sessions, pca=d.pca,
              pca_variance=d.pca_variance)
    try:
        rd = cached_region(d.nsd_root, need.subject, load_region(need.region), **kw)  # never reads betas: no workers
        if rd is None and d.synthetic:  # seconds on the synthetic data
            rd = extract_regions(d.nsd_root, need.subject, [load_region(need.region)], progress=False,
                                 read_workers=d.get("read_workers", "auto"), **kw)[need.region]
    except FileNotFoundError as e:
        log.warning("predictor %s: output count not checked, the NSD data are not here (%s)", path, e)
        return
    if rd is None:
        log.warning("predictor %s: output count not checked, %s of subject %d is not extracted in paths.cache_dir=%s "
                    "(training the predictor there extracts it)", path, need.region, need.subject, cfg.paths.cache_dir)
        return
    if n_out != rd.n_outputs:
        raise ValueError(f"predictor checkpoint {path} has {n_out} outputs but region {need.region} of subject "
                         f"{need.subject} has {rd.n_outputs} in the data at {d.nsd_root}. The checkpoint was trained "
                         f"on other data or settings; retrain it with: {predictor_train_command(cfg, need)}")

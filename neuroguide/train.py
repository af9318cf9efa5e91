"""``neuroguide.train.run(cfg)``: what ``python train.py`` does, for every task.

1. check the config (the shared keys here, the task's own keys by the task); 2. write the synthetic
data the task ``needs`` (``task.needs``); 3. provide the task's requirements (e.g. a trained
predictor, :mod:`neuroguide.requirements`), then seed; 4. build the datamodule
(``cfg.task.datamodule``) and the task from the registry (``Task.from_configs``; a config may make several runs
that are built together, ``Task.run_configs``, e.g. encoding's ``task.regions``); 5. fit with Lightning, resuming from
``<output>/checkpoints/last.ckpt`` when present (a task with ``closed_form = True``, e.g. encoding's ridge,
is fitted when built and only validated here); 6. validate and test the selected checkpoint;
7. write ``config.yaml``, export the model (``model.ckpt``, plus task-specific places such as
``${paths.predictors_dir}/subjNN/<region>.ckpt``), then ``metrics.json`` (last: a folder holding it holds a
finished run) and ``learning_curves.png`` into the output folder.

One process writes a run folder at a time (:func:`neuroguide.utils.run_lock.one_writer`: a second run of the
same folder is refused at once, naming the first); every file is written atomically, checkpoints included
(:class:`neuroguide.callbacks.AtomicCheckpointIO`); an unreadable ``checkpoints/last.ckpt`` (cut short) is
moved to ``<output>/last.ckpt.corrupt-<time>``, with a warning naming both, and the run starts afresh.

A run's identity is its config less :data:`neuroguide.run_names.NOT_IDENTITY` (where, how and how long it runs)
and ``paths.*`` (where its inputs are): a rerun whose identity matches the folder's finished run returns its
metrics; one asking for more epochs (``task.max_epochs``) extends it from ``checkpoints/last.ckpt``. A smoke run
(:func:`neuroguide.run_names.smoke_settings`: ``+trainer.fast_dev_run=true``, ``limit_*_batches``, ``max_steps``,
...) has its own folder, is never taken as finished and never exports outside it.
"""
from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from neuroguide.callbacks import AtomicCheckpointIO, ExactResume
from neuroguide.config import output_dir
from neuroguide.data import prepare_synthetic
from neuroguide.learning_curves import write_learning_curves
from neuroguide.logging_setup import log_outputs
from neuroguide.loggers import WandbLogger, finish_wandb
from neuroguide.models.checkpoints import set_aside_unreadable
from neuroguide.requirements import provide
from neuroguide.run_names import MAY_MOVE, NOT_IDENTITY, listed, smoke_settings
from neuroguide.slurm import preflight, slurm_allocation
from neuroguide.tasks import get_task
from neuroguide.utils.io import atomic_path, read_json, write_json
from neuroguide.utils.run_lock import one_writer
from neuroguide.utils.seeding import check_seed

log = logging.getLogger("neuroguide")


def check_config(cfg: DictConfig) -> None:
    """Fail early, naming the key, on shared values no task can use (each task checks its own keys)."""
    subject = cfg.get("subject")
    if subject is not None and not (isinstance(subject, int) and 1 <= subject <= 8):
        raise ValueError(f"subject must be an integer 1..8; got {subject!r}")
    check_seed(cfg.get("seed"))


def build_loggers(cfg: DictConfig) -> list:
    return [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None and "_target_" in c]


def build_callbacks(cfg: DictConfig) -> list:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]


def _float_metrics(metrics: dict) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (and test) the task of ``cfg``; returns the final metrics (also in metrics.json). A config that
    makes several runs (:meth:`Task.run_configs`; encoding with ``task.regions``: one per region, each in its own
    folder) returns all of them, each key prefixed by its run folder's name (``FFA/test/r_median``)."""
    check_config(cfg)
    task_cls = get_task(cfg.task.name)
    task_cls.check_config(cfg)
    preflight(cfg.trainer.get("devices", 1), cfg.trainer.get("accelerator", "auto"))
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    with one_writer(out):  # a second run of this folder at once is refused, naming this process
        return _run_in(out, cfg, task_cls)


def _run_in(out: Path, cfg: DictConfig, task_cls) -> dict[str, float]:
    prepare_synthetic(cfg.data, cfg.task.get("needs", ()))  # the embedded default: written on first use
    cfg = task_cls.prepare_config(cfg)  # e.g. guidance: region=none forces alpha=0
    for need in task_cls.requirements(cfg):  # e.g. the region's predictor, trained first on synthetic data
        cfg = provide(need, cfg, train=run)
    smoke = smoke_settings(cfg.trainer)
    if smoke:
        log.info("smoke run (%s): never taken as finished (a rerun runs it again) and exported nowhere but %s",
                 ", ".join(f"trainer.{k}={v}" for k, v in smoke.items()), out)
    runs = task_cls.run_configs(cfg)  # one, or several sharing one fit (encoding: task.regions)
    results: list[dict | None] = []
    for c in runs:
        done = completed_metrics(output_dir(c), c) if c.get("resume", True) and not smoke else None
        if done is not None:
            log.info("%s already holds the finished run of this config (metrics.json, model.ckpt): nothing to do "
                     "(resume=false trains it again)", output_dir(c))
        results.append(done)
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        # seeded after the requirements: the same command gives the same run whether or not they existed
        L.seed_everything(int(cfg.seed), workers=True)
        datamodules = [instantiate(runs[i].task.datamodule, _recursive_=False) for i in todo]
        modules = task_cls.from_configs([runs[i] for i in todo], datamodules)
        for i, datamodule, module in zip(todo, datamodules, modules):
            results[i] = _fit_and_test(runs[i], datamodule, module)
    if len(runs) == 1:
        return results[0]
    return {f"{output_dir(c).name}/{k}": v for c, m in zip(runs, results) for k, v in m.items()}


def _fit_and_test(cfg: DictConfig, datamodule, module) -> dict[str, float]:
    """Steps 5-7 of :func:`run` for one run: fit (or validate a closed-form fit), validate and test the selected
    checkpoint, write the run folder and export the model; returns its metrics."""
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"plugins": [AtomicCheckpointIO()]}  # checkpoints written beside their name, then renamed
    if slurm_allocation() is not None:  # requeue on timeout is submitit's job (once), not Lightning's
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        extra["plugins"].append(SLURMEnvironment(auto_requeue=False))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=build_loggers(cfg) or False,
                                     callbacks=build_callbacks(cfg) + [ExactResume(cfg.seed)],
                                     default_root_dir=str(out), **extra)
    _log_config(trainer, cfg)
    last = out / "checkpoints" / "last.ckpt"
    if cfg.get("resume", True):
        set_aside_unreadable(last, out)  # truncated (killed while copied?): moved into out/, warned; a fresh start
    ckpt_path = str(last) if cfg.get("resume", True) and last.exists() else None
    if ckpt_path and smoke_settings(cfg.trainer) and holds_finished_run(out):  # a finished smoke run: run it again
        log.info("%s holds a finished smoke run: running it again from the start (not from %s)", out, last)
        ckpt_path = None
    if ckpt_path:
        check_resumable(last, cfg)
        log.info("resuming from %s", ckpt_path)
    if getattr(module, "closed_form", False):  # fitted when built (ridge readouts): validated and tested, not trained
        trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics, selected = _float_metrics(trainer.callback_metrics), None
    else:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics = _float_metrics(trainer.callback_metrics)
        selected = selected_checkpoint(trainer, str(cfg.get("test_ckpt", "best")))
    if selected is not None:  # the best-validation weights: validated again (val/* of that epoch), tested, exported
        log.info("testing and exporting the best validation checkpoint %s", selected)
        trainer.validate(module, datamodule=datamodule, ckpt_path=str(selected), verbose=False)
        metrics.update(_float_metrics(trainer.callback_metrics))
        metrics["selected_epoch"] = float(_checkpoint_epoch(selected))
    if cfg.get("test", True) and hasattr(module, "test_step"):
        trainer.test(module, datamodule=datamodule, ckpt_path=str(selected) if selected else None, verbose=False)
        metrics.update(_float_metrics(trainer.callback_metrics))
    _finish(trainer, module, cfg, out, metrics)
    return metrics


# keys that may differ between a run and its rerun in the same folder: not its identity, or where its inputs are
MAY_CHANGE_ON_RESUME = NOT_IDENTITY + MAY_MOVE


def science_diff(a: dict, b: dict) -> list[str]:
    """Dotted keys whose values differ between two resolved run configs, leaving out :data:`MAY_CHANGE_ON_RESUME`."""
    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                out.update(flat(v, key + "."))
            elif not listed(key, MAY_CHANGE_ON_RESUME):
                out[key] = v
        return out

    fa, fb = flat(a), flat(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k, "<unset>") != fb.get(k, "<unset>"))


def _epochs(run_config: dict) -> int | None:
    """The epochs a run was configured for (``trainer.max_epochs``, resolved; ``task.max_epochs`` else)."""
    v = (run_config.get("trainer") or {}).get("max_epochs", (run_config.get("task") or {}).get("max_epochs"))
    return None if v is None else int(v)


def holds_finished_run(out: Path) -> bool:
    """Whether the folder ``out`` holds a finished run: metrics.json, model.ckpt and config.yaml, metrics.json
    written after ``checkpoints/last.ckpt`` (when one is kept)."""
    files = [out / "metrics.json", out / "model.ckpt", out / "config.yaml"]
    last = out / "checkpoints" / "last.ckpt"
    return all(f.is_file() for f in files) and not (last.exists() and last.stat().st_mtime > files[0].stat().st_mtime)


def completed_metrics(out: Path, cfg: DictConfig) -> dict[str, float] | None:
    """The metrics of a finished run of this config in ``out`` (metrics.json written after its last
    checkpoint, the same identity in config.yaml, as many epochs), else None; a differing config is said in the
    log. A finished run of fewer epochs than ``cfg`` asks for is extended (None: resumed from its last.ckpt) when
    that checkpoint is kept (``keep_checkpoints=true``), else trained afresh in place with a warning (None); a run
    of more epochs than asked is a ValueError (it would be replaced by a shorter one)."""
    import yaml

    last = out / "checkpoints" / "last.ckpt"
    if not holds_finished_run(out):
        return None
    saved = yaml.safe_load((out / "config.yaml").read_text()) or {}
    differ = science_diff(saved, OmegaConf.to_container(cfg, resolve=True))
    if differ:
        log.info("%s holds a finished run of another config (%s differ): training this one", out, ", ".join(differ[:8]))
        return None
    had, want = _epochs(saved), int(cfg.trainer.max_epochs)
    if had is None or had == want:
        return read_json(out / "metrics.json")
    if had < want:
        if last.exists():
            log.info("%s holds this run finished at %d epochs: extending it to task.max_epochs=%d from %s", out, had,
                     want, last)
        else:  # a shorter run (a 1-epoch try, say) is a part of what is asked: it is replaced, never silently kept
            log.warning("%s holds this run finished at %d epochs without its checkpoints (keep_checkpoints=false), "
                        "so it cannot be extended: training task.max_epochs=%d from the start in this folder, "
                        "replacing it (keep_checkpoints=true keeps a run extendable)", out, had, want)
        return None
    raise ValueError(f"{out} holds this run finished at {had} epochs (metrics.json, model.ckpt), more than "
                     f"task.max_epochs={want} asks for. Fix: task.max_epochs={had} returns it, or resume=false trains "
                     f"{want} epochs from the start in this folder (replacing that run)")


def check_resumable(last: Path, cfg: DictConfig) -> None:
    """Refuse to resume a checkpoint written under another config (weights of two configs would mix), or one
    that has trained more epochs than ``cfg`` asks for; say when the epochs differ (an extension)."""
    ck = torch.load(last, map_location="cpu", weights_only=True)
    hp = ck.get("hyper_parameters") or {}
    differ = science_diff(hp.get("run_config") or {}, OmegaConf.to_container(cfg, resolve=True))
    if differ:
        raise ValueError(f"{last} was written by a run of another config ({', '.join(differ[:8])} differ), so resuming "
                         f"would mix the two. Rerun with resume=false to start this config afresh in the folder, or "
                         f"give it its own folder (hydra.run.dir=...)")
    done, want = int(ck.get("epoch", -1)) + 1, int(cfg.trainer.max_epochs)  # saved at the end of epoch `epoch`
    if done > want:
        raise ValueError(f"{last} has trained {done} epochs, more than task.max_epochs={want}. Fix: "
                         f"task.max_epochs={done} (or more) resumes it; resume=false trains {want} from the start")
    had = _epochs(hp.get("run_config") or {})
    if had is not None and had != want:
        log.info("resuming a run configured for %d epochs with task.max_epochs=%d", had, want)
        if str((cfg.task.get("scheduler") or {}).get("name")) == "cosine":
            log.warning("task.scheduler.name=cosine spans the run's epochs: from epoch %d on the learning rate follows "
                        "the cosine over %d epochs (it was going to 0 at %d), so the result differs from a run trained "
                        "%d epochs from the start", done, want, had, want)


def selected_checkpoint(trainer: L.Trainer, which: str) -> Path | None:
    """The checkpoint whose weights are tested and exported: ``best`` (by the task's monitor, the
    default) or ``last`` (the weights at the end of fitting; returns None: they are in memory)."""
    if which not in ("best", "last"):
        raise ValueError(f"test_ckpt must be 'best' or 'last'; got {which!r}")
    cb = trainer.checkpoint_callback
    if which == "last" or cb is None or not getattr(cb, "best_model_path", ""):
        if which == "best":
            log.info("no checkpoint callback with a best model (callbacks=none?): testing the last weights")
        return None
    return Path(cb.best_model_path)


def _checkpoint_epoch(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


@rank_zero_only
def _log_config(trainer: L.Trainer, cfg: DictConfig) -> None:
    container = OmegaConf.to_container(cfg, resolve=True)
    for lg in trainer.loggers:
        lg.log_hyperparams(container)


@rank_zero_only
def _finish(trainer: L.Trainer, module, cfg: DictConfig, out: Path, metrics: dict) -> None:
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        log.warning("non-finite metrics: %s", bad)
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    module.export(out / "model.ckpt", metrics)
    smoke = smoke_settings(cfg.trainer)
    for p in module.export_paths(cfg):
        if smoke:  # a run that did not train fully never replaces a trained model
            log.warning("smoke run (%s): its %s model is not exported to %s, only to %s", ", ".join(
                f"trainer.{k}={v}" for k, v in smoke.items()), cfg.task.name, p, out / "model.ckpt")
            continue
        module.export(p, metrics)
        log.info("saved %s model to %s", cfg.task.name, p)
    write_json(out / "metrics.json", metrics)  # last: a folder with metrics.json holds a finished run
    figure = write_learning_curves(trainer, cfg, out)
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            finish_wandb(lg.experiment, metrics, out)
    if not cfg.get("keep_checkpoints", False) and (out / "checkpoints").is_dir():
        # last/best hold the optimizer state for resuming and the selection; the run is finished and exported
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        log.info("removed %s (keep_checkpoints=true keeps them)", out / "checkpoints")
    log.info("metrics: %s", {k: round(v, 4) for k, v in sorted(metrics.items())})
    log_outputs("run folder", out, {"model": out / "model.ckpt", "metrics": out / "metrics.json",
                                    "config": out / "config.yaml", "log": out / "train.log"},
                [figure] if figure else [])

"""``neuroguide.evaluation.runner.run(cfg)``: what ``python evaluate.py`` does.

Three modes, one set of analyses (``eval=[...]``, each configured under ``cfg.eval.<name>``):

- ``ckpt=<path>``: every analysis on one model, on its own evaluation stimuli;
- ``models=[a, b, ...]``: the analyses that compare models (transfer, model-vs-model RSA);
- ``sweep_dir=<dir>``: every run below the folder (each holding ``model.ckpt``); each run gets an
  ``eval_metrics.json`` beside its ``metrics.json``, and the sweep one comparison table and figures. A
  train.py run folder without ``model.ckpt`` (crashed, killed, still running) is a failure
  ``<run>/eval/model/failed = "no model.ckpt: ..."``, also listed in report.md.

A guided model keeps its predictor by reference (:mod:`neuroguide.models.checkpoints`): one whose predictor
file moved is looked up by content below ``paths.predictors_dir``.

Results: the evaluation run's ``metrics.json`` (keys ``eval/<analysis>/...``; per model in the multi-model
modes), the W&B summary, and PNG figures in the output folder.

A failing analysis loses nothing: its exception is logged with the traceback and recorded as
``eval/<analysis>/failed = "<ExceptionType>: <message>"`` (``eval/model/failed``, ``eval/stimuli/failed`` when a
model or its stimuli cannot be loaded; prefixed by the model or run in the multi-model modes), the other
analyses, models and runs go on, metrics.json is written with everything that completed, and then
:func:`run` raises :class:`EvaluationFailed` naming every failure (``evaluate.py`` exits with status 1).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from neuroguide.config import CONF_DIR, output_dir
from neuroguide.evaluation.checks import check_eval_eps
from neuroguide.evaluation.registry import (  # noqa: F401  (per_model, multi_model, FAILED: the public names)
    FAILED, MULTI_MODEL, PER_MODEL, PER_RUN_IN_SWEEPS, STANDALONE, _recorded, failures, multi_model, per_model,
    registered)
from neuroguide.evaluation.stimuli import model_stimuli
from neuroguide.logging_setup import log_outputs
from neuroguide.models.checkpoints import load_model
from neuroguide.utils.io import atomic_path, write_json
from neuroguide.utils.seeding import check_seed, seed_all

log = logging.getLogger("neuroguide")
registered()  # every analysis package registers itself


class EvaluationFailed(RuntimeError):
    """Raised by :func:`run` after metrics.json was written: ``failures`` maps each failed step's metric key
    (``.../eval/<analysis>/failed``) to its ``"<ExceptionType>: <message>"``."""

    def __init__(self, failures: Mapping[str, str], metrics_file: Path):
        self.failures = dict(failures)
        self.metrics_file = metrics_file
        lines = "".join(f"\n  {k}: {v}" for k, v in self.failures.items())
        super().__init__(f"{len(self.failures)} evaluation step(s) failed (tracebacks in the log); {metrics_file} "
                         f"holds the results of the others and these failures:{lines}")


# --------------------------------------------------------------------------- modes
def _device(cfg) -> torch.device:
    d = str(cfg.get("device", "auto"))
    if d == "auto":
        d = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(d)


def available_analyses() -> str:
    """What ``eval=[...]`` can name: the registered analyses and the config files of ``conf/eval/``."""
    files = sorted(p.stem for p in (CONF_DIR / "eval").glob("*.yaml"))
    return (f"per-model analyses {sorted(PER_MODEL)}, multi-model analyses (models=[...], sweep_dir=...) "
            f"{sorted(MULTI_MODEL)}, without a model {sorted(STANDALONE)} (e.g. selection: backbones x layers); config files in "
            f"{CONF_DIR / 'eval'}: {files}; presets are experiments (e.g. experiment=guo2022_sensitivity: the "
            "sensitivity analysis with the paper's budget)")


def check_eval_overrides(overrides: list[str]) -> None:
    """Refuse ``eval=[...]`` overrides naming no config file of ``conf/eval/``, with a KeyError listing what
    exists; ``evaluate.py`` calls it on its command line before Hydra composes the config (whose own error,
    "Could not load 'eval/<name>'", lists nothing) and before any model is loaded."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    files = {p.stem for p in (CONF_DIR / "eval").glob("*.yaml")}
    parser = OverridesParser.create()
    for arg in overrides:
        try:
            o = parser.parse_override(arg)
        except Exception:  # not an override (a flag such as -m, --cfg job) or bad syntax: Hydra reports it
            continue
        if o.key_or_group != "eval" or o.is_delete():
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        names = []
        for v in values:
            if isinstance(v, str) and v.startswith("["):  # one choice of a sweep eval=[a],[b]
                v = parser.parse_override(f"eval={v}").value()
            if v is not None:
                names += [str(x) for x in v] if isinstance(v, list) else [str(v)]
        unknown = sorted(set(names) - files)
        if unknown:
            raise KeyError(f"unknown analyses {unknown} in {arg}: there is no conf/eval/<name>.yaml for them. "
                           f"Available: {available_analyses()}. Fix: name only these, "
                           "e.g. eval=[sensitivity,robustness]")


def _analyses(cfg: DictConfig) -> dict[str, dict]:
    chosen = OmegaConf.to_container(cfg.get("eval") or {}, resolve=True)
    known = registered()
    unknown = sorted(set(chosen) - known)
    if unknown:
        raise KeyError(f"unknown analyses {unknown} in eval=[...] (cfg.eval); available: {available_analyses()}")
    return chosen


def evaluate_model(path: str | Path, analyses: Mapping[str, dict], out: Path, cfg: DictConfig) -> dict:
    """Every per-model analysis on the model at ``path``; figures go into ``out``. A failure (of an analysis,
    or of loading the model or its stimuli) is recorded as ``eval/<step>/failed`` and the others go on."""
    metrics: dict = {}
    model = stim = None
    with _recorded(metrics, "model", str(path)):
        model = _load(path, cfg)
    if model is not None:
        with _recorded(metrics, "stimuli", str(path)):
            stim = model_stimuli(model, cfg.get("n_images"), cfg.get("stimuli") or {})
            stim.images = stim.images.to(_device(cfg))
    if stim is None:
        return metrics
    for name, params in analyses.items():
        if name not in PER_MODEL:
            continue
        seed_all(int(cfg.get("seed", 0)))  # each analysis draws the same numbers whatever ran before it
        log.info("%s on %s (%d stimuli: %s)", name, path, len(stim), stim.source)
        with _recorded(metrics, name, str(path)):
            metrics.update(PER_MODEL[name](model, stim, out / name, dict(params or {})))
    return metrics


def _load(path: str | Path, cfg: DictConfig):
    """``load_model`` on the chosen device; a part kept by reference that moved is looked up by content below
    ``paths.predictors_dir``."""
    try:
        search = [p for p in [OmegaConf.select(cfg, "paths.predictors_dir", default=None)] if p]
    except Exception:  # noqa: BLE001 - an unresolvable interpolation: no folder to look in
        search = []
    return load_model(path, map_location=_device(cfg), search=search)


def _runs_below(sweep_dir: Path, unfinished: Mapping[Path, str] | None = None) -> list[Path]:
    """The run folders holding a model.ckpt below ``sweep_dir`` (not the predictors trained on the way); a
    FileNotFoundError listing the ``unfinished`` run folders when there is none."""
    unfinished = unfinished or {}
    runs = sorted(p.parent for p in sweep_dir.rglob("model.ckpt")
                  if not any(part.startswith("predictor_") for part in p.parent.relative_to(sweep_dir).parts))
    if not runs:
        more = "".join(f"\n  {r}: {why}" for r, why in unfinished.items())
        raise FileNotFoundError(f"no run with a model.ckpt below sweep_dir={sweep_dir}"
                                + (f"; {len(unfinished)} run folder(s) without one:{more}" if unfinished else ""))
    return runs


def model_file(path: str, key: str = "ckpt") -> str:
    """The checkpoint a ``ckpt=`` / ``models=`` entry names, absolute (a relative path is the caller's folder's, see
    :func:`neuroguide.command_line.caller_path`): a file as given; a run folder by its ``model.ckpt``. A folder
    without one is a FileNotFoundError naming what it holds and the fix."""
    from neuroguide.command_line import caller_path

    p = caller_path(path)
    if not p.is_dir():
        return str(p)
    if (p / "model.ckpt").is_file():
        log.info("%s=%s is a run folder: evaluating its model.ckpt", key, path)
        return str(p / "model.ckpt")
    last = p / "checkpoints" / "last.ckpt"
    hint = (f" It holds {last}: the run has not finished (rerun its train.py command to finish it), or evaluate "
            f"that checkpoint with {key}={last}" if last.is_file() else "")
    raise FileNotFoundError(f"{key}={path} is a folder ({p}) without a model.ckpt: expected a checkpoint file, a run's "
                            f"model.ckpt or a predictor's .ckpt (e.g. {key}={p / 'model.ckpt'}).{hint}")


def run(cfg: DictConfig) -> dict:
    """Run the chosen analyses in the chosen mode; writes metrics.json, config.yaml and figures. ``ckpt``,
    ``models`` and ``sweep_dir`` are resolved first (:func:`model_file`; config.yaml holds them absolute)."""
    from neuroguide.command_line import caller_path

    check_seed(cfg.get("seed", 0))
    analyses = _analyses(cfg)
    check_eval_eps(analyses)  # eps units (eval.robustness.eps_linf=[8] is not 8/255) before any model is loaded
    cfg = cfg.copy()
    if cfg.get("ckpt"):
        cfg.ckpt = model_file(cfg.ckpt)
    if cfg.get("models"):
        cfg.models = [model_file(m, "models") for m in cfg.models]
    if cfg.get("sweep_dir"):
        cfg.sweep_dir = str(caller_path(cfg.sweep_dir))
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    modes = [k for k in ("ckpt", "models", "sweep_dir") if cfg.get(k)]
    if analyses and set(analyses) <= set(STANDALONE) and not modes:  # e.g. selection: no trained model needed
        metrics = {}
        for name, params in analyses.items():
            metrics.update(STANDALONE[name](dict(params or {}), out))
        write_json(out / "metrics.json", metrics)
        _log_outputs(out, cfg)
        return metrics
    if len(modes) != 1:
        raise ValueError("give exactly one of ckpt=<path>, models=[<path>,...] or sweep_dir=<dir> "
                         f"(got {modes or 'none'})")
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    metrics: dict = {}
    if cfg.get("ckpt"):
        metrics = evaluate_model(cfg.ckpt, analyses, out, cfg)
    elif cfg.get("models"):
        metrics = evaluate_models([str(m) for m in cfg.models], analyses, out, cfg)
    else:
        metrics = evaluate_sweep(Path(cfg.sweep_dir), analyses, out, cfg)
    write_json(out / "metrics.json", metrics)
    _wandb_summary(cfg, metrics, out)
    _log_outputs(out, cfg)
    failed = failures(metrics)
    if failed:
        raise EvaluationFailed(failed, out / "metrics.json")
    return metrics


def _log_outputs(out: Path, cfg: DictConfig) -> None:
    """The closing block: where metrics.json and the figures are (sweep mode: also each run's eval/ folder)."""
    files = {"metrics": out / "metrics.json", "config": out / "config.yaml", "log": out / "evaluate.log"}
    if cfg.get("sweep_dir"):
        files["per run"] = Path(cfg.sweep_dir)  # <run>/eval/ and <run>/eval_metrics.json
    log_outputs("evaluation folder", out, files, out.rglob("*.png"))


def evaluate_models(paths: list[str], analyses: Mapping[str, dict], out: Path, cfg: DictConfig) -> dict:
    """The analyses on several models, on the stimuli of the first: multi-model analyses on all of them,
    per-model ones on each (keys ``<model>/eval/...``). A model that does not load is recorded as
    ``<model>/eval/model/failed`` and left out; a failed analysis as ``[<model>/]eval/<analysis>/failed``."""
    metrics: dict = {}
    models = {}
    for p in paths:
        key = _short_name(p, paths)
        with _recorded(metrics, "model", p, prefix=f"{key}/"):
            models[key] = _load(p, cfg)
    if not models:
        return metrics
    first = next(iter(models))
    stim = None
    with _recorded(metrics, "stimuli", f"{first} (the stimuli of the first model)"):
        stim = model_stimuli(models[first], cfg.get("n_images"), cfg.get("stimuli") or {})
        stim.images = stim.images.to(_device(cfg))
    if stim is None:
        return metrics
    for name, params in analyses.items():
        seed_all(int(cfg.get("seed", 0)))
        if name in MULTI_MODEL:
            with _recorded(metrics, name, f"the models {list(models)}"):
                metrics.update(MULTI_MODEL[name](models, stim, out / name, dict(params or {})))
        elif name in PER_MODEL:
            for key, m in models.items():
                res: dict = {}
                with _recorded(res, name, key):
                    res.update(PER_MODEL[name](m, stim, out / key / name, dict(params or {})))
                metrics.update({f"{key}/{k}": v for k, v in res.items()})
    return metrics


def _short_name(path: str, all_paths: list[str]) -> str:
    """A readable unique name for a checkpoint: its run folder (or file stem)."""
    p = Path(path)
    name = p.parent.name if p.name in ("model.ckpt", "last.ckpt", "best.ckpt") else p.stem
    if sum(1 for q in all_paths if (Path(q).parent.name if Path(q).name == p.name else Path(q).stem) == name) > 1:
        name = f"{p.parent.parent.name}/{name}"
    return name


def evaluate_sweep(sweep_dir: Path, analyses: Mapping[str, dict], out: Path, cfg: DictConfig) -> dict:
    from neuroguide.report import report, robustness_by_region, unfinished_runs

    unfinished = unfinished_runs(sweep_dir, marker="model.ckpt")
    runs = _runs_below(sweep_dir, unfinished)
    metrics = {f"{run_dir.relative_to(sweep_dir)}/eval/model/{FAILED}": f"no model.ckpt: {why}"
               for run_dir, why in unfinished.items()}  # crashed, killed or still running: named, not dropped
    for key, why in metrics.items():
        log.error("%s: %s", key, why)
    per = {k: v for k, v in analyses.items() if k in PER_MODEL}
    from tqdm.auto import tqdm

    for run_dir in tqdm(runs, desc="runs"):
        res = evaluate_model(run_dir / "model.ckpt", per, run_dir / "eval", cfg)  # failures recorded, not raised
        write_json(run_dir / "eval_metrics.json", res)
        metrics.update({f"{run_dir.relative_to(sweep_dir)}/{k}": v for k, v in res.items()})
    multi = {k: v for k, v in analyses.items() if k in MULTI_MODEL and not (k in PER_MODEL and k in PER_RUN_IN_SWEEPS)}
    if multi:
        compared = evaluate_models([str(r / "model.ckpt") for r in runs], multi, out, cfg)
        with _recorded(metrics, "sweep_models", f"the runs below {sweep_dir}"):
            clash = sorted(k for k in compared if k in metrics and compared[k] != metrics[k])
            if clash:  # a registration bug: never let one result silently replace another
                raise KeyError(f"the multi-model analyses {sorted(multi)} would overwrite {len(clash)} per-run results "
                               f"(e.g. {clash[:3]}); kept the per-run ones. Register the analysis with "
                               "@multi_model(name, in_sweeps=False) or key its results by model")
        metrics.update({k: v for k, v in compared.items() if k not in metrics})
    with _recorded(metrics, "report", str(sweep_dir)):
        report(sweep_dir, out)
        robustness_by_region(sweep_dir, out)
    return metrics


def _wandb_summary(cfg: DictConfig, metrics: dict, out: Path) -> None:
    """Final evaluation numbers into a W&B run (offline without a key, never a prompt)."""
    import os

    if os.environ.get("WANDB_MODE") == "disabled" or cfg.get("wandb") is False:
        return
    from neuroguide.loggers import finish_wandb, wandb_mode

    try:
        import wandb

        run = wandb.init(project="neuroguide", group=str(cfg.get("name", "eval")), job_type="evaluate",
                         dir=str(out), mode=wandb_mode(out), config=OmegaConf.to_container(cfg, resolve=True))
    except Exception as e:  # logging must never lose the results already written
        log.warning("W&B run not started: %s", e)
        return
    finish_wandb(run, metrics, out)

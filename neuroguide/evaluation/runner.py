"""``neuroguide.evaluation.runner.run(cfg)``: what ``python evaluate.py`` does.

Three modes, one set of analyses (``eval=[...]``, each configured under ``cfg.eval.<name>``):

- ``ckpt=<path>``: every analysis on one model, on its own evaluation stimuli;
- ``models=[a, b, ...]``: the analyses that compare models (transfer, model-vs-model RSA);
- ``sweep_dir=<dir>``: every run below the folder (each holding ``model.ckpt``); each run gets an
  ``eval_metrics.json`` beside its ``metrics.json``, and the sweep one comparison table and figures.

Results: the evaluation run's ``metrics.json`` (keys ``eval/<analysis>/...``; per model in the multi-model
modes), the W&B summary, and PNG figures in the output folder.

A failing analysis loses nothing: its exception is logged with the traceback and recorded as
``eval/<analysis>/failed = "<ExceptionType>: <message>"`` (``eval/model/failed``, ``eval/stimuli/failed`` when a
model or its stimuli cannot be loaded; prefixed by the model or run in the multi-model modes), the other
analyses, models and runs go on, metrics.json is written with everything that completed, and then
:func:`run` raises :class:`EvaluationFailed` naming every failure (``evaluate.py`` exits with status 1).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Callable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from neuroguide.config import CONF_DIR, output_dir
from neuroguide.evaluation.stimuli import Stimuli, model_stimuli
from neuroguide.logging_setup import log_outputs
from neuroguide.models.checkpoints import load_model
from neuroguide.models.features import device_of
from neuroguide.utils.io import atomic_path, write_json

log = logging.getLogger("neuroguide")

FAILED = "failed"  # last part of the metric key of a failed step: eval/<analysis>/failed


class EvaluationFailed(RuntimeError):
    """Raised by :func:`run` after metrics.json was written: ``failures`` maps each failed step's metric key
    (``.../eval/<analysis>/failed``) to its ``"<ExceptionType>: <message>"``."""

    def __init__(self, failures: Mapping[str, str], metrics_file: Path):
        self.failures = dict(failures)
        self.metrics_file = metrics_file
        lines = "".join(f"\n  {k}: {v}" for k, v in self.failures.items())
        super().__init__(f"{len(self.failures)} evaluation step(s) failed (tracebacks in the log); {metrics_file} "
                         f"holds the results of the others and these failures:{lines}")


def failures(metrics: Mapping) -> dict[str, str]:
    """The failed steps recorded in ``metrics`` (keys ending in ``/failed``)."""
    return {k: v for k, v in metrics.items() if k.rsplit("/", 1)[-1] == FAILED}


@contextlib.contextmanager
def _recorded(metrics: dict, step: str, where: str, prefix: str = ""):
    """Run the block; an exception in it is logged with its traceback and recorded in ``metrics`` as
    ``{prefix}eval/{step}/failed = "<ExceptionType>: <message>"`` (one line), and the caller goes on."""
    try:
        yield
    except Exception as e:
        key = f"{prefix}eval/{step}/{FAILED}"
        log.exception("%s failed (%s): recorded as %s in metrics.json; the other steps go on", step, where, key)
        metrics[key] = " ".join(f"{type(e).__name__}: {e}".split())

# --------------------------------------------------------------------------- per-model analyses
PerModel = Callable[[torch.nn.Module, Stimuli, Path, dict], dict]
PER_MODEL: dict[str, PerModel] = {}
MULTI_MODEL: dict[str, Callable[[dict, Stimuli, Path, dict], dict]] = {}


def per_model(name: str, needs_labels: bool = False):
    """Register a per-model analysis; with ``needs_labels`` it is skipped (with a warning) on stimuli
    without class labels (predictors, IT models)."""

    def deco(fn):
        def run_if_labelled(model, stim, out, p):
            if needs_labels and stim.labels is None:
                log.warning("%s: %s has no class labels (not a classifier): skipped", name, stim.source)
                return {}
            return fn(model, stim, out, p)

        PER_MODEL[name] = run_if_labelled
        return fn

    return deco


def multi_model(name: str):
    def deco(fn):
        MULTI_MODEL[name] = fn
        return fn

    return deco


def _images(stim: Stimuli, n: int | None) -> torch.Tensor:
    return stim.images if not n else stim.images[:n]


@per_model("sensitivity")
def _sensitivity(model, stim, out, p):
    """``n_images`` attacked images (the first of the evaluation stimuli); ``sigma_i`` over
    ``n_sigma_images`` clean images spread over the same held-out split (null: all of it)."""
    from neuroguide.evaluation import sensitivity

    p = dict(p)
    n = p.pop("n_images", None)
    n_sigma = p.pop("n_sigma_images", None)
    if stim.split is not None:  # stimuli of model_stimuli: read the held-out split again, not only the first N
        sigma_images = stim.split(n_sigma).images
    else:
        sigma_images = _images(stim, n_sigma)
    log.info("sensitivity: %d attacked images, sigma_i over %d held-out clean images (%s)", len(_images(stim, n)),
             len(sigma_images), stim.source)
    return sensitivity.evaluate(model, _images(stim, n), out, sigma_images=sigma_images, **p)


@per_model("robustness", needs_labels=True)
def _robustness(model, stim, out, p):
    """``n_images`` (default 1000; null: all) labelled images spread over the model's held-out split, read
    again for this analysis (not only the top-level ``n_images``): accuracies are binomial, so 64 images
    give a standard error of ~0.06, 200 images ~0.03, 1000 ~0.015."""
    from neuroguide.evaluation import robustness

    p = dict(p)
    n = p.pop("n_images", None)
    if str(n).strip().lower() in ("all", "none", "null"):
        n = None
    if stim.split is not None:
        stim = stim.split(int(n) if n else None)
    elif n:
        stim = dataclasses.replace(stim, images=stim.images[:int(n)], labels=stim.labels[:int(n)], responses=None)
    log.info("robustness: %d labelled images (%s)", len(stim.labels), stim.source)
    return robustness.evaluate(model, stim.images, stim.labels, out, **p)


@multi_model("transfer")
def _transfer(models, stim, out, p):
    from neuroguide.evaluation import transfer

    return transfer.evaluate(models, stim.images, stim.labels, out, **p)


def neural_reference(model, params: dict, cfg_n: int | None) -> tuple[torch.Tensor, dict]:
    """Images and measured responses to compare a model with: NSD test images with the voxels of
    ``params['regions']`` (default: the model's own region), or an IT model's test sites."""
    from neuroguide.evaluation.stimuli import STIMULI, nsd_stimuli

    info = model.neuroguide_info
    regions = params.pop("regions", None)
    n = params.pop("n_images", None) or cfg_n
    device = device_of(model)
    if info["task_name"] == "it_encoding" and not regions:
        st = STIMULI["it_encoding"](info["run_config"], info["facts"], n, {})
        return st.images.to(device), {"IT": st.responses}
    st = nsd_stimuli(info["run_config"], info["facts"], n, params.pop("stimuli", {}) or {}, regions)
    return st.images.to(device), st.region_responses


@per_model("rsa")
def _rsa(model, stim, out, p):
    from neuroguide.evaluation import rsa

    p.pop("layer", None)  # the model-vs-model layer
    images, responses = neural_reference(model, p, len(stim))
    return rsa.evaluate(model, images, out, responses=responses, **p)


@per_model("cka")
def _cka(model, stim, out, p):
    from neuroguide.evaluation import cka

    p.pop("layer", None)
    images, responses = neural_reference(model, p, len(stim))
    return cka.evaluate(model, images, out, responses=responses, **p)


@per_model("shape_bias", needs_labels=True)
def _shape_bias(model, stim, out, p):
    from neuroguide.evaluation import shape_bias

    return shape_bias.evaluate(model, out, images=stim.images, labels=stim.labels, **p)


@per_model("smoothness", needs_labels=True)
def _smoothness(model, stim, out, p):
    from neuroguide.evaluation import smoothness

    return smoothness.evaluate(model, stim.images, stim.labels, out, **p)


@multi_model("rsa")
def _rsa_models(models, stim, out, p):
    from neuroguide.evaluation import rsa

    p = dict(p)
    p.pop("regions", None), p.pop("n_images", None), p.pop("layers", None)
    return rsa.evaluate_models(models, stim.images, out, **p)


@multi_model("cka")
def _cka_models(models, stim, out, p):
    from neuroguide.evaluation import cka

    p = dict(p)
    p.pop("regions", None), p.pop("n_images", None), p.pop("layers", None)
    return cka.evaluate_models(models, stim.images, out, **p)


@per_model("subspace")
def _subspace(model, stim, out, p):
    """The spectrum of J^T J at the first ``n_images`` stimuli (McNeal & Murty's perturbation subspaces)."""
    from neuroguide.evaluation import subspace

    return subspace.evaluate(model, stim.images, out, **p)


@multi_model("subspace")
def _subspace_models(models, stim, out, p):
    """Model x model similarity of perturbation subspaces on the stimuli of the first model."""
    from neuroguide.evaluation import subspace

    return subspace.evaluate_models(models, stim.images, out, **p)


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
            f"{sorted(MULTI_MODEL)}, 'selection' (backbones x layers, no trained model); config files in "
            f"{CONF_DIR / 'eval'}: {files} (e.g. eval=[sensitivity_guo2022] is the sensitivity analysis with "
            "another budget)")


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
    known = set(PER_MODEL) | set(MULTI_MODEL) | {"selection"}
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
        model = load_model(path, map_location=_device(cfg))
    if model is not None:
        with _recorded(metrics, "stimuli", str(path)):
            stim = model_stimuli(model, cfg.get("n_images"), cfg.get("stimuli") or {})
            stim.images = stim.images.to(_device(cfg))
    if stim is None:
        return metrics
    for name, params in analyses.items():
        if name not in PER_MODEL:
            continue
        log.info("%s on %s (%d stimuli: %s)", name, path, len(stim), stim.source)
        with _recorded(metrics, name, str(path)):
            metrics.update(PER_MODEL[name](model, stim, out / name, dict(params or {})))
    return metrics


def _runs_below(sweep_dir: Path) -> list[Path]:
    runs = sorted(p.parent for p in sweep_dir.rglob("model.ckpt")
                  if not any(part.startswith("predictor_") for part in p.parent.relative_to(sweep_dir).parts))
    if not runs:
        raise FileNotFoundError(f"no run with a model.ckpt below sweep_dir={sweep_dir}")
    return runs


def run(cfg: DictConfig) -> dict:
    """Run the chosen analyses in the chosen mode; writes metrics.json, config.yaml and figures."""
    analyses = _analyses(cfg)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    modes = [k for k in ("ckpt", "models", "sweep_dir") if cfg.get(k)]
    if set(analyses) == {"selection"} and not modes:  # backbones x layers; no trained model needed
        from neuroguide.evaluation.selection import run_selection

        res = run_selection({**analyses["selection"], "out_dir": str(out)})
        metrics = {f"eval/selection/{r['at_eps']}/{r['layer']}/{k}": v for r in res["rows"] for k, v in r.items()
                   if isinstance(v, float)}
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
            models[key] = load_model(p, map_location=_device(cfg))
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
    from neuroguide.report import report, robustness_by_region

    runs = _runs_below(sweep_dir)
    metrics = {}
    per = {k: v for k, v in analyses.items() if k in PER_MODEL}
    from tqdm.auto import tqdm

    for run_dir in tqdm(runs, desc="runs"):
        res = evaluate_model(run_dir / "model.ckpt", per, run_dir / "eval", cfg)  # failures recorded, not raised
        write_json(run_dir / "eval_metrics.json", res)
        metrics.update({f"{run_dir.relative_to(sweep_dir)}/{k}": v for k, v in res.items()})
    multi = {k: v for k, v in analyses.items() if k in MULTI_MODEL}
    if multi:
        metrics.update(evaluate_models([str(r / "model.ckpt") for r in runs], multi, out, cfg))
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
                         dir=str(out), mode=wandb_mode(), config=OmegaConf.to_container(cfg, resolve=True))
    except Exception as e:  # logging must never lose the results already written
        log.warning("W&B run not started: %s", e)
        return
    finish_wandb(run, metrics, out)

"""The registry of ``evaluate.py``'s analyses, and how a failing one is recorded.

An analysis registers itself, in its package's ``__init__`` (``neuroguide/evaluation/analyses/<name>/``), with
``@per_model("<name>")`` (``fn(model, stimuli, out_dir, params) -> metrics``, run on each model),
``@multi_model("<name>")`` (``fn({name: model}, stimuli, out_dir, params) -> metrics``, run once on all models of
``models=`` / ``sweep_dir=`` mode) or ``@standalone("<name>")`` (``fn(params, out_dir) -> metrics``, needing no trained
model, e.g. ``selection``: backbones x layers); ``params`` is ``cfg.eval.<name>`` (``conf/eval/<name>.yaml``).
:func:`registered` imports every analysis package and lists the names; the modes are in
:mod:`neuroguide.evaluation.runner`.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Mapping

import torch

from neuroguide.evaluation.stimuli import Stimuli

log = logging.getLogger("neuroguide")

FAILED = "failed"  # last part of the metric key of a failed step: eval/<analysis>/failed


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


# multi-model analyses that add nothing in sweep_dir= mode beyond the per-run results (each run's own, on its own
# stimuli): sweep mode runs only their per-model part, whose keys the multi-model part would otherwise overwrite
PER_RUN_IN_SWEEPS: set[str] = set()


def multi_model(name: str, in_sweeps: bool = True):
    """Register a multi-model analysis; ``in_sweeps=False``: in ``sweep_dir=`` mode only its per-model part runs
    (e.g. control, whose multi-model part only draws every model's curve in one figure)."""

    def deco(fn):
        MULTI_MODEL[name] = fn
        if not in_sweeps:
            PER_RUN_IN_SWEEPS.add(name)
        return fn

    return deco


STANDALONE: dict[str, Callable[[dict, Path], dict]] = {}


def standalone(name: str):
    """Register an analysis that needs no trained model (``python evaluate.py eval=[<name>]`` without ``ckpt=``)."""

    def deco(fn):
        STANDALONE[name] = fn
        return fn

    return deco


def registered() -> set[str]:
    """The names of every registered analysis (imports every package of :mod:`neuroguide.evaluation.analyses`)."""
    from neuroguide.evaluation.analyses import import_all

    import_all()
    return set(PER_MODEL) | set(MULTI_MODEL) | set(STANDALONE)


def _images(stim: Stimuli, n: int | None) -> torch.Tensor:
    return stim.images if not n else stim.images[:n]

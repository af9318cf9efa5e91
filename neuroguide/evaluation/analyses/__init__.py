"""The analyses of ``evaluate.py``, one package each (``eval=[<name>]``, configured by ``conf/eval/<name>.yaml``).

Each package registers itself in its ``__init__`` with :func:`neuroguide.evaluation.registry.per_model`,
:func:`~neuroguide.evaluation.registry.multi_model` or :func:`~neuroguide.evaluation.registry.standalone`, beside the
code it runs; :func:`import_all` imports every package so that the registry holds all of them (no hand-kept list).
An analysis imports the shared math (:mod:`neuroguide.evaluation.metrics`), the attack engine
(:mod:`neuroguide.attacks`), the models and the evaluation's infrastructure (registry, stimuli, responses, plots,
checks); it never imports the runner, nor another analysis' modules (only a package's public names).
"""
from __future__ import annotations

import importlib
import pkgutil


def import_all() -> list[str]:
    """Import every analysis package (each registers itself); returns their names."""
    names = sorted(info.name for info in pkgutil.iter_modules(__path__) if info.ispkg)
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names

"""Tasks (LightningModules) and their registry: ``@register_task("predictor", kind=ModelKind(...))`` on the class is
all a task needs; :func:`get_task` imports the modules of this package to find it, :func:`model_kind` its entry of the
table of model kinds (:mod:`neuroguide.tasks.kinds`)."""
from __future__ import annotations

import importlib
import pkgutil

from neuroguide.tasks.kinds import ModelKind

_TASKS: dict[str, type] = {}


def register_task(name: str, kind: ModelKind):
    """Register a task class under ``name``, the name of the kind of model it trains, described by ``kind``."""

    def deco(cls):
        if name in _TASKS and _TASKS[name] is not cls:
            raise KeyError(f"task {name!r} is registered twice ({_TASKS[name].__module__} and {cls.__module__})")
        if not isinstance(kind, ModelKind):
            raise TypeError(f"register_task({name!r}, kind=...): expected a ModelKind, got {kind!r}")
        cls.task_name = name
        cls.kind = kind
        _TASKS[name] = cls
        return cls

    return deco


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def task_names() -> list[str]:
    _import_all()
    return sorted(_TASKS)


def get_task(name: str) -> type:
    if name not in _TASKS:
        _import_all()
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r} (config key task.name, chosen with task=<name>); "
                       f"known tasks: {sorted(_TASKS)}")
    return _TASKS[name]


def model_kind(name: str | None) -> ModelKind:
    """The table entry of kind ``name`` (a checkpoint's ``model_kind`` or a run's ``task.name``); a KeyError listing
    the known kinds otherwise."""
    return get_task(str(name)).kind

"""Tasks (LightningModules) and their registry: ``@register_task("predictor")`` on the class is all
a task needs; :func:`get_task` imports the modules of this package to find it."""
from __future__ import annotations

import importlib
import pkgutil

_TASKS: dict[str, type] = {}


def register_task(name: str):
    def deco(cls):
        if name in _TASKS and _TASKS[name] is not cls:
            raise KeyError(f"task {name!r} is registered twice ({_TASKS[name].__module__} and {cls.__module__})")
        cls.task_name = name
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

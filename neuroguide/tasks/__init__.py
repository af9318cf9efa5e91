"""Tasks (LightningModules) and their registry: ``@register_task("predictor")``."""
from __future__ import annotations

import importlib

_TASKS: dict[str, type] = {}
# task name -> module that defines it (imported lazily by get_task)
_MODULES = {
    "predictor": "neuroguide.tasks.predictor",
    "guidance": "neuroguide.tasks.guidance",
    "it_encoding": "neuroguide.tasks.it_encoding",
}


def register_task(name: str):
    def deco(cls):
        cls.task_name = name
        _TASKS[name] = cls
        return cls

    return deco


def get_task(name: str) -> type:
    if name not in _TASKS and name in _MODULES:
        importlib.import_module(_MODULES[name])
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(set(_MODULES) | set(_TASKS))}")
    return _TASKS[name]

"""The registry of model builders, keyed by model kind (as timm keys models by architecture).

A builder is a function ``(**model_config) -> nn.Module`` registered with ``@register_model(kind)``
in the module that defines the network (``models/resnet.py``: ``predictor``; ``models/dual_head.py``:
``guidance``; ``models/it_encoding.py``: ``it_encoding``). A checkpoint's ``model_config`` holds
exactly the builder's arguments, so :func:`neuroguide.models.checkpoints.load_model` rebuilds any
model without Hydra, the data or the task that trained it.

Files written before this split carried run facts (region, subject, alpha, at_eps, ...) inside
``model_config``; :func:`split_model_config` separates them again by the builder's signature (plus an
optional ``upgrade`` hook per kind for renamed arguments).
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, Callable

from torch import nn

Builder = Callable[..., nn.Module]
_BUILDERS: dict[str, Builder] = {}
_UPGRADES: dict[str, Callable[[dict], tuple[dict, dict]]] = {}


def register_model(kind: str, upgrade: Callable[[dict], tuple[dict, dict]] | None = None):
    """Decorator: register ``fn(**model_config) -> nn.Module`` as the builder of ``kind``.

    ``upgrade(old_model_config) -> (model_config, facts)``: how a model_config written before the
    builder's current signature maps to it (default: keep the builder's arguments, the rest are facts).
    """

    def deco(fn: Builder) -> Builder:
        if kind in _BUILDERS and _BUILDERS[kind] is not fn:
            raise KeyError(f"model kind {kind!r} is registered twice ({_BUILDERS[kind].__module__} and {fn.__module__})")
        _BUILDERS[kind] = fn
        if upgrade is not None:
            _UPGRADES[kind] = upgrade
        return fn

    return deco


def _import_all() -> None:
    """Import every module of ``neuroguide.models`` so that their decorators have run."""
    import neuroguide.models as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")


def model_kinds() -> list[str]:
    _import_all()
    return sorted(_BUILDERS)


def model_builder(kind: str) -> Builder:
    """The builder registered for ``kind``; a KeyError listing the known kinds otherwise."""
    if kind not in _BUILDERS:
        _import_all()
    if kind not in _BUILDERS:
        raise KeyError(f"unknown model kind {kind!r}; known kinds: {sorted(_BUILDERS)}. A checkpoint's "
                       "hyper_parameters.model_kind (or task_name) names the kind")
    return _BUILDERS[kind]


def build_model(kind: str, **model_config: Any) -> nn.Module:
    """A freshly initialised network of ``kind`` (weights come from a checkpoint's state dict)."""
    builder = model_builder(kind)
    unknown = set(model_config) - builder_arguments(kind)
    if unknown and not _takes_var_kwargs(builder):
        raise TypeError(f"model kind {kind!r} takes {sorted(builder_arguments(kind))}; got unknown "
                        f"model_config keys {sorted(unknown)} (run facts such as region or alpha belong in 'facts')")
    return builder(**model_config)


def builder_arguments(kind: str) -> set[str]:
    params = inspect.signature(model_builder(kind)).parameters.values()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _takes_var_kwargs(fn: Callable) -> bool:
    return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def split_model_config(kind: str, model_config: dict) -> tuple[dict, dict]:
    """(builder arguments, run facts) of a model_config that may predate the split (see module doc)."""
    model_builder(kind)  # imports the builders (and their upgrade hooks)
    if kind in _UPGRADES:
        return _UPGRADES[kind](dict(model_config))
    args = builder_arguments(kind)
    return ({k: v for k, v in model_config.items() if k in args},
            {k: v for k, v in model_config.items() if k not in args})

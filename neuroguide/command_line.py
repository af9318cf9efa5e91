"""The command line of ``train.py`` / ``evaluate.py``: Hydra's record of it, its ``+`` keys checked against what the
project reads, paths resolved against the caller's folder, and commands printed back.

``+key=value`` adds a key that the composed config lacks. Hydra accepts any key that way, so a typo
(``+task.max_epoch=1``, which Hydra itself suggests after ``task.max_epoch=1``) would be silently ignored.
:func:`check_added_keys` lets a ``+`` key through only when something reads it:

- a key of the config *schema*: of ``conf/train.yaml`` or of any option of its groups, at its package
  (:func:`schema_keys`), e.g. ``+backbone.source=timm`` (a key of other ``conf/backbone/*.yaml``);
- an argument of the object a config node builds (a node with ``_target_``): ``+trainer.<any lightning.Trainer
  argument>`` (``+trainer.fast_dev_run=true``, ``+trainer.limit_train_batches=2``), ``+task.datamodule.unreadable``
  (an argument of the datamodule class), ``+callbacks.model_checkpoint.<argument>``;
- an entry of an open map, a node that is ``{}`` in its config file (``+paths.robust_weights.2=<file>``).

Anything else is refused, naming the nearest valid key (:func:`difflib.get_close_matches`).
"""
from __future__ import annotations

import difflib
import functools
import inspect
import os
import shlex
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf

from neuroguide.config import CONF_DIR

# the groups of train.py's config (conf/<group>/*.yaml); eval/ and hydra/ belong to evaluate.py and Hydra
TRAIN_GROUPS = ("paths", "data", "region", "task", "trainer", "logger", "callbacks", "experiment", "backbone",
                "datamodule")
# each entry point's config (conf/<app>.yaml) and the groups it composes (hydra/: Hydra's own keys, Hydra's checks)
APP_GROUPS = {"train": TRAIN_GROUPS, "evaluate": ("paths", "eval", "experiment"), "closed_loop": ("paths",)}


def command_overrides() -> list[str] | None:
    """The overrides of the command being run, as Hydra records them (``hydra.overrides.task``); None outside a
    Hydra app (a config composed from Python)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return [str(o) for o in HydraConfig.get().overrides.task]


def caller_path(path: str | os.PathLike) -> Path:
    """``path`` made absolute against the folder the command was started in (``~`` expanded). Hydra keeps the
    working folder (``hydra.job.chdir: false``); with ``hydra.job.chdir=true`` the caller's is Hydra's original one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    p = Path(str(path)).expanduser()
    if p.is_absolute():
        return p
    return (Path(get_original_cwd()) if HydraConfig.initialized() else Path.cwd()) / p


def shell_command(words: Iterable[str]) -> str:
    """The words as one shell command line, each quoted where the shell needs it (a path with spaces)."""
    return " ".join(w if w.startswith("python ") else shlex.quote(w) for w in words)


def _flat_keys(node, prefix: str = "") -> dict[str, object]:
    """Every dotted key of a container (dicts and their leaves), with its value."""
    out: dict[str, object] = {}
    for k, v in node.items():
        key = f"{prefix}{k}"
        out[key] = v
        if isinstance(v, dict):
            out.update(_flat_keys(v, key + "."))
    return out


@functools.lru_cache(maxsize=None)
def schema_keys(app: str = "train") -> dict[str, object]:
    """An entry point's config schema: every dotted key of ``conf/<app>.yaml`` and of every option of its groups
    (:data:`APP_GROUPS`; train: :data:`TRAIN_GROUPS`), each at the package it is mounted at (its group; ``# @package _global_``; a defaults
    entry ``/datamodule@datamodule`` of a task file: ``task.datamodule``), with its raw value. Read from the files
    (tens of milliseconds), not composed, so every option counts whether or not the command chose it."""
    import yaml

    def package(f: Path) -> str:
        first = f.read_text().lstrip().splitlines()[:1]
        if first and first[0].startswith("# @package"):
            p = first[0].split(None, 2)[2].strip()
            return "" if p == "_global_" else p
        return "" if f.parent == CONF_DIR else f.parent.name

    groups = APP_GROUPS[app]
    files = [CONF_DIR / f"{app}.yaml"] + [f for g in groups for f in sorted((CONF_DIR / g).glob("*.yaml"))]
    top = {next(iter(e)) for e in yaml.safe_load((CONF_DIR / f"{app}.yaml").read_text())["defaults"]
           if isinstance(e, dict)}
    mounts: dict[str, set[str]] = {g: {g} for g in groups if g in top}  # the others: where files mount them
    bodies = {}
    for f in files:
        body = yaml.safe_load(f.read_text()) or {}
        for entry in body.pop("defaults", None) or []:  # /group@package: option
            key = next(iter(entry)) if isinstance(entry, dict) else ""
            if key.startswith("/") and "@" in key:
                group, pkg = key[1:].split("@", 1)
                pkg = pkg[len("_global_."):] if pkg.startswith("_global_.") else ".".join(x for x in (package(f), pkg) if x)
                mounts.setdefault(group, set()).add(pkg)
        bodies[f] = body
    keys: dict[str, object] = {}
    for f, body in bodies.items():
        for mount in ({""} if f.parent == CONF_DIR else mounts.get(f.parent.name, {package(f)})):
            prefix = package(f) if package(f) != f.parent.name else mount
            keys.update(_flat_keys(body, f"{prefix}." if prefix else ""))
    return keys


def _target_arguments(target: str) -> tuple[set[str], bool]:
    """(argument names, whether it takes ``**kwargs``) of the callable a ``_target_`` names."""
    from hydra.utils import get_method

    try:
        fn = get_method(target)
    except Exception:  # not importable here: its own instantiation reports that
        return set(), True
    sig = inspect.signature(fn.__init__ if inspect.isclass(fn) else fn)
    params = sig.parameters.values()
    return ({p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"},
            any(p.kind is p.VAR_KEYWORD for p in params))


def offered(key: str, cfg: DictConfig, app: str = "train") -> tuple[bool, list[str]]:
    """Whether something reads the added dotted ``key`` of the config ``cfg`` of ``conf/<app>.yaml`` (the rules of
    the module docstring), and the keys to suggest near it."""
    parts = key.split(".")
    candidates: set[str] = set()
    for i in range(1, len(parts)):  # an argument of an object the config builds
        parent = ".".join(parts[:i])
        node = OmegaConf.select(cfg, parent, default=None, throw_on_missing=False)
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        if target is not None:
            args, any_kwargs = _target_arguments(str(target))
            if parts[i] in args or any_kwargs:
                return True, []
            candidates |= {f"{parent}.{a}" for a in args}
    schema = schema_keys(app)
    if key in schema or any(schema.get(".".join(parts[:i])) == {} for i in range(1, len(parts))):  # or an open map
        return True, []
    return False, difflib.get_close_matches(key, sorted(candidates | set(schema)), n=3, cutoff=0.8)


def check_added_keys(overrides: Iterable[str] | None, cfg: DictConfig, app: str = "train") -> None:
    """Refuse the ``+key=value`` (and ``++key=value``) overrides of ``<app>.py``'s command line whose key nothing reads
    (ValueError naming the key, the nearest valid ones and the fix); config group additions (``+experiment=...``)
    and Hydra's own keys (``+hydra.*``) are Hydra's."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    added = []
    for o in OverridesParser.create().parse_overrides([str(x) for x in overrides or []]):
        if ((o.is_add() or o.is_force_add()) and not (CONF_DIR / o.key_or_group).is_dir() and o.package is None
                and not o.key_or_group.startswith("hydra.")):
            added.append(o)
    if not added:
        return
    for o in added:
        ok, near = offered(o.key_or_group, cfg, app)
        if ok:
            continue
        value = o.input_line.split("=", 1)[1] if o.input_line and "=" in o.input_line else ""
        if near:  # a key the composed config has is set without '+'
            has = OmegaConf.select(cfg, near[0], default="__absent__", throw_on_missing=False) != "__absent__"
            fix = f"Did you mean {near[0]}? Fix: {'' if has else '+'}{near[0]}={value}" + (
                f" (also near: {', '.join(near[1:])})" if near[1:] else "") + ". "
        else:
            fix = f"Fix: check its spelling against the composed config (python {app}.py --cfg job). "
        raise ValueError(
            f"{o.input_line}: nothing reads the key {o.key_or_group} (no config file of {CONF_DIR} has it, and no "
            f"object built from the config takes it), so the run would silently ignore it. {fix}"
            "'+' adds only keys of another option of a config group (+backbone.source=timm), arguments of an object "
            "the config builds (+trainer.<lightning.Trainer argument>) and entries of an open map "
            "(+paths.robust_weights.2=<file>)")

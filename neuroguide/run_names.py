"""Run folder names: the run's scientific factors, readable, plus a short hash of every other override.

``python train.py region=TO alpha=0.5``           -> ``outputs/guidance/region-TO_alpha-0.5_eps-0``
``python train.py task=predictor region=V1 seed=1`` -> ``outputs/predictor/task-predictor_region-V1_seed-1``
``... task.lr=0.01 paths.data_dir=/d``             -> ``..._cfg-3f2a9c1e`` (8 hex digits of those overrides)
``python evaluate.py ckpt=<run>/model.ckpt eval=[rsa,cka]`` -> ``outputs/eval/ckpt-<run>_eval-rsa+cka_cfg-...``

Rules (one place, used by ``conf/hydra/{default,evaluate}.yaml`` through the ``ng_run_name`` resolver):

* The task's core factors are always named, with the values of the composed config (so ``alpha=.5`` and
  ``alpha=0.5`` name the same folder): guidance region, alpha, eps (at.eps); predictor region;
  it_encoding backbone, bb.eps (backbone.at_eps), layer; encoding region (``task.regions`` when given, e.g.
  ``regions-FFA+EBA+PPA``), backbone, layer; evaluate.py the analyses (eval). A backbone chosen by its config (``backbone=resnet50_l2_eps1``) is named by that option.
* The other named factors (task, norm when not l2, shuffle, seed, subject, experiment, ckpt, models,
  sweep_dir) are named when given on the command line. Paths never enter the name: a checkpoint is named
  by its run folder (``ckpt-region-TO_alpha-0.5_eps-0``), several models by their count.
* Every other override (``task.lr=0.01``, ``data.image_size=32``, paths, and the full text of ckpt / models /
  sweep_dir) goes into an 8-digit hash suffix ``cfg-<hash>``: two different commands never share a folder
  by accident, and the same command always finds its folder again (auto-resume).
* Overrides that are not the run's identity (:data:`NOT_IDENTITY`: where and how it runs, and how long) are left
  out, so that rerunning a command with them changed finds its folder and resumes or extends it: ``hydra.*``,
  ``logger``, ``resume``, ``keep_checkpoints``, ``paths.log_dir``, ``paths.cache_dir``, ``task.max_epochs``, worker
  counts, the machine's trainer settings (``trainer=gpu``, ``trainer.devices``, ``trainer.precision``, ...; see
  :data:`NOT_IDENTITY`), plus ``hydra.job.config.override_dirname.exclude_keys``.
* A smoke run, one whose trainer cuts training or evaluation short (:data:`SMOKE_KEYS`: ``trainer.fast_dev_run``,
  ``limit_*_batches``, ``max_steps``, ``max_time``, ``overfit_batches``, read from the composed config), gets its
  own folder, named ``..._smoke-fast_dev_run`` or ``..._smoke-limit_train_batches-2`` (those keys are named,
  not hashed): it can never be taken for the real run of its command (:func:`smoke_settings`).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import PurePath
from typing import Any, Iterable

# (override key, label in the name, where the value comes from: a config path, or None = the override's value)
FACTORS: tuple[tuple[str, str, str | None], ...] = (
    ("task", "task", "task.name"),
    ("region", "region", "region.name"),
    ("task.regions", "regions", "task.regions"),
    ("alpha", "alpha", "alpha"),
    ("at.eps", "eps", "at.eps"),
    ("at.norm", "norm", "at.norm"),
    ("predictor.shuffle", "shuffle", "predictor.shuffle"),
    ("seed", "seed", "seed"),
    ("subject", "subject", "subject"),
    ("backbone", "backbone", "backbone.name"),
    ("backbone.at_eps", "bb.eps", "backbone.at_eps"),
    ("backbone.layer", "layer", "backbone.layer"),
    ("experiment", "experiment", None),
    ("ckpt", "ckpt", None),
    ("models", "models", None),
    ("sweep_dir", "sweep", None),
    ("eval", "eval", None),
)


def core_factors(task) -> tuple[str, ...]:
    """The factors named even when not overridden (the composed config's values): the task's
    ``ModelKind.name_factors`` (:mod:`neuroguide.tasks.kinds`); none for evaluate.py (no task)."""
    if task is None:
        return ()
    from neuroguide.tasks import model_kind

    try:
        return model_kind(str(task)).name_factors
    except KeyError:  # an unknown task: train.py refuses it with the list of tasks; here the name stays plain
        return ()


# config groups named by the option chosen on the command line (backbone=resnet50_l2_eps1: several options
# share backbone.name resnet50), else by the config's value
GROUPS = ("backbone",)
# factors whose override text is a path: named by a short label, their full text goes into the hash
PATHS = ("ckpt", "models", "sweep_dir")
# Not a run's identity: never in the folder name nor its hash, and free to change when the run is resumed or
# extended (neuroguide.train compares everything else with the run's config.yaml / last.ckpt): where and how it
# runs and for how long. A key here also covers the keys below it (logger.wandb.project); "trainer" is the group
# choice (trainer=gpu), not the trainer's keys, of which only the machine's are listed. Numerics may differ in the
# last digits with another precision or device count, the science does not.
NOT_IDENTITY = ("hydra", "logger", "resume", "keep_checkpoints", "paths.log_dir", "paths.cache_dir", "paths.output_dir",
                "task.max_epochs", "trainer.max_epochs", "data.num_workers", "data.read_workers",
                "task.datamodule.num_workers", "task.datamodule.read_workers", "callbacks.progress_bar",
                "callbacks.last_checkpoint", "callbacks.model_checkpoint.dirpath", "callbacks.model_checkpoint.save_last",
                "trainer", "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
                "trainer.precision", "trainer.sync_batchnorm", "trainer.deterministic", "trainer.benchmark",
                "trainer.plugins", "trainer.log_every_n_steps", "trainer.enable_progress_bar",
                "trainer.enable_model_summary", "trainer.num_sanity_val_steps", "trainer.profiler",
                "trainer.detect_anomaly", "trainer.default_root_dir")
GROUP_ONLY = ("trainer",)  # entries of NOT_IDENTITY that are a group choice only, not a prefix of keys
# In the folder name (paths say which data and weights a run reads) but free to change when a folder's run is
# resumed: the data moved (rerun with hydra.run.dir=<its folder> and the new paths).
MAY_MOVE = ("paths",)
# Lightning trainer keys that cut training or evaluation short, with the value that does not (None: unset)
SMOKE_KEYS = {"fast_dev_run": False, "limit_train_batches": 1.0, "limit_val_batches": 1.0,
              "limit_test_batches": 1.0, "max_steps": -1, "max_time": None, "overfit_batches": 0.0}
DEFAULTS_HIDDEN = {"at.norm": "l2"}  # named only when not this value
REPLACES = {"task.regions": "region"}  # set (given or by an experiment), names the run in place of that one
MAX_LEN = 120


def listed(key: str, names: Iterable[str]) -> bool:
    """Whether the dotted ``key`` is one of ``names`` or below one of them (a :data:`GROUP_ONLY` name: itself only)."""
    return any(key == n or (n not in GROUP_ONLY and key.startswith(n + ".")) for n in names)


def smoke_settings(trainer: Any) -> dict[str, Any]:
    """The :data:`SMOKE_KEYS` that ``trainer`` (the composed ``cfg.trainer``, or a dict of trainer overrides) sets
    to a value that cuts training or evaluation short, in :data:`SMOKE_KEYS` order; empty for a full run.

    Lightning's meanings: ``fast_dev_run`` true or N (batches); ``limit_*_batches`` an int is a number of batches
    (``1`` is one batch, ``1.0`` all of them), a float below 1.0 a fraction; ``max_steps`` other than -1;
    ``max_time`` set; ``overfit_batches`` other than 0."""
    def get(k):
        try:
            return trainer.get(k, None)
        except Exception:  # a missing interpolation target, say: not a smoke setting
            return None

    out = {}
    for key, full in SMOKE_KEYS.items():
        v = get(key)
        if v is None or v == full and isinstance(v, type(full)) or (key == "fast_dev_run" and not v) \
                or (key == "max_steps" and v == -1) or (key == "overfit_batches" and v == 0):
            continue
        out[key] = v
    return out


def smoke_label(settings: dict[str, Any]) -> str:
    """``smoke-fast_dev_run``, ``smoke-limit_train_batches-2+max_steps-5``: the folder suffix of a smoke run."""
    return "smoke-" + "+".join(k if v is True else f"{k}-{_fmt(v)}" for k, v in settings.items())


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower()
    if isinstance(v, float):
        return format(v, ".10g")
    if isinstance(v, (list, tuple)):
        return "+".join(_fmt(x) for x in v)
    return str(v).replace("/", "_")  # at.eps=8/255 -> eps-8_255 (one folder, not two)


def _path_label(key: str, value: Any) -> str:
    """A path override's text in the name: a checkpoint's run folder, a sweep folder's name, a model count."""
    if key == "models":
        return str(len(value)) if isinstance(value, (list, tuple)) else "1"
    p = PurePath(str(value))
    if key == "ckpt" and p.suffix == ".ckpt":
        if p.name in ("model.ckpt", "last.ckpt", "best.ckpt"):
            p = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        else:
            p = p.with_suffix("")  # e.g. predictors/synthetic/subj01/TO.ckpt -> TO
    return p.name or "root"


def run_name(overrides: Iterable[str], config: Any = None, exclude: Iterable[str] = ()) -> str:
    """The run folder name of a command (``overrides`` as Hydra records them in ``hydra.overrides.task``).

    ``config`` (the composed config, an OmegaConf node or dict-like with ``select``) gives the factors' values;
    without it the overrides' own values are used."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    not_named = NOT_IDENTITY + tuple(str(k) for k in exclude)
    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
    given: dict[str, Any] = {}
    hashed: list[str] = []
    smoke_given: dict[str, Any] = {}
    for o in parsed:
        key = o.key_or_group
        if listed(key, not_named) or key.startswith("hydra/"):
            continue
        if key.startswith("trainer.") and key.split(".", 1)[1] in SMOKE_KEYS:  # named below, from the config
            if not o.is_delete():
                smoke_given[key.split(".", 1)[1]] = o.value()
            continue
        if key in {k for k, _, _ in FACTORS} and not o.is_delete():
            given[key] = o.value()
            if key not in PATHS:
                continue
        hashed.append(o.input_line or f"{key}={o.value()}")

    def value(key: str, path: str | None) -> Any:
        if key in GROUPS and key in given:
            return given[key]
        if path is not None and config is not None:
            found = OmegaConf.select(config, path, default="__missing__", throw_on_missing=False)
            if found != "__missing__":
                return OmegaConf.to_container(found, resolve=True) if OmegaConf.is_config(found) else found
        return given.get(key)

    task = value("task", "task.name")
    core = core_factors(task)
    if config is not None and task is None and OmegaConf.select(config, "eval") is not None:  # evaluate.py
        evals = OmegaConf.select(config, "eval")
        given.setdefault("eval", list(evals.keys()) if OmegaConf.is_dict(evals) else evals)
    paths = {key: path for key, _, path in FACTORS}
    set_ = {k for k in REPLACES if value(k, paths[k]) not in (None, [], "")}  # given, or set by an experiment
    replaced = {REPLACES[k] for k in set_}
    parts = []
    for key, label, path in FACTORS:
        if (key not in given and key not in core and key not in set_) or key in replaced:
            continue
        v = value(key, path) if key not in PATHS else _path_label(key, given[key])
        if key in DEFAULTS_HIDDEN and _fmt(v) == DEFAULTS_HIDDEN[key]:
            continue
        parts.append(f"{label}-{_fmt(v)}")
    if hashed:
        parts.append("cfg-" + hashlib.sha1("\n".join(sorted(hashed)).encode()).hexdigest()[:8])
    trainer = OmegaConf.select(config, "trainer") if config is not None else None
    smoke = smoke_settings(trainer if trainer is not None else smoke_given)
    if smoke:
        parts.append(smoke_label(smoke))
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", "_".join(parts)) or "default"
    if len(name) > MAX_LEN:  # very long factor values (e.g. many analyses): cut, and a hash of the whole name
        name = name[:MAX_LEN - 13] + "_h-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name

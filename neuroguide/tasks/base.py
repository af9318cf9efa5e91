"""What every task shares: the checkpoint contract, model export, optimizer and schedule.

A task is a LightningModule whose network is ``self.model``, built by the model registry
(:mod:`neuroguide.models.registry`) from ``model_config`` under the task's name as model kind, and
whose hyper-parameters are plain dicts (``task_name``, ``model_kind``, ``model_config``, ``facts``,
``run_config``), so that ``neuroguide.load_model`` can rebuild it from a weights-only checkpoint.

Optimizer and schedule are the same pattern for every task: ``task.optimizer`` is a Hydra partial
(``_partial_: true``) called on :meth:`Task.param_groups`, ``task.scheduler`` a plain dict
(:func:`neuroguide.tasks.schedules.lr_factor`).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, ClassVar

import lightning as L
import torch
from torch import nn

from neuroguide.models.checkpoints import referenced_state, save_model_file
from neuroguide.models.registry import model_builder
from neuroguide.tasks.schedules import configure_schedule


class Task(L.LightningModule):
    task_name: ClassVar[str] = "task"

    def __init__(self, model_config: dict, run_config: dict | None = None, model: nn.Module | None = None, *,
                 facts: dict | None = None, optimizer: Callable | None = None, scheduler: dict | None = None,
                 references: dict | None = None):
        """``model``: an already built network (e.g. with loaded weights); else built from model_config.
        ``facts``: run facts stored beside the model (region, subject, alpha, ...). ``optimizer``: a
        callable ``params -> torch.optim.Optimizer`` (Hydra partial); ``scheduler``: see module doc.
        ``references``: ``{prefix: {"path", "sha256"}}`` frozen parts of the model whose weights are
        that file's (not stored in this task's checkpoints; see :mod:`neuroguide.models.checkpoints`)."""
        super().__init__()
        # plain dicts (not the caller's frame): what load_model needs, loadable with weights_only=True
        self._set_hparams({"task_name": self.task_name, "model_kind": self.task_name,
                           "model_config": dict(model_config), "facts": dict(facts or {}),
                           "run_config": dict(run_config or {}), "references": dict(references or {})})
        self._hparams_initial = copy.deepcopy(self._hparams)
        self.model = model if model is not None else self.build_model(**model_config)
        self.optimizer_factory, self.scheduler_config = optimizer, dict(scheduler or {})

    @classmethod
    def build_model(cls, *args: Any, **model_config: Any) -> nn.Module:
        """The registered builder of this task's model kind."""
        return model_builder(cls.task_name)(*args, **model_config)

    @classmethod
    def requirements(cls, cfg) -> list:
        """What the pipeline must provide before the task is built (e.g. a trained predictor); see
        :mod:`neuroguide.requirements`."""
        return []

    @classmethod
    def prepare_config(cls, cfg):
        """The run config as the task will use it (e.g. guidance: ``region=none`` forces alpha to 0)."""
        return cfg

    @classmethod
    def check_config(cls, cfg) -> None:
        """Fail early, naming the key, on values this task cannot use."""

    @classmethod
    def from_config(cls, cfg, datamodule) -> "Task":  # pragma: no cover - abstract
        """Build the task from the composed run config and its (set-up) datamodule."""
        raise NotImplementedError

    @classmethod
    def run_configs(cls, cfg) -> list:
        """The runs one command makes, each a full run config with its own ``paths.output_dir``: ``[cfg]`` (the
        encoding task with ``task.regions``: one per region)."""
        return [cfg]

    @classmethod
    def from_configs(cls, cfgs: list, datamodules: list) -> list["Task"]:
        """The tasks of the runs ``cfgs``, their datamodules not yet set up: each datamodule prepared and set up,
        then :meth:`from_config` one by one (a task may build them together, e.g. sharing a fit)."""
        for d in datamodules:
            d.prepare_data()
            d.setup("fit")
        return [cls.from_config(c, d) for c, d in zip(cfgs, datamodules)]

    def forward(self, x):
        return self.model(x)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # plain dicts only, so that weights_only=True loads work
        checkpoint["hyper_parameters"] = {k: v for k, v in dict(self.hparams).items()}
        prefixes = tuple(f"model.{p}" for p in self.hparams.get("references") or {})
        if prefixes:  # parts kept by reference: their weights are the referenced file's
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(prefixes)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resume / best-checkpoint reloads: parts kept by reference come back from their (hash-checked) files."""
        refs = (checkpoint.get("hyper_parameters") or {}).get("references") or {}
        if refs:  # a referenced file that moved is looked up by content below this run's paths.predictors_dir
            search = [((self.hparams.get("run_config") or {}).get("paths") or {}).get("predictors_dir")]
            state = referenced_state(refs, checkpoint.get("neuroguide_path", "the checkpoint being loaded"),
                                     [d for d in search if d])
            checkpoint["state_dict"].update({f"model.{k}": v for k, v in state.items()})

    # ------------------------------------------------------------------ optimizer
    def param_groups(self) -> list:
        """What the optimizer updates: the trainable parameters (tasks may return param groups)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self.param_groups()
        opt = self.optimizer_factory(params) if self.optimizer_factory else torch.optim.Adam(params, lr=1e-3)
        return configure_schedule(opt, self.scheduler_config, self.trainer)

    # ------------------------------------------------------------------ export
    def export(self, path: str | Path, metrics: dict | None = None) -> Path:
        """Write ``self.model`` as a standalone model file loadable by ``neuroguide.load_model``."""
        hp = self.hparams
        return save_model_file(path, hp["model_kind"], dict(hp["model_config"]), self.model.state_dict(),
                               dict(hp.get("run_config") or {}), metrics, facts=dict(hp.get("facts") or {}),
                               task_name=self.task_name, references=dict(hp.get("references") or {}))

    def export_paths(self, cfg) -> list[Path]:
        """Extra places (besides the run folder) where the trained model is exported."""
        return []

"""What every task shares: the checkpoint contract and model export.

A task is a LightningModule whose network is ``self.model`` (built by the static
``build_model(**model_config)``) and whose hyper-parameters are plain dicts, so that
``neuroguide.load_model`` can rebuild it from a weights-only checkpoint.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
from torch import nn

from neuroguide.models.checkpoints import save_model_file


class Task(L.LightningModule):
    task_name: ClassVar[str] = "task"

    def __init__(self, model_config: dict, run_config: dict | None = None, model: nn.Module | None = None):
        """``model``: an already built network (e.g. with loaded frozen parts); else built from model_config."""
        super().__init__()
        # plain dicts (not the caller's frame): what load_model needs, loadable with weights_only=True
        self._set_hparams({"task_name": self.task_name, "model_config": dict(model_config),
                           "run_config": dict(run_config or {})})
        self._hparams_initial = copy.deepcopy(self._hparams)
        self.model = model if model is not None else self.build_model(**model_config)

    @staticmethod
    def build_model(**model_config: Any) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg, datamodule) -> "Task":  # pragma: no cover - abstract
        """Build the task from the composed run config and its (set-up) datamodule."""
        raise NotImplementedError

    def forward(self, x):
        return self.model(x)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # plain dicts only, so that weights_only=True loads work
        checkpoint["hyper_parameters"] = {k: v for k, v in dict(self.hparams).items()}

    def export(self, path: str | Path, metrics: dict | None = None) -> Path:
        """Write ``self.model`` as a standalone model file loadable by ``neuroguide.load_model``."""
        hp = self.hparams
        return save_model_file(path, self.task_name, dict(hp["model_config"]), self.model.state_dict(),
                               dict(hp.get("run_config") or {}), metrics)

    def export_paths(self, cfg) -> list[Path]:
        """Extra places (besides the run folder) where the trained model is exported."""
        return []

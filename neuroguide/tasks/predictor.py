"""Neural predictor (NeuralGuidance): ResNet18 -> one region's voxels (or PCA components).

Loss: squared error summed over outputs, averaged over the batch; Adam (``task.lr`` 1e-3, weight
decay 5e-4). Scores on the validation and test (shared) images, always in voxel space against the measured
(repeat-averaged) voxel responses: per-voxel Pearson r, its median and mean, and r relative to the
noise ceiling, ``r / sqrt(NC / 100)``, over the voxels with ``NC >= nc_threshold`` (percent). With
PCA, predictions are mapped back to voxels first; the component-space r is reported as ``r_pc_*``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from neuroguide.metrics import nanmedian, pearson_r, voxel_score_summary, voxel_scores
from neuroguide.tasks import register_task
from neuroguide.tasks.kinds import ModelKind
from neuroguide.tasks.regression import RegressionTask


@dataclass(frozen=True)
class PredictorRequirement:
    """A task's need for the trained predictor of ``region`` (or its shuffled control) for ``subject``;
    the pipeline (:mod:`neuroguide.requirements`) puts its path into the run config at ``config_key``."""

    region: str
    subject: int
    shuffle: bool = False
    config_key: str = "predictor_path"


def predictor_path(predictors_dir: str | Path, subject: int, region: str, shuffle: bool = False) -> Path:
    """Where the predictor of ``region`` (or its shuffled control) for ``subject`` is stored."""
    name = f"{region}_shuffle" if shuffle else region
    return Path(predictors_dir).expanduser() / f"subj{int(subject):02d}" / f"{name}.ckpt"


KIND = ModelKind(
    stimuli="nsd",
    name_factors=("region",),
    report_factors=("region",),
)


@register_task("predictor", kind=KIND)
class PredictorTask(RegressionTask):
    def __init__(self, model_config: dict, run_config: dict | None = None, *, facts: dict | None = None,
                 optimizer=None, scheduler=None, nc: np.ndarray | None = None, pca_components=None, pca_mean=None,
                 nc_threshold: float = 0.0):
        super().__init__(model_config, run_config, facts=facts, optimizer=optimizer, scheduler=scheduler)
        self.nc_threshold = float(nc_threshold)
        # noise ceiling and PCA back-projection: buffers (not part of the exported model)
        self.register_buffer("nc", torch.tensor(np.asarray(nc if nc is not None else [], np.float32)),
                             persistent=False)
        self.pca_components = None if pca_components is None else torch.tensor(np.array(pca_components))
        self.pca_mean = None if pca_mean is None else torch.tensor(np.array(pca_mean))

    @classmethod
    def from_config(cls, cfg, datamodule) -> "PredictorTask":
        rd = datamodule.region_data
        model_config = {"arch": cfg.task.arch, "n_outputs": int(rd.n_outputs)}
        facts = {"region": cfg.region.name, "subject": int(cfg.subject), "n_voxels": int(rd.n_voxels),
                 "pca": rd.pca_components is not None, "shuffle": bool(cfg.task.shuffle),
                 "image_size": int(cfg.data.image_size)}
        return cls(model_config, OmegaConf.to_container(cfg, resolve=True), facts=facts,
                   optimizer=instantiate(cfg.task.optimizer), scheduler=cfg.task.get("scheduler"), nc=np.asarray(rd.nc),
                   pca_components=rd.pca_components, pca_mean=rd.pca_mean,
                   nc_threshold=float(cfg.data.get("nc_threshold") or 0.0))

    @staticmethod
    def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Squared error summed over outputs, averaged over the batch."""
        return ((pred - target) ** 2).sum(1).mean()

    def objective(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.loss_fn(pred, target)}

    def eval_target(self, voxels: torch.Tensor) -> torch.Tensor:
        # validation and test targets are the measured voxel responses (see the datamodule)
        return self.to_outputs(voxels)

    def to_voxels(self, z: torch.Tensor) -> torch.Tensor:
        """(N, n_outputs) outputs -> (N, V) voxels (PCA back-projection when the outputs are components)."""
        if self.pca_components is None:
            return z
        return z @ self.pca_components.to(z) + self.pca_mean.to(z)

    def to_outputs(self, voxels: torch.Tensor) -> torch.Tensor:
        """(N, V) voxels -> (N, n_outputs) what the model is trained to output (PCA scores when on)."""
        if self.pca_components is None:
            return voxels
        return (voxels - self.pca_mean.to(voxels)) @ self.pca_components.to(voxels).T

    def scores(self, pred: torch.Tensor, voxels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scores of (N, n_outputs) predictions against (N, V) measured voxel responses.

        Returns ``r`` (V,) per-voxel Pearson r of the back-projected predictions; ``r_nc`` (V_kept,)
        ``r / sqrt(NC / 100)`` over the voxels with ``NC >= nc_threshold``; with PCA ``r_pc`` (k,) the
        per-component r against the measured responses' PCA scores.
        """
        out = voxel_scores(self.to_voxels(pred), voxels, self.nc if self.nc.numel() else None, self.nc_threshold)
        if self.pca_components is not None:
            out["r_pc"] = pearson_r(pred, self.to_outputs(voxels))
        return out

    def log_scores(self, split: str, pred: torch.Tensor, target: torch.Tensor) -> None:
        s = self.scores(pred, target)
        for k, v in voxel_score_summary(split, s).items():
            self.log(k, v, prog_bar=k == "val/r_median")
        if "r_pc" in s:
            self.log(f"{split}/r_pc_median", nanmedian(s["r_pc"]))

    def export_paths(self, cfg) -> list[Path]:
        f = self.hparams["facts"]
        return [predictor_path(cfg.paths.predictors_dir, f["subject"], f["region"], f["shuffle"])]

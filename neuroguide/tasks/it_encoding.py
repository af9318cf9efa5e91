"""IT encoding model (Guo et al.): a (robust) backbone cut at a layer + a factorized readout to IT sites.

Model: ``r(x) = FactorizedReadout(Backbone(x))``, the backbone an (adversarially trained) ResNet50
cut at ``layer4.0`` by default, loaded from a local MadryLab-format checkpoint chosen by
``backbone.at_eps`` (``paths.robust_weights``) or ``backbone.weights``. With ``backbone.freeze=true``
the backbone is in eval mode with ``requires_grad=False`` and stays so when Lightning calls
``.train()`` (only the readout learns); with ``freeze=false`` the model is trained end to end (the
backbone with its own learning rate ``backbone_lr``), as on each day of Guo et al.'s closed loop.

Loss: mean squared error over the recorded (image, site) targets (NaN targets are skipped) plus the
readout's L1 penalties ``l1_spatial`` and ``l1_features``. Scores per site on the split's images:
Pearson r, explained variance ``1 - Var(y - y_hat) / Var(y)``, and ``r_corrected = r / sqrt(R)`` (the correction
for attenuation: divided by the square root of ``R``) with ``R`` the split-half reliability of the mean response
on the same images (:func:`neuroguide.data.it.split_half_reliability`: Spearman-Brown generalized to unequal
halves, e.g. 1 and 2 of 3 repeats).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from neuroguide.metrics import nan_pearson_r, nanmedian
from neuroguide.models.checkpoints import read_checkpoint
from neuroguide.models.it_encoding import ITEncodingModel
from neuroguide.models.readouts import masked_mse
from neuroguide.models.robust_weights import load_robust_weights, robust_weights_path
from neuroguide.tasks import register_task
from neuroguide.tasks.kinds import ModelKind
from neuroguide.tasks.regression import RegressionTask

log = logging.getLogger("neuroguide")


def check_sites(n_checkpoint: int, n_data: int, where: str) -> None:
    """A readout of ``n_checkpoint`` sites cannot be trained or scored on data of ``n_data`` sites."""
    if int(n_checkpoint) != int(n_data):
        raise ValueError(f"{where} has a readout for {n_checkpoint} IT sites but the data has {n_data} sites. "
                         "Use a checkpoint trained on the same recording sites (same paths.it_file), or start a "
                         "new readout (task.init_from=null)")


KIND = ModelKind(
    penultimate_layer=None,
    stimuli="it",
    name_factors=("backbone", "backbone.at_eps", "backbone.layer"),
    report_factors=("region", "backbone"),
)


@register_task("it_encoding", kind=KIND)
class ITEncodingTask(RegressionTask):
    val_loss_key = "mse"
    min_scored = 3

    def __init__(self, model_config: dict, run_config: dict | None = None, *, facts: dict | None = None,
                 optimizer=None, scheduler=None, backbone_lr: float = 1e-4, l1_spatial: float = 1.0,
                 l1_features: float = 1.0, reliability: dict | None = None, model: ITEncodingModel | None = None):
        super().__init__(model_config, run_config, model, facts=facts, optimizer=optimizer, scheduler=scheduler)
        self.backbone_lr = float(backbone_lr)
        self.l1_spatial, self.l1_features = float(l1_spatial), float(l1_features)
        self.reliability = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32)
                            for k, v in (reliability or {}).items()}
        self.scores_by_split: dict[str, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ config
    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.task.get("it_file") is None:
            raise FileNotFoundError("task=it_encoding needs IT recordings: set paths.it_file=/path/to/it.h5 (format "
                                    "in neuroguide/data/it.py), or use data=synthetic")

    @classmethod
    def from_config(cls, cfg, datamodule) -> "ITEncodingTask":
        b = cfg.backbone
        model_config = {"backbone": b.name, "layer": b.layer, "n_sites": int(datamodule.n_sites),
                        "image_size": int(datamodule.image_size), "freeze": bool(b.freeze),
                        "positive": bool(cfg.task.get("positive", False))}
        facts = {"at_eps": None if b.get("at_eps") is None else float(b.at_eps), "image_size": int(datamodule.image_size),
                 "site_ids": [str(s) for s in datamodule.site_ids], "it_file": str(datamodule.path)}
        init_from = cfg.task.get("init_from")
        if init_from:  # continue from an earlier IT model (e.g. the previous day's)
            ck = read_checkpoint(init_from, kind="it_encoding")
            check_sites(ck.model_config["n_sites"], datamodule.n_sites, f"task.init_from={init_from}")
            model_config.update({k: ck.model_config[k] for k in ("backbone", "layer", "image_size", "positive")
                                 if k in ck.model_config})
            facts["weights"] = str(init_from)
            model = cls.build_model(**model_config)
            model.load_state_dict(ck.state_dict)
        else:
            weights = robust_weights_path(b.get("at_eps"), cfg.paths.get("robust_weights"), b.get("weights"))
            facts["weights"] = None if weights is None else str(weights)
            model = cls.build_model(**model_config)
            if weights is not None:
                info = load_robust_weights(model.backbone.root, weights)
                log.info("backbone %s: loaded %d tensors from %s", b.name, info["loaded"], weights)
            else:
                log.warning("backbone %s is randomly initialised (backbone.at_eps=null, backbone.weights=null)", b.name)
            model.readout.init_bias(torch.from_numpy(datamodule.train_mean))
        t = cfg.task
        return cls(model_config, OmegaConf.to_container(cfg, resolve=True), facts=facts,
                   optimizer=instantiate(t.optimizer), scheduler=t.get("scheduler"), backbone_lr=t.backbone_lr,
                   l1_spatial=t.l1_spatial, l1_features=t.l1_features, reliability=datamodule.reliability, model=model)

    # ------------------------------------------------------------------ loss and scores
    def objective(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """MSE over the finite targets (B, n_sites) + the readout's L1 penalties."""
        mse = masked_mse(pred, target)
        l1 = self.model.readout.l1(self.l1_spatial, self.l1_features)
        return {"loss": mse + l1, "mse": mse, "l1": l1}

    def scores(self, pred: torch.Tensor, target: torch.Tensor, split: str | None = None) -> dict[str, torch.Tensor]:
        """Per-site r, explained variance and (when the split's reliability ``R`` is known) ``r / sqrt(R)``
        (NaN where ``R <= 0``)."""
        pred, target = pred.double(), target.double()
        r = nan_pearson_r(pred, target)
        ok = torch.isfinite(target)
        res = torch.where(ok, target - pred, torch.nan)
        y = torch.where(ok, target, torch.nan)
        ev = 1 - _nanvar(res) / _nanvar(y)
        out = {"r": r.float(), "ev": ev.float()}
        rel = self.reliability.get(split) if split else None
        if rel is not None and rel.numel() == r.numel():
            out["r_corrected"] = torch.where(rel > 0, r / rel.clamp_min(1e-12).sqrt(), torch.nan).float()
        return out

    def log_scores(self, split: str, pred: torch.Tensor, target: torch.Tensor) -> None:
        s = self.scores_by_split[split] = self.scores(pred, target, split)
        self.log(f"{split}/r_median", nanmedian(s["r"]), prog_bar=split == "val")
        self.log(f"{split}/r_mean", torch.nanmean(s["r"]))
        self.log(f"{split}/ev_mean", torch.nanmean(s["ev"]))
        if "r_corrected" in s:
            self.log(f"{split}/r_corrected_median", nanmedian(s["r_corrected"]))

    # ------------------------------------------------------------------ steps
    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.model.readout.apply_constraints()

    def param_groups(self) -> list:
        """The readout at ``task.lr`` (the optimizer's lr); a trainable backbone at ``backbone_lr``."""
        groups = [{"params": list(self.model.readout.parameters())}]
        trainable = [p for p in self.model.backbone.parameters() if p.requires_grad]
        if trainable:
            groups.append({"params": trainable, "lr": self.backbone_lr})
        return groups


def _nanvar(x: torch.Tensor) -> torch.Tensor:
    """Variance of each column over its finite rows (N, K) -> (K,)."""
    m = torch.nanmean(x, 0)
    return torch.nanmean((x - m) ** 2, 0)

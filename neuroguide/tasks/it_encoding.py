"""IT encoding model (Guo et al.): a (robust) backbone cut at a layer + a factorized readout to IT sites.

Model: ``r(x) = FactorizedReadout(Backbone(x))``, the backbone an (adversarially trained) ResNet50
cut at ``layer4.0`` by default, loaded from a local MadryLab-format checkpoint chosen by
``backbone.at_eps`` (``paths.robust_weights``) or ``backbone.weights``. With ``backbone.freeze=true``
the backbone is in eval mode with ``requires_grad=False`` and stays so when Lightning calls
``.train()`` (only the readout learns); with ``freeze=false`` the model is trained end to end (the
backbone with its own learning rate ``backbone_lr``), as on each day of Guo et al.'s closed loop.

Loss: mean squared error over the recorded (image, site) targets (NaN targets are skipped) plus the
readout's L1 penalties ``l1_spatial`` and ``l1_features``. Scores per site on the split's images:
Pearson r, explained variance ``1 - Var(y - y_hat) / Var(y)``, and ``r / sqrt(rho)`` with ``rho`` the
split-half (Spearman-Brown) reliability of the mean response on the same images.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from neuroguide.metrics import nan_pearson_r, nanmedian
from neuroguide.models.backbones import Backbone
from neuroguide.models.readouts import FactorizedReadout, masked_mse
from neuroguide.tasks import register_task
from neuroguide.tasks.base import Task

log = logging.getLogger("neuroguide")


class ITEncodingModel(nn.Module):
    """(B, 3, S, S) in [0, 1] -> (B, n_sites) predicted IT responses.

    ``backbone``: :class:`Backbone` giving (B, C, h, w); ``readout``: :class:`FactorizedReadout`.
    ``freeze``: the backbone is kept in eval mode with ``requires_grad=False`` (input gradients still
    flow through it, so attacks on the model work).
    """

    def __init__(self, backbone: Backbone, readout: FactorizedReadout, freeze: bool = True):
        super().__init__()
        self.backbone, self.readout, self.freeze = backbone, readout, bool(freeze)
        if self.freeze:
            self.backbone.eval()
            for p in self.backbone.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ITEncodingModel":
        super().train(mode)
        if self.freeze:
            self.backbone.eval()  # frozen: never in train mode, whatever Lightning asks
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.backbone(x))


def check_sites(n_checkpoint: int, n_data: int, where: str) -> None:
    """A readout of ``n_checkpoint`` sites cannot be trained or scored on data of ``n_data`` sites."""
    if int(n_checkpoint) != int(n_data):
        raise ValueError(f"{where} has a readout for {n_checkpoint} IT sites but the data has {n_data} sites. "
                         "Use a checkpoint trained on the same recording sites (same paths.it_file), or start a "
                         "new readout (task.init_from=null)")


@register_task("it_encoding")
class ITEncodingTask(Task):
    def __init__(self, model_config: dict, run_config: dict | None = None, *, lr: float = 1e-2,
                 backbone_lr: float = 1e-4, weight_decay: float = 0.0, l1_spatial: float = 1.0,
                 l1_features: float = 1.0, reliability: dict | None = None, model: nn.Module | None = None):
        super().__init__(model_config, run_config, model)
        self.lr, self.backbone_lr, self.weight_decay = float(lr), float(backbone_lr), float(weight_decay)
        self.l1_spatial, self.l1_features = float(l1_spatial), float(l1_features)
        self.reliability = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32)
                            for k, v in (reliability or {}).items()}
        self._preds: dict[str, list] = {"val": [], "test": []}
        self.scores_by_split: dict[str, dict[str, torch.Tensor]] = {}

    @staticmethod
    def build_model(backbone: str = "resnet50", layer: str = "layer4.0", n_sites: int = 1, image_size: int = 224,
                    freeze: bool = True, positive: bool = False, **_meta) -> ITEncodingModel:
        """Backbone ``backbone`` cut at ``layer`` + a factorized readout sized for ``image_size`` inputs.

        Weights are not loaded here (a checkpoint's state dict holds them); ``_meta`` (at_eps,
        weights, site_ids, ...) is kept in the checkpoint for look-ups and checks.
        """
        bb = Backbone(backbone, layer)
        readout = FactorizedReadout(bb.output_shape(int(image_size)), int(n_sites), positive=bool(positive))
        return ITEncodingModel(bb, readout, freeze=bool(freeze))

    # ------------------------------------------------------------------ config
    @classmethod
    def prepare_config(cls, cfg):
        """Find the IT file: ``task.it_file``, or on synthetic data the synthetic file (written on first use)."""
        from omegaconf import OmegaConf

        cfg = cfg.copy()
        OmegaConf.set_struct(cfg, False)
        if cfg.task.get("it_file") is None:
            if not cfg.data.get("synthetic"):
                raise FileNotFoundError("task=it_encoding needs IT recordings: set paths.it_file=/path/to/it.h5 "
                                        "(format in neuroguide/data/it.py), or use data=synthetic")
            from neuroguide.data.synthetic.it import write_synthetic_it

            params = OmegaConf.to_container(cfg.task.synthetic_it, resolve=True)
            cfg.task.it_file = str(write_synthetic_it(Path(cfg.paths.synthetic_root) / "it", **params))
        return cfg

    @classmethod
    def from_config(cls, cfg, datamodule) -> "ITEncodingTask":
        from omegaconf import OmegaConf

        from neuroguide.models.checkpoints import read_checkpoint
        from neuroguide.models.robust_weights import load_robust_weights, robust_weights_path

        b = cfg.backbone
        model_config = {"backbone": b.name, "layer": b.layer, "n_sites": int(datamodule.n_sites),
                        "image_size": int(datamodule.image_size), "freeze": bool(b.freeze),
                        "positive": bool(cfg.task.get("positive", False)),
                        "at_eps": None if b.get("at_eps") is None else float(b.at_eps),
                        "site_ids": [str(s) for s in datamodule.site_ids], "it_file": str(datamodule.path)}
        init_from = cfg.task.get("init_from")
        if init_from:  # continue from an earlier IT model (e.g. the previous day's)
            task_name, mc, _, sd = read_checkpoint(init_from)
            if task_name != "it_encoding":
                raise ValueError(f"task.init_from={init_from} holds a {task_name!r} model, not an it_encoding model")
            check_sites(mc["n_sites"], datamodule.n_sites, f"task.init_from={init_from}")
            model_config.update({k: mc[k] for k in ("backbone", "layer", "image_size", "positive") if k in mc})
            model_config["weights"] = str(init_from)
            model = cls.build_model(**model_config)
            model.load_state_dict(sd)
        else:
            weights = robust_weights_path(b.get("at_eps"), cfg.paths.get("robust_weights"), b.get("weights"))
            model_config["weights"] = None if weights is None else str(weights)
            model = cls.build_model(**model_config)
            if weights is not None:
                info = load_robust_weights(model.backbone.root, weights)
                log.info("backbone %s: loaded %d tensors from %s", b.name, info["loaded"], weights)
            else:
                log.warning("backbone %s is randomly initialised (backbone.at_eps=null, backbone.weights=null)", b.name)
            model.readout.init_bias(torch.from_numpy(datamodule.train_mean))
        t = cfg.task
        return cls(model_config, OmegaConf.to_container(cfg, resolve=True), lr=t.lr, backbone_lr=t.backbone_lr,
                   weight_decay=t.weight_decay, l1_spatial=t.l1_spatial, l1_features=t.l1_features,
                   reliability=datamodule.reliability, model=model)

    # ------------------------------------------------------------------ loss and scores
    def objective(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """MSE over the finite targets (B, n_sites) + the readout's L1 penalties."""
        mse = masked_mse(pred, target)
        l1 = self.model.readout.l1(self.l1_spatial, self.l1_features)
        return {"loss": mse + l1, "mse": mse, "l1": l1}

    def scores(self, pred: torch.Tensor, target: torch.Tensor, split: str | None = None) -> dict[str, torch.Tensor]:
        """Per-site r, explained variance and (when the split's reliability is known) corrected r."""
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

    # ------------------------------------------------------------------ steps
    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.objective(self.model(x), y)
        for k, v in out.items():
            self.log(f"train/{k}", v, on_step=False, on_epoch=True, batch_size=len(x), prog_bar=k == "loss")
        return out["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.model.readout.apply_constraints()

    def _eval_step(self, split, batch):
        x, y = batch
        pred = self.model(x)
        self.log(f"{split}/loss", self.objective(pred, y)["mse"], on_epoch=True, batch_size=len(x), sync_dist=True)
        self._preds[split].append((pred.detach().cpu(), y.detach().cpu()))

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch)

    def _eval_end(self, split):
        items, self._preds[split] = self._preds[split], []
        if not items:
            return
        pred, target = torch.cat([p for p, _ in items]), torch.cat([t for _, t in items])
        if self.trainer.world_size > 1:
            pred = self.all_gather(pred).flatten(0, 1).cpu()
            target = self.all_gather(target).flatten(0, 1).cpu()
        if len(pred) < 3:
            return
        s = self.scores_by_split[split] = self.scores(pred, target, split)
        self.log(f"{split}/r_median", nanmedian(s["r"]), prog_bar=split == "val")
        self.log(f"{split}/r_mean", torch.nanmean(s["r"]))
        self.log(f"{split}/ev_mean", torch.nanmean(s["ev"]))
        if "r_corrected" in s:
            self.log(f"{split}/r_corrected_median", nanmedian(s["r_corrected"]))

    def on_validation_epoch_end(self):
        self._eval_end("val")

    def on_test_epoch_end(self):
        self._eval_end("test")

    def configure_optimizers(self):
        groups = [{"params": list(self.model.readout.parameters()), "lr": self.lr}]
        trainable = [p for p in self.model.backbone.parameters() if p.requires_grad]
        if trainable:
            groups.append({"params": trainable, "lr": self.backbone_lr})
        return torch.optim.Adam(groups, weight_decay=self.weight_decay)


def _nanvar(x: torch.Tensor) -> torch.Tensor:
    """Variance of each column over its finite rows (N, K) -> (K,)."""
    m = torch.nanmean(x, 0)
    return torch.nanmean((x - m) ** 2, 0)

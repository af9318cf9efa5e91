"""Neurally-guided classification (Shao et al.): a dual-head ResNet18 aligned to a frozen predictor.

Loss: ``(1 - alpha) * CE(logits, y) + alpha * MSE(neural_head(x), predictor(x))``. With
``at.eps > 0`` the heads see PGD examples ``x_adv`` made by the project's attack engine (the model in
eval mode while attacking, in train mode for the update): ``(1 - alpha) * CE(logits(x_adv), y) +
alpha * MSE(neural_head(x_adv), predictor(x_t))`` with ``x_t = x`` (``at.target=clean``, the default:
like the label ``y``, the brain's response is that of the image, which an imperceptible perturbation
does not change) or ``x_t = x_adv`` (``at.target=adv``: the predictor's own response to the perturbed
image). AT runs also log ``val/adv_acc``, the validation accuracy under the training attack (a checkpoint
can be selected by it: ``task.monitor=val/adv_acc``). Baselines are regions:
``region=none`` (alpha forced to 0), ``region=random`` (an untrained predictor sized like
``region.like``), ``predictor.shuffle=true`` (the shuffled-control predictor of the region).
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchmetrics.classification import MulticlassAccuracy

from neuroguide.metrics import rowwise_pearson_r
from neuroguide.models.checkpoints import load_model
from neuroguide.models.dual_head import head_pool_size
from neuroguide.models.registry import build_model
from neuroguide.tasks import register_task
from neuroguide.tasks.kinds import ModelKind
from neuroguide.tasks.base import Task
from neuroguide.tasks.predictor import PredictorRequirement
from neuroguide.utils.io import file_sha256

log = logging.getLogger("neuroguide")
AT_TARGETS = ("clean", "adv")
# the frozen predictor is in eval mode on purpose: Lightning's notice about it is noise
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def check_at_target(target: str) -> str:
    """``at.target``: the image whose predictor response is the alignment target under adversarial training."""
    if target not in AT_TARGETS:
        raise ValueError(f"at.target must be one of {AT_TARGETS} (the predictor's input for the alignment target under "
                         f"adversarial training: the clean image x or the adversarial x_adv); got {target!r}")
    return target


KIND = ModelKind(
    region_layer="neural_head",
    sensitivity_units="penultimate",
    stimuli="classification",
    name_factors=("region", "alpha", "at.eps"),
    report_factors=("region", "alpha", "at_eps"),
)


@register_task("guidance", kind=KIND)
class GuidanceTask(Task):
    def __init__(self, model_config: dict, run_config: dict | None = None, *, facts: dict | None = None,
                 alpha: float = 0.5, at: dict | None = None, optimizer=None, scheduler=None,
                 predictor: torch.nn.Module | None = None, references: dict | None = None,
                 model: torch.nn.Module | None = None):
        """``predictor``: the loaded frozen predictor whose weights the model's predictor takes (else the
        weights come from a checkpoint's state dict). ``references``: ``{"predictor.": {"path", "sha256"}}``
        when the predictor is a trained file (kept by reference in checkpoints and the exported model).
        ``model``: an already built network with the dual-head interface (``forward_heads``,
        ``predictor_target``), e.g. a tiny one in tests; default: built from ``model_config``."""
        super().__init__(model_config, run_config, model, facts=facts, optimizer=optimizer, scheduler=scheduler,
                         references=references)
        if predictor is not None:
            if self.model.predictor is None:
                raise ValueError("a predictor was given but model_config.predictor is empty")
            self.model.predictor.load_state_dict(predictor.state_dict())
        self.alpha = float(alpha)
        self.at = dict(at or {"eps": 0.0})
        self.at["eps"] = at_eps(self.at)
        self.at["target"] = check_at_target(self.at.get("target", "clean"))
        k = model_config["num_classes"]
        self.metrics = torch.nn.ModuleDict({
            f"{s}_{n}": MulticlassAccuracy(num_classes=k, top_k=min(topk, k), average="micro")
            for s in ("train", "val", "test") for n, topk in (("acc", 1), ("acc5", 5))})

    # ------------------------------------------------------------------ config
    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Guidance keys, checked before anything is trained: alpha, at.*, task.head_pool."""
        alpha = _number(cfg, "alpha")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1] (the loss is (1 - alpha) * CE + alpha * MSE); got alpha={alpha}")
        if str(cfg.at.norm).lower() not in ("l2", "linf"):
            raise ValueError(f"at.norm must be l2 or linf; got {cfg.at.norm!r}")
        at_eps(cfg.at)
        check_at_target(cfg.at.get("target", "clean"))
        head_pool_size(cfg.task.branch, cfg.task.get("head_pool", "auto"))

    @classmethod
    def requirements(cls, cfg: DictConfig) -> list:
        """A region's guidance needs that region's trained predictor (baselines none and random do not)."""
        if cfg.region.get("baseline") is not None:
            return []
        return [PredictorRequirement(str(cfg.region.name), int(cfg.subject), bool(cfg.predictor.shuffle))]

    @classmethod
    def prepare_config(cls, cfg: DictConfig) -> DictConfig:
        if cfg.region.get("baseline") == "none" and float(cfg.alpha) != 0.0:
            log.warning("region=none: no neural guidance, alpha forced from %s to 0", cfg.alpha)
            cfg = cfg.copy()
            OmegaConf.set_struct(cfg, False)
            cfg.alpha = 0.0
        return cfg

    @classmethod
    def from_config(cls, cfg: DictConfig, datamodule) -> "GuidanceTask":
        baseline = cfg.region.get("baseline")
        pred_module, pred_config, pred_facts, references = None, None, {}, {}
        if baseline is None:  # the region's trained predictor: kept by reference (path + content hash)
            path = Path(cfg.predictor_path).resolve()
            references = {"predictor.": {"path": str(path), "sha256": file_sha256(path)}}
            pred_module = load_model(path, kind="predictor")
            pred_config, pred_facts = pred_module.neuroguide_info["model_config"], pred_module.neuroguide_info["facts"]
        elif baseline == "random":
            pred_module, pred_config, pred_facts = random_predictor(cfg)
        model_config = {"num_classes": int(datamodule.num_classes), "branch": cfg.task.branch,
                        "head_pool": head_pool_size(cfg.task.branch, cfg.task.get("head_pool", "auto")),
                        "arch": cfg.task.arch, "n_neural": int(pred_config["n_outputs"]) if pred_config else 0,
                        "predictor": pred_config,
                        "predictor_image_size": pred_facts.get("image_size") if pred_config else None}
        facts = {"region": cfg.region.name, "subject": int(cfg.subject), "alpha": float(cfg.alpha),
                 "at_eps": at_eps(cfg.at), "at_norm": str(cfg.at.norm), "image_size": int(cfg.data.image_size),
                 "predictor": dict(pred_facts), "predictor_path": cfg.get("predictor_path")}
        return cls(model_config, OmegaConf.to_container(cfg, resolve=True), facts=facts, alpha=cfg.alpha,
                   at=OmegaConf.to_container(cfg.at, resolve=True), optimizer=instantiate(cfg.task.optimizer),
                   scheduler=cfg.task.get("scheduler"), predictor=pred_module, references=references)

    # ------------------------------------------------------------------ steps
    def adversarial(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD examples within ``at.eps`` (L2 or Linf) of ``x``, in [0, 1], made in eval mode."""
        from neuroguide.attacks import objectives, pgd_attack

        at = self.at
        return pgd_attack(self.model, x, objectives.CrossEntropy(y), eps=float(at["eps"]), norm=str(at["norm"]).lower(),
                          steps=int(at["steps"]), step_size=at.get("step_size"),
                          random_start=bool(at.get("random_start", True))).x_adv.detach()

    def losses(self, x: torch.Tensor, y: torch.Tensor, target_x: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Both heads on ``x``; the alignment target is the frozen predictor's response to ``target_x``
        (default ``x``)."""
        logits, neural = self.model.forward_heads(x)
        out = {"logits": logits, "ce": F.cross_entropy(logits, y)}
        if neural is not None:
            target = self.model.predictor_target(x if target_x is None else target_x)
            out["align"] = F.mse_loss(neural, target)
            out["neural_r"] = rowwise_pearson_r(neural.detach(), target).nanmean()
            out["loss"] = (1 - self.alpha) * out["ce"] + self.alpha * out["align"]
        else:
            out["loss"] = out["ce"]
        return out

    def training_step(self, batch, batch_idx):
        x, y = batch
        if float(self.at.get("eps", 0)) > 0:  # heads (and CE) on x_adv; the target per at.target
            x_adv = self.adversarial(x, y)
            out = self.losses(x_adv, y, target_x=x if self.at["target"] == "clean" else x_adv)
        else:
            out = self.losses(x, y)
        self._log("train", out, y)
        return out["loss"]

    def _log(self, split: str, out: dict, y: torch.Tensor) -> None:
        bs = len(y)
        on_step = split == "train"
        for k in ("loss", "ce", "align", "neural_r"):
            if k in out:
                self.log(f"{split}/{k}", out[k], on_step=False, on_epoch=True, batch_size=bs, sync_dist=not on_step,
                         prog_bar=k in ("loss",) and split == "train")
        for n in ("acc", "acc5"):
            m = self.metrics[f"{split}_{n}"]
            m(out["logits"].detach(), y)
            self.log(f"{split}/{n}", m, on_step=False, on_epoch=True, batch_size=bs, prog_bar=(split, n) == ("val", "acc"))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self._log("val", self.losses(x, y), y)
        if float(self.at.get("eps", 0)) > 0:  # AT runs: accuracy under the training attack (at.eps, at.steps)
            x_adv = self.adversarial(x, y)
            with torch.no_grad():
                acc = (self.model(x_adv).argmax(1) == y).float().mean()
            self.log("val/adv_acc", acc, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self._log("test", self.losses(x, y), y)


def at_eps(at) -> float:
    """``at.eps`` as a float >= 0: a number, or ``k/255`` (a string, as Hydra reads ``at.eps=8/255``); with
    ``at.norm=linf`` snapped to the nearest k/255 within a tolerance (``neuroguide.attacks.eps``). Its units are
    checked (:func:`neuroguide.attacks.eps.check_eps_units`): ``at.eps=8 at.norm=linf`` is refused, ``at.eps=8/255``
    under the default L2 norm warned about."""
    from neuroguide.attacks.eps import check_eps_units, parse_eps_for

    value, norm = at.get("eps", 0.0), str(at.get("norm", "l2"))
    try:
        eps = parse_eps_for(value, norm, "at.eps")
    except ValueError:
        raise ValueError(f"at.eps must be a number; got at.eps={value!r} (expected L2 in [0, 1] pixel units, e.g. "
                         "at.eps=1.0, or k/255 for Linf, e.g. at.eps=8/255 at.norm=linf)") from None
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"at.eps must be >= 0 (0 = plain training); got at.eps={value!r}")
    return check_eps_units(eps, norm, "at.eps", value) if eps > 0 else eps


def _number(cfg: DictConfig, key: str) -> float:
    value = OmegaConf.select(cfg, key)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number; got {key}={value!r}") from None


def random_predictor(cfg: DictConfig) -> tuple[torch.nn.Module, dict, dict]:
    """An untrained predictor (seeded) with as many outputs as region ``region.like`` has:
    (module, model_config, facts)."""
    from neuroguide.data.nsd_regions import extract_regions, load_region

    like = cfg.region.get("like", "TO")
    spec = load_region(like)
    try:
        rd = extract_regions(cfg.data.nsd_root, cfg.subject, [spec], cache_dir=cfg.paths.cache_dir,
                             betas_format=cfg.data.betas_format, max_sessions=cfg.data.max_sessions,
                             pca=cfg.data.pca, pca_variance=cfg.data.pca_variance, progress=False,
                             read_workers=cfg.data.get("read_workers", "auto"))[like]
    except FileNotFoundError as e:
        raise FileNotFoundError(f"region=random needs the NSD data of region {like} to size the predictor "
                                f"(paths.nsd_root={cfg.data.nsd_root}): {e}") from None
    mc = {"arch": cfg.task.arch, "n_outputs": int(rd.n_outputs)}
    facts = {"region": f"random_{like}", "subject": int(cfg.subject), "n_voxels": int(rd.n_voxels),
             "pca": bool(cfg.data.pca), "shuffle": False, "image_size": int(cfg.data.image_size)}
    torch.manual_seed(int(cfg.seed))
    return build_model("predictor", **mc), mc, facts

"""Neurally-guided classification (Shao et al.): a dual-head ResNet18 aligned to a frozen predictor.

Loss: ``(1 - alpha) * CE(logits, y) + alpha * MSE(neural_head(x), predictor(x))``. With
``at.eps > 0`` the heads see PGD examples ``x_adv`` made by the project's attack engine (the model in
eval mode while attacking, in train mode for the update): ``(1 - alpha) * CE(logits(x_adv), y) +
alpha * MSE(neural_head(x_adv), predictor(x_t))`` with ``x_t = x`` (``at.target=clean``, the default:
like the label ``y``, the brain's response is that of the image, which an imperceptible perturbation
does not change) or ``x_t = x_adv`` (``at.target=adv``: the predictor's own response to the perturbed
image). Baselines are regions:
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
from neuroguide.models.checkpoints import load_model, read_checkpoint
from neuroguide.models.dual_head import DualHeadResNet, head_pool_size
from neuroguide.tasks import get_task, register_task
from neuroguide.tasks.base import Task
from neuroguide.tasks.predictor import predictor_path

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


def predictor_train_command(cfg: DictConfig, region: str) -> str:
    """The exact command that trains the predictor the guidance run looks for."""
    parts = ["python train.py task=predictor", f"region={region}", f"subject={cfg.subject}", f"data={cfg.data.name}"]
    if cfg.data.name != "synthetic":
        parts.append(f"paths.nsd_root={cfg.paths.nsd_root}")
    if cfg.predictor.shuffle:
        parts.append("predictor.shuffle=true")
    if Path(cfg.paths.predictors_dir) != Path(cfg.paths.root_dir) / "predictors" / cfg.data.name:
        parts.append(f"paths.predictors_dir={cfg.paths.predictors_dir}")
    return " ".join(parts)


def predictor_config(cfg: DictConfig, region: str, out: Path) -> DictConfig:
    """The config that trains ``region``'s predictor with this run's data, paths, subject and seed
    (``predictor.train_overrides`` adjust its task and trainer)."""
    from neuroguide.config import compose_config

    pcfg = compose_config("train", ["task=predictor", f"region={region}", "logger=csv",
                                    *cfg.predictor.get("train_overrides", [])])
    OmegaConf.set_struct(pcfg, False)
    for key in ("data", "paths", "subject", "seed", "predictor"):
        v = cfg[key]
        pcfg[key] = OmegaConf.to_container(v, resolve=False) if OmegaConf.is_config(v) else v
    pcfg.trainer.accelerator = cfg.trainer.accelerator
    pcfg.paths.output_dir = str(out)
    return pcfg


def ensure_predictor(cfg: DictConfig, region: str) -> Path:
    """Path of the region's predictor; on synthetic data it is trained first when missing."""
    path = predictor_path(cfg.paths.predictors_dir, cfg.subject, region, bool(cfg.predictor.shuffle))
    if path.exists():
        return path
    if not cfg.data.synthetic:
        raise FileNotFoundError(
            f"no {region} predictor for subject {cfg.subject} at {path}. Train it first with:\n  "
            f"{predictor_train_command(cfg, region)}")
    from neuroguide.config import output_dir
    from neuroguide.train import run

    out = output_dir(cfg) / f"predictor_{path.stem}"
    log.warning("no %s predictor at %s: training it first on the synthetic data (%s)", region, path, out)
    run(predictor_config(cfg, region, out))
    if not path.exists():  # pragma: no cover - run() exports it
        raise RuntimeError(f"training the {region} predictor did not write {path}")
    return path


@register_task("guidance")
class GuidanceTask(Task):
    def __init__(self, model_config: dict, run_config: dict | None = None, *, alpha: float = 0.5,
                 at: dict | None = None, optimizer=None, scheduler=None, predictor: torch.nn.Module | None = None):
        model = self.build_model(**model_config, predictor_module=predictor) if predictor is not None else None
        super().__init__(model_config, run_config, model)
        self.alpha = float(alpha)
        self.at = dict(at or {"eps": 0.0})
        self.at["target"] = check_at_target(self.at.get("target", "clean"))
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        k = model_config["num_classes"]
        self.metrics = torch.nn.ModuleDict({
            f"{s}_{n}": MulticlassAccuracy(num_classes=k, top_k=min(topk, k), average="micro")
            for s in ("train", "val", "test") for n, topk in (("acc", 1), ("acc5", 5))})

    @staticmethod
    def build_model(num_classes: int, n_neural: int = 0, branch: str = "layer4", arch: str = "resnet18",
                    predictor: dict | None = None, predictor_module: torch.nn.Module | None = None,
                    head_pool: int = 1, **_meta) -> DualHeadResNet:
        """The dual-head model; ``predictor`` is the predictor's model_config (architecture only,
        weights come from the state dict) unless an already loaded ``predictor_module`` is given.
        ``head_pool``: side of the pool before the neural head's linear map, as resolved from
        ``task.head_pool`` at training time; a model_config without it (checkpoints made before the
        option) had the global pool, 1."""
        pred = predictor_module
        if pred is None and predictor:
            pred = get_task("predictor").build_model(**predictor)
        size = (predictor or {}).get("image_size")
        return DualHeadResNet(num_classes, n_neural if pred is not None else 0, branch, arch, pred, size,
                              head_pool=head_pool)

    @classmethod
    def prepare_config(cls, cfg: DictConfig) -> DictConfig:
        cfg = cfg.copy()
        OmegaConf.set_struct(cfg, False)
        check_at_target(cfg.at.get("target", "clean"))  # before a predictor is trained on the way
        head_pool_size(cfg.task.branch, cfg.task.get("head_pool", "auto"))
        baseline = cfg.region.get("baseline")
        if baseline == "none" and float(cfg.alpha) != 0.0:
            log.warning("region=none: no neural guidance, alpha forced from %s to 0", cfg.alpha)
            cfg.alpha = 0.0
        if baseline is None:
            cfg.predictor_path = str(ensure_predictor(cfg, cfg.region.name))
        return cfg

    @classmethod
    def from_config(cls, cfg: DictConfig, datamodule) -> "GuidanceTask":
        baseline = cfg.region.get("baseline")
        pred_module, pred_cfg = None, None
        if baseline is None:
            pred_module, pred_cfg = load_predictor(cfg.predictor_path, cfg)
        elif baseline == "random":
            pred_module, pred_cfg = random_predictor(cfg)
        model_config = {"num_classes": int(datamodule.num_classes), "branch": cfg.task.branch,
                        "head_pool": head_pool_size(cfg.task.branch, cfg.task.get("head_pool", "auto")),
                        "arch": cfg.task.arch, "n_neural": int(pred_cfg["n_outputs"]) if pred_cfg else 0,
                        "predictor": pred_cfg, "region": cfg.region.name, "alpha": float(cfg.alpha),
                        "at_eps": float(cfg.at.eps), "image_size": int(cfg.data.image_size)}
        return cls(model_config, OmegaConf.to_container(cfg, resolve=True), alpha=cfg.alpha,
                   at=OmegaConf.to_container(cfg.at, resolve=True), optimizer=instantiate(cfg.task.optimizer),
                   scheduler=cfg.task.get("scheduler"), predictor=pred_module)

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

    def test_step(self, batch, batch_idx):
        x, y = batch
        self._log("test", self.losses(x, y), y)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = self.optimizer_factory(params) if self.optimizer_factory else torch.optim.SGD(
            params, lr=0.1, momentum=0.9, weight_decay=1e-4)
        sched = dict(self.scheduler_factory or {})
        name = sched.get("name") or "none"
        if name not in ("none", "cosine", "step"):
            raise ValueError(f"task.scheduler.name must be none, cosine or step; got {name!r}")
        if name == "none" and not float(sched.get("warmup_epochs") or 0):
            return opt
        s = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor({**sched, "name": name}, *self._steps()))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": "step"}}

    def _steps(self) -> tuple[int, int]:
        """(optimizer steps of the whole run, optimizer steps per epoch)."""
        epochs = max(1, int(self.trainer.max_epochs or 1))
        total = self.trainer.estimated_stepping_batches
        total = max(1, int(total)) if math.isfinite(total) else epochs
        return total, max(1, math.ceil(total / epochs))


def lr_factor(sched: dict, total_steps: int, steps_per_epoch: int):
    """Multiplier of the base learning rate at optimizer step ``k`` (0-based), stepped per batch.

    Linear warm-up over ``warmup_epochs`` (may be fractional): ``(k + 1) / W`` for the first
    ``W = round(warmup_epochs * steps_per_epoch)`` steps; then ``cosine``: ``0.5 * (1 + cos(pi * t))``
    with ``t`` going from 0 to 1 over the remaining steps (the per-step form of cosine annealing to 0),
    or ``step``: ``gamma ** (number of milestones (epochs) <= the step's epoch)``, or ``none``: 1.
    """
    name = sched.get("name") or "none"
    warm = int(round(float(sched.get("warmup_epochs") or 0) * steps_per_epoch))
    warm = min(warm, max(total_steps - 1, 0))
    milestones = sorted(int(m) for m in sched.get("milestones") or [])
    gamma = float(sched.get("gamma", 0.1))

    def factor(k: int) -> float:
        if k < warm:
            return (k + 1) / warm
        if name == "cosine":
            t = (k - warm) / max(1, total_steps - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
        if name == "step":
            epoch = k // steps_per_epoch
            return gamma ** sum(epoch >= m for m in milestones)
        return 1.0

    return factor


def load_predictor(path: str | Path, cfg: DictConfig) -> tuple[torch.nn.Module, dict]:
    """Load a predictor checkpoint and check that it belongs to this run's region and data."""
    task_name, mc, _, _ = read_checkpoint(path)
    if task_name != "predictor":
        raise ValueError(f"{path} holds a {task_name!r} model, not a predictor")
    want = cfg.region.name
    if mc.get("region") != want or int(mc.get("subject", cfg.subject)) != int(cfg.subject):
        raise ValueError(f"{path} is the predictor of region {mc.get('region')} subject {mc.get('subject')}, but this "
                         f"run asks for region={want} subject={cfg.subject}. Retrain with: "
                         f"{predictor_train_command(cfg, want)}")
    expected = region_outputs(cfg, want)
    if expected is not None and int(mc["n_outputs"]) != expected:
        raise ValueError(f"predictor checkpoint {path} has {mc['n_outputs']} outputs but region {want} of subject "
                         f"{cfg.subject} has {expected} in the data at {cfg.data.nsd_root}. The checkpoint was "
                         f"trained on other data or settings; retrain it with: {predictor_train_command(cfg, want)}")
    return load_model(path), mc


def region_outputs(cfg: DictConfig, region: str, spec=None) -> int | None:
    """Output size the region's predictor must have on this run's NSD data (voxels or PCA components)."""
    from neuroguide.data.nsd import extract_regions

    spec = spec if spec is not None else OmegaConf.to_container(cfg.region, resolve=True)
    try:
        rd = extract_regions(cfg.data.nsd_root, cfg.subject, [spec], cache_dir=cfg.paths.cache_dir,
                             betas_format=cfg.data.betas_format, max_sessions=cfg.data.max_sessions,
                             pca=cfg.data.pca, pca_variance=cfg.data.pca_variance, progress=False)[region]
    except FileNotFoundError:
        return None  # no NSD betas here (e.g. only the predictors were copied): nothing to check against
    return int(rd.n_outputs)


def random_predictor(cfg: DictConfig) -> tuple[torch.nn.Module, dict]:
    """An untrained predictor (seeded) with as many outputs as region ``region.like`` has."""
    from neuroguide.config import CONF_DIR

    like = cfg.region.get("like", "TO")
    spec_file = CONF_DIR / "region" / f"{like}.yaml"
    if not spec_file.exists():
        raise FileNotFoundError(f"region.like={like}: no region config {spec_file}")
    spec = OmegaConf.to_container(OmegaConf.load(spec_file), resolve=True)
    n = region_outputs(cfg, like, spec)
    if n is None:
        raise FileNotFoundError(f"region=random needs the NSD data of region {like} to size the predictor "
                                f"(paths.nsd_root={cfg.data.nsd_root})")
    mc = {"arch": cfg.task.arch, "n_outputs": n, "region": f"random_{like}", "subject": int(cfg.subject),
          "n_voxels": n, "pca": bool(cfg.data.pca), "shuffle": False, "image_size": int(cfg.data.image_size)}
    torch.manual_seed(int(cfg.seed))
    return get_task("predictor").build_model(**mc), mc

"""Adversarial training does what the literature says, on a planted problem with a non-robust feature.

The problem (two classes, 3 x 12 x 12 images around grey 0.5, pixel noise):

- a **robust** cue: the left half brighter than the right (class 1) or the reverse (class 0), amplitude
  ``ROBUST_AMP`` per pixel (L2 norm ~2.1, far above the attack's eps), but it disagrees with the label on
  ``FLIP`` of the images, so alone it gives at most ``1 - FLIP`` accuracy;
- a **non-robust** cue: a pixel checkerboard of sign +-1 by class, amplitude ``PATTERN_AMP`` per pixel (L2
  norm ~0.42: an L2 perturbation of ``EPS = 1.0`` can invert it), which always agrees with the label.

Plain training fits the labels with the tiny pattern (clean accuracy ~1) and collapses under PGD at ``EPS``
(the attack inverts the pattern); adversarial training at ``EPS`` (the guidance task's own ``adversarial``
and ``training_step``: PGD of the project's engine, model in eval mode while attacking, heads on x_adv)
cannot use the pattern, so it learns the robust cue: clean accuracy ~``1 - FLIP`` (the expected clean cost)
and robust accuracy at ``EPS`` far above the plain model's. The frozen "predictor" is a coarse (4 x 4
average-pooled) linear map, so its target ignores the checkerboard, like a brain region that does not see
an imperceptible high-frequency pattern.
"""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning as L
from neuroguide.evaluation.analyses.robustness.core import accuracy, adversarial_accuracy
from neuroguide.tasks.guidance import GuidanceTask

SIZE, N_NEURAL = 12, 4
ROBUST_AMP, PATTERN_AMP, NOISE, FLIP = 0.1, 0.02, 0.05, 0.1
EPS = {"l2": 1.0, "linf": "8/255"}  # L2 in [0, 1] pixel units; Linf as k/255 (a string, as Hydra passes it)


def planted(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, SIZE, SIZE) images in [0, 1] and (n,) labels of the planted problem."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    sign = (2 * y - 1).float().view(n, 1, 1, 1)
    robust_sign = torch.where(torch.rand(n, generator=g) < FLIP, -sign.flatten(), sign.flatten()).view(n, 1, 1, 1)
    col = torch.arange(SIZE)
    halves = torch.where(col < SIZE // 2, 1.0, -1.0).view(1, 1, 1, SIZE)  # left bright / right dark
    checker = ((col.view(-1, 1) + col.view(1, -1)) % 2 * 2 - 1).float().view(1, 1, SIZE, SIZE)
    x = (0.5 + ROBUST_AMP * robust_sign * halves + PATTERN_AMP * sign * checker
         + NOISE * torch.randn(n, 3, SIZE, SIZE, generator=g))
    return x.clamp(0, 1), y


class TinyDualHead(nn.Module):
    """The dual-head interface of ``DualHeadResNet`` on a tiny CNN (with batch norm, as the ResNet has)."""

    def __init__(self, n_neural: int = N_NEURAL):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())
        dim = 8 * (SIZE // 2) ** 2
        self.fc = nn.Linear(dim, 2)
        self.neural_head = nn.Linear(dim, n_neural)
        torch.manual_seed(1)
        self.predictor = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(3 * (SIZE // 4) ** 2, n_neural))
        self.predictor.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.predictor.eval()  # frozen
        return self

    def forward_heads(self, x):
        h = self.trunk(x)
        return self.fc(h), self.neural_head(h)

    def forward(self, x):
        return self.forward_heads(x)[0]

    @torch.no_grad()
    def predictor_target(self, x):
        return self.predictor(x)


def train(at_eps, norm: str = "l2", epochs: int = 10, seed: int = 0) -> GuidanceTask:
    """The guidance task (alpha 0.5) on the tiny model, trained by Lightning; ``at`` as in conf/train.yaml."""
    torch.manual_seed(seed)
    model = TinyDualHead()
    task = GuidanceTask({"num_classes": 2}, {}, alpha=0.5, model=model,
                        at={"eps": at_eps, "norm": norm, "steps": 3, "step_size": None, "random_start": True,
                            "target": "clean"},
                        optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    x, y = planted(512, seed=1)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=epochs)
    trainer.fit(task, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True),
                val_dataloaders=DataLoader(TensorDataset(*planted(128, seed=3)), batch_size=64))
    task.val_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return task


def robust_accuracy(model, x, y, eps: float, norm: str) -> float:
    """The robustness evaluation's PGD (10 steps, random start, 2.5 eps / steps)."""
    return adversarial_accuracy(model, x, y, eps=eps, norm=norm, steps=10, generator=torch.Generator().manual_seed(0))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_adversarial_training_beats_plain_training_at_its_eps_on_a_planted_non_robust_feature(norm, one_thread):
    """(one_thread, conftest: one intra-op thread; on a busy 2-core machine this test took 6 minutes with two)"""
    t0 = time.time()
    x, y = planted(400, seed=2)
    eps = GuidanceTask({"num_classes": 2}, {}, model=TinyDualHead(), at={"eps": EPS[norm], "norm": norm}).at["eps"]
    if norm == "linf":
        assert eps == 8 / 255  # at.eps=8/255 is parsed by the task
    res = {}
    for name, train_eps in (("plain", 0.0), (f"AT {EPS[norm]}", EPS[norm])):
        task = train(train_eps, norm)
        model = task.model
        # AT runs also validate under the training attack (what task.monitor=val/adv_acc selects by)
        assert ("val/adv_acc" in task.val_metrics) == (train_eps != 0.0)
        res[name] = {"val/adv_acc": task.val_metrics.get("val/adv_acc", float("nan")),"clean": accuracy(model, x, y), "eps/2": robust_accuracy(model, x, y, eps / 2, norm),
                     "eps": robust_accuracy(model, x, y, eps, norm)}
    print(f"\nplanted problem, {norm} eps {EPS[norm]} ({len(y)} test images, PGD 10 steps; {time.time() - t0:.1f} s)")
    for name, r in res.items():
        print(f"  {name:12s} " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()))
    plain, at = res["plain"], res[f"AT {EPS[norm]}"]
    assert plain["clean"] > 0.97  # the pattern fits the labels that the robust cue gets wrong
    assert plain["eps"] < 0.3  # ... and PGD at eps inverts it
    assert at["eps"] > 0.75 and at["eps"] > plain["eps"] + 0.45  # AT learned the robust cue
    assert at["val/adv_acc"] > 0.75
    assert 0.8 < at["clean"] < plain["clean"] - 0.05  # the clean cost: the robust cue is wrong on FLIP of the images


# --------------------------------------------------------------------------- eps written as k/255
def test_linf_eps_as_k_over_255_parse_and_snap_to_one_key():
    from neuroguide.attacks.eps import parse_eps, snap_linf
    from neuroguide.evaluation.plots import check_eps_list, eps_label, eps_tag

    assert parse_eps("8/255") == 8 / 255 and parse_eps(" 16 / 255 ") == 16 / 255 and parse_eps("0.5") == 0.5
    assert parse_eps(1) == 1.0 and snap_linf(0.0313725) == 8 / 255 and snap_linf(0.0627451) == 16 / 255
    assert snap_linf(0.01) == 0.01 and snap_linf(8.5 / 255) == 8.5 / 255  # not near a whole k: unchanged
    # the two spellings of 8/255 and 16/255 get the same keys, whatever the digits typed
    for eps in (0.0313725, 0.03137, "8/255", 8 / 255):
        assert eps_tag("linf", eps) == "linf_8_255" and eps_label("linf", eps) == "8/255"
    assert eps_tag("linf", 0.0627451) == "linf_16_255" and eps_tag("fgsm", "4/255") == "fgsm_4_255"
    assert eps_tag("l2", 1.0) == "l2_1.0" and eps_tag("linf", 0.01) == "linf_0.01"
    assert check_eps_list(["16/255", 0.0313725], "eps_linf", norm="linf") == [8 / 255, 16 / 255]  # snapped, sorted
    with pytest.raises(ValueError, match=r"eps_linf holds the same eps more than once: \['8/255', 0.0313725\]"):
        check_eps_list(["8/255", 0.0313725, "16/255"], "eps_linf", norm="linf")  # two spellings of 8/255
    for bad in (["8/0"], ["abc"], ["-1/255"]):
        with pytest.raises(ValueError, match="eps_linf"):
            check_eps_list(bad, "eps_linf", norm="linf")


def test_k_over_255_in_configs_evaluation_and_at_eps(compose_train, tmp_path):
    from neuroguide.evaluation.analyses.robustness.core import evaluate
    from neuroguide.run_names import run_name
    from neuroguide.tasks.guidance import at_eps

    cfg = compose_train("at.eps=8/255", "at.norm=linf")
    assert cfg.at.eps == "8/255"  # Hydra reads k/255 as a string ...
    GuidanceTask.check_config(cfg)  # ... which the task accepts
    assert at_eps(cfg.at) == 8 / 255 and at_eps({"eps": 0.0313725, "norm": "linf"}) == 8 / 255
    assert at_eps({"eps": 0.0313725, "norm": "l2"}) == 0.0313725  # L2 eps are never snapped
    assert run_name(["at.eps=8/255", "at.norm=linf"], cfg) == "region-TO_alpha-0.5_eps-8_255_norm-linf"
    with pytest.raises(ValueError, match="at.eps must be >= 0"):
        at_eps({"eps": "-8/255", "norm": "linf"})
    # the evaluation: eps lists as written in conf/eval/robustness.yaml and on the command line
    x, y = planted(6, seed=0)
    m = evaluate(TinyDualHead().eval(), x, y, tmp_path, eps_l2=[], eps_linf=["8/255", 0.0627451], steps=1,
                 fgsm=False, autoattack=False, progress=False)
    assert {"eval/robustness/linf_8_255/acc", "eval/robustness/linf_16_255/acc_se"} <= set(m)
    assert m["eval/robustness/n_images"] == 6

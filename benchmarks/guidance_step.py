"""Time per training step: the guided dual-head ResNet18 against plain ResNet18 classification.

Same batch, image size and optimizer (SGD, momentum 0.9) in one process; both sides interleaved
to share the machine's state. The guided step is GuidanceTask's real loss path: trunk + both
heads forward, the frozen predictor's forward under no_grad, backward, update. The floor of the
ratio is about 1.33 (one extra forward of a same-sized network, ~1/3 of a forward+backward).
An adversarial-training step (PGD, ``--at-steps`` steps) is also timed relative to plain.

    python benchmarks/guidance_step.py [--batch 32] [--size 64] [--steps 10] [--at-steps 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from neuroguide.models.resnet import NormalizedResNet
from neuroguide.tasks.guidance import GuidanceTask
from neuroguide.tasks.predictor import PredictorTask


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--at-steps", type=int, default=3)
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--voxels", type=int, default=200)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)

    pred_cfg = {"arch": "resnet18", "n_outputs": args.voxels}
    mc = {"num_classes": args.classes, "n_neural": args.voxels, "branch": "layer4", "arch": "resnet18", "predictor": pred_cfg,
          "predictor_image_size": args.size}
    guided = GuidanceTask(mc, {}, alpha=0.5, predictor=PredictorTask.build_model(**pred_cfg)).to(dev)
    at_task = GuidanceTask(mc, {}, alpha=0.5, at={"eps": 0.5, "norm": "l2", "steps": args.at_steps, "step_size": None,
                                                 "random_start": True},
                           predictor=PredictorTask.build_model(**pred_cfg)).to(dev)
    plain = NormalizedResNet("resnet18", args.classes).to(dev)
    opts = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
            for k, m in (("plain", plain), ("guided", guided), ("at", at_task))}
    x = torch.rand(args.batch, 3, args.size, args.size, device=dev)
    y = torch.randint(0, args.classes, (args.batch,), device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step_plain():
        plain.train()
        loss = F.cross_entropy(plain(x), y)
        opts["plain"].zero_grad(set_to_none=True)
        loss.backward()
        opts["plain"].step()

    def step_guided(task, key):
        task.train()
        xb = task.adversarial(x, y) if float(task.at.get("eps", 0)) > 0 else x
        loss = task.losses(xb, y)["loss"]
        opts[key].zero_grad(set_to_none=True)
        loss.backward()
        opts[key].step()

    sides = {"plain": step_plain, "guided": lambda: step_guided(guided, "guided"), "at": lambda: step_guided(at_task, "at")}
    for fn in sides.values():  # warm-up
        fn(), fn()
    times = {k: [] for k in sides}
    for _ in range(args.steps):
        for k, fn in sides.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device {dev}, threads {torch.get_num_threads()}, batch {args.batch}, {args.size} px, "
          f"{args.classes} classes, {args.voxels} predictor outputs, median of {args.steps} steps")
    print(f"plain ResNet18 step      : {med['plain'] * 1e3:8.1f} ms")
    print(f"guided dual-head step    : {med['guided'] * 1e3:8.1f} ms")
    print(f"guided + AT ({args.at_steps} PGD steps): {med['at'] * 1e3:8.1f} ms")
    print(f"ratio guided / plain     : {med['guided'] / med['plain']:.3f}   (floor ~1.33, target <= 1.45)")
    print(f"ratio AT / plain         : {med['at'] / med['plain']:.3f}")


if __name__ == "__main__":
    main()

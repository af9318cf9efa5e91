"""Super-stimuli / maximally exciting images (McNeal & Murty's "unconstrained" maximization; Guo et al.'s
super-stimuli): maximize the mean response ``m(x)`` of a region (or of chosen units) from noise or from given
images, with the one attack engine.

"No eps" is the L2 diameter of the pixel box, ``sqrt(C H W)``: every image in [0, 1] lies within it of any start,
so the ball never binds and only the box does; a finite eps keeps the result within eps of its start.

Regularisation (optional, as in feature visualisation) happens inside the forward that the engine attacks
(:class:`Regularized`): each call shifts the batch by a random ``(dy, dx)`` in ``[-jitter, jitter]`` pixels
(``torch.roll``) and blurs it with a Gaussian of ``blur_sigma`` pixels before the model. The objective then is
stochastic, so the engine's own "best iterate" is judged by a noisy value; :class:`Trajectory` wraps the attacked
forward and scores every iterate by the *clean* response (no jitter, no blur), keeping the best-so-far image per
start. The trajectory is that best-so-far value after each gradient evaluation (non-decreasing by construction);
the saved image is the one that reached it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from neuroguide.attacks import objectives, pgd_attack
from neuroguide.attacks.eps import check_eps_units, parse_eps_for
from neuroguide.evaluation.analyses.control.region_control import responses
from neuroguide.evaluation.plots import amplified, curve_figure, image_grid_figure, write_csv
from neuroguide.evaluation.responses import spread
from neuroguide.models.features import device_of

KEY = "eval.control.superstimulus"
STARTS = ("noise", "images")


class Regularized(nn.Module):
    """``forward(x) = inner(blur(jitter(x)))``: (B, C, H, W) -> inner's output.

    Args:
        jitter: largest shift in pixels (a random ``(dy, dx)`` per call, shared by the batch; 0: none).
        blur_sigma: Gaussian blur in pixels (kernel ``2 ceil(2 sigma) + 1`` wide, reflect padding; 0: none).
    """

    def __init__(self, inner: nn.Module, jitter: int = 0, blur_sigma: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if int(jitter) != jitter or jitter < 0:
            raise ValueError(f"{KEY}.jitter must be a whole number of pixels >= 0, got {jitter!r}")
        if not (blur_sigma >= 0 and math.isfinite(blur_sigma)):
            raise ValueError(f"{KEY}.blur_sigma must be >= 0 pixels, got {blur_sigma!r}")
        self.inner, self.jitter, self.blur_sigma, self.generator = inner, int(jitter), float(blur_sigma), generator
        kernel = None
        if blur_sigma > 0:
            r = int(math.ceil(2 * blur_sigma))
            g = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * blur_sigma ** 2))
            kernel = g / g.sum()
        self.register_buffer("kernel", kernel, persistent=False)

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur of (B, C, H, W), each channel on its own."""
        if self.kernel is None:
            return x
        C, r = x.shape[1], len(self.kernel) // 2
        k = self.kernel.to(x)
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.reshape(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.reshape(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.jitter:
            dy, dx = torch.randint(-self.jitter, self.jitter + 1, (2,), generator=self.generator).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
        return self.inner(self.blur(x))


class Trajectory(nn.Module):
    """Wraps the attacked forward; at each call scores the iterate ``x`` (B, C, H, W) with ``score`` (the clean
    scalar response, (B,)) and keeps per row the best value and image so far. ``history``: one (B,) best-so-far
    tensor per call (per gradient evaluation of the engine, plus its final evaluation)."""

    def __init__(self, attacked: nn.Module, score: Callable[[torch.Tensor], torch.Tensor], bar=None):
        super().__init__()
        self.attacked, self.score, self.bar = attacked, score, bar
        self.best_value: torch.Tensor | None = None
        self.best_x: torch.Tensor | None = None
        self.history: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            xd = x.detach()
            s = self.score(xd).float()
            if self.best_value is None:
                self.best_value, self.best_x = s.clone(), xd.clone()
            else:
                better = s > self.best_value
                self.best_value = torch.where(better, s, self.best_value)
                self.best_x = torch.where(better.reshape(-1, *([1] * (xd.ndim - 1))), xd, self.best_x)
            self.history.append(self.best_value.cpu().clone())
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(best=f"{float(self.best_value.mean()):.4g}")
        return self.attacked(x)


@dataclass
class SuperResult:
    """S starts, T recorded steps.

    Attributes:
        starts: (S, C, H, W) start images; images: (S, C, H, W) the best image of each start.
        trajectory: (T, S) best-so-far clean response (T = steps + 1: every gradient evaluation and the last point).
        start_response, response: (S,) clean response of the starts and of the images.
        eps: the radius used (the L2 box diameter when none was given).
    """

    starts: torch.Tensor
    images: torch.Tensor
    trajectory: torch.Tensor
    start_response: torch.Tensor
    response: torch.Tensor
    eps: float
    norm: str


def start_images(kind: str, n: int, shape: tuple[int, int, int], images: torch.Tensor | None = None,
                 noise_sd: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, C, H, W) starts: ``noise`` = grey 0.5 plus Gaussian noise of ``noise_sd``, clipped to [0, 1];
    ``images`` = the first n of ``images``."""
    if kind not in STARTS:
        raise ValueError(f"{KEY}.start={kind!r} is not known: expected one of {list(STARTS)}")
    if int(n) != n or n < 1:
        raise ValueError(f"{KEY}.n_starts must be a whole number >= 1, got {n!r}")
    if kind == "images":
        if images is None or len(images) == 0:
            raise ValueError(f"{KEY}.start=images needs images: none were given")
        return images[:int(n)].detach().float().cpu().clone()
    return (0.5 + noise_sd * torch.randn((int(n), *shape), generator=generator)).clamp(0, 1)


def superstimulus(forward: nn.Module, starts: torch.Tensor, *, eps: float | None = None, norm: str = "l2",
                  steps: int = 200, step_size: float | None = None, jitter: int = 0, blur_sigma: float = 0.0,
                  generator: torch.Generator | None = None, victim: nn.Module | None = None,
                  progress: bool = True) -> SuperResult:
    """Maximize the mean response ``forward(x).mean(1)`` from each start (S, C, H, W) in [0, 1] with plain PGD
    (no random start); ``eps`` None = the L2 diameter of the box (see the module docstring)."""
    starts = starts.detach().float().cpu()
    diameter = math.sqrt(starts[0].numel())
    if eps is None:
        eps, norm = diameter, "l2"
    else:
        given, eps = eps, parse_eps_for(eps, norm, f"{KEY}.eps")  # a number or k/255
        if float(eps) > 0:
            check_eps_units(eps, norm, f"{KEY}.eps", given)  # Linf >= 1 refused, k/255 as L2 warned about
    if not (float(eps) > 0 and math.isfinite(float(eps))):
        raise ValueError(f"{KEY}.eps must be a number > 0 or null (no limit), got {eps!r}")
    device = device_of(forward)

    def score(x):
        return forward(x).flatten(1).mean(1)

    with tqdm(total=steps + 1, desc="super-stimulus", disable=not progress, leave=False) as bar:
        traj = Trajectory(Regularized(forward, jitter, blur_sigma, generator), score, bar)
        pgd_attack(traj, starts.to(device), objectives.MeanResponse("up"), eps=float(eps), norm=norm, steps=steps,
                   step_size=step_size, random_start=False, victim=victim or forward)
    images = traj.best_x.detach().float().cpu()
    return SuperResult(starts=starts, images=images, trajectory=torch.stack(traj.history),
                       start_response=responses(forward, starts).mean(1), response=responses(forward, images).mean(1),
                       eps=float(eps), norm=norm)


def evaluate(forward: nn.Module, natural_images: torch.Tensor, out_dir: str | os.PathLike, *, start: str = "noise",
             n_starts: int = 4, noise_sd: float = 0.1, eps: float | None = None, norm: str = "l2", steps: int = 200,
             step_size: float | None = None, jitter: int = 0, blur_sigma: float = 0.0, seed: int | None = 0,
             victim: nn.Module | None = None, prefix: str = "eval/control/superstimulus", batch_size: int = 64,
             progress: bool = True) -> dict:
    """Super-stimuli from ``start`` (``noise`` or the first ``natural_images``), compared with the best natural image
    (the highest mean response over ``natural_images``). Writes ``superstimuli.png`` (start, super-stimulus, the
    amplified change), ``superstimulus_trajectory.csv`` and ``.png``. Keys ``{prefix}/response`` (mean over starts),
    ``start_response``, ``best_natural``, ``above_best_natural_sd`` (``(response - best natural) / sd`` over the
    natural images), ``fraction_above_best_natural``, ``eps``."""
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    starts = start_images(start, n_starts, tuple(natural_images.shape[1:]), natural_images, noise_sd, gen)
    res = superstimulus(forward, starts, eps=eps, norm=norm, steps=steps, step_size=step_size, jitter=jitter,
                        blur_sigma=blur_sigma, generator=gen, victim=victim, progress=progress)
    nat = responses(forward, natural_images, batch_size).mean(1)
    best, sd = float(nat.max()), spread(nat)
    out_dir = Path(out_dir)
    T, S = res.trajectory.shape
    write_csv(out_dir / "superstimulus_trajectory.csv",
              [{"step": t, "start": s, "best_so_far": float(res.trajectory[t, s])} for t in range(T) for s in range(S)])
    curve_figure([{"title": f"{start} start, {res.norm} eps {res.eps:.3g}" + (f", jitter {jitter}px" if jitter else "")
                   + (f", blur {blur_sigma}px" if blur_sigma else ""), "xlabel": "gradient evaluations",
                   "ylabel": "mean response (best so far)",
                   "curves": [{"x": list(range(T)), "y": res.trajectory[:, s].tolist(), "label": f"start {s}",
                               "style": "-"} for s in range(S)],
                   "hlines": [{"y": best, "label": "best natural image"}]}],
                 out_dir / "superstimulus_trajectory.png", title="super-stimulus")
    image_grid_figure([("start", res.starts.numpy()), ("super-stimulus", res.images.numpy()),
                       ("change (ampl.)", amplified((res.images - res.starts).numpy()))],
                      out_dir / "superstimuli.png",
                      row_labels=[f"{float(a):.3g} -> {float(b):.3g}" for a, b in zip(res.start_response, res.response)])
    final = float(res.response.mean())
    return {f"{prefix}/response": final, f"{prefix}/start_response": float(res.start_response.mean()),
            f"{prefix}/best_natural": best,
            f"{prefix}/above_best_natural_sd": (final - best) / sd if sd > 0 else math.nan,
            f"{prefix}/fraction_above_best_natural": float((res.response > best).float().mean()),
            f"{prefix}/eps": res.eps, f"{prefix}/steps": float(steps)}


__all__ = ["superstimulus", "evaluate", "Regularized", "Trajectory", "SuperResult", "start_images"]

"""Per-row attack objectives. The engine MAXIMIZES them.

An objective is a callable ``objective(outputs, rows) -> (B,)``:

- ``outputs``: (B, K) model outputs (logits, unit or voxel responses) of the attacked batch;
- ``rows``: (B,) LongTensor, for each row of the batch the index of the input row it came from
  (the engine stacks restarts along the batch axis, so row ``b`` of the batch is a copy of input
  row ``rows[b]``). Per-input quantities (labels, unit indices, targets) are looked up with it.

Each row's value depends only on that row's outputs, so one backward pass of ``value.sum()``
gives every row its own gradient (models run in eval mode: no batch statistics).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_DIRECTIONS = {"up": 1.0, "+": 1.0, "+1": 1.0, "down": -1.0, "-": -1.0, "-1": -1.0}


def direction_sign(direction: str | int | float | torch.Tensor) -> float | torch.Tensor:
    """``"up"`` -> +1, ``"down"`` -> -1; numbers keep their sign; a tensor of +/-1 per row passes through."""
    if isinstance(direction, torch.Tensor):
        if direction.ndim == 0:
            return float(direction.sign().item())
        return direction.sign().float()
    if isinstance(direction, (int, float)):
        if direction == 0:
            raise ValueError("direction 0 has no sign: use 'up' (+1) or 'down' (-1)")
        return 1.0 if direction > 0 else -1.0
    key = str(direction).lower()
    if key not in _DIRECTIONS:
        raise ValueError(f"direction {direction!r} is not known: expected 'up' or 'down' (or +1 / -1)")
    return _DIRECTIONS[key]


def _take(value: torch.Tensor | float, rows: torch.Tensor, like: torch.Tensor):
    """Per-input ``value`` (N, ...) looked up for each batch row; scalars pass through."""
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        return value
    return value.to(like.device)[rows.to(like.device)]


def _check_2d(outputs: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1); (B, ...) -> (B, K)."""
    if outputs.ndim == 1:
        return outputs[:, None]
    return outputs if outputs.ndim == 2 else outputs.flatten(1)


class Objective:
    """Base class of per-row objectives: ``__call__(outputs (B, K), rows (B,)) -> (B,)``."""

    def __call__(self, outputs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class CrossEntropy(Objective):
    """Untargeted attack: ``CE(logits, y)`` per row (maximized). ``labels``: (N,) LongTensor."""

    def __init__(self, labels: torch.Tensor):
        self.labels = torch.as_tensor(labels).long()

    def __call__(self, outputs, rows):
        outputs = _check_2d(outputs)
        return F.cross_entropy(outputs, _take(self.labels, rows, outputs), reduction="none")


class TargetClass(Objective):
    """Targeted attack: ``log softmax(logits)[t]`` per row (maximized). ``targets``: (N,) or an int."""

    def __init__(self, targets: torch.Tensor | int):
        self.targets = torch.as_tensor(targets).long()

    def __call__(self, outputs, rows):
        outputs = _check_2d(outputs)
        t = _take(self.targets, rows, outputs)
        if not isinstance(t, torch.Tensor) or t.ndim == 0:
            t = torch.full((outputs.shape[0],), int(t), device=outputs.device, dtype=torch.long)
        return F.log_softmax(outputs, dim=1).gather(1, t[:, None])[:, 0]


class Unit(Objective):
    """One unit's response pushed up or down: ``sign * h_i(x)`` per row.

    Args:
        index: the unit, an int or a (N,) LongTensor (one unit per input row: many units share a batch).
        direction: "up" / "down" (or +1 / -1), or a (N,) tensor of +/-1 per input row.
    """

    def __init__(self, index: int | torch.Tensor, direction: str | int | torch.Tensor = "up"):
        self.index = torch.as_tensor(index).long()
        self.sign = direction_sign(direction)

    def __call__(self, outputs, rows):
        outputs = _check_2d(outputs)
        idx = _take(self.index, rows, outputs)
        if not isinstance(idx, torch.Tensor) or idx.ndim == 0:
            h = outputs[:, int(idx)]
        else:
            h = outputs.gather(1, idx[:, None])[:, 0]
        return _take(self.sign, rows, outputs) * h


class MeanResponse(Objective):
    """A region's mean response pushed up or down: ``sign * mean_k h_k(x)`` per row."""

    def __init__(self, direction: str | int | torch.Tensor = "up"):
        self.sign = direction_sign(direction)

    def __call__(self, outputs, rows):
        outputs = _check_2d(outputs)
        return _take(self.sign, rows, outputs) * outputs.mean(dim=1)


class MSEToTarget(Objective):
    """Drive the response towards a target: ``-mean_k (h_k(x) - t_k)^2`` per row.

    ``target``: (K,) (one target for all rows) or (N, K) (one per input row).
    """

    def __init__(self, target: torch.Tensor):
        self.target = torch.as_tensor(target).float()

    def __call__(self, outputs, rows):
        outputs = _check_2d(outputs)
        t = self.target.to(outputs.device)
        if t.ndim == 2:
            t = t[rows.to(outputs.device)]
        return -((outputs - t) ** 2).mean(dim=1)


class ResponseChange(Objective):
    """Move the whole response away from a reference: ``+mean_k ((h_k(x) - r_k) / s_k)^2`` per row.

    The untargeted attack on neural outputs (transfer of response changes, population sensitivity);
    ``reference``: (N, K), usually the clean response. ``scale``: None (``s_k = 1``) or (K,) per-unit scales
    ``s_k > 0``, e.g. each unit's std over clean images (Lonngqvist et al.'s population change
    ``||(r(x + d) - r(x)) / sigma||_2 = sqrt(K * value)``). Its gradient is zero at the reference: use a random
    start.
    """

    def __init__(self, reference: torch.Tensor, scale: torch.Tensor | None = None):
        self.reference = torch.as_tensor(reference).float()
        self.scale = None
        if scale is not None:
            self.scale = torch.as_tensor(scale).float().flatten()
            if not bool(torch.isfinite(self.scale).all()) or bool((self.scale <= 0).any()):
                raise ValueError(f"ResponseChange scale: expected finite per-unit scales > 0, got min "
                                 f"{float(self.scale.min()):g}; leave out units with zero std")

    def __call__(self, outputs, rows):
        outputs = _check_2d(outputs)
        r = self.reference.to(outputs.device)
        if r.ndim == 2:
            r = r[rows.to(outputs.device)]
        diff = outputs - r
        if self.scale is not None:
            if self.scale.numel() != diff.shape[1]:
                raise ValueError(f"ResponseChange scale has {self.scale.numel()} values for {diff.shape[1]} units")
            diff = diff / self.scale.to(outputs.device)
        return (diff ** 2).mean(dim=1)


class UnitMSEToTarget(Objective):
    """One unit driven towards a target value: ``-(h_i(x) - t)^2`` per row (Guo et al. sec. 3.1 attack
    the IT model's site ``i`` with ``MSE(r_i(x + d), +1000)`` or ``MSE(r_i(x + d), -1000)``).

    Args:
        index: the unit, an int or a (N,) LongTensor (one unit per input row).
        target: a float or a (N,) tensor (one target per input row).
    """

    def __init__(self, index: int | torch.Tensor, target: float | torch.Tensor):
        self.index = torch.as_tensor(index).long()
        self.target = torch.as_tensor(target).float()

    def __call__(self, outputs, rows):
        outputs = _check_2d(outputs)
        idx = _take(self.index, rows, outputs)
        h = outputs[:, int(idx)] if not isinstance(idx, torch.Tensor) or idx.ndim == 0 else \
            outputs.gather(1, idx[:, None])[:, 0]
        return -(h - _take(self.target, rows, outputs)) ** 2

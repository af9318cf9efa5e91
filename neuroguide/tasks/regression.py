"""What the regression tasks share (predictor, it_encoding, encoding).

Each validation/test batch's predictions and targets are kept; at the end of the epoch they are
gathered across devices and scored once on the whole split (per-output Pearson r through
:mod:`neuroguide.metrics`), since a median of per-batch correlations is not the split's correlation.
"""
from __future__ import annotations

import torch

from neuroguide.tasks.base import Task


class RegressionTask(Task):
    """Subclasses define ``objective(pred, target) -> {"loss", ...}`` (what is minimised; ``val_loss_key``
    names the term logged as ``<split>/loss``) and ``log_scores(split, pred, target)`` for a whole split."""

    val_loss_key = "loss"
    min_scored = 2  # fewer samples than this on a split: no scores

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._preds: dict[str, list] = {"val": [], "test": []}

    def objective(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def eval_target(self, target: torch.Tensor) -> torch.Tensor:
        """What ``objective`` compares the predictions with on validation/test batches (default: the target)."""
        return target

    def log_scores(self, split: str, pred: torch.Tensor, target: torch.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.objective(self.model(x), y)
        for k, v in out.items():
            self.log(f"train/{k}", v, on_step=False, on_epoch=True, batch_size=len(x), prog_bar=k == "loss")
        return out["loss"]

    def _eval_step(self, split: str, batch) -> None:
        x, y = batch
        pred = self.model(x)
        loss = self.objective(pred, self.eval_target(y))[self.val_loss_key]
        self.log(f"{split}/loss", loss, on_epoch=True, batch_size=len(x), sync_dist=True)
        self._preds[split].append((pred.detach().cpu(), y.detach().cpu()))

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch)

    def _eval_end(self, split: str) -> None:
        items, self._preds[split] = self._preds[split], []
        if not items:
            return
        pred, target = torch.cat([p for p, _ in items]), torch.cat([t for _, t in items])
        if self.trainer.world_size > 1:
            pred, target = (unpad_gathered(self.all_gather(t), self._split_size(split)) for t in (pred, target))
        if len(pred) >= self.min_scored:
            self.log_scores(split, pred, target)

    def _split_size(self, split: str) -> int | None:
        loaders = self.trainer.val_dataloaders if split == "val" else self.trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        return len(loader.dataset) if loader is not None and hasattr(loader, "dataset") else None

    def on_validation_epoch_end(self):
        self._eval_end("val")

    def on_test_epoch_end(self):
        self._eval_end("test")


def unpad_gathered(x: torch.Tensor, n: int | None) -> torch.Tensor:
    """(W, n_local, ...) per-rank results of an unshuffled ``DistributedSampler`` (rank r holds the samples
    r, r + W, r + 2W, ... of the split, padded by repeating the first ones up to W * n_local) -> (n, ...) in the
    split's order, each sample once (a padded duplicate would count twice in a per-voxel r)."""
    x = x.transpose(0, 1).flatten(0, 1)
    return (x if n is None else x[:n]).cpu()

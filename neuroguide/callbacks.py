"""``ExactResume``: a run killed and rerun (resumed from ``last.ckpt``) ends as if never killed.

What a resumed run needs beyond the weights, optimizer and loop counters Lightning restores:

- the same random numbers: before every training batch the global generators (Python, numpy, torch
  CPU and GPU) are seeded from (seed, epoch, batch index, rank), so what a training step draws (PGD
  random starts of adversarial training, dropout) depends on where the step is, not on what ran
  before it (the requirements trained in the same process, a sanity check, validation, how Lightning
  restarts its loops: a resumed run creates the epoch's data iterator, which draws from the global
  generator, before ``on_train_epoch_start``, an uninterrupted one after it; seeding per epoch was not
  enough). The augmentations are seeded per sample by the training loader
  (:mod:`neuroguide.data.loaders`), so data-loader workers need nothing from here;
- the metrics logged before the kill: loggers that can resume (:class:`neuroguide.loggers.CSVLogger`)
  keep their file's rows up to the checkpoint (and drop the rows logged after it, which the resumed
  run logs again); a run that starts from scratch starts a fresh file.

``neuroguide.train.run`` always adds it (also with ``callbacks=none``): it changes no number of an
uninterrupted run's steps but their random draws. Checkpoints are written at the end of an epoch
(after validation), which is where a resumed run starts.

``AtomicCheckpointIO``: how every Lightning checkpoint (``last.ckpt``, ``best.ckpt``) is written, also added
always. Lightning's own writer stages the file in the system's temporary folder and moves it, across file
systems, under its final name: a disk that fills during the copy leaves a partial checkpoint under that name
(which a rerun then fails to resume from). Here the checkpoint is written by
:func:`neuroguide.models.checkpoints.save_torch`: checked against the free space first, written beside its
final name and renamed, a full disk one :class:`~neuroguide.utils.io.DiskFull` error.
"""
from __future__ import annotations

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO

from neuroguide.utils.seeding import derive_seed, seed_all


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        from neuroguide.models.checkpoints import save_torch

        save_torch(checkpoint, path)


class ExactResume(L.Callback):
    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        seed_all(derive_seed(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._resumed = False

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn == "fit":  # resuming (not validate/test of the best checkpoint)
            self._resumed = True
            for lg in trainer.loggers:
                if hasattr(lg, "resume_at"):
                    lg.resume_at(int(checkpoint.get("global_step", 0)))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not getattr(self, "_resumed", False):  # from scratch: no rows of an earlier run in the logs
            for lg in trainer.loggers:
                if hasattr(lg, "resume_at"):
                    lg.resume_at(None)

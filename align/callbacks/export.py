"""Export the policy in diffusers format whenever a checkpoint is written and when training ends."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from align.callbacks.run_dir import run_dir
from align.callbacks.survival import assert_finite_weights, replace_dir_atomically

log = logging.getLogger(__name__)


class DiffusersExport(L.Callback):
    """Writes ``<run>/export/step-<N>`` at each checkpoint (if ``on_checkpoint``) and ``<run>/export/final``.

    A full fine-tune exports a whole pipeline directory (StableDiffusion(XL)Pipeline.from_pretrained loads it
    as is); a LoRA run exports the adapter file that ``pipeline.load_lora_weights`` reads. A checkpoint
    written after ``final`` at the same step (ModelCheckpoint's ``save_last`` runs its ``on_train_end`` after
    this callback's) exports nothing: the weights are ``final``'s, and the run's summary names ``final``.
    """

    def __init__(self, dirpath: str | None = None, on_checkpoint: bool = True):
        self.dirpath, self.on_checkpoint = dirpath, on_checkpoint
        self.last_export: Path | None = None
        self._final_step: int | None = None
        self._step: int | None = None  # of the last checkpoint export

    def _root(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else run_dir(trainer) / "export"

    def _export(self, trainer: L.Trainer, pl_module, name: str) -> None:
        root = self._root(trainer)  # every rank calls it: run_dir broadcasts
        assert_finite_weights(pl_module, f"the export {name}")
        if trainer.is_global_zero:
            replace_dir_atomically(root / name, pl_module.export)  # never half-written
            self.last_export = root / name
            log.info("exported %s", self.last_export)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # ModelCheckpoint saves step-N.ckpt and last.ckpt at the same step: one export for both
        if self.on_checkpoint and trainer.global_step not in (self._final_step, self._step):
            self._export(trainer, pl_module, f"step-{trainer.global_step}")
            self._step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self._export(trainer, pl_module, "final")
        self._final_step = trainer.global_step

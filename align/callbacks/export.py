"""Export the policy in diffusers format whenever a checkpoint is written and when training ends."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import lightning as L
import yaml

from align.callbacks.run_dir import broadcast, refuse_fsdp, run_dir
from align.callbacks.survival import assert_finite_weights, replace_dir_atomically
from align.models.export_dtype import cast_export
from align.models.export_dtype import export_dtype as export_dtype_of
from align.models.model_card import write_model_card

log = logging.getLogger(__name__)


def write_export(module, out: Path, dtype: str, config: dict, metrics: dict | None = None) -> None:
    """``module.export`` in ``dtype`` with a model card,
    written beside ``out`` and renamed into place."""

    def write(folder: Path) -> None:
        module.export(folder)
        cast_export(folder, dtype)
        lora = getattr(module, "hparams", {}).get("lora_rank", 0) > 0
        write_model_card(folder, config, metrics, lora=lora)

    replace_dir_atomically(out, write)


def run_config(trainer) -> dict:
    """The run's resolved config (``<run>/config.yaml``, written by ``align fit``), or {}."""
    if getattr(trainer, "strategy", None) is None:
        return {}
    path = run_dir(trainer) / "config.yaml"  # every rank: run_dir broadcasts
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The one-number entries of ``trainer.callback_metrics``, as floats."""
    return {k: float(v) for k, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


class DiffusersExport(L.Callback):
    """Writes ``<run>/export/step-<N>`` at each checkpoint
    (if ``on_checkpoint``) and ``<run>/export/final``.

    A full fine-tune exports a whole pipeline directory (StableDiffusion(XL)Pipeline.from_pretrained
    loads it as is, with the base's scheduler); a LoRA run exports the adapter file that
    ``load_lora_weights`` reads. ``export_dtype``: fp32 (what training holds), fp16 or bf16.
    ``keep``: the newest step exports kept (None: all). One export per step: a second checkpoint at
    the same step (``last.ckpt``) exports nothing, and a ``final`` at the step of the newest step
    export is that export, renamed.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        on_checkpoint: bool = True,
        export_dtype: str = "fp32",
        keep: int | None = 2,
    ):
        export_dtype_of(export_dtype)  # an unknown dtype fails when the run starts
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 (or None for every export), got {keep}")
        self.dirpath, self.on_checkpoint = dirpath, on_checkpoint
        self.export_dtype, self.keep = export_dtype, keep
        self.last_export: Path | None = None
        self._final_step: int | None = None
        self._step: int | None = None  # of the last checkpoint export

    def _root(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else run_dir(trainer) / "export"

    def _export(self, trainer: L.Trainer, pl_module, name: str) -> Path:
        """Every rank calls it (run_dir broadcasts); rank 0 writes. Returns the export root."""
        root = self._root(trainer)
        config = run_config(trainer)
        assert_finite_weights(pl_module, f"the export {name}")
        if trainer.is_global_zero:
            metrics = scalar_metrics(getattr(trainer, "callback_metrics", {}))
            write_export(pl_module, root / name, self.export_dtype, config, metrics)
            self.last_export = root / name
            log.info("exported %s", self.last_export)
        return root

    def _prune(self, root: Path) -> None:
        steps = sorted(root.glob("step-*"), key=lambda p: int(p.name.removeprefix("step-")))
        for old in steps[: -self.keep] if self.keep else []:
            shutil.rmtree(old, ignore_errors=True)

    def setup(self, trainer, pl_module, stage) -> None:
        refuse_fsdp(trainer, self)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # ModelCheckpoint saves step-N.ckpt and last.ckpt at the same step: one export for both
        if self.on_checkpoint and trainer.global_step not in (self._final_step, self._step):
            root = self._export(trainer, pl_module, f"step-{trainer.global_step}")
            self._step = trainer.global_step
            if trainer.is_global_zero:
                self._prune(root)

    def on_train_end(self, trainer, pl_module) -> None:
        root = self._root(trainer)  # every rank: run_dir broadcasts
        newest = root / f"step-{trainer.global_step}"
        # the same weights: no second copy (rank 0 decides: other nodes may not see the folder)
        if broadcast(trainer, self._step == trainer.global_step and newest.is_dir()):
            if trainer.is_global_zero:
                replace_dir_atomically(root / "final", lambda folder: os.replace(newest, folder))
                self.last_export = root / "final"
                log.info(
                    "exported %s (the step-%d export, renamed)",
                    self.last_export,
                    trainer.global_step,
                )
        else:
            self._export(trainer, pl_module, "final")
        self._final_step = trainer.global_step

"""Tell the user, at the end of a run, where everything it wrote is and how to look at it."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from align.callbacks.export import DiffusersExport
from align.callbacks.run_dir import run_dir


class ArtifactSummary(L.Callback):
    """Prints the run directory, resolved config, checkpoints,
    diffusers export and wandb run at fit end."""

    def on_fit_end(self, trainer, pl_module) -> None:
        root = run_dir(trainer)
        if not trainer.is_global_zero:
            return
        lines = [f"run directory:     {root}"]
        if (root / "config.yaml").exists():
            lines.append(f"resolved config:   {root / 'config.yaml'}")
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and (cb.last_model_path or cb.best_model_path):
                lines.append(f"checkpoint:        {cb.last_model_path or cb.best_model_path}")
            if isinstance(cb, DiffusersExport) and cb.last_export:
                lines.append(f"diffusers export:  {cb.last_export}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                wandb_dir = Path(logger.experiment.dir).parent
                lines.append(f"wandb run:         {wandb_dir}")
                lines.append(
                    f"  view it:         wandb sync {wandb_dir}   (uploads the offline run; then "
                    "open the printed URL)"
                )
            elif getattr(logger, "log_dir", None):
                lines.append(f"{type(logger).__name__}:  {logger.log_dir}")
        print("\n".join(["", "=" * 80, "align: run finished", *lines, "=" * 80]), flush=True)

"""What a run says on screen: one line when training starts, and at the end what the held-out
metrics did and where everything it wrote is."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from align.callbacks.export import DiffusersExport, scalar_metrics
from align.callbacks.run_dir import run_dir

# the held-out metrics worth a newcomer's look, in this order, when the method logs them
HEADLINE = (
    "val/loss",
    "val/implicit_acc",
    "val/reward_margin",
    "val/reward_desirable",
    "val/reward_undesirable",
    "val/accuracy",
)


class ArtifactSummary(L.Callback):
    """Prints the model and run directory at the start; at fit end, the held-out metrics before
    the first step and after the last (the same validation batches, noise and timesteps), and the
    run directory, resolved config, checkpoints, diffusers export and wandb run.

    The "before" values come from Lightning's sanity check (set ``num_sanity_val_steps: -1`` to
    run the whole validation set there); they are also logged at step 0, so the curves start there.
    """

    def __init__(self) -> None:
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}
        self.before_step = 0

    def on_validation_end(self, trainer, pl_module) -> None:
        metrics = scalar_metrics(trainer.callback_metrics)
        metrics = {k: v for k, v in metrics.items() if k.startswith("val/")}
        if not trainer.sanity_checking:
            self.after = metrics
            return
        self.before, self.before_step = metrics, trainer.global_step
        if metrics and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_start(self, trainer, pl_module) -> None:
        root = run_dir(trainer)  # every rank: it broadcasts
        if not trainer.is_global_zero:
            return
        params = list(pl_module.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        model = pl_module.hparams.get("model")
        steps = f"{trainer.max_steps} steps" if trainer.max_steps > 0 else "no step limit"
        print(
            f"align: training {type(pl_module).__name__}"
            + (f" on {model}" if model else "")
            + f": {get_human_readable_count(trainable)} trainable of "
            f"{get_human_readable_count(sum(p.numel() for p in params))} parameters, {steps}, "
            f"run directory {root}",
            flush=True,
        )

    def learning_lines(self) -> list[str]:
        """``val/implicit_acc   0.500 -> 0.875`` for each headline metric measured both times."""
        names = [k for k in HEADLINE if k in self.before and k in self.after]
        if not names:
            return []
        lines = [f"held-out metrics:  step {self.before_step} -> end"]
        lines += [f"  {k:<24}{self.before[k]:>9.4g} -> {self.after[k]:.4g}" for k in names]
        return lines

    def on_fit_end(self, trainer, pl_module) -> None:
        root = run_dir(trainer)
        if not trainer.is_global_zero:
            return
        lines = [*self.learning_lines(), f"run directory:     {root}"]
        if (root / "config.yaml").exists():
            lines.append(f"resolved config:   {root / 'config.yaml'}")
        for cb in trainer.callbacks:
            saved = isinstance(cb, ModelCheckpoint) and (cb.last_model_path or cb.best_model_path)
            if saved:
                lines.append(f"checkpoint:        {short(saved)}")
            if isinstance(cb, DiffusersExport) and cb.last_export:
                lines.append(f"diffusers export:  {cb.last_export}")
        images = root / "images"
        if images.is_dir():
            lines.append(f"images:            {images}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                wandb_dir = Path(logger.experiment.dir).parent
                lines.append(f"wandb run:         {wandb_dir}")
                lines.append(f"  upload it:       wandb sync {wandb_dir}")
            elif getattr(logger, "log_dir", None):
                lines.append(f"{type(logger).__name__ + ':':<19}{logger.log_dir}")
        print("\n".join(["", "=" * 80, "align: run finished", *lines, "=" * 80]), flush=True)


def short(path: str) -> str:
    """``path`` relative to the working directory when it lies below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative

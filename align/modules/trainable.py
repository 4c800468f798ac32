"""What every trained module here shares (``DiffusionModule``, ``PreferenceModelModule``): the
injected optimizer and scheduler, metric logging, the gradient norm and the data pipeline's skip
counts in the logs.
"""

from __future__ import annotations

from collections import Counter

import lightning as L
import torch

from align.modules.frozen import trainable_parameters


class TrainableModule(L.LightningModule):
    """Subclasses set ``optimizer_factory`` and ``scheduler_factory`` (LightningCLI's callables)."""

    prog_bar_metrics: tuple[str, ...] = ("loss",)  # shown in the progress bar

    def __init__(self):
        super().__init__()
        self._skipped: Counter[str] = Counter()

    def log_metrics(self, prefix: str, metrics: dict[str, torch.Tensor], batch_size: int) -> None:
        """``<prefix>/<name>`` for each metric; outside training reduced over ranks."""
        sync = prefix != "train"
        for name, value in metrics.items():
            bar = name in self.prog_bar_metrics
            self.log(f"{prefix}/{name}", value, prog_bar=bar, batch_size=batch_size, sync_dist=sync)

    def log_skipped(self, batch: dict) -> None:
        """Running totals of samples skipped by the data pipeline, by reason
        (``train/skipped/<reason>``)."""
        self._skipped.update(batch.get("skipped", {}))
        for reason, total in self._skipped.items():
            self.log(f"train/skipped/{reason}", float(total), reduce_fx="max")

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in trainable_parameters(self) if p.grad is not None]
        if grads:
            # one foreach pass, not a norm per tensor
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(trainable_parameters(self))
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"},
        }

"""A progress bar in optimizer steps of the run.

Lightning's bar counts batches of the current epoch and titles it ``Epoch 1/-2`` when a run is
bounded by ``max_steps`` (every align config): this one counts ``global_step`` up to ``max_steps``
and names the epoch beside it.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf


class StepProgressBar(TQDMProgressBar):
    """``step 37/40 · epoch 1`` with the logged progress-bar metrics after it."""

    def on_train_epoch_start(self, trainer, *_) -> None:
        if trainer.max_steps is None or trainer.max_steps < 0:
            return super().on_train_epoch_start(trainer, *_)
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:  # the first epoch: one bar for the whole run
            bar.reset(total=convert_inf(trainer.max_steps))
            bar.initial = 0
        bar.n = trainer.global_step
        bar.set_description(self.description(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps is None or trainer.max_steps < 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        if bar is None or bar.disable or not self._should_update(trainer.global_step, bar.total):
            return
        bar.n = trainer.global_step
        bar.set_description(self.description(trainer), refresh=False)
        bar.set_postfix(self.get_metrics(trainer, pl_module))

    @staticmethod
    def description(trainer) -> str:
        return f"step {trainer.global_step}/{trainer.max_steps} · epoch {trainer.current_epoch}"

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the run is named in the summary; a logger id here is noise
        return metrics

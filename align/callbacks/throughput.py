"""Samples per second, measured between batch starts: what the GPU was fed,
including data loading."""

from __future__ import annotations

import time

import lightning as L


class Throughput(L.Callback):
    """Logs ``train/samples_per_sec`` (pairs or images per second on this rank) and
    ``train/step_time``."""

    def __init__(self, window: int = 20):
        self.window = window
        self._times: list[float] = []
        self._sizes: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._times.append(time.perf_counter())
        self._sizes.append(len(batch["caption"]) if "caption" in batch else 0)
        self._times, self._sizes = self._times[-self.window - 1 :], self._sizes[-self.window - 1 :]
        if len(self._times) > 1:
            elapsed = self._times[-1] - self._times[0]
            pl_module.log("train/samples_per_sec", sum(self._sizes[:-1]) / elapsed)
            pl_module.log("train/step_time", elapsed / (len(self._times) - 1))

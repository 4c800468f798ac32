"""Throughput: Lightning's ``ThroughputMonitor`` counting a batch's captions as its samples."""

from __future__ import annotations

import warnings

from lightning.pytorch.callbacks import ThroughputMonitor

# FLOPs per step are `align bench`'s (measured per model), not the monitor's: no warning each run
warnings.filterwarnings("ignore", message="When using the `ThroughputMonitor`")


def caption_count(batch: dict) -> int:
    """Samples in a batch: its captions (pairs for DPO, images for KTO and SFT, prompts for RL)."""
    return len(batch.get("caption", ()))


class Throughput(ThroughputMonitor):
    """Logs ``train/device/samples_per_sec`` and ``train/device/batches_per_sec`` (rank 0; with
    several ranks also ``train/samples_per_sec`` and ``train/batches_per_sec``, all ranks) over the
    last ``window`` steps, data loading included."""

    def __init__(self, window: int = 20):
        super().__init__(batch_size_fn=caption_count, window_size=window, separator="/")
